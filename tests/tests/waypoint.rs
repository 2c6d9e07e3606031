//! The waypoint end to end in the netns cluster (root; see zmesh_tests docs): client pod →
//! ztunnel (eBPF capture) ═HBONE═▶ waypoint pod (the real `waypoint` binary, identity and
//! config from `zmesh-controller`) ═HBONE═▶ ztunnel → pod, with the sample apps. Every config
//! change is a YAML file written into the controller's directory, as a user would.
//!
//! Cluster (controller source, namespace `default` labelled `istio.io/use-waypoint:
//! waypoint`): node0 { client, reviews-v3, tcp-echo-v2 }, node1 { waypoint-0, reviews-v1,
//! reviews-v2, productpage, httpbin, tcp-echo-v1 }. Services: reviews:9080 (v1/v2/v3),
//! productpage:9080, httpbin:8000, tcp-echo:9000 (v1/v2).
//!
//! A request went through the waypoint iff the app saw an `x-request-id` (the waypoint adds one
//! when absent; ztunnel never touches HTTP) — that is how the L4 and L7 paths are told apart.

use std::collections::HashMap;
use std::io::{BufRead, Read, Write};
use std::net::{Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use zmesh_tests::{
    Cluster, HttpResponse, PodSpec, ServiceSpec, USE_WAYPOINT, connect_in, http_in, http1_request,
    metric_value, require_root,
};

const T: Duration = Duration::from_secs(5);
const WP: &str = "waypoint";
const REVIEWS: SocketAddr = vip(1, 9080);
const PRODUCTPAGE: SocketAddr = vip(2, 9080);
const HTTPBIN: SocketAddr = vip(3, 8000);
const TCP_ECHO: SocketAddr = vip(4, 9000);

const fn vip(last: u8, port: u16) -> SocketAddr {
    SocketAddr::V4(std::net::SocketAddrV4::new(
        Ipv4Addr::new(10, 96, 0, last),
        port,
    ))
}

fn service(name: &str, addr: SocketAddr, pods: &[&str]) -> ServiceSpec {
    let SocketAddr::V4(a) = addr else {
        unreachable!("IPv4 VIPs")
    };
    ServiceSpec {
        name: name.into(),
        namespace: "default".into(),
        vip: *a.ip(),
        port: a.port(),
        target_port: a.port(),
        pods: pods.iter().map(|p| p.to_string()).collect(),
    }
}

/// The cluster of the module docs, sample apps running, traffic already through the waypoint.
fn cluster() -> Cluster {
    let pod = |name: &str, node: usize, version: &str| {
        PodSpec::new(name, "default", node, true).version(version)
    };
    let mut c = Cluster::builder()
        .controller()
        .nodes(2)
        .pod(pod("client", 0, "v1"))
        .pod(pod("reviews-v1", 1, "v1"))
        .pod(pod("reviews-v2", 1, "v2"))
        .pod(pod("reviews-v3", 0, "v3"))
        .pod(pod("productpage", 1, "v1"))
        .pod(pod("httpbin", 1, "v1"))
        .pod(pod("tcp-echo-v1", 1, "v1"))
        .pod(pod("tcp-echo-v2", 0, "v2"))
        .service(service(
            "reviews",
            REVIEWS,
            &["reviews-v1", "reviews-v2", "reviews-v3"],
        ))
        .service(service("productpage", PRODUCTPAGE, &["productpage"]))
        .service(service("httpbin", HTTPBIN, &["httpbin"]))
        .service(service(
            "tcp-echo",
            TCP_ECHO,
            &["tcp-echo-v1", "tcp-echo-v2"],
        ))
        .waypoint(WP, "default", 1)
        .namespace_label("default", USE_WAYPOINT, WP)
        .build()
        .expect("building the netns cluster with a waypoint");
    for v in ["v1", "v2", "v3"] {
        c.start_http(&format!("reviews-{v}"), "reviews", 9080)
            .expect("reviews app");
    }
    c.start_http("productpage", "productpage", 9080)
        .expect("productpage app");
    c.start_http("httpbin", "httpbin", 8000)
        .expect("httpbin app");
    c.start_tcp_echo("tcp-echo-v1", 9000).expect("tcp-echo v1");
    c.start_tcp_echo("tcp-echo-v2", 9000).expect("tcp-echo v2");
    wait_until(
        &c,
        Duration::from_secs(20),
        "the first request through the waypoint",
        || get(&c, REVIEWS, "/", &[]).is_ok_and(|r| r.status == 200 && via_waypoint(&r)),
    );
    c
}

/// Sum of the waypoint's `istio_requests_total` samples with `labels`.
fn waypoint_metric(c: &Cluster, labels: &[(&str, &str)]) -> f64 {
    let text = c
        .waypoint_get(WP, 15020, "/metrics")
        .expect("waypoint metrics")
        .body;
    metric_value(&text, "istio_requests_total", labels)
}

/// `GET path` from the client pod to `dst` (a fresh connection, as a browser refresh).
fn get(
    c: &Cluster,
    dst: SocketAddr,
    path: &str,
    headers: &[(&str, &str)],
) -> std::io::Result<HttpResponse> {
    req(c, dst, &format!("GET {path}"), headers)
}

fn req(
    c: &Cluster,
    dst: SocketAddr,
    request: &str,
    headers: &[(&str, &str)],
) -> std::io::Result<HttpResponse> {
    let host = format!("{}:{}", host_of(dst), dst.port());
    c.http("client", dst, request, &host, headers, T)
}

fn host_of(dst: SocketAddr) -> &'static str {
    match dst {
        REVIEWS => "reviews",
        PRODUCTPAGE => "productpage",
        HTTPBIN => "httpbin",
        _ => "tcp-echo",
    }
}

/// The sample app's version in a response body (`"v1"`...), or the status when not 200.
fn version(r: &HttpResponse) -> String {
    if r.status != 200 {
        return format!("status {}", r.status);
    }
    r.json()["version"].as_str().unwrap_or("?").to_string()
}

/// Did the app see the request come through the waypoint (an `x-request-id` it added)?
fn via_waypoint(r: &HttpResponse) -> bool {
    r.json()["headers"]["x-request-id"].is_string()
}

/// `n` GETs on reviews on one keep-alive connection (the waypoint routes each request on
/// its own): count by version (non-200s counted as `status N`).
fn versions(c: &Cluster, n: usize, headers: &[(&str, &str)]) -> HashMap<String, usize> {
    let mut s = c
        .connect("client", REVIEWS, T)
        .unwrap_or_else(|e| panic!("connecting to reviews: {e}"));
    let mut m = HashMap::new();
    for i in 0..n {
        let r = http1_request(&mut s, "GET", "/reviews/0", "reviews:9080", headers)
            .unwrap_or_else(|e| panic!("request {i} of {n} to reviews failed: {e}"));
        *m.entry(version(&r)).or_insert(0) += 1;
    }
    m
}

fn wait_until(c: &Cluster, timeout: Duration, what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !f() {
        assert!(
            Instant::now() < deadline,
            "timed out waiting for: {what}\n--- waypoint log ---\n{}\n--- controller log ---\n{}",
            c.waypoint_log(WP),
            c.source_log()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn apply(c: &Cluster, file: &str, yaml: &str) {
    c.apply_yaml_to_waypoint(WP, file, yaml)
        .unwrap_or_else(|e| panic!("applying {file}: {e}"));
}

const REVIEWS_DR: &str = "apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: reviews, namespace: default}
spec:
  host: reviews
  subsets:
  - {name: v1, labels: {version: v1}}
  - {name: v2, labels: {version: v2}}
  - {name: v3, labels: {version: v3}}
";

/// `virtual-service-reviews-*.yaml`: the DestinationRule plus a VirtualService with `http`.
fn reviews_vs(http: &str) -> String {
    format!(
        "{REVIEWS_DR}---\napiVersion: networking.istio.io/v1\nkind: VirtualService\n\
         metadata: {{name: reviews, namespace: default}}\nspec:\n  hosts: [reviews]\n  http:\n{http}"
    )
}

const JASON: (&str, &str) = ("end-user", "jason");

/// The seeds' scenarios (catalogue §3) with their numbers, one cluster, in sequence: A1, A2,
/// A4, A6, A5, A3, mirroring (A9), L7 authorization (A14.7), rate limiting (A20), circuit
/// breaking (A8) and TCP weighted routing (A7).
#[test]
fn seeds_scenarios_through_the_waypoint() {
    if !require_root("seeds_scenarios_through_the_waypoint") {
        return;
    }
    let c = cluster();

    // A0: no L7 config yet: the waypoint forwards to every version of the service.
    let m = versions(&c, 30, &[]);
    assert!(
        m.len() >= 2 && !m.keys().any(|k| k.starts_with("status")),
        "A0 baseline: {m:?}"
    );
    // A line per request in the waypoint's own log, written within its flush interval (1 s).
    wait_until(&c, Duration::from_secs(10), "A0's access-log lines", || {
        c.waypoint_log(WP)
            .lines()
            .filter(|l| l.contains("request complete") && l.contains("response_code=200"))
            .count()
            >= 30
    });

    // WebSocket-style upgrade (HTTP/1.1 Upgrade): 101 through the waypoint, lines echoed both
    // ways, the client's half-close carried to the app, whose last line still comes back.
    let upgraded_before = waypoint_metric(&c, &[("response_code", "101")]);
    let mut ws = connect_in(&c.pod_ns("client"), REVIEWS, T).expect("upgrade connection");
    ws.set_read_timeout(Some(T)).expect("read timeout");
    ws.write_all(
        b"GET /ws HTTP/1.1\r\nhost: reviews:9080\r\nconnection: Upgrade\r\nupgrade: websocket\r\n\r\n",
    )
    .expect("upgrade request");
    let mut lines = std::io::BufReader::new(ws.try_clone().expect("clone"));
    let mut head = String::new();
    loop {
        let mut l = String::new();
        if lines.read_line(&mut l).expect("101 head") == 0 || l == "\r\n" {
            break;
        }
        head.push_str(&l);
    }
    assert!(
        head.starts_with("HTTP/1.1 101"),
        "upgrade answered 101: {head}"
    );
    for i in 0..3 {
        ws.write_all(format!("message {i}\n").as_bytes())
            .expect("message");
        let mut l = String::new();
        lines.read_line(&mut l).expect("echo");
        assert!(l.ends_with(&format!(" message {i}\n")), "echo {i}: {l:?}");
    }
    ws.shutdown(std::net::Shutdown::Write).expect("half-close");
    let mut rest = String::new();
    lines
        .read_to_string(&mut rest)
        .expect("end of the upgraded stream");
    assert!(
        rest.ends_with(" bye\n"),
        "last words after the half-close: {rest:?}"
    );
    wait_until(&c, T, "the upgrade counted once as 101", || {
        waypoint_metric(&c, &[("response_code", "101")]) == upgraded_before + 1.0
    });

    // A1: route all to v1.
    apply(
        &c,
        "50-reviews.yaml",
        &reviews_vs("  - route:\n    - destination: {host: reviews, subset: v1}\n"),
    );
    let m = versions(&c, 20, &[]);
    assert_eq!(m.get("v1"), Some(&20), "A1 all to v1: {m:?}");

    // A2: end-user jason → v2, everyone else → v1.
    apply(
        &c,
        "50-reviews.yaml",
        &reviews_vs(
            "  - match:\n    - headers:\n        end-user: {exact: jason}\n    route:\n    \
             - destination: {host: reviews, subset: v2}\n  - route:\n    \
             - destination: {host: reviews, subset: v1}\n",
        ),
    );
    let m = versions(&c, 10, &[JASON]);
    assert_eq!(m.get("v2"), Some(&10), "A2 jason → v2: {m:?}");
    let m = versions(&c, 10, &[("end-user", "bob")]);
    assert_eq!(m.get("v1"), Some(&10), "A2 everyone else → v1: {m:?}");

    // A4: abort 500 for jason, immediately; others unaffected.
    apply(
        &c,
        "50-reviews.yaml",
        &reviews_vs(
            "  - fault:\n      abort: {httpStatus: 500, percentage: {value: 100}}\n    match:\n    \
             - headers:\n        end-user: {exact: jason}\n    route:\n    \
             - destination: {host: reviews, subset: v1}\n  - route:\n    \
             - destination: {host: reviews, subset: v1}\n",
        ),
    );
    let t = Instant::now();
    let r = get(&c, REVIEWS, "/reviews/0", &[JASON]).expect("jason's request");
    assert_eq!(r.status, 500, "A4 abort for jason: {r:?}");
    assert!(
        t.elapsed() < Duration::from_secs(1),
        "A4 abort is immediate: {:?}",
        t.elapsed()
    );
    let m = versions(&c, 5, &[]);
    assert_eq!(m.get("v1"), Some(&5), "A4 others unaffected: {m:?}");

    // A6: 50/50 v1/v3, then 100 % v3. The band is 5 standard deviations wide (400 requests,
    // 150..=250 v3): a correct split fails it less than once in a million runs (the former
    // 200-request ±10 % band failed one run in ~300), while 100/0 or 65/35 still fail.
    apply(
        &c,
        "50-reviews.yaml",
        &reviews_vs(
            "  - route:\n    - destination: {host: reviews, subset: v1}\n      weight: 50\n    \
             - destination: {host: reviews, subset: v3}\n      weight: 50\n",
        ),
    );
    let m = versions(&c, 400, &[]);
    let v3 = m.get("v3").copied().unwrap_or(0);
    assert!(
        (150..=250).contains(&v3) && m.get("v1").copied().unwrap_or(0) + v3 == 400,
        "A6 50/50 v1/v3 over 400 requests: {m:?}"
    );
    apply(
        &c,
        "50-reviews.yaml",
        &reviews_vs("  - route:\n    - destination: {host: reviews, subset: v3}\n"),
    );
    let m = versions(&c, 20, &[]);
    assert_eq!(m.get("v3"), Some(&20), "A6 100 % v3: {m:?}");

    // A5: a 0.5 s route timeout vs a 2 s slow upstream (ratings' delay, here the app's
    // /delay/2000) → 504 after ≈0.5 s; a fast request still passes.
    apply(
        &c,
        "50-reviews.yaml",
        &reviews_vs(
            "  - route:\n    - destination: {host: reviews, subset: v2}\n    timeout: 0.5s\n",
        ),
    );
    let t = Instant::now();
    let r = get(&c, REVIEWS, "/delay/2000", &[]).expect("A5 request");
    let e = t.elapsed();
    assert_eq!(r.status, 504, "A5 0.5 s timeout vs 2 s delay: {r:?}");
    assert!(
        e >= Duration::from_millis(450) && e < Duration::from_millis(1500),
        "A5 504 after {e:?}"
    );
    let r = get(&c, REVIEWS, "/delay/50", &[]).expect("A5 fast request");
    assert_eq!(version(&r), "v2", "A5 under the timeout: {r:?}");

    // A3: a 7 s delay for jason; the caller (productpage's budget: 3 s + 1 retry) gives up
    // after ≈6 s with its own error; other users see no delay.
    apply(
        &c,
        "50-reviews.yaml",
        &reviews_vs(
            "  - fault:\n      delay: {fixedDelay: 7s, percentage: {value: 100}}\n    match:\n    \
             - headers:\n        end-user: {exact: jason}\n    route:\n    \
             - destination: {host: reviews, subset: v1}\n  - route:\n    \
             - destination: {host: reviews, subset: v1}\n",
        ),
    );
    let t = Instant::now();
    let r = get(&c, REVIEWS, "/reviews/0", &[("end-user", "bob")]).expect("A3 bob");
    assert!(
        version(&r) == "v1" && t.elapsed() < Duration::from_secs(1),
        "A3 others: {r:?} after {:?}",
        t.elapsed()
    );
    let t = Instant::now();
    let budget = Duration::from_secs(3);
    let caller = (0..2).map(|_| {
        c.http(
            "client",
            REVIEWS,
            "GET /reviews/0",
            "reviews:9080",
            &[JASON],
            budget,
        )
    });
    let results: Vec<_> = caller.collect();
    let e = t.elapsed();
    assert!(
        results.iter().all(|r| r.is_err()),
        "A3 jason's two attempts must both exceed 3 s: {results:?}"
    );
    assert!(
        e >= Duration::from_millis(5900) && e < Duration::from_millis(7000),
        "A3 the caller gives up after 3 s + 1 retry ≈ 6 s, took {e:?}"
    );

    // A9 mirroring v1 → v2: v2 receives each request with Host reviews-shadow:9080, the
    // caller only ever sees v1.
    apply(
        &c,
        "50-reviews.yaml",
        &reviews_vs(
            "  - route:\n    - destination: {host: reviews, subset: v1}\n      weight: 100\n    \
             mirror: {host: reviews, subset: v2}\n    mirrorPercentage: {value: 100}\n",
        ),
    );
    let v2_log = || c.app_log("reviews-v2", "zmesh-sample-http");
    let before = v2_log().lines().count();
    let m = versions(&c, 10, &[]);
    assert_eq!(m.get("v1"), Some(&10), "A9 the caller sees only v1: {m:?}");
    wait_until(&c, T, "v2 logs the 10 mirrored requests", || {
        v2_log()
            .lines()
            .skip(before)
            .filter(|l| l.starts_with("request "))
            .count()
            >= 10
    });
    let log = v2_log();
    let mirrored: Vec<&str> = log
        .lines()
        .skip(before)
        .filter(|l| l.starts_with("request "))
        .collect();
    assert!(
        mirrored
            .iter()
            .all(|l| l.contains("host=reviews-shadow:9080")),
        "A9 mirrored copies carry the -shadow Host: {mirrored:#?}"
    );

    // A14.7 L7 authorization on productpage: ALLOW GET /productpage, everything else 403.
    apply(
        &c,
        "60-productpage-authz.yaml",
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\n\
         metadata: {name: productpage-viewer, namespace: default}\nspec:\n  \
         targetRefs: [{kind: Service, group: \"\", name: productpage}]\n  action: ALLOW\n  \
         rules:\n  - to: [{operation: {methods: [GET], paths: [/productpage]}}]\n",
    );
    let r = get(&c, PRODUCTPAGE, "/productpage", &[]).expect("GET /productpage");
    assert_eq!(r.status, 200, "A14 GET /productpage allowed: {r:?}");
    for request in ["POST /productpage", "GET /admin", "DELETE /productpage"] {
        let r = req(&c, PRODUCTPAGE, request, &[]).expect(request);
        assert_eq!(
            (r.status, r.body.as_str()),
            (403, "RBAC: access denied"),
            "A14 {request} denied"
        );
    }

    // A20 local rate limit (3 per minute on the route) → the 4th request gets 429.
    apply(
        &c,
        "50-reviews.yaml",
        &format!(
            "{REVIEWS_DR}---\napiVersion: networking.istio.io/v1\nkind: VirtualService\n\
             metadata:\n  name: reviews\n  namespace: default\n  annotations: {{zmesh.io/rate-limit: \"3/m\"}}\n\
             spec:\n  hosts: [reviews]\n  http:\n  - route:\n    - destination: {{host: reviews, subset: v1}}\n"
        ),
    );
    let codes: Vec<u16> = (0..4)
        .map(|_| {
            get(&c, REVIEWS, "/reviews/0", &[])
                .expect("A20 request")
                .status
        })
        .collect();
    assert_eq!(codes, vec![200, 200, 200, 429], "A20 rate limit 3/m");

    // A8 circuit breaking: 1 connection, 1 pending, 1 request per connection. One caller never
    // overflows; 2 and 3 concurrent callers get some 503 UO, each counted in
    // istio_requests_total{response_code="503",response_flags="UO"}.
    apply(
        &c,
        "70-httpbin.yaml",
        "apiVersion: networking.istio.io/v1\nkind: DestinationRule\n\
         metadata: {name: httpbin, namespace: default}\nspec:\n  host: httpbin\n  trafficPolicy:\n    \
         connectionPool:\n      tcp: {maxConnections: 1}\n      \
         http: {http1MaxPendingRequests: 1, maxRequestsPerConnection: 1}\n---\n\
         apiVersion: networking.istio.io/v1\nkind: VirtualService\n\
         metadata: {name: httpbin, namespace: default}\nspec:\n  hosts: [httpbin]\n  http:\n  \
         - route:\n    - destination: {host: httpbin}\n    retries: {attempts: 0}\n",
    );
    let uo_counted = || {
        let text = c
            .waypoint_get(WP, 15020, "/metrics")
            .expect("waypoint metrics")
            .body;
        metric_value(
            &text,
            "istio_requests_total",
            &[("response_code", "503"), ("response_flags", "UO")],
        ) as usize
    };
    let counted_before = uo_counted();
    let (ok1, uo1) = load(&c, 1, 10);
    assert_eq!((ok1, uo1), (10, 0), "A8 one caller never overflows");
    // Two callers overflow only when one's next request arrives before the connection the
    // other just finished has closed (Envoy's "Sockets used: 3"): a few rounds at most.
    let mut two = (0, 0);
    let t = Instant::now();
    while two.1 == 0 && t.elapsed() < Duration::from_secs(20) {
        let (ok, uo) = load(&c, 2, 20);
        two = (two.0 + ok, two.1 + uo);
    }
    let three = load(&c, 3, 30);
    println!(
        "A8 circuit breaker: c=2 → {} ok / {} 503; c=3 → {} ok / {} 503",
        two.0, two.1, three.0, three.1
    );
    assert!(two.1 > 0, "A8 two callers get some 503 UO: {two:?}");
    assert!(three.1 > 0, "A8 three callers get some 503 UO: {three:?}");
    assert!(
        two.0 > 0 && three.0 > 0,
        "A8 most requests still pass: {two:?} {three:?}"
    );
    wait_until(
        &c,
        T,
        "the UO 503s are counted in istio_requests_total",
        || uo_counted() - counted_before == two.1 + three.1,
    );
    // ... and in Envoy's cluster stats, where `curl localhost:15000/stats | grep pending` finds
    // them (A8 step 4), also scraped as envoy_cluster_*{cluster_name}.
    let stats = c
        .waypoint_get(WP, 15000, "/stats")
        .expect("waypoint /stats")
        .body;
    let stat = |name: &str| -> usize {
        stats
            .lines()
            .filter(|l| l.contains("httpbin.default.svc") && l.contains(&format!(".{name}: ")))
            .filter_map(|l| l.rsplit(": ").next()?.parse::<usize>().ok())
            .sum()
    };
    let overflow = stat("upstream_rq_pending_overflow");
    assert!(overflow >= two.1 + three.1, "A8 stats: {stats}");
    assert!(stat("upstream_rq_pending_total") >= overflow, "{stats}");
    assert_eq!(stat("upstream_rq_pending_active"), 0, "{stats}");
    let metrics = c
        .waypoint_get(WP, 15020, "/metrics")
        .expect("waypoint metrics")
        .body;
    let scraped = metric_value(
        &metrics,
        "envoy_cluster_upstream_rq_pending_overflow_total",
        &[],
    );
    assert_eq!(scraped as usize, {
        stats
            .lines()
            .filter(|l| l.contains(".upstream_rq_pending_overflow: "))
            .filter_map(|l| l.rsplit(": ").next()?.parse::<usize>().ok())
            .sum::<usize>()
    });

    // A7 tcp-echo: 100 % v1, then 80/20 (one routing decision per connection).
    let tcp_vs = |route: &str| {
        format!(
            "apiVersion: networking.istio.io/v1\nkind: DestinationRule\n\
             metadata: {{name: tcp-echo, namespace: default}}\nspec:\n  host: tcp-echo\n  subsets:\n  \
             - {{name: v1, labels: {{version: v1}}}}\n  - {{name: v2, labels: {{version: v2}}}}\n---\n\
             apiVersion: networking.istio.io/v1\nkind: VirtualService\n\
             metadata: {{name: tcp-echo, namespace: default}}\nspec:\n  hosts: [tcp-echo]\n  tcp:\n  \
             - route:\n{route}"
        )
    };
    let echo_versions = |n: usize| {
        let mut m: HashMap<String, usize> = HashMap::new();
        for i in 0..n {
            let reply = c
                .echo("client", TCP_ECHO, "hello", T)
                .unwrap_or_else(|e| panic!("tcp-echo connection {i}: {e}"));
            let v = reply.split(' ').next().unwrap_or("").to_string();
            *m.entry(v).or_insert(0) += 1;
        }
        m
    };
    apply(
        &c,
        "80-tcp-echo.yaml",
        &tcp_vs("    - destination: {host: tcp-echo, port: {number: 9000}, subset: v1}\n"),
    );
    let m = echo_versions(10);
    assert_eq!(m.get("v1"), Some(&10), "A7 100 % v1: {m:?}");
    apply(
        &c,
        "80-tcp-echo.yaml",
        &tcp_vs(
            "    - destination: {host: tcp-echo, port: {number: 9000}, subset: v1}\n      weight: 80\n    \
             - destination: {host: tcp-echo, port: {number: 9000}, subset: v2}\n      weight: 20\n",
        ),
    );
    let m = echo_versions(100);
    let v2 = m.get("v2").copied().unwrap_or(0);
    assert!(
        // ≥ 4 standard deviations: a correct 80/20 fails < 1 run in 100 000.
        (4..=40).contains(&v2) && m.get("v1").copied().unwrap_or(0) + v2 == 100,
        "A7 80/20 over 100 connections: {m:?}"
    );
}

/// `callers` concurrent callers from the client pod (fortio's `-c`), `n` requests in all to
/// httpbin `/`, each caller on its own keep-alive connection (so its next request
/// follows the previous response at once, as fortio's do): `(200s, 503s)`; any other
/// outcome fails the test.
fn load(c: &Cluster, callers: usize, n: usize) -> (usize, usize) {
    let ns = c.pod_ns("client");
    let handles: Vec<_> = (0..callers)
        .map(|_| {
            let ns = ns.clone();
            std::thread::spawn(move || {
                let mut s = connect_in(&ns, HTTPBIN, T).expect("circuit-breaker caller connects");
                let (mut ok, mut uo) = (0, 0);
                for _ in 0..n / callers {
                    let r = http1_request(&mut s, "GET", "/", "httpbin:8000", &[])
                        .expect("circuit-breaker request");
                    match r.status {
                        200 => ok += 1,
                        503 => uo += 1,
                        s => panic!("unexpected status {s}: {r:?}"),
                    }
                }
                (ok, uo)
            })
        })
        .collect();
    handles.into_iter().fold((0, 0), |(a, b), h| {
        let (ok, uo) = h.join().expect("caller thread");
        (a + ok, b + uo)
    })
}

/// Requests counted by reviews pods' logs (what actually reached an app).
fn reviews_requests(c: &Cluster) -> usize {
    ["reviews-v1", "reviews-v2", "reviews-v3"]
        .iter()
        .map(|p| {
            c.app_log(p, "zmesh-sample-http")
                .lines()
                .filter(|l| l.starts_with("request "))
                .count()
        })
        .sum()
}

/// Waypoint lifecycle: removing the namespace's `istio.io/use-waypoint` label sends traffic
/// back to the L4 path (the VirtualService no longer applies) with nothing restarted; a
/// Service label brings it back; a waypoint killed mid-traffic fails the in-flight request
/// and every new one (no bypass: nothing reaches the reviews pods), and traffic flows through
/// it again once restarted.
#[test]
fn waypoint_label_removal_kill_and_restart() {
    if !require_root("waypoint_label_removal_kill_and_restart") {
        return;
    }
    let mut c = cluster();
    apply(
        &c,
        "50-reviews.yaml",
        &reviews_vs("  - route:\n    - destination: {host: reviews, subset: v1}\n"),
    );
    let m = versions(&c, 10, &[]);
    assert_eq!(
        m.get("v1"),
        Some(&10),
        "through the waypoint, all to v1: {m:?}"
    );
    let pids = (c.waypoint_pid(WP), c.ztunnel_pid(0), c.ztunnel_pid(1));

    // Remove the namespace label: the L4 path (ztunnel load-balances over all versions and
    // the waypoint's x-request-id is gone).
    c.set_namespace_label("default", USE_WAYPOINT, None)
        .unwrap();
    wait_until(
        &c,
        Duration::from_secs(20),
        "traffic back on the L4 path",
        || get(&c, REVIEWS, "/", &[]).is_ok_and(|r| r.status == 200 && !via_waypoint(&r)),
    );
    let mut m = HashMap::new();
    for _ in 0..30 {
        let r = get(&c, REVIEWS, "/reviews/0", &[]).expect("L4 request");
        assert!(
            !via_waypoint(&r),
            "label removed, yet through the waypoint: {r:?}"
        );
        *m.entry(version(&r)).or_insert(0) += 1;
    }
    assert!(
        m.len() >= 2,
        "the L4 path ignores the VirtualService: {m:?}"
    );
    assert_eq!(
        (c.waypoint_pid(WP), c.ztunnel_pid(0), c.ztunnel_pid(1)),
        pids,
        "nothing restarted"
    );

    // `istio.io/use-waypoint` on the Service alone brings the waypoint back.
    c.set_service_label("default", "reviews", USE_WAYPOINT, Some(WP))
        .unwrap();
    wait_until(
        &c,
        Duration::from_secs(20),
        "service label → through the waypoint",
        || get(&c, REVIEWS, "/", &[]).is_ok_and(|r| r.status == 200 && via_waypoint(&r)),
    );
    let m = versions(&c, 10, &[]);
    assert_eq!(
        m.get("v1"),
        Some(&10),
        "service-labelled: all to v1 again: {m:?}"
    );

    // Kill the waypoint while a slow request is in flight.
    let inflight = {
        let ns = c.pod_ns("client");
        std::thread::spawn(move || {
            http_in(
                &ns,
                REVIEWS,
                "GET /delay/2000",
                "reviews:9080",
                &[],
                Duration::from_secs(10),
            )
        })
    };
    std::thread::sleep(Duration::from_millis(500));
    c.kill_waypoint(WP);
    let r = inflight.join().expect("in-flight thread");
    assert!(
        !r.as_ref().is_ok_and(|r| r.status == 200),
        "the in-flight request completed after the waypoint died: {r:?}"
    );
    let reached = reviews_requests(&c);
    for i in 0..5 {
        let r = get(&c, REVIEWS, "/reviews/0", &[]);
        assert!(
            !r.as_ref().is_ok_and(|r| r.status == 200),
            "request {i} succeeded with the waypoint down (bypass): {r:?}"
        );
    }
    assert_eq!(
        reviews_requests(&c),
        reached,
        "requests reached a reviews pod while the waypoint was down (bypass)"
    );

    // Restart: it syncs again (same pod, same identity) and serves.
    c.start_waypoint(WP).expect("waypoint restarts");
    wait_until(
        &c,
        Duration::from_secs(20),
        "traffic through the restarted waypoint",
        || get(&c, REVIEWS, "/", &[]).is_ok_and(|r| r.status == 200 && via_waypoint(&r)),
    );
    let m = versions(&c, 10, &[]);
    assert_eq!(
        m.get("v1"),
        Some(&10),
        "after the restart, all to v1: {m:?}"
    );
}

/// Bad clients: malformed HTTP/1.1 (400), oversized headers (431) and an HTTP/2 protocol
/// error (GOAWAY PROTOCOL_ERROR) each end only their own connection; a concurrent slow
/// request through the same waypoint completes, and new requests keep working.
#[test]
fn bad_client_input_fails_only_its_own_connection() {
    if !require_root("bad_client_input_fails_only_its_own_connection") {
        return;
    }
    let c = cluster();
    let ns = c.pod_ns("client");
    let slow = {
        let ns = ns.clone();
        std::thread::spawn(move || {
            http_in(
                &ns,
                REVIEWS,
                "GET /delay/1500",
                "reviews:9080",
                &[],
                Duration::from_secs(10),
            )
        })
    };
    std::thread::sleep(Duration::from_millis(200));

    // Send `bytes`, read what comes back until the waypoint closes the connection.
    let exchange = |bytes: &[u8]| -> Vec<u8> {
        let mut s = connect_in(&ns, REVIEWS, T).expect("connect");
        let _ = s.write_all(bytes);
        let mut buf = Vec::new();
        let _ = s.read_to_end(&mut buf);
        buf
    };
    let malformed = exchange(b"GET /x HTTP/1.1\r\nbad header line\r\n\r\n");
    let text = String::from_utf8_lossy(&malformed);
    assert!(
        text.starts_with("HTTP/1.1 400"),
        "malformed request → 400: {text:?}"
    );

    let huge = format!(
        "GET /x HTTP/1.1\r\nhost: reviews\r\nx-big: {}\r\n\r\n",
        "a".repeat(200_000)
    );
    let oversized = exchange(huge.as_bytes());
    let text = String::from_utf8_lossy(&oversized);
    assert!(
        text.starts_with("HTTP/1.1 431"),
        "oversized headers → 431: {:?}",
        &text[..text.len().min(200)]
    );

    // HTTP/2 prior knowledge: preface, empty SETTINGS, then HEADERS on stream 0.
    let mut h2 = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    h2.extend_from_slice(&[0, 0, 0, 0x4, 0, 0, 0, 0, 0]);
    h2.extend_from_slice(&[0, 0, 1, 0x1, 0x5, 0, 0, 0, 0, 0x82]);
    let reply = exchange(&h2);
    assert_eq!(
        goaway_code(&reply),
        Some(0x1),
        "HTTP/2 protocol error → GOAWAY PROTOCOL_ERROR; got {reply:?}"
    );

    let r = slow.join().expect("slow request thread");
    assert!(
        r.as_ref().is_ok_and(|r| r.status == 200 && via_waypoint(r)),
        "the concurrent request through the same waypoint must succeed: {r:?}"
    );
    let r = get(&c, REVIEWS, "/", &[]).expect("a new request after the bad ones");
    assert_eq!(r.status, 200, "{r:?}");
}

/// The error code of the first GOAWAY frame in a server's HTTP/2 byte stream.
fn goaway_code(mut buf: &[u8]) -> Option<u32> {
    while buf.len() >= 9 {
        let len = u32::from_be_bytes([0, buf[0], buf[1], buf[2]]) as usize;
        let payload = buf.get(9..9 + len)?;
        if buf[3] == 0x7 {
            return Some(u32::from_be_bytes(payload.get(4..8)?.try_into().ok()?));
        }
        buf = &buf[9 + len..];
    }
    None
}
