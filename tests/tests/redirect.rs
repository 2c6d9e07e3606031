//! End-to-end redirection scenarios in the netns cluster (root; see zmesh_tests docs).
//!
//! Cluster: node0 { client (enrolled, ns client-ns), outsider (not enrolled) },
//!          node1 { echo (enrolled, ns server-ns, tcp echo v1 :9000), plain (not enrolled,
//!                  tcp echo v0 :9000) }.

use std::net::SocketAddr;
use std::time::Duration;

use zmesh_tests::{Cluster, PodSpec, ServiceSpec, contains, pcap_tcp_port_packets, require_root};

const T: Duration = Duration::from_secs(3);

fn cluster() -> Cluster {
    let mut c = Cluster::builder()
        .nodes(2)
        .pod(PodSpec::new("client", "client-ns", 0, true))
        .pod(PodSpec::new("outsider", "legacy", 0, false))
        .pod(PodSpec::new("echo", "server-ns", 1, true))
        .pod(PodSpec::new("plain", "legacy", 1, false).version("v0"))
        .build()
        .expect("building the netns cluster");
    c.start_tcp_echo("echo", 9000).expect("echo app");
    c.start_tcp_echo("plain", 9000).expect("plain app");
    c
}

fn addr(c: &Cluster, pod: &str, port: u16) -> SocketAddr {
    SocketAddr::from((c.pod(pod).ip, port))
}

/// Enrolled → enrolled across nodes goes through HBONE (only TLS on the fabric, the marker
/// never in clear, the destination logs the source's SPIFFE identity); enrolled →
/// non-enrolled passes through; non-enrolled → enrolled works (PERMISSIVE) without the
/// source node's ztunnel. Then: kill the client node's ztunnel → new connections fail and
/// nothing leaks; restart → traffic flows again and /config_dump shows the pods reconciled.
#[test]
fn cross_node_hbone_fail_closed_and_restart() {
    if !require_root("cross_node_hbone_fail_closed_and_restart") {
        return;
    }
    let mut c = cluster();
    let echo = addr(&c, "echo", 9000);

    // 1. enrolled -> enrolled, cross node.
    let cap = c.capture("hbone").unwrap();
    let marker = "ZMESH-MARKER-7f3a91";
    let reply = c.echo("client", echo, marker, T).expect("client -> echo");
    assert_eq!(reply, format!("v1 {marker}"));
    let pcap = cap.finish().unwrap();
    assert!(
        !contains(&pcap, marker.as_bytes()),
        "the payload marker crossed the fabric in clear"
    );
    assert!(
        pcap_tcp_port_packets(&pcap, 15008) > 0,
        "no HBONE (15008) packets on the fabric"
    );
    assert_eq!(
        pcap_tcp_port_packets(&pcap, 9000),
        0,
        "plaintext to the app port crossed the fabric"
    );
    let client_id = c.pod("client").identity();
    assert!(
        c.wait_log_line(1, T, |l| l.contains("connection complete")
            && l.contains("direction=\"inbound\"")
            && l.contains(&format!("src.identity=\"{client_id}\""))),
        "node1's access log does not show the source identity {client_id}:\n{}",
        c.ztunnel_log(1)
    );
    assert!(
        !c.ztunnel_log(1).contains('\u{1b}'),
        "terminal colour codes in ztunnel's log file"
    );

    // 1b. The HTTP sample through the mesh: service/version and the request headers echoed.
    c.start_http("echo", "reviews", 8080).expect("http app");
    let body = http_get(&c, "client", addr(&c, "echo", 8080), "/").expect("GET /");
    let v: serde_json::Value = serde_json::from_str(&body).expect("JSON body");
    assert_eq!(v["service"], "reviews", "{v}");
    assert_eq!(v["version"], "v1", "{v}");
    assert_eq!(v["headers"]["x-zmesh-test"], "yes", "{v}");
    let status = http_get(&c, "client", addr(&c, "echo", 8080), "/status/503");
    assert!(status.is_err_and(|e| e.contains("503")), "/status/503");

    // 1c. Captured connections spread over node0's workers (2, the default): bpf_sk_assign to
    // a SO_REUSEPORT listener picks a member of the group (Linux >= 6.5), so both workers'
    // 15001 listeners accept and each tunnels through its own HBONE pool (24 connections on
    // one worker alone: 2^-23).
    for i in 0..24 {
        c.echo("client", echo, &format!("spread-{i}"), T)
            .expect("client -> echo");
    }
    let workers = c.config_dump(0).unwrap()["workers"].clone();
    let used: Vec<u64> = workers
        .as_array()
        .expect("/config_dump lists the workers")
        .iter()
        .map(|w| w["hbone_pool_opened_total"].as_u64().unwrap_or(0))
        .collect();
    assert!(
        used.len() == 2 && used.iter().all(|&n| n >= 1),
        "captured connections did not reach both workers: {workers}"
    );

    // 2. enrolled -> non-enrolled: plain passthrough through the client's ztunnel.
    let plain = addr(&c, "plain", 9000);
    let reply = c
        .echo("client", plain, "to-plain", T)
        .expect("client -> plain");
    assert_eq!(reply, "v0 to-plain");

    // 3. non-enrolled -> enrolled (PERMISSIVE): via node1's 15006; node0's ztunnel not in path.
    let before0 = c.ztunnel_log(0);
    let reply = c
        .echo("outsider", echo, "from-outsider", T)
        .expect("outsider -> echo");
    assert_eq!(reply, "v1 from-outsider");
    let outsider_ip = c.pod("outsider").ip.to_string();
    let after0 = c.ztunnel_log(0);
    assert!(
        !after0[before0.len()..].contains(&outsider_ip),
        "node0's ztunnel saw the non-enrolled pod's traffic"
    );
    // non-enrolled -> non-enrolled: untouched.
    let reply = c
        .echo("outsider", plain, "legacy", T)
        .expect("outsider -> plain");
    assert_eq!(reply, "v0 legacy");

    // 4. Kill node0's ztunnel: the enrolled client's new connections fail, nothing leaks.
    c.kill_ztunnel(0);
    let cap = c.capture("killed").unwrap();
    let leak = "ZMESH-LEAK-CHECK-1c2d";
    let r = c.echo("client", echo, leak, Duration::from_secs(2));
    assert!(
        r.is_err(),
        "client reached echo with its ztunnel dead: {r:?}"
    );
    let r = c.echo("client", plain, leak, Duration::from_secs(2));
    assert!(
        r.is_err(),
        "client reached plain with its ztunnel dead: {r:?}"
    );
    let pcap = cap.finish().unwrap();
    assert!(
        !contains(&pcap, leak.as_bytes()),
        "plaintext leaked while ztunnel was down"
    );
    // The non-enrolled pod on the same node is not affected.
    let reply = c
        .echo("outsider", plain, "still-ok", T)
        .expect("outsider -> plain (ztunnel down)");
    assert_eq!(reply, "v0 still-ok");

    // 5. Restart: pinned state reconciled, traffic flows again.
    c.restart_ztunnel(0).expect("ztunnel restart");
    let dump = c.config_dump(0).unwrap();
    assert_eq!(dump["redirect"]["reconciled"], true, "{}", dump["redirect"]);
    assert_eq!(
        c.enrolled_ips(0).unwrap(),
        vec![c.pod("client").ip.to_string()],
        "{}",
        dump["redirect"]
    );
    let reply = c
        .echo_eventually("client", echo, "after-restart", Duration::from_secs(10))
        .expect("client -> echo after restart");
    assert_eq!(reply, "v1 after-restart");
}

/// Removing a pod from the mesh (protocol HBONE -> TCP, what the namespace label drives)
/// un-captures it without restarting anything (the marker then crosses in clear), adding it
/// back captures it again; STRICT refuses plaintext from non-enrolled pods; enrolment changes
/// made while ztunnel is down are reconciled when it starts again.
#[test]
fn unenroll_reenroll_and_strict() {
    if !require_root("unenroll_reenroll_and_strict") {
        return;
    }
    let mut c = cluster();
    let echo = addr(&c, "echo", 9000);
    assert_eq!(c.echo("client", echo, "hello", T).unwrap(), "v1 hello");

    // Un-enroll the client.
    c.update_mesh(|m| {
        m.pods
            .iter_mut()
            .find(|p| p.name == "client")
            .unwrap()
            .enrolled = false;
    })
    .unwrap();
    c.wait_enrolled(0, Duration::from_secs(15))
        .expect("client released");
    let cap = c.capture("unenrolled").unwrap();
    let marker = "ZMESH-DIRECT-4e5f";
    // echo is still enrolled: the client's plaintext reaches node1's 15006 (PERMISSIVE).
    let reply = c
        .echo_eventually("client", echo, marker, Duration::from_secs(5))
        .unwrap();
    assert_eq!(reply, format!("v1 {marker}"));
    let pcap = cap.finish().unwrap();
    assert!(
        contains(&pcap, marker.as_bytes()),
        "after un-enrolling, the client's connection should go direct (in clear)"
    );

    // Enroll it again: HBONE again.
    c.update_mesh(|m| {
        m.pods
            .iter_mut()
            .find(|p| p.name == "client")
            .unwrap()
            .enrolled = true;
    })
    .unwrap();
    c.wait_enrolled(0, Duration::from_secs(15))
        .expect("client captured again");
    let cap = c.capture("reenrolled").unwrap();
    let marker = "ZMESH-HBONE-AGAIN-8a9b";
    let reply = c
        .echo_eventually("client", echo, marker, Duration::from_secs(5))
        .unwrap();
    assert_eq!(reply, format!("v1 {marker}"));
    let pcap = cap.finish().unwrap();
    assert!(
        !contains(&pcap, marker.as_bytes()),
        "re-enrolled traffic went in clear"
    );

    // STRICT: plaintext from a non-enrolled pod to an enrolled one is refused; mesh traffic works.
    c.update_mesh(|m| m.mtls_mode = Some("STRICT".into()))
        .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let r = c.echo("outsider", echo, "strict", Duration::from_secs(2));
        if r.is_err() {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "STRICT did not refuse plaintext: {r:?}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(c.echo("client", echo, "mtls", T).unwrap(), "v1 mtls");

    // Changes while ztunnel is down are reconciled from the pinned state on restart: the
    // client (no longer enrolled) is released, the outsider (now enrolled) is captured.
    c.kill_ztunnel(0);
    c.update_mesh(|m| {
        m.pods
            .iter_mut()
            .find(|p| p.name == "client")
            .unwrap()
            .enrolled = false;
        m.pods
            .iter_mut()
            .find(|p| p.name == "outsider")
            .unwrap()
            .enrolled = true;
    })
    .unwrap();
    c.restart_ztunnel(0).expect("restart reconciles");
    let dump = c.config_dump(0).unwrap();
    let change = &dump["redirect"]["last_change"];
    let client_ip = c.pod("client").ip.to_string();
    let outsider_ip = c.pod("outsider").ip.to_string();
    assert_eq!(
        change["removed"],
        serde_json::json!([client_ip]),
        "{change}"
    );
    assert_eq!(
        change["added"],
        serde_json::json!([outsider_ip]),
        "{change}"
    );
    // The outsider is now in the mesh (HBONE, allowed under STRICT); the client is not.
    let reply = c
        .echo_eventually("outsider", echo, "now-meshed", Duration::from_secs(5))
        .unwrap();
    assert_eq!(reply, "v1 now-meshed");
    assert!(
        c.echo("client", echo, "plain", Duration::from_secs(2))
            .is_err()
    );
}

/// Same-node enrolled → enrolled goes through HBONE too, same-node non-enrolled → enrolled
/// through the inbound plaintext listener, enrolled → non-enrolled passes through; a Service VIP (no kube-proxy, no
/// route for it) is load-balanced across endpoints on both nodes; L4 AuthorizationPolicy by
/// namespace + port, by principal, and by ipBlocks applies while traffic flows (a live
/// connection that becomes denied is closed).
#[test]
fn same_node_vip_and_authz() {
    if !require_root("same_node_vip_and_authz") {
        return;
    }
    let mut c = Cluster::builder()
        .nodes(2)
        .pod(PodSpec::new("client", "client-ns", 0, true))
        .pod(PodSpec::new("echo-a", "server-ns", 0, true).version("v2"))
        .pod(PodSpec::new("outsider", "legacy", 0, false))
        .pod(PodSpec::new("echo", "server-ns", 1, true))
        .service(ServiceSpec {
            name: "echo".into(),
            namespace: "server-ns".into(),
            vip: "10.96.0.10".parse().unwrap(),
            port: 80,
            target_port: 9000,
            pods: vec!["echo".into(), "echo-a".into()],
        })
        .build()
        .expect("building the netns cluster");
    c.start_tcp_echo("echo", 9000).unwrap();
    c.start_tcp_echo("echo-a", 9000).unwrap();
    let client_id = c.pod("client").identity();

    // Same node, through node0's HBONE listener.
    let echo_a = addr(&c, "echo-a", 9000);
    assert_eq!(
        c.echo("client", echo_a, "same-node", T).unwrap(),
        "v2 same-node"
    );
    assert!(
        c.wait_log_line(0, T, |l| l.contains("hbone_server")
            && l.contains("connection complete")
            && l.contains(&client_id)),
        "same-node connection did not go through HBONE:\n{}",
        c.ztunnel_log(0)
    );

    // Same node, non-enrolled <-> enrolled: the outsider's plaintext goes through node0's
    // 15006 (not around it), and the client's connection to the outsider passes through.
    c.start_tcp_echo("outsider", 9000).unwrap();
    let outsider = addr(&c, "outsider", 9000);
    let outsider_ip = c.pod("outsider").ip.to_string();
    assert_eq!(
        c.echo("outsider", echo_a, "plain-in", T).unwrap(),
        "v2 plain-in"
    );
    assert!(
        c.wait_log_line(0, T, |l| l.contains("inbound_plaintext")
            && l.contains("connection complete")
            && l.contains(&format!("src.addr={outsider_ip}:"))),
        "same-node plaintext to an enrolled pod bypassed ztunnel:\n{}",
        c.ztunnel_log(0)
    );
    assert_eq!(
        c.echo("client", outsider, "to-legacy", T).unwrap(),
        "v1 to-legacy"
    );

    // VIP load balancing across both nodes.
    let vip = SocketAddr::from(([10, 96, 0, 10], 80));
    let mut seen = std::collections::BTreeSet::new();
    for i in 0..30 {
        let r = c
            .echo("client", vip, &format!("lb{i}"), T)
            .expect("client -> VIP");
        seen.insert(r.split(' ').next().unwrap_or_default().to_string());
        if seen.len() == 2 {
            break;
        }
    }
    assert_eq!(
        seen.into_iter().collect::<Vec<_>>(),
        vec!["v1", "v2"],
        "VIP traffic did not reach both endpoints"
    );

    // Authorization while traffic flows: a live connection, then deny by namespace + port.
    let echo = addr(&c, "echo", 9000);
    let mut live = c.connect("client", echo, T).unwrap();
    assert_eq!(line(&mut live, "live-1"), Some("v1 live-1".into()));
    c.update_mesh(|m| {
        m.policies = vec![
            r#"- name: deny-client-ns
  namespace: server-ns
  action: Deny
  rules:
  - - - namespaces: ["client-ns"]
    - - destinationPorts: [9000]"#
                .into(),
        ]
    })
    .unwrap();
    wait_until(Duration::from_secs(10), "deny by namespace+port", || {
        c.echo("client", echo, "denied?", Duration::from_secs(2))
            .is_err()
    });
    assert_eq!(
        line(&mut live, "live-2"),
        None,
        "a live connection survived a policy that denies it"
    );
    // Other namespaces are still allowed (echo-a's pod, in server-ns, as a client).
    assert_eq!(c.echo("echo-a", echo, "ok", T).unwrap(), "v1 ok");

    // ALLOW by principal: only the client; the plaintext outsider has none.
    c.update_mesh(|m| {
        m.policies = vec![format!(
            r#"- name: allow-client
  namespace: server-ns
  action: Allow
  rules:
  - - - principals: ["{}"]"#,
            client_id.trim_start_matches("spiffe://")
        )]
    })
    .unwrap();
    wait_until(Duration::from_secs(10), "allow by principal", || {
        c.echo("client", echo, "allowed", Duration::from_secs(2))
            .is_ok()
            && c.echo("outsider", echo, "x", Duration::from_secs(2))
                .is_err()
    });

    // ipBlocks: deny the client's address.
    let client_ip = c.pod("client").ip;
    c.update_mesh(|m| {
        m.policies = vec![format!(
            r#"- name: deny-ip
  namespace: server-ns
  action: Deny
  rules:
  - - - sourceIps: ["{client_ip}/32"]"#
        )]
    })
    .unwrap();
    wait_until(Duration::from_secs(10), "deny by ipBlock", || {
        c.echo("client", echo, "ip?", Duration::from_secs(2))
            .is_err()
            && c.echo("outsider", echo, "y", Duration::from_secs(2))
                .is_ok()
    });
}

fn line(s: &mut std::net::TcpStream, text: &str) -> Option<String> {
    use std::io::{Read, Write};
    s.write_all(format!("{text}\n").as_bytes()).ok()?;
    let mut buf = Vec::new();
    let mut b = [0u8; 1];
    loop {
        match s.read(&mut b) {
            Ok(0) | Err(_) => return None,
            Ok(_) if b[0] == b'\n' => return Some(String::from_utf8_lossy(&buf).into_owned()),
            Ok(_) => buf.push(b[0]),
        }
    }
}

fn wait_until(timeout: Duration, what: &str, mut f: impl FnMut() -> bool) {
    let deadline = std::time::Instant::now() + timeout;
    while !f() {
        assert!(
            std::time::Instant::now() < deadline,
            "timed out waiting for: {what}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// `GET path` from a pod; Ok(body) on 200, Err(status) otherwise.
fn http_get(c: &Cluster, from: &str, dst: SocketAddr, path: &str) -> Result<String, String> {
    let r = c
        .http(
            from,
            dst,
            &format!("GET {path}"),
            "reviews",
            &[("x-zmesh-test", "yes")],
            T,
        )
        .map_err(|e| e.to_string())?;
    if r.status == 200 {
        Ok(r.body)
    } else {
        Err(format!("HTTP/1.1 {}", r.status))
    }
}

/// The same cluster fed by `zmesh-controller` (file source, Delta ADS over TLS, certificates
/// from its CA): enrolment follows the Namespace's `istio.io/dataplane-mode` label — removing
/// it from `client-ns` (the only file rewritten is the Namespaces file) releases the client
/// (its marker then crosses in clear), adding it back captures it again, labelling `legacy`
/// captures both of its pods (their traffic becomes HBONE) — with no restart; a mesh-wide
/// STRICT PeerAuthentication refuses plaintext; a label change made while a ztunnel is down is
/// reconciled when it restarts and resyncs; an AuthorizationPolicy added to the directory
/// refuses the next connection.
#[test]
fn controller_namespace_label_enrolls_and_releases() {
    if !require_root("controller_namespace_label_enrolls_and_releases") {
        return;
    }
    let mut c = Cluster::builder()
        .controller()
        .nodes(2)
        .pod(PodSpec::new("client", "client-ns", 0, true))
        .pod(PodSpec::new("outsider", "legacy", 0, false))
        .pod(PodSpec::new("echo", "server-ns", 1, true))
        .pod(PodSpec::new("plain", "legacy", 1, false).version("v0"))
        .build()
        .expect("building the netns cluster with the controller");
    c.start_tcp_echo("echo", 9000).expect("echo app");
    c.start_tcp_echo("plain", 9000).expect("plain app");
    let echo = addr(&c, "echo", 9000);
    let plain = addr(&c, "plain", 9000);

    // Mesh traffic with identities from the controller's CA.
    let marker = "ZMESH-CTRL-HBONE-11aa";
    let cap = c.capture("ctrl-hbone").unwrap();
    assert_eq!(
        c.echo("client", echo, marker, T).unwrap(),
        format!("v1 {marker}")
    );
    let pcap = cap.finish().unwrap();
    assert!(!contains(&pcap, marker.as_bytes()), "marker in clear");
    assert!(pcap_tcp_port_packets(&pcap, 15008) > 0, "no HBONE packets");
    let client_id = c.pod("client").identity();
    assert!(
        c.wait_log_line(1, T, |l| l.contains("connection complete")
            && l.contains(&format!("src.identity=\"{client_id}\""))),
        "node1 did not log the client's identity:\n{}",
        c.ztunnel_log(1)
    );

    // Un-enroll client-ns: only the Namespace label changes.
    c.set_namespace_enrolled("client-ns", false).unwrap();
    let changed = c.controller_source().unwrap().last_changed.clone();
    assert_eq!(changed, vec!["00-namespaces.yaml".to_string()]);
    c.wait_enrolled(0, Duration::from_secs(15))
        .expect("client released");
    let cap = c.capture("ctrl-released").unwrap();
    let marker = "ZMESH-CTRL-DIRECT-22bb";
    assert_eq!(
        c.echo_eventually("client", echo, marker, Duration::from_secs(5))
            .unwrap(),
        format!("v1 {marker}")
    );
    assert!(
        contains(&cap.finish().unwrap(), marker.as_bytes()),
        "released client should connect directly (in clear)"
    );

    // Label it again: captured again.
    c.set_namespace_enrolled("client-ns", true).unwrap();
    c.wait_enrolled(0, Duration::from_secs(15))
        .expect("client captured again");
    let cap = c.capture("ctrl-again").unwrap();
    let marker = "ZMESH-CTRL-AGAIN-33cc";
    assert_eq!(
        c.echo_eventually("client", echo, marker, Duration::from_secs(5))
            .unwrap(),
        format!("v1 {marker}")
    );
    assert!(
        !contains(&cap.finish().unwrap(), marker.as_bytes()),
        "re-enrolled traffic went in clear"
    );

    // Label legacy: both of its pods (one per node) are captured; their traffic is HBONE.
    c.set_namespace_enrolled("legacy", true).unwrap();
    c.wait_enrolled(0, Duration::from_secs(15))
        .expect("outsider captured");
    c.wait_enrolled(1, Duration::from_secs(15))
        .expect("plain captured");
    let cap = c.capture("ctrl-legacy").unwrap();
    let marker = "ZMESH-CTRL-LEGACY-44dd";
    assert_eq!(
        c.echo_eventually("outsider", plain, marker, Duration::from_secs(5))
            .unwrap(),
        format!("v0 {marker}")
    );
    let pcap = cap.finish().unwrap();
    assert!(
        !contains(&pcap, marker.as_bytes()),
        "legacy marker in clear"
    );
    assert!(pcap_tcp_port_packets(&pcap, 15008) > 0, "no HBONE packets");

    // Release legacy again, then STRICT (a mesh-wide PeerAuthentication in istio-system):
    // the outsider's plaintext is refused, mesh traffic still flows.
    c.set_namespace_enrolled("legacy", false).unwrap();
    c.wait_enrolled(0, Duration::from_secs(15))
        .expect("outsider released");
    c.update_mesh(|m| m.mtls_mode = Some("STRICT".into()))
        .unwrap();
    wait_until(Duration::from_secs(10), "STRICT refuses plaintext", || {
        c.echo("outsider", echo, "strict?", Duration::from_secs(2))
            .is_err()
    });
    assert_eq!(c.echo("client", echo, "mtls", T).unwrap(), "v1 mtls");

    // A label change while node0's ztunnel is down is reconciled when it comes back (it
    // resyncs from the controller): the client is released.
    c.kill_ztunnel(0);
    c.set_namespace_enrolled("client-ns", false).unwrap();
    c.restart_ztunnel(0)
        .expect("restarted ztunnel resyncs and reconciles");
    let change = &c.config_dump(0).unwrap()["redirect"]["last_change"];
    assert_eq!(
        change["removed"],
        serde_json::json!([c.pod("client").ip.to_string()]),
        "{change}"
    );
    c.update_mesh(|m| m.mtls_mode = None).unwrap();
    c.set_namespace_enrolled("client-ns", true).unwrap();
    c.wait_enrolled(0, Duration::from_secs(15))
        .expect("client captured again");
    assert_eq!(
        c.echo_eventually("client", echo, "back", Duration::from_secs(5))
            .unwrap(),
        "v1 back"
    );

    // A policy added to the directory refuses the client's next connection.
    c.update_mesh(|m| {
        m.k8s_objects.push(
            r#"apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: deny-client-ns
  namespace: server-ns
spec:
  action: DENY
  rules:
  - from:
    - source:
        namespaces: ["client-ns"]"#
                .into(),
        )
    })
    .unwrap();
    wait_until(Duration::from_secs(10), "deny-client-ns applies", || {
        c.echo("client", echo, "denied?", Duration::from_secs(2))
            .is_err()
    });
    assert!(
        c.wait_log_line(1, T, |l| l.contains("denied by authorization policy")
            && l.contains("deny-client-ns")),
        "no denial log line naming the policy:\n{}",
        c.ztunnel_log(1)
    );
    assert_eq!(
        c.echo("outsider", echo, "still-allowed", T).unwrap(),
        "v1 still-allowed"
    );
}
