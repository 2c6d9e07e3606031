//! `zmesh demo`: a guided tour on a local network-namespace cluster.
//!
//! The cluster is the end-to-end test harness (`zmesh_tests::Cluster`) with the
//! `ControllerSource`: `zmesh-controller` runs in the fabric netns on a directory of Kubernetes
//! YAML, and each node's ztunnel (real processes, real eBPF redirection) gets its config over
//! Delta ADS and its certificates from the controller's CA.
//!
//! ```text
//!  node0: productpage (shop, enrolled)   client (legacy, not enrolled)
//!  node1: reviews-v1, ratings, tcp-echo (shop, enrolled)   legacy-server (legacy)
//! ```
//!
//! Every step prints what happens and why, then one or more checks; `--check` turns a failed
//! check into a non-zero exit. The last line is always `demo: N passed, M failed`.

use std::io::{BufRead, Read, Write};
use std::net::{Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use zmesh_tests::{
    Cluster, ControllerSource, PodSpec, ServiceSpec, USE_WAYPOINT, contains, in_netns,
    pcap_tcp_port_packets,
};

/// Options of `zmesh demo`.
#[derive(clap::Args, Debug)]
pub struct DemoArgs {
    /// Exit non-zero if any step's outcome is wrong (for CI).
    #[arg(long)]
    pub check: bool,
    /// Keep the cluster running after the last step until Enter is pressed (to explore it).
    #[arg(long)]
    pub keep: bool,
}

/// How many checks passed and failed.
#[derive(Debug, Default)]
pub struct Outcome {
    pub passed: usize,
    pub failed: usize,
}

const T: Duration = Duration::from_secs(3);
const STEPS: usize = 8;
const WAYPOINT: &str = "waypoint";
const REVIEWS_VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 11);
const RATINGS_VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 12);
const TCP_ECHO_VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 13);
const HTTP_PORT: u16 = 9080;
const ECHO_PORT: u16 = 9000;
const POLICY_NAME: &str = "ratings-deny-reviews";

struct Report {
    outcome: Outcome,
}

impl Report {
    fn step(&self, n: usize, title: &str, why: &str) {
        println!("\n[{n}/{STEPS}] {title}");
        for line in why.lines() {
            println!("      {line}");
        }
    }
    fn show(&self, line: &str) {
        println!("        {line}");
    }
    fn check(&mut self, ok: bool, what: &str) -> bool {
        if ok {
            self.outcome.passed += 1;
            println!("    PASS  {what}");
        } else {
            self.outcome.failed += 1;
            println!("    FAIL  {what}");
        }
        ok
    }
    fn summary(&self) {
        println!(
            "\ndemo: {} passed, {} failed",
            self.outcome.passed, self.outcome.failed
        );
    }
}

/// Run the demo; `Err` only for problems outside the steps (not root, missing tools).
pub fn run(args: &DemoArgs) -> Result<Outcome> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!("zmesh demo needs root (network namespaces, eBPF): run with sudo");
    }
    for tool in ["ip", "tcpdump"] {
        if std::process::Command::new(tool).arg("-V").output().is_err() {
            bail!(
                "zmesh demo needs `{tool}` (Debian: apt-get install -y iproute2 tcpdump; or run scripts/setup.sh)"
            );
        }
    }
    let mut r = Report {
        outcome: Outcome::default(),
    };
    println!("zmesh demo: a 2-node mesh in network namespaces, fed by zmesh-controller");
    r.step(
        0,
        "build the cluster",
        "Two nodes, each with a ztunnel (eBPF redirection on), a controller serving a directory\n\
         of Kubernetes YAML: namespace `shop` is labelled istio.io/dataplane-mode=ambient,\n\
         namespace `legacy` is not. Each ztunnel gets its config over Delta ADS (TLS, :15012)\n\
         and its workload certificates from the controller's CA.",
    );
    let started = Instant::now();
    let mut cluster = match build() {
        Ok(c) => c,
        Err(e) => {
            r.check(false, &format!("cluster up: {e:#}"));
            r.summary();
            return Ok(r.outcome);
        }
    };
    show_cluster(&r, &cluster, started.elapsed());
    let synced =
        (0..2).all(|i| cluster.wait_log_line(i, T, |l| l.contains("xDS initial sync complete")));
    r.check(
        synced,
        "both ztunnels synced from the controller over ADS (TLS); shop pods captured",
    );

    let prefix = cluster.prefix.clone();
    let steps: [fn(&mut Report, &Cluster); 6] = [
        step1_shop_cross_node,
        step2_fabric_capture,
        step3_legacy_untouched,
        step4_legacy_to_shop,
        step5_policy,
        step6_metrics,
    ];
    for s in steps {
        s(&mut r, &cluster);
    }
    step7_waypoint(&mut r, &mut cluster);

    if args.keep {
        keep(&cluster);
    }
    r.step(
        8,
        "clean up",
        "Stop the ztunnels, the controller and the apps; delete the namespaces and the pinned\n\
         eBPF state.",
    );
    drop(cluster);
    let leftovers: Vec<String> = std::fs::read_dir("/run/netns")
        .map(|rd| {
            rd.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.starts_with(&prefix))
                .collect()
        })
        .unwrap_or_default();
    let bpf_left = std::fs::read_dir("/sys/fs/bpf")
        .map(|rd| {
            rd.flatten()
                .any(|e| e.file_name().to_string_lossy().starts_with(&prefix))
        })
        .unwrap_or(false);
    r.check(
        leftovers.is_empty() && !bpf_left,
        &format!("no network namespace or bpffs directory named {prefix}* is left"),
    );
    r.summary();
    Ok(r.outcome)
}

fn build() -> Result<Cluster> {
    let pod = |name: &str, ns: &str, node: usize, enrolled: bool, sa: &str| {
        let mut p = PodSpec::new(name, ns, node, enrolled);
        p.service_account = sa.into();
        p
    };
    let svc = |name: &str, vip: Ipv4Addr, port: u16, pods: &[&str]| ServiceSpec {
        name: name.into(),
        namespace: "shop".into(),
        vip,
        port,
        target_port: port,
        pods: pods.iter().map(|p| p.to_string()).collect(),
    };
    let mut c = Cluster::builder()
        .controller()
        .nodes(2)
        .pod(pod("productpage", "shop", 0, true, "productpage"))
        .pod(pod("client", "legacy", 0, false, "client"))
        .pod(pod("reviews-v1", "shop", 1, true, "reviews").version("v1"))
        .pod(pod("reviews-v2", "shop", 1, true, "reviews").version("v2"))
        .pod(pod("ratings", "shop", 1, true, "ratings"))
        .pod(pod("tcp-echo", "shop", 1, true, "tcp-echo"))
        .pod(pod("legacy-server", "legacy", 1, false, "legacy-server"))
        .service(svc(
            "reviews",
            REVIEWS_VIP,
            HTTP_PORT,
            &["reviews-v1", "reviews-v2"],
        ))
        // Deployed now, used from step 7 on (when shop is labelled to use it).
        .waypoint(WAYPOINT, "shop", 1)
        .service(svc("ratings", RATINGS_VIP, HTTP_PORT, &["ratings"]))
        .service(svc("tcp-echo", TCP_ECHO_VIP, ECHO_PORT, &["tcp-echo"]))
        .build()
        .context("building the cluster")?;
    c.start_http("reviews-v1", "reviews", HTTP_PORT)
        .context("starting reviews")?;
    c.start_http("reviews-v2", "reviews", HTTP_PORT)
        .context("starting reviews v2")?;
    c.start_http("ratings", "ratings", HTTP_PORT)
        .context("starting ratings")?;
    c.start_tcp_echo("tcp-echo", ECHO_PORT)
        .context("starting tcp-echo")?;
    c.start_tcp_echo("legacy-server", ECHO_PORT)
        .context("starting legacy-server")?;
    Ok(c)
}

fn show_cluster(r: &Report, c: &Cluster, took: Duration) {
    r.show(&format!(
        "controller: {} (netns {}), config dir {}",
        ControllerSource::xds_url(),
        c.fabric_ns(),
        c.controller_source()
            .map(|s| s.config_dir.display().to_string())
            .unwrap_or_default()
    ));
    for i in 0..c.mesh.nodes {
        r.show(&format!(
            "node{i} ({}), ztunnel --xds-address {} --redirect",
            Cluster::node_ip(i),
            ControllerSource::xds_url()
        ));
        for p in c.mesh.pods.iter().filter(|p| p.node == i) {
            r.show(&format!(
                "  {:<14} {:<10} ns={:<7} {}",
                p.name,
                p.ip.to_string(),
                p.namespace,
                if p.enrolled {
                    p.identity()
                } else {
                    "(not in the mesh)".into()
                }
            ));
        }
    }
    r.show(&format!("up in {:.1} s", took.as_secs_f64()));
}

fn step1_shop_cross_node(r: &mut Report, c: &Cluster) {
    r.step(
        1,
        "shop -> shop across nodes: productpage (node0) GET http://reviews:9080/",
        "productpage's connection to the reviews Service VIP is captured by node0's ztunnel\n\
         (eBPF), carried in HBONE (mTLS with SPIFFE certificates from the controller's CA) to\n\
         node1's ztunnel, which hands it to reviews-v1. Both ztunnels log the connection.",
    );
    let dst = SocketAddr::from((REVIEWS_VIP, HTTP_PORT));
    let res = http_get(c, "productpage", dst, "reviews", "/");
    let ok = match &res {
        Ok((status, body)) => {
            r.show(&format!("{status}  {}", body.trim()));
            status.contains(" 200")
                && serde_json::from_str::<serde_json::Value>(body)
                    .is_ok_and(|v| v["service"] == "reviews")
        }
        Err(e) => {
            r.show(&format!("request failed: {e}"));
            false
        }
    };
    r.check(ok, "productpage got 200 from reviews");
    let src = c.pod("productpage").identity();
    let dst_id = c.pod("reviews-v1").identity();
    for (node, direction) in [(0, "outbound"), (1, "inbound")] {
        let found = find_line(c, node, |l| {
            l.contains("connection complete")
                && l.contains(&format!("direction=\"{direction}\""))
                && l.contains(&format!("src.identity=\"{src}\""))
        });
        if let Some(l) = &found {
            r.show(&format!(
                "node{node} access log: {}",
                fields(
                    l,
                    &[
                        "direction",
                        "src.identity",
                        "dst.identity",
                        "dst.addr",
                        "bytes_sent"
                    ]
                )
            ));
        }
        let id_ok = found
            .as_ref()
            .is_some_and(|l| direction == "outbound" || l.contains(&dst_id));
        r.check(
            id_ok,
            &format!("node{node}'s ztunnel captured it ({direction}, src {src})"),
        );
    }
}

fn step2_fabric_capture(r: &mut Report, c: &Cluster) {
    r.step(
        2,
        "what crosses the wire: tcpdump on the fabric while productpage talks to tcp-echo",
        "A marker string goes productpage -> tcp-echo (node1) and back. Between the nodes there\n\
         should be only TLS on port 15008: no marker, no packet to the app port 9000.",
    );
    let cap = match c.capture("demo-fabric") {
        Ok(cap) => cap,
        Err(e) => {
            r.check(false, &format!("tcpdump on the fabric: {e}"));
            return;
        }
    };
    let marker = "ZMESH-DEMO-SECRET-5e1f";
    let reply = c.echo(
        "productpage",
        SocketAddr::from((TCP_ECHO_VIP, ECHO_PORT)),
        marker,
        T,
    );
    let pcap = cap.finish().unwrap_or_default();
    let hbone = pcap_tcp_port_packets(&pcap, 15008);
    let app = pcap_tcp_port_packets(&pcap, ECHO_PORT);
    let clear = contains(&pcap, marker.as_bytes());
    r.show(&format!("reply: {reply:?}"));
    r.show(&format!(
        "captured {} bytes: {hbone} packets on 15008, {app} on {ECHO_PORT}, marker in clear: {clear}",
        pcap.len()
    ));
    r.check(
        reply.is_ok_and(|l| l == format!("v1 {marker}")),
        "tcp-echo answered",
    );
    r.check(
        hbone > 0 && app == 0 && !clear,
        "only HBONE (15008) on the fabric, payload never in clear",
    );
}

fn step3_legacy_untouched(r: &mut Report, c: &Cluster) {
    r.step(
        3,
        "legacy -> legacy: client (node0) -> legacy-server (node1)",
        "Neither pod is enrolled: their traffic goes straight through, no ztunnel sees it.",
    );
    let before = [c.ztunnel_log(0).len(), c.ztunnel_log(1).len()];
    let dst = SocketAddr::from((c.pod("legacy-server").ip, ECHO_PORT));
    let reply = c.echo("client", dst, "hello-legacy", T);
    r.show(&format!("reply: {reply:?}"));
    r.check(
        reply.is_ok_and(|l| l == "v1 hello-legacy"),
        "legacy-server answered",
    );
    std::thread::sleep(Duration::from_millis(300));
    let ip = format!("{}:", c.pod("client").ip);
    let seen: Vec<usize> = (0..2)
        .filter(|&i| {
            c.ztunnel_log(i)
                .get(before[i]..)
                .is_some_and(|new| new.contains(&ip))
        })
        .collect();
    r.check(
        seen.is_empty(),
        &format!("no ztunnel logged the connection (seen by nodes {seen:?})"),
    );
}

fn step4_legacy_to_shop(r: &mut Report, c: &Cluster) {
    r.step(
        4,
        "legacy -> shop: client (node0, not enrolled) GET reviews-v1 (node1)",
        "The mesh is PERMISSIVE by default: plaintext from outside the mesh is accepted by the\n\
         destination ztunnel on its inbound plaintext port 15006 (no identity: src.identity is\n\
         empty). node0's ztunnel is not involved.",
    );
    let before0 = c.ztunnel_log(0).len();
    let dst = SocketAddr::from((c.pod("reviews-v1").ip, HTTP_PORT));
    let res = http_get(c, "client", dst, "reviews", "/");
    let ok = match &res {
        Ok((status, _)) => {
            r.show(status);
            status.contains(" 200")
        }
        Err(e) => {
            r.show(&format!("request failed: {e}"));
            false
        }
    };
    r.check(ok, "client got 200 from reviews-v1");
    let ip = c.pod("client").ip.to_string();
    let line = find_line(c, 1, |l| {
        l.contains("inbound_plaintext")
            && l.contains("connection complete")
            && l.contains(&format!("src.addr={ip}:"))
    });
    if let Some(l) = &line {
        r.show(&format!(
            "node1 access log: {}",
            fields(l, &["src.addr", "dst.addr", "dst.identity", "direction"])
        ));
    }
    let node0_saw = c
        .ztunnel_log(0)
        .get(before0..)
        .is_some_and(|new| new.contains(&format!("{ip}:")));
    r.check(
        line.is_some() && !node0_saw,
        "node1's ztunnel accepted it on 15006; node0's did not see it",
    );
}

fn step5_policy(r: &mut Report, c: &Cluster) {
    r.step(
        5,
        "an AuthorizationPolicy: reviews must not call ratings",
        "Before: reviews-v1 can call ratings. Then a DENY policy selecting ratings, matching\n\
         the principal of reviews' service account, is written into the controller's\n\
         directory; the controller pushes it; node1's ztunnel refuses reviews-v1's next\n\
         connection (HBONE 401) and logs the policy's name. productpage is still allowed.",
    );
    let ratings = SocketAddr::from((RATINGS_VIP, HTTP_PORT));
    let before = http_get(c, "reviews-v1", ratings, "ratings", "/");
    r.check(
        before.as_ref().is_ok_and(|(s, _)| s.contains(" 200")),
        &format!(
            "before: reviews-v1 -> ratings: {}",
            match &before {
                Ok((status, _)) => status.clone(),
                Err(e) => e.to_string(),
            }
        ),
    );
    let policy = format!(
        "apiVersion: security.istio.io/v1\n\
         kind: AuthorizationPolicy\n\
         metadata:\n  name: {POLICY_NAME}\n  namespace: shop\n\
         spec:\n  selector:\n    matchLabels:\n      app: ratings\n  action: DENY\n  rules:\n  \
         - from:\n    - source:\n        principals: [\"cluster.local/ns/shop/sa/reviews\"]\n"
    );
    for l in policy.lines() {
        r.show(l);
    }
    let published = publish_policy(c, &policy);
    match &published {
        Ok(path) => r.show(&format!("wrote {path} (the controller's directory)")),
        Err(e) => r.show(&format!("writing the policy failed: {e}")),
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut denied = false;
    while published.is_ok() && Instant::now() < deadline {
        match http_get(c, "reviews-v1", ratings, "ratings", "/") {
            Err(_) => {
                denied = true;
                break;
            }
            Ok(_) => std::thread::sleep(Duration::from_millis(200)),
        }
    }
    r.check(denied, "after: reviews-v1 -> ratings is refused");
    let line = find_line(c, 1, |l| {
        l.contains("denied by authorization policy") && l.contains(POLICY_NAME)
    });
    if let Some(l) = &line {
        let msg = l
            .find("connection denied")
            .map(|i| &l[i..])
            .unwrap_or(l.as_str());
        r.show(&format!("node1 log: {msg}"));
    }
    r.check(line.is_some(), "node1's ztunnel logged the policy's name");
    let allowed = http_get(c, "productpage", ratings, "ratings", "/");
    r.check(
        allowed.is_ok_and(|(s, _)| s.contains(" 200")),
        "productpage -> ratings is still allowed",
    );
}

const REVIEWS_ROUTING: &str = "apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: reviews, namespace: shop}
spec:
  host: reviews
  subsets:
  - {name: v1, labels: {version: v1}}
  - {name: v2, labels: {version: v2}}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: reviews, namespace: shop}
spec:
  hosts: [reviews]
  http:
  - match:
    - headers:
        end-user: {exact: jason}
    route:
    - destination: {host: reviews, subset: v2}
  - route:
    - destination: {host: reviews, subset: v1}
";

fn step7_waypoint(r: &mut Report, c: &mut Cluster) {
    r.step(
        7,
        "L7 with a waypoint: reviews routed by the `end-user` header",
        "Namespace shop is labelled istio.io/use-waypoint=waypoint: ztunnels now send shop's\n\
         service traffic through the waypoint (the `waypoint` binary in its own pod, identity\n\
         and config from the controller). A VirtualService + DestinationRule written into the\n\
         controller's directory send `end-user: jason` to reviews v2, everyone else to v1.",
    );
    let reviews = SocketAddr::from((REVIEWS_VIP, HTTP_PORT));
    let get = |c: &Cluster, user: Option<&str>| {
        let headers: Vec<(&str, &str)> = user.map(|u| ("end-user", u)).into_iter().collect();
        c.http(
            "productpage",
            reviews,
            "GET /reviews/0",
            "reviews:9080",
            &headers,
            T,
        )
    };
    let via_waypoint = |r: &zmesh_tests::HttpResponse| {
        r.status == 200 && r.json()["headers"]["x-request-id"].is_string()
    };
    let labelled = c.set_namespace_label("shop", USE_WAYPOINT, Some(WAYPOINT));
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut through = false;
    while labelled.is_ok() && Instant::now() < deadline {
        if get(c, None).is_ok_and(|r| via_waypoint(&r)) {
            through = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    r.check(
        through,
        "productpage -> reviews now goes through the waypoint (reviews sees an x-request-id)",
    );
    for l in REVIEWS_ROUTING.lines().skip_while(|l| *l != "---").skip(1) {
        r.show(l);
    }
    let applied = c.apply_yaml_to_waypoint(WAYPOINT, "40-demo-reviews.yaml", REVIEWS_ROUTING);
    if let Err(e) = &applied {
        r.show(&format!("applying the VirtualService failed: {e}"));
    }
    let version = |user: Option<&str>| -> String {
        match get(c, user) {
            Ok(resp) if resp.status == 200 => {
                resp.json()["version"].as_str().unwrap_or("?").to_string()
            }
            Ok(resp) => format!("status {}", resp.status),
            Err(e) => format!("error: {e}"),
        }
    };
    let jason: Vec<String> = (0..5).map(|_| version(Some("jason"))).collect();
    let others: Vec<String> = (0..5).map(|_| version(None)).collect();
    r.show(&format!("end-user: jason -> {}", jason.join(" ")));
    r.show(&format!("no end-user     -> {}", others.join(" ")));
    r.check(
        applied.is_ok() && jason.iter().all(|v| v == "v2"),
        "every request of jason went to reviews v2",
    );
    r.check(
        applied.is_ok() && others.iter().all(|v| v == "v1"),
        "every other request went to reviews v1",
    );
}

/// Drop the policy into the controller's directory as its own file (what `kubectl apply`
/// would be in a real cluster); the file source picks it up within a second.
fn publish_policy(c: &Cluster, policy: &str) -> Result<String> {
    let src = c
        .controller_source()
        .context("the demo cluster has no controller source")?;
    let path = src.config_dir.join("40-demo-policy.yaml");
    let tmp = src.config_dir.join(".40-demo-policy.yaml.tmp");
    std::fs::write(&tmp, policy).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, &path).with_context(|| format!("renaming to {}", path.display()))?;
    Ok(path.display().to_string())
}

fn step6_metrics(r: &mut Report, c: &Cluster) {
    r.step(
        6,
        "metrics: node1's ztunnel /metrics (port 15020)",
        "Istio's metric names and labels: connections counted by the destination ztunnel, with\n\
         the SPIFFE principals of both ends.",
    );
    let body = in_netns(&c.node_ns(1), || {
        let mut s = std::net::TcpStream::connect_timeout(
            &SocketAddr::from(([127, 0, 0, 1], 15020)),
            Duration::from_secs(2),
        )?;
        s.set_read_timeout(Some(Duration::from_secs(5)))?;
        write!(
            s,
            "GET /metrics HTTP/1.1\r\nHost: metrics\r\nConnection: close\r\n\r\n"
        )?;
        let mut out = String::new();
        s.read_to_string(&mut out)?;
        Ok(out)
    });
    let body = match body {
        Ok(b) => b,
        Err(e) => {
            r.check(false, &format!("GET /metrics: {e}"));
            return;
        }
    };
    let lines: Vec<&str> = body
        .lines()
        .filter(|l| l.starts_with("istio_tcp_connections_opened_total{"))
        .collect();
    for l in &lines {
        r.show(&format!(
            "istio_tcp_connections_opened_total{{{}}} {}",
            labels(
                l,
                &["reporter", "source_principal", "destination_principal"]
            ),
            l.rsplit(' ').next().unwrap_or_default()
        ));
    }
    let src = c.pod("productpage").identity();
    let dst = c.pod("reviews-v1").identity();
    r.check(
        lines.iter().any(|l| {
            l.contains("reporter=\"destination\"")
                && l.contains(&format!("source_principal=\"{src}\""))
                && l.contains(&format!("destination_principal=\"{dst}\""))
        }),
        "productpage -> reviews counted with both principals",
    );
}

fn keep(c: &Cluster) {
    println!("\nThe cluster is still running (--keep). Explore it, for example:");
    println!(
        "  ip netns exec {} curl -s http://{REVIEWS_VIP}:{HTTP_PORT}/",
        c.pod_ns("productpage")
    );
    println!(
        "  ip netns exec {} curl -s 127.0.0.1:15000/config_dump",
        c.node_ns(0)
    );
    println!("  files and logs: {}", c.dir.display());
    println!("Press Enter to clean up.");
    let mut line = String::new();
    let _ = std::io::stdin().lock().read_line(&mut line);
}

/// `GET path` from pod `from`: (status line, body).
fn http_get(
    c: &Cluster,
    from: &str,
    dst: SocketAddr,
    host: &str,
    path: &str,
) -> std::io::Result<(String, String)> {
    let mut s = c.connect(from, dst, T)?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"
    )?;
    let mut out = String::new();
    s.read_to_string(&mut out)?;
    let (head, body) = out.split_once("\r\n\r\n").ok_or_else(|| {
        std::io::Error::new(
            std::io::ErrorKind::UnexpectedEof,
            format!("no complete HTTP response: {out:?}"),
        )
    })?;
    Ok((
        head.lines().next().unwrap_or_default().to_string(),
        body.to_string(),
    ))
}

/// The first line of node `i`'s ztunnel log matching `pred`, waiting up to 3 s.
fn find_line(c: &Cluster, i: usize, pred: impl Fn(&str) -> bool) -> Option<String> {
    if !c.wait_log_line(i, T, &pred) {
        return None;
    }
    c.ztunnel_log(i)
        .lines()
        .find(|l| pred(l))
        .map(str::to_string)
}

/// `key=value` pairs of a log line, in the order of `keys` (missing keys skipped).
fn fields(line: &str, keys: &[&str]) -> String {
    keys.iter()
        .filter_map(|k| {
            let pat = format!(" {k}=");
            let start = line.find(&pat)? + pat.len();
            let rest = &line[start..];
            let value = if let Some(q) = rest.strip_prefix('"') {
                &rest[..q.find('"').map_or(rest.len(), |e| e + 2)]
            } else {
                rest.split(' ').next().unwrap_or_default()
            };
            Some(format!("{k}={value}"))
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// `name="value"` pairs of a Prometheus sample line, in the order of `keys`.
fn labels(line: &str, keys: &[&str]) -> String {
    keys.iter()
        .filter_map(|k| {
            let pat = format!("{k}=\"");
            let start = line.find(&pat)? + pat.len();
            let end = line[start..].find('"')? + start;
            Some(format!("{k}=\"{}\"", &line[start..end]))
        })
        .collect::<Vec<_>>()
        .join(",")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fields_and_labels_are_extracted() {
        let l = "2026 INFO access: connection complete src.addr=10.20.0.2:5 \
                 src.identity=\"spiffe://cluster.local/ns/shop/sa/a\" direction=\"inbound\"";
        assert_eq!(
            fields(l, &["direction", "src.addr", "missing"]),
            "direction=\"inbound\" src.addr=10.20.0.2:5"
        );
        let m = "istio_tcp_connections_opened_total{reporter=\"destination\",\
                 source_principal=\"spiffe://x\"} 3";
        assert_eq!(
            labels(m, &["source_principal", "reporter"]),
            "source_principal=\"spiffe://x\",reporter=\"destination\""
        );
    }
}
