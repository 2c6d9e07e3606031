//! The loopback demo: two ztunnels ("node-a" and "node-b") in one process on 127.0.0.0/8, a
//! client workload on node-a and an echo workload on node-b. Shows a connection carried over
//! HBONE with both SPIFFE identities, a policy denial, and the metrics Istio dashboards read.
//!
//! Run: `cargo run -p ztunnel --example loopback_demo` (add `-- --check` to exit non-zero if any
//! step's outcome is wrong).

#[path = "../tests/common/mod.rs"]
mod common;

use std::process::ExitCode;

use common::*;

struct Steps {
    passed: u32,
    failed: u32,
}

impl Steps {
    fn check(&mut self, what: &str, ok: bool) {
        if ok {
            self.passed += 1;
            println!("  [ok]   {what}");
        } else {
            self.failed += 1;
            println!("  [FAIL] {what}");
        }
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    let check_mode = std::env::args().any(|a| a == "--check");
    // Quiet logs (warnings only); access-log events are still captured for step 1.
    let _ = zmesh_core::telemetry::init_logging("warn", false, None);
    let logs = zmesh_core::telemetry::capture_access_logs();
    let mut steps = Steps {
        passed: 0,
        failed: 0,
    };

    println!("== zmesh loopback demo: two ztunnels, mutual TLS, HBONE, L4 policy ==\n");
    let mesh = Mesh::start("").await;
    println!(
        "ztunnel A (node-a): SOCKS5 {}, HBONE {}",
        mesh.a.addrs.socks5.unwrap(),
        mesh.a.addrs.hbone.unwrap()
    );
    println!("ztunnel B (node-b): HBONE {}", mesh.b.addrs.hbone.unwrap());
    println!("workloads: client {CLIENT_IP} on node-a ({CLIENT_ID})");
    println!("           echo   {} on node-b ({ECHO_ID})\n", mesh.echo);

    println!("1. client -> echo, through ztunnel A's SOCKS5 port, tunnelled to ztunnel B");
    let socks = mesh.a.addrs.socks5.unwrap();
    match socks_connect(socks, ip(CLIENT_IP), mesh.echo).await {
        Ok(mut s) => {
            let ok = roundtrip(&mut s, b"hello through the mesh").await.is_ok();
            steps.check("the echo server answered through the tunnel", ok);
        }
        Err(code) => steps.check(&format!("tunnel opened (SOCKS5 reply {code:#04x})"), false),
    }
    eventually_quiet(|| logs.lines().iter().any(|l| l["direction"] == "inbound")).await;
    let lines = logs.lines();
    let inbound = lines.iter().find(|l| l["direction"] == "inbound");
    if let Some(l) = inbound {
        println!(
            "   B's access log: src.identity={} dst.identity={} bytes_recv={}",
            l["src.identity"], l["dst.identity"], l["bytes_recv"]
        );
    }
    steps.check(
        "the destination saw the client's SPIFFE identity",
        inbound.is_some_and(|l| l["src.identity"] == CLIENT_ID && l["dst.identity"] == ECHO_ID),
    );
    println!(
        "   on the wire between the nodes: TLS 1.3 (ALPN h2) to port {}, one HTTP/2 CONNECT stream per connection",
        mesh.b.addrs.hbone.unwrap().port()
    );

    println!("\n2. an AuthorizationPolicy denying the client's namespace, applied live");
    mesh.apply_both(
        "policies:\n- name: deny-client-ns\n  namespace: server-ns\n  action: Deny\n  rules:\n  - - - namespaces: [{exact: client-ns}]\n",
    );
    let denied = socks_connect(socks, ip(CLIENT_IP), mesh.echo).await;
    steps.check(
        "a new connection from client-ns is refused (HBONE 401 -> SOCKS5 'not allowed')",
        denied.err() == Some(0x02),
    );
    match socks_connect(socks, ip(OTHER_IP), mesh.echo).await {
        Ok(mut s) => steps.check(
            "other-ns is still allowed",
            roundtrip(&mut s, b"hi").await.is_ok(),
        ),
        Err(_) => steps.check("other-ns is still allowed", false),
    }

    println!("\n3. metrics on ztunnel B (Istio names and labels)");
    let text = mesh.b.metrics().encode();
    for line in text.lines().filter(|l| {
        (l.starts_with("istio_tcp_connections_opened_total{")
            || l.starts_with("istio_tcp_connections_failed_total{"))
            && l.contains("reporter=\"destination\"")
    }) {
        let labels = line
            .split_once('{')
            .and_then(|(_, rest)| rest.rsplit_once('}'))
            .map(|(l, _)| l)
            .unwrap_or_default();
        let short: Vec<&str> = labels
            .split(',')
            .filter(|kv| {
                [
                    "source_principal",
                    "destination_principal",
                    "response_flags",
                    "connection_security_policy",
                ]
                .iter()
                .any(|k| kv.starts_with(k))
            })
            .collect();
        let name = line.split('{').next().unwrap_or_default();
        let value = line.rsplit(' ').next().unwrap_or_default();
        println!("   {name}{{{}}} {value}", short.join(","));
    }
    steps.check(
        "the denial is counted with response_flags=DENY",
        metric_value(
            &text,
            "istio_tcp_connections_failed_total",
            &[("response_flags", "DENY")],
        ) == Some(1.0),
    );

    println!("\ndemo: {} passed, {} failed", steps.passed, steps.failed);
    if check_mode && steps.failed > 0 {
        return ExitCode::FAILURE;
    }
    ExitCode::SUCCESS
}

async fn eventually_quiet(mut f: impl FnMut() -> bool) {
    for _ in 0..100 {
        if f() {
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}
