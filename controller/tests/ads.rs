//! Delta ADS conformance over real gRPC on loopback: the server is fed through its
//! `ResourceCache` (or through the object store + translation loop of a `Controller`) and driven
//! by a raw client that sends each request by hand, or by zmesh's own `XdsClient`.

mod common_ads;
use common_ads as common;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use common::*;
use zmesh_controller::ca::{TOKENS_DIR, write_bootstrap_token};
use zmesh_controller::controller::{Controller, ControllerConfig};
use zmesh_controller::xds::cache::ResourceCache;
use zmesh_core::metrics::{Metrics, sample_sum};
use zmesh_core::state::{ConfigSource, StateStore};
use zmesh_core::xds::{
    ControlPlaneEndpoint, ControlPlaneTls, TerminationReason, TokenSource, XdsClient, XdsConfig,
    XdsMetrics,
};
use zmesh_proto::discovery::DeltaDiscoveryRequest;
use zmesh_proto::{ADDRESS_TYPE_URL, AUTHORIZATION_TYPE_URL};

const DEBOUNCE: Duration = Duration::from_millis(50);
/// Long enough that a push, if one were coming, would have arrived (debounce + slack).
const QUIET: Duration = Duration::from_millis(400);

fn mesh() -> Vec<zmesh_core::state::Workload> {
    vec![
        workload("default", "a", "sa-a", "10.0.0.1", "node-1"),
        workload("default", "b", "sa-b", "10.0.0.2", "node-1"),
        workload("other", "c", "sa-c", "10.0.0.3", "node-2"),
    ]
}

fn seeded_cache() -> Arc<ResourceCache> {
    let cache = ResourceCache::new();
    cache.update(BTreeMap::from([
        (ADDRESS_TYPE_URL.to_string(), addresses(&mesh())),
        (
            AUTHORIZATION_TYPE_URL.to_string(),
            BTreeMap::from([("default/deny".to_string(), policy_any("default", "deny"))]),
        ),
    ]));
    cache
}

/// Subscribe wildcard to both types and ACK the initial responses; returns them.
async fn sync_wildcard(
    c: &mut RawClient,
) -> (
    zmesh_proto::discovery::DeltaDiscoveryResponse,
    zmesh_proto::discovery::DeltaDiscoveryResponse,
) {
    c.subscribe(ADDRESS_TYPE_URL, &[], BTreeMap::new()).await;
    c.subscribe(AUTHORIZATION_TYPE_URL, &[], BTreeMap::new())
        .await;
    let r1 = c.recv().await;
    let r2 = c.recv().await;
    let (addr, authz) = if r1.type_url == ADDRESS_TYPE_URL {
        (r1, r2)
    } else {
        (r2, r1)
    };
    c.ack(&addr).await;
    c.ack(&authz).await;
    (addr, authz)
}

#[tokio::test]
async fn wildcard_subscribe_gets_everything() {
    init();
    let h = AdsHarness::start(seeded_cache(), DEBOUNCE).await;
    let mut c = RawClient::connect(h.addr).await;
    let (addr, authz) = sync_wildcard(&mut c).await;
    let all: Vec<String> = mesh().iter().map(|w| w.uid.clone()).collect();
    assert_eq!(names(&addr), all);
    assert!(addr.removed_resources.is_empty());
    assert_eq!(addr.type_url, ADDRESS_TYPE_URL);
    assert_eq!(
        addr.system_version_info,
        h.cache.version(ADDRESS_TYPE_URL).to_string()
    );
    assert!(!addr.nonce.is_empty());
    for r in &addr.resources {
        let any = r.resource.as_ref().unwrap();
        assert_eq!(any.type_url, ADDRESS_TYPE_URL);
        assert_eq!(r.version.len(), 32, "content hash version");
    }
    assert_eq!(names(&authz), vec!["default/deny"]);
    assert_ne!(addr.nonce, authz.nonce);
    // ACKed and nothing changed: nothing more.
    c.expect_silence(QUIET).await;
    assert_eq!(h.metrics.nack_count(ADDRESS_TYPE_URL), 0);

    // "*" is wildcard too; an empty type still answers (so clients can become ready).
    let empty = ResourceCache::new();
    let h2 = AdsHarness::start(empty, DEBOUNCE).await;
    let mut c2 = RawClient::connect(h2.addr).await;
    c2.subscribe(ADDRESS_TYPE_URL, &["*"], BTreeMap::new())
        .await;
    let r = c2.recv().await;
    assert!(r.resources.is_empty() && r.removed_resources.is_empty());
    assert_eq!(r.system_version_info, "0");
}

#[tokio::test]
async fn large_initial_pushes_take_turns_without_letting_a_silent_client_stall_others() {
    init();
    let cache = ResourceCache::new();
    let many: Vec<zmesh_core::state::Workload> = (0..1500)
        .map(|i| {
            let ip = format!("10.1.{}.{}", i / 200, i % 200 + 1);
            workload("default", &format!("p{i}"), "sa", &ip, "node-1")
        })
        .collect();
    cache.update(BTreeMap::from([(
        ADDRESS_TYPE_URL.to_string(),
        addresses(&many),
    )]));
    let opts = zmesh_controller::xds::server::AdsOptions {
        debounce: DEBOUNCE,
        concurrent_large_pushes: 1,
        ..Default::default()
    };
    let h = AdsHarness::start_with(cache, opts, "127.0.0.1:0".parse().unwrap()).await;
    let mut a = RawClient::connect(h.addr).await;
    a.subscribe(ADDRESS_TYPE_URL, &[], BTreeMap::new()).await;
    let ra = a.recv().await;
    assert_eq!(ra.resources.len(), 1500);
    // One slot, held by A until it answers: B waits.
    let mut b = RawClient::connect(h.addr).await;
    b.subscribe(ADDRESS_TYPE_URL, &[], BTreeMap::new()).await;
    b.expect_silence(Duration::from_secs(1)).await;
    a.ack(&ra).await;
    let rb = tokio::time::timeout(Duration::from_secs(2), b.recv())
        .await
        .expect("B is served once A has ACKed");
    assert_eq!(rb.resources.len(), 1500);
    // A client syncing two large types holds one slot and gets both at once.
    for i in 0..1200 {
        let name = format!("default/p{i}");
        h.cache.apply(
            AUTHORIZATION_TYPE_URL,
            BTreeMap::from([(name, policy_any("default", &format!("p{i}")))]),
            vec![],
        );
    }
    b.ack(&rb).await;
    let mut d = RawClient::connect(h.addr).await;
    let both = tokio::time::timeout(Duration::from_secs(2), sync_wildcard(&mut d))
        .await
        .expect("a stream never waits for a second slot while holding one");
    assert_eq!(
        (both.0.resources.len(), both.1.resources.len()),
        (1500, 1200)
    );
    // B has its slot back; B's later push is small. Take the slot with a client that
    // never answers, then C still gets its state, after the bounded wait.
    let mut b = RawClient::connect(h.addr).await;
    b.subscribe(ADDRESS_TYPE_URL, &[], BTreeMap::new()).await;
    let _ = b.recv().await;
    let started = std::time::Instant::now();
    let mut c = RawClient::connect(h.addr).await;
    c.subscribe(ADDRESS_TYPE_URL, &[], BTreeMap::new()).await;
    let rc = tokio::time::timeout(Duration::from_secs(10), c.recv())
        .await
        .expect("a silent client delays others only for a bounded time");
    assert_eq!(rc.resources.len(), 1500);
    assert!(
        started.elapsed() >= Duration::from_secs(4),
        "C waited for the slot"
    );
}

#[tokio::test]
async fn one_change_reaches_a_connected_client_as_one_delta() {
    init();
    let h = AdsHarness::start(seeded_cache(), DEBOUNCE).await;
    let mut c = RawClient::connect(h.addr).await;
    let (first, _) = sync_wildcard(&mut c).await;
    let v0: u64 = first.system_version_info.parse().unwrap();

    // Add one pod.
    let mut ws = mesh();
    ws.push(workload("default", "d", "sa-d", "10.0.0.4", "node-1"));
    h.cache.update_type(ADDRESS_TYPE_URL, addresses(&ws));
    let r = c.recv().await;
    assert_eq!(r.type_url, ADDRESS_TYPE_URL);
    assert_eq!(names(&r), vec![uid("default", "d")]);
    assert!(r.removed_resources.is_empty());
    assert_eq!(r.system_version_info, (v0 + 1).to_string());
    c.ack(&r).await;
    c.expect_silence(QUIET).await; // exactly one delta; Authorization untouched

    // Remove one pod.
    ws.retain(|w| w.name != "a");
    h.cache.update_type(ADDRESS_TYPE_URL, addresses(&ws));
    let r = c.recv().await;
    assert!(r.resources.is_empty());
    assert_eq!(r.removed_resources, vec![uid("default", "a")]);
    c.ack(&r).await;
    c.expect_silence(QUIET).await;

    // Several changes coalesce into one delta. An isolated change (f) goes out at once (no
    // debounce delay after a quiet window); changes made while a push is in flight (or within
    // the window after it) leave together, with the latest content.
    ws.push(workload("default", "f", "sa-f", "10.0.0.6", "node-1"));
    h.cache.update_type(ADDRESS_TYPE_URL, addresses(&ws));
    let r_f = c.recv().await;
    assert_eq!(names(&r_f), vec![uid("default", "f")]);
    let mut e = workload("default", "e", "sa-e", "10.0.0.5", "node-1");
    ws.push(e.clone());
    h.cache.update_type(ADDRESS_TYPE_URL, addresses(&ws));
    e.addresses = vec!["10.0.0.55".parse().unwrap()];
    ws.pop();
    ws.push(e.clone());
    h.cache.update_type(ADDRESS_TYPE_URL, addresses(&ws));
    c.expect_silence(QUIET).await; // nothing while f is unacknowledged
    c.ack(&r_f).await;
    let r = c.recv().await;
    assert_eq!(names(&r), vec![uid("default", "e")]);
    let (_, cached) = h.cache.snapshot(ADDRESS_TYPE_URL);
    assert_eq!(
        r.resources[0].version,
        *cached[uid("default", "e").as_str()].version
    );
    c.ack(&r).await;
    c.expect_silence(QUIET).await;
}

#[tokio::test]
async fn reconnect_with_initial_versions_resends_only_changes() {
    init();
    let h = AdsHarness::start(seeded_cache(), DEBOUNCE).await;
    let mut c = RawClient::connect(h.addr).await;
    let (first, _) = sync_wildcard(&mut c).await;
    let held = versions(&first);
    drop(c);

    // While the client is away: b changes, c goes away, f arrives.
    let mut ws = mesh();
    ws[1].addresses = vec!["10.0.0.22".parse().unwrap()];
    ws.retain(|w| w.name != "c");
    ws.push(workload("default", "f", "sa-f", "10.0.0.6", "node-1"));
    h.cache.update_type(ADDRESS_TYPE_URL, addresses(&ws));

    let mut c = RawClient::connect(h.addr).await;
    let mut initial = held.clone();
    initial.insert("vanished-long-ago".into(), "123".into());
    c.subscribe(ADDRESS_TYPE_URL, &[], initial).await;
    let r = c.recv().await;
    assert_eq!(names(&r), vec![uid("default", "b"), uid("default", "f")]);
    let mut removed = r.removed_resources.clone();
    removed.sort();
    assert_eq!(
        removed,
        vec![uid("other", "c"), "vanished-long-ago".to_string()]
    );
    c.ack(&r).await;
    c.expect_silence(QUIET).await;

    // Reconnecting with exactly the current versions: an empty answer (the client is ready).
    drop(c);
    let (_, now) = h.cache.snapshot(ADDRESS_TYPE_URL);
    let current: BTreeMap<String, String> = now
        .iter()
        .map(|(k, v)| (k.to_string(), v.version.to_string()))
        .collect();
    let mut c = RawClient::connect(h.addr).await;
    c.subscribe(ADDRESS_TYPE_URL, &[], current).await;
    let r = c.recv().await;
    assert!(
        r.resources.is_empty() && r.removed_resources.is_empty(),
        "{r:?}"
    );
}

#[tokio::test]
async fn nack_is_counted_not_resent_and_later_changes_flow() {
    init();
    let h = AdsHarness::start(seeded_cache(), DEBOUNCE).await;
    let mut c = RawClient::connect(h.addr).await;
    sync_wildcard(&mut c).await;

    // b changes; the client NACKs it.
    let mut ws = mesh();
    ws[1].addresses = vec!["10.0.0.22".parse().unwrap()];
    h.cache.update_type(ADDRESS_TYPE_URL, addresses(&ws));
    let r = c.recv().await;
    assert_eq!(names(&r), vec![uid("default", "b")]);
    c.nack(&r, "b: field `addresses`: test rejection").await;
    // Not pushed again.
    c.expect_silence(QUIET).await;
    assert_eq!(h.metrics.nack_count(ADDRESS_TYPE_URL), 1);

    // A change elsewhere flows, and carries only that resource (not the NACKed b).
    ws[0].addresses = vec!["10.0.0.11".parse().unwrap()];
    h.cache.update_type(ADDRESS_TYPE_URL, addresses(&ws));
    let r = c.recv().await;
    assert_eq!(names(&r), vec![uid("default", "a")]);
    c.ack(&r).await;

    // A new version of b is pushed again.
    ws[1].addresses = vec!["10.0.0.222".parse().unwrap()];
    h.cache.update_type(ADDRESS_TYPE_URL, addresses(&ws));
    let r = c.recv().await;
    assert_eq!(names(&r), vec![uid("default", "b")]);
    c.ack(&r).await;
    c.expect_silence(QUIET).await;
    assert_eq!(h.metrics.nack_count(ADDRESS_TYPE_URL), 1);

    // A removal of a resource the client NACKed is still sent (it may hold the good part).
    ws[2].addresses = vec!["10.0.0.33".parse().unwrap()];
    h.cache.update_type(ADDRESS_TYPE_URL, addresses(&ws));
    let r = c.recv().await;
    c.nack(&r, "c: nope").await;
    ws.retain(|w| w.name != "c");
    h.cache.update_type(ADDRESS_TYPE_URL, addresses(&ws));
    let r = c.recv().await;
    assert_eq!(r.removed_resources, vec![uid("other", "c")]);
    assert_eq!(h.metrics.nack_count(ADDRESS_TYPE_URL), 2);
}

#[tokio::test]
async fn named_subscribe_and_unsubscribe() {
    init();
    let h = AdsHarness::start(seeded_cache(), DEBOUNCE).await;
    let mut c = RawClient::connect(h.addr).await;
    let a = uid("default", "a");
    let b = uid("default", "b");
    c.subscribe(ADDRESS_TYPE_URL, &[&a, "default/missing"], BTreeMap::new())
        .await;
    let r = c.recv().await;
    assert_eq!(names(&r), vec![a.clone()]);
    assert_eq!(r.removed_resources, vec!["default/missing"]);
    c.ack(&r).await;

    // b is not subscribed: its changes are not sent.
    let mut ws = mesh();
    ws[1].addresses = vec!["10.0.0.22".parse().unwrap()];
    h.cache.update_type(ADDRESS_TYPE_URL, addresses(&ws));
    c.expect_silence(QUIET).await;

    // Subscribing to b later sends it.
    c.send(DeltaDiscoveryRequest {
        type_url: ADDRESS_TYPE_URL.into(),
        resource_names_subscribe: vec![b.clone()],
        ..Default::default()
    })
    .await;
    let r = c.recv().await;
    assert_eq!(names(&r), vec![b.clone()]);
    c.ack(&r).await;

    // After unsubscribing a, its changes are not sent; b's still are.
    c.send(DeltaDiscoveryRequest {
        type_url: ADDRESS_TYPE_URL.into(),
        resource_names_unsubscribe: vec![a.clone()],
        ..Default::default()
    })
    .await;
    ws[0].addresses = vec!["10.0.0.11".parse().unwrap()];
    h.cache.update_type(ADDRESS_TYPE_URL, addresses(&ws));
    c.expect_silence(QUIET).await;
    ws[1].addresses = vec!["10.0.0.23".parse().unwrap()];
    h.cache.update_type(ADDRESS_TYPE_URL, addresses(&ws));
    let r = c.recv().await;
    assert_eq!(names(&r), vec![b.clone()]);
    c.ack(&r).await;

    // On-demand style: subscribe "*" and unsubscribe "*" in the first request = nothing.
    let mut d = RawClient::connect(h.addr).await;
    d.send(DeltaDiscoveryRequest {
        type_url: ADDRESS_TYPE_URL.into(),
        resource_names_subscribe: vec!["*".into()],
        resource_names_unsubscribe: vec!["*".into()],
        ..Default::default()
    })
    .await;
    let r = d.recv().await;
    assert!(r.resources.is_empty(), "{r:?}");
}

#[tokio::test]
async fn bad_requests() {
    init();
    let h = AdsHarness::start(seeded_cache(), DEBOUNCE).await;

    // Unknown type: no answer, the stream stays usable.
    let mut c = RawClient::connect(h.addr).await;
    c.subscribe(
        "type.googleapis.com/envoy.config.cluster.v3.Cluster",
        &[],
        BTreeMap::new(),
    )
    .await;
    c.expect_silence(QUIET).await;
    c.subscribe(ADDRESS_TYPE_URL, &[], BTreeMap::new()).await;
    assert_eq!(c.recv().await.resources.len(), 3);

    // Empty type URL: the stream ends with InvalidArgument naming the problem.
    let mut c = RawClient::connect(h.addr).await;
    c.send(DeltaDiscoveryRequest::default()).await;
    let err = c.next().await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    assert!(
        err.message().contains("empty type_url"),
        "{}",
        err.message()
    );

    // A NACK without a nonce.
    let mut c = RawClient::connect(h.addr).await;
    c.send(DeltaDiscoveryRequest {
        type_url: ADDRESS_TYPE_URL.into(),
        error_detail: Some(Default::default()),
        ..Default::default()
    })
    .await;
    let err = c.next().await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    assert!(
        err.message().contains("without response_nonce"),
        "{}",
        err.message()
    );

    // State of the world is not served.
    let mut sotw = zmesh_proto::discovery::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient::connect(h.url()).await.unwrap();
    let err = sotw
        .stream_aggregated_resources(futures::stream::empty())
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unimplemented);
}

fn client_cfg(url: String) -> XdsConfig {
    let mut cfg = XdsConfig::ztunnel(
        ControlPlaneEndpoint::new(url, None),
        "node-1",
        "ztunnel-x",
        "istio-system",
        None,
    );
    cfg.initial_backoff = Duration::from_millis(50);
    cfg.max_backoff = Duration::from_millis(400);
    cfg
}

#[tokio::test]
async fn xds_client_applies_deltas_nacks_garbage_and_survives_a_restart() {
    init();
    let cache = seeded_cache();
    let h = AdsHarness::start(cache.clone(), DEBOUNCE).await;
    let port = h.addr;
    let store = StateStore::new();
    let stop = tokio_util::sync::CancellationToken::new();
    let metrics = Metrics::new("ztunnel");
    let xm = XdsMetrics::new(&metrics);
    let client = XdsClient::new(client_cfg(h.url()))
        .with_metrics(xm.clone())
        .with_stop(stop.clone());
    let status = client.status();
    let st = store.clone();
    tokio::spawn(async move { Box::new(client).run(st).await });
    eventually("initial sync", || store.is_synced()).await;
    assert_eq!(store.read().workloads().count(), 3);
    assert!(store.read().policy("default/deny").is_some());
    let ip = "10.0.0.3".parse().unwrap();
    assert_eq!(store.read().workload_by_ip(ip).unwrap().name, "c");
    // The controller's responses, as the client counts them: one per type so far.
    let text = metrics.encode();
    for t in [ADDRESS_TYPE_URL, AUTHORIZATION_TYPE_URL] {
        let url = [("url", t)];
        assert_eq!(
            sample_sum(&text, "istio_xds_message_total", &url),
            Some(1.0),
            "{text}"
        );
        assert!(
            sample_sum(&text, "istio_xds_message_bytes_total", &url).unwrap_or(0.0) > 0.0,
            "{text}"
        );
    }

    // A resource that fails to decode is NACKed; the good ones of the same push apply.
    let mut ws = mesh();
    ws.push(workload("default", "d", "sa-d", "10.0.0.4", "node-1"));
    let mut res = addresses(&ws);
    res.insert("default/garbage".into(), garbage_any());
    cache.update_type(ADDRESS_TYPE_URL, res);
    eventually("d applied", || {
        store.read().workload_by_uid(&uid("default", "d")).is_some()
    })
    .await;
    eventually("NACK counted", || {
        h.metrics.nack_count(ADDRESS_TYPE_URL) == 1
    })
    .await;
    assert_eq!(status.nacks_sent.load(Ordering::Relaxed), 1);

    // Remove the garbage and a pod: removal reaches the state.
    ws.retain(|w| w.name != "a");
    cache.update_type(ADDRESS_TYPE_URL, addresses(&ws));
    eventually("a removed", || {
        store.read().workload_by_uid(&uid("default", "a")).is_none()
    })
    .await;

    // Kill the server: the client keeps serving its last state.
    h.kill().await;
    eventually("disconnected", || !status.connected.load(Ordering::Relaxed)).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(store.read().workloads().count(), 3);
    assert_eq!(store.read().workload_by_ip(ip).unwrap().name, "c");
    // The controller ended the stream saying it is shutting down (Unavailable): Reconnect;
    // the attempts while it is down are refused: ConnectionError.
    assert_eq!(xm.terminations(TerminationReason::Reconnect), 1);
    eventually("refused reconnects counted", || {
        xm.terminations(TerminationReason::ConnectionError) >= 1
    })
    .await;
    assert_eq!(xm.terminations(TerminationReason::Error), 0);
    assert_eq!(xm.terminations(TerminationReason::Complete), 0);
    let text = metrics.encode();
    assert_eq!(
        sample_sum(
            &text,
            "istio_xds_connection_terminations_total",
            &[("reason", "Reconnect")]
        ),
        Some(1.0),
        "{text}"
    );
    // Three Address pushes (initial, with garbage, removal), one Authorization.
    let url = [("url", ADDRESS_TYPE_URL)];
    assert_eq!(
        sample_sum(&text, "istio_xds_message_total", &url),
        Some(3.0),
        "{text}"
    );

    // Restart on the same port with the same data plus one change: the client resyncs, and
    // only the changed resource travels.
    ws[0].addresses = vec!["10.0.0.22".parse().unwrap()]; // b moves
    cache.update_type(ADDRESS_TYPE_URL, addresses(&ws));
    let h2 = AdsHarness::start_on(cache.clone(), DEBOUNCE, port).await;
    eventually("reconnected", || {
        status.connects.load(Ordering::Relaxed) >= 2
    })
    .await;
    eventually("b moved", || {
        store
            .read()
            .workload_by_uid(&uid("default", "b"))
            .is_some_and(|w| w.addresses == vec!["10.0.0.22".parse::<std::net::IpAddr>().unwrap()])
    })
    .await;
    let sent = h2
        .metrics
        .resources_sent
        .get_or_create(&vec![(
            "type_url".to_string(),
            ADDRESS_TYPE_URL.to_string(),
        )])
        .get();
    assert_eq!(
        sent, 1,
        "only the changed workload is resent after reconnect"
    );
    assert_eq!(store.read().workloads().count(), 3);
    stop.cancel();
    h2.kill().await;
}

/// Pod + ambient namespace as YAML files, as a user would write them into the config directory.
fn write_pod(dir: &std::path::Path, name: &str, ip: &str, node: &str) {
    let yaml = format!(
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}\n  namespace: shop\n  labels: {{app: {name}}}\nspec:\n  serviceAccountName: sa-{name}\n  nodeName: {node}\nstatus:\n  podIP: {ip}\n  phase: Running\n"
    );
    std::fs::write(dir.join(format!("pod-{name}.yaml")), yaml).unwrap();
}

fn write_namespace(dir: &std::path::Path) {
    std::fs::write(
        dir.join("namespace.yaml"),
        "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: shop\n  labels:\n    istio.io/dataplane-mode: ambient\n",
    )
    .unwrap();
}

fn pod_uid(name: &str) -> String {
    format!("Kubernetes//v1/Pod/shop/{name}")
}

#[tokio::test]
async fn a_pod_file_added_or_removed_reaches_the_client_as_one_delta() {
    init();
    let dir = temp_dir("file-delta");
    write_namespace(&dir);
    write_pod(&dir, "a", "10.2.0.1", "node-1");
    write_pod(&dir, "b", "10.2.0.2", "node-2");
    let c = Controller::start(ControllerConfig {
        debounce: DEBOUNCE,
        ..ControllerConfig::loopback(&dir)
    })
    .await
    .unwrap();
    let mut client = RawClient::connect(c.addrs.xds_plaintext.unwrap()).await;
    let (first, _) = sync_wildcard(&mut client).await;
    assert_eq!(names(&first), vec![pod_uid("a"), pod_uid("b")]);

    // A new file with one pod: one delta carrying exactly that workload.
    write_pod(&dir, "c", "10.2.0.3", "node-1");
    let added = client.recv().await;
    assert_eq!(added.type_url, ADDRESS_TYPE_URL);
    assert_eq!(names(&added), vec![pod_uid("c")]);
    assert!(added.removed_resources.is_empty());
    client.ack(&added).await;

    // The file removed: one delta removing exactly that workload.
    std::fs::remove_file(dir.join("pod-c.yaml")).unwrap();
    let removed = client.recv().await;
    assert!(removed.resources.is_empty());
    assert_eq!(removed.removed_resources, vec![pod_uid("c")]);
    client.ack(&removed).await;
    client.expect_silence(QUIET).await;
    c.shutdown().await;
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn controller_restart_on_the_same_directory_keeps_clients_state() {
    init();
    let dir = temp_dir("restart");
    write_namespace(&dir);
    write_pod(&dir, "a", "10.1.0.1", "node-1");
    write_pod(&dir, "b", "10.1.0.2", "node-2");
    let cfg = ControllerConfig {
        debounce: DEBOUNCE,
        ..ControllerConfig::loopback(&dir)
    };
    let c1 = Controller::start(cfg.clone()).await.unwrap();
    assert_eq!(
        c1.cache.len(ADDRESS_TYPE_URL),
        2,
        "translated before serving"
    );

    // A client over TLS, verifying the controller's SPIFFE identity against the root, with
    // its node's bootstrap token.
    let tls_addr = c1.addrs.xds_tls.unwrap();
    let token = write_bootstrap_token(&dir.join(TOKENS_DIR), "node-1").unwrap();
    let mut ccfg = client_cfg(format!("https://{tls_addr}"));
    ccfg.endpoint.tls = Some(ControlPlaneTls {
        roots: vec![c1.ca.root_der()],
        identities: vec!["spiffe://cluster.local/ns/istio-system/sa/zmesh-controller".into()],
        dns_name: None,
    });
    ccfg.token = TokenSource::Literal(token);
    let store = StateStore::new();
    let stop = tokio_util::sync::CancellationToken::new();
    let client = XdsClient::new(ccfg).with_stop(stop.clone());
    let status = client.status();
    let st = store.clone();
    tokio::spawn(async move { Box::new(client).run(st).await });
    eventually("synced", || {
        store.is_synced() && store.read().workloads().count() == 2
    })
    .await;

    // Kill the controller; the client keeps its state.
    c1.shutdown().await;
    eventually("disconnected", || !status.connected.load(Ordering::Relaxed)).await;
    assert_eq!(store.read().workloads().count(), 2);

    // Restart on the same directory and ports (the CA root was persisted there, so the client
    // still trusts it); one pod's file changed meanwhile.
    write_pod(&dir, "b", "10.1.0.22", "node-2");
    let c2 = Controller::start(ControllerConfig {
        xds_tls_addr: Some(tls_addr),
        ..cfg.clone()
    })
    .await
    .unwrap();
    assert_eq!(c2.ca.root_der(), store_root(&dir));
    eventually("reconnected", || {
        status.connects.load(Ordering::Relaxed) >= 2
    })
    .await;
    eventually("b moved", || {
        store
            .read()
            .workload_by_ip("10.1.0.22".parse().unwrap())
            .is_some_and(|w| w.name == "b")
    })
    .await;
    assert_eq!(store.read().workloads().count(), 2);
    let sent = c2
        .ads_metrics
        .resources_sent
        .get_or_create(&vec![(
            "type_url".to_string(),
            ADDRESS_TYPE_URL.to_string(),
        )])
        .get();
    assert_eq!(sent, 1, "only the changed pod is resent after the restart");
    assert!(
        store
            .read()
            .workload_by_ip("10.1.0.1".parse().unwrap())
            .is_some()
    );
    stop.cancel();
    c2.shutdown().await;
    let _ = std::fs::remove_dir_all(&dir);
}

fn store_root(dir: &std::path::Path) -> rustls_pki_types::CertificateDer<'static> {
    ControlPlaneTls::load_roots(&dir.join("ca/root-cert.pem")).unwrap()[0].clone()
}

/// Delta ADS on the TLS port (15012) describes the whole mesh: a stream needs a token the CA
/// would accept. The plaintext port (local use) does not ask.
#[tokio::test]
async fn tls_ads_refuses_streams_without_a_valid_token() {
    use zmesh_proto::discovery::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
    init();
    let dir = temp_dir("ads-auth");
    write_namespace(&dir);
    write_pod(&dir, "a", "10.1.0.1", "node-1");
    let c = Controller::start(ControllerConfig::loopback(&dir))
        .await
        .unwrap();
    let token = write_bootstrap_token(&dir.join(TOKENS_DIR), "node-1").unwrap();
    let endpoint = ControlPlaneEndpoint::new(
        format!("https://{}", c.addrs.xds_tls.unwrap()),
        Some(ControlPlaneTls {
            roots: vec![c.ca.root_der()],
            identities: vec!["spiffe://cluster.local/ns/istio-system/sa/zmesh-controller".into()],
            dns_name: None,
        }),
    );
    let open = |token: Option<String>| {
        let channel = endpoint.channel().unwrap();
        async move {
            let mut client = AggregatedDiscoveryServiceClient::new(channel);
            let mut req = tonic::Request::new(futures::stream::iter(vec![DeltaDiscoveryRequest {
                type_url: ADDRESS_TYPE_URL.into(),
                ..Default::default()
            }]));
            if let Some(t) = token {
                req.metadata_mut()
                    .insert("authorization", format!("Bearer {t}").parse().unwrap());
            }
            client.delta_aggregated_resources(req).await
        }
    };
    let Err(none) = open(None).await else {
        panic!("a stream without a token was served");
    };
    assert_eq!(none.code(), tonic::Code::Unauthenticated, "{none:?}");
    assert!(none.message().contains("authorization"), "{none:?}");
    let Err(bad) = open(Some("not-a-valid-token-of-any-node".into())).await else {
        panic!("a stream with an unknown token was served");
    };
    assert_eq!(bad.code(), tonic::Code::Unauthenticated, "{bad:?}");
    assert_eq!(c.ads_metrics.unauthenticated_streams.get(), 2);
    // The node's token opens the stream and gets the workloads.
    let mut ok = open(Some(token))
        .await
        .expect("the node's token was refused")
        .into_inner();
    let first = tokio::time::timeout(Duration::from_secs(10), ok.message())
        .await
        .expect("no response")
        .expect("stream error")
        .expect("stream ended");
    assert_eq!(first.type_url, ADDRESS_TYPE_URL);
    // Plaintext (local) needs none: the stream opens.
    let mut plain = RawClient::connect(c.addrs.xds_plaintext.unwrap()).await;
    plain
        .subscribe(ADDRESS_TYPE_URL, &[], BTreeMap::new())
        .await;
    assert_eq!(plain.recv().await.type_url, ADDRESS_TYPE_URL);
    c.shutdown().await;
    let _ = std::fs::remove_dir_all(&dir);
}
