//! Waypoint reconciliation end to end, against the in-memory fake API server
//! (`zmesh-kube-fake`): a Gateway of class `istio-waypoint` gets its ServiceAccount, CA-root
//! ConfigMap, Deployment and Service (owned by it), and a status; a Gateway of another class
//! gets nothing; deleting the Gateway deletes them; objects of a Gateway deleted while the
//! controller was down are removed at start; an API error (403) is retried until it clears,
//! without holding up other Gateways; a same-named object of someone else is left alone; and
//! the `zmesh-controller` binary in `--kubernetes` mode does all this with its flags' values.

use std::time::Duration;

use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;
use zmesh_controller::waypoints::{Template, Timing, WaypointReconciler, WaypointSettings};
use zmesh_kube_fake::FakeApiServer;

const GW: &str = "gateway.networking.k8s.io/v1";

fn settings() -> WaypointSettings {
    WaypointSettings {
        image: "ghcr.io/zmesh/waypoint:test".into(),
        xds_address: "https://zmesh-controller.zmesh-system.svc:15012".into(),
        control_plane_identity: "spiffe://cluster.local/ns/zmesh-system/sa/zmesh-controller".into(),
        trust_domain: "cluster.local".into(),
        cluster_id: "Kubernetes".into(),
        ca_root_pem: "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n".into(),
    }
}

fn gateway(ns: &str, name: &str, class: &str) -> Value {
    json!({"apiVersion": GW, "kind": "Gateway",
           "metadata": {"name": name, "namespace": ns, "uid": format!("uid-{ns}-{name}")},
           "spec": {"gatewayClassName": class,
                    "listeners": [{"name": "mesh", "port": 15008, "protocol": "HBONE"}]}})
}

fn namespaces(api: &FakeApiServer, names: &[&str]) {
    for n in names {
        api.insert(json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": n}}));
    }
}

/// Start the reconciler against `api` with test timing; cancelled on drop of the token.
async fn start(api: &FakeApiServer) -> CancellationToken {
    // Logs (RUST_LOG=debug) help when a wait times out; only the first test's init succeeds.
    let _ = zmesh_core::telemetry::init_logging("info", false, None).map(std::mem::forget);
    let client = kube::Client::try_from(api.kube_config()).expect("client for the fake API");
    let timing = Timing {
        backoff_initial: Duration::from_millis(50),
        backoff_max: Duration::from_millis(400),
        resync: Duration::from_secs(60),
        request_timeout: Duration::from_secs(5),
        absent_retry: Duration::from_secs(1),
    };
    let reconciler =
        WaypointReconciler::new(client, Template::embedded().expect("template"), settings())
            .with_timing(timing);
    let cancel = CancellationToken::new();
    tokio::spawn(reconciler.run(cancel.clone()));
    cancel
}

/// Poll `f` until it returns `Some`, for at most 10 s.
async fn wait_for<T>(what: &str, f: impl FnMut() -> Option<T>) -> T {
    wait_long(what, Duration::from_secs(10), f).await
}

async fn wait_long<T>(what: &str, limit: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        if let Some(v) = f() {
            return v;
        }
        if tokio::time::Instant::now() > deadline {
            panic!("timed out waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn condition(gw: &Value, t: &str) -> Option<Value> {
    gw.pointer("/status/conditions")?
        .as_array()?
        .iter()
        .find(|c| c["type"] == t)
        .cloned()
}

/// The four objects of waypoint `ns/name`, when they all exist.
fn owned(api: &FakeApiServer, ns: &str, name: &str) -> Option<[Value; 4]> {
    Some([
        api.get("v1", "ServiceAccount", Some(ns), name)?,
        api.get("v1", "ConfigMap", Some(ns), &format!("{name}-ca-root"))?,
        api.get("apps/v1", "Deployment", Some(ns), name)?,
        api.get("v1", "Service", Some(ns), name)?,
    ])
}

fn none_left(api: &FakeApiServer, ns: &str, name: &str) -> bool {
    api.get("v1", "ServiceAccount", Some(ns), name).is_none()
        && api
            .get("v1", "ConfigMap", Some(ns), &format!("{name}-ca-root"))
            .is_none()
        && api.get("apps/v1", "Deployment", Some(ns), name).is_none()
        && api.get("v1", "Service", Some(ns), name).is_none()
}

#[tokio::test]
async fn waypoint_gateway_lifecycle() {
    let api = FakeApiServer::start().await;
    namespaces(&api, &["shop", "team"]);
    api.insert(gateway("shop", "waypoint", "istio-waypoint"));
    api.insert(gateway("shop", "ingress", "istio"));
    let cancel = start(&api).await;

    let objects = wait_for("the waypoint's objects", || owned(&api, "shop", "waypoint")).await;
    let gw = api.get(GW, "Gateway", Some("shop"), "waypoint").unwrap();
    let uid = gw["metadata"]["uid"].clone();
    for o in &objects {
        assert_eq!(
            o["metadata"]["ownerReferences"],
            json!([{"apiVersion": GW, "kind": "Gateway", "name": "waypoint", "uid": uid,
                    "controller": true, "blockOwnerDeletion": true}]),
            "{}",
            o["kind"]
        );
        assert_eq!(
            o["metadata"]["labels"]["app.kubernetes.io/managed-by"],
            "zmesh-controller"
        );
        assert_eq!(
            o["metadata"]["labels"]["gateway.networking.k8s.io/gateway-name"],
            "waypoint"
        );
    }
    let [_, _, deployment, service] = objects;
    assert_eq!(
        deployment["spec"]["template"]["spec"]["containers"][0]["image"],
        "ghcr.io/zmesh/waypoint:test"
    );
    assert_eq!(service["spec"]["ports"][0]["port"], 15008);

    // Server-side apply with our field manager, forced.
    let applies: Vec<_> = api
        .requests()
        .into_iter()
        .filter(|r| r.method == "PATCH" && r.path.ends_with("/deployments/waypoint"))
        .collect();
    assert!(!applies.is_empty());
    for r in &applies {
        assert_eq!(
            r.content_type.as_deref(),
            Some("application/apply-patch+yaml")
        );
        assert!(
            r.query.contains("fieldManager=zmesh-controller"),
            "{}",
            r.query
        );
        assert!(r.query.contains("force=true"), "{}", r.query);
    }

    // Status: accepted, not programmed until there is an address and an available replica.
    let gw = wait_for("Accepted on the Gateway", || {
        let gw = api.get(GW, "Gateway", Some("shop"), "waypoint")?;
        condition(&gw, "Accepted").map(|_| gw)
    })
    .await;
    assert_eq!(condition(&gw, "Accepted").unwrap()["status"], "True");
    let programmed = condition(&gw, "Programmed").unwrap();
    assert_eq!(programmed["status"], "False");
    assert_eq!(programmed["reason"], "AddressNotAssigned");

    // The fake allocates no cluster IPs: play the API server's part.
    let mut svc = api.get("v1", "Service", Some("shop"), "waypoint").unwrap();
    svc["spec"]["clusterIP"] = json!("10.96.0.20");
    svc["spec"]["clusterIPs"] = json!(["10.96.0.20"]);
    api.replace(svc);
    wait_for("the Gateway's address", || {
        let gw = api.get(GW, "Gateway", Some("shop"), "waypoint")?;
        (gw["status"]["addresses"] == json!([{"type": "IPAddress", "value": "10.96.0.20"}]))
            .then_some(())
    })
    .await;
    let gw = api.get(GW, "Gateway", Some("shop"), "waypoint").unwrap();
    assert_eq!(condition(&gw, "Programmed").unwrap()["reason"], "Pending");

    // ... and the Deployment controller's.
    let mut dep = api
        .get("apps/v1", "Deployment", Some("shop"), "waypoint")
        .unwrap();
    dep["status"] = json!({"replicas": 1, "readyReplicas": 1, "availableReplicas": 1});
    api.replace(dep);
    let gw = wait_for("Programmed=True", || {
        let gw = api.get(GW, "Gateway", Some("shop"), "waypoint")?;
        (condition(&gw, "Programmed")?["status"] == "True").then_some(gw)
    })
    .await;
    let programmed = condition(&gw, "Programmed").unwrap();
    assert_eq!(programmed["reason"], "Programmed");
    if let Some(g) = gw["metadata"].get("generation") {
        assert_eq!(&programmed["observedGeneration"], g);
    }

    // Settled: our own writes (applies, status) do not trigger further writes.
    let writes = api.writes().len();
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(api.writes().len(), writes, "writes continue after settling");

    // Drift: someone edits the Deployment; the controller puts it back.
    let mut dep = api
        .get("apps/v1", "Deployment", Some("shop"), "waypoint")
        .unwrap();
    dep["spec"]["template"]["spec"]["containers"][0]["image"] = json!("attacker/image");
    api.replace(dep);
    wait_for("the image restored", || {
        let d = api.get("apps/v1", "Deployment", Some("shop"), "waypoint")?;
        (d["spec"]["template"]["spec"]["containers"][0]["image"] == "ghcr.io/zmesh/waypoint:test")
            .then_some(())
    })
    .await;

    // The other class got nothing, and was never written to.
    assert!(none_left(&api, "shop", "ingress"));
    assert!(
        !api.requests()
            .iter()
            .any(|r| r.method != "GET" && r.path.contains("/ingress")),
        "a non-waypoint Gateway was written to"
    );

    // Deleting the Gateway deletes its objects (no garbage collector in the fake).
    api.delete(GW, "Gateway", Some("shop"), "waypoint");
    wait_for("the objects deleted", || {
        none_left(&api, "shop", "waypoint").then_some(())
    })
    .await;
    cancel.cancel();
}

fn labelled(api_version: &str, kind: &str, ns: &str, name: &str, labels: Value) -> Value {
    json!({"apiVersion": api_version, "kind": kind,
           "metadata": {"name": name, "namespace": ns, "labels": labels}})
}

fn deployment(ns: &str, name: &str, labels: Value) -> Value {
    labelled("apps/v1", "Deployment", ns, name, labels)
}

#[tokio::test]
async fn objects_of_a_gateway_deleted_while_down_are_removed_at_start() {
    let api = FakeApiServer::start().await;
    namespaces(&api, &["shop", "team"]);
    let ours = json!({"app.kubernetes.io/managed-by": "zmesh-controller",
                      "gateway.networking.k8s.io/gateway-name": "gone"});
    api.insert(deployment("shop", "gone", ours.clone()));
    api.insert(labelled("v1", "Service", "shop", "gone", ours.clone()));
    api.insert(labelled(
        "v1",
        "ServiceAccount",
        "shop",
        "gone",
        ours.clone(),
    ));
    api.insert(labelled("v1", "ConfigMap", "shop", "gone-ca-root", ours));
    // Not ours: another implementation's gateway, and a plain app.
    api.insert(deployment(
        "shop",
        "other",
        json!({"gateway.networking.k8s.io/gateway-name": "other"}),
    ));
    api.insert(deployment("shop", "app", json!({"app": "x"})));
    // A live waypoint in the same namespace keeps its objects.
    api.insert(gateway("shop", "live", "istio-waypoint"));
    let cancel = start(&api).await;

    wait_for("the stale objects deleted", || {
        none_left(&api, "shop", "gone").then_some(())
    })
    .await;
    wait_for("the live waypoint's objects", || {
        owned(&api, "shop", "live")
    })
    .await;
    assert!(
        api.get("apps/v1", "Deployment", Some("shop"), "other")
            .is_some()
    );
    assert!(
        api.get("apps/v1", "Deployment", Some("shop"), "app")
            .is_some()
    );
    cancel.cancel();
}

#[tokio::test]
async fn forbidden_apply_is_retried_and_does_not_block_others() {
    let api = FakeApiServer::start().await;
    namespaces(&api, &["shop", "team"]);
    api.fail("PATCH", "/apis/apps/v1/namespaces/shop/deployments", 403);
    api.insert(gateway("shop", "waypoint", "istio-waypoint"));
    api.insert(gateway("team", "waypoint", "istio-waypoint"));
    let cancel = start(&api).await;

    // The other namespace's waypoint is unaffected.
    wait_for("team's waypoint", || owned(&api, "team", "waypoint")).await;
    // shop's is retried: several attempts, and the Gateway says why it is not programmed.
    wait_for("retries of the forbidden apply", || {
        let attempts = api
            .requests()
            .iter()
            .filter(|r| r.method == "PATCH" && r.path.ends_with("/shop/deployments/waypoint"))
            .count();
        (attempts >= 3).then_some(())
    })
    .await;
    let gw = wait_for("the failure in the status", || {
        let gw = api.get(GW, "Gateway", Some("shop"), "waypoint")?;
        condition(&gw, "Programmed").map(|_| gw)
    })
    .await;
    let programmed = condition(&gw, "Programmed").unwrap();
    assert_eq!(programmed["status"], "False");
    let message = programmed["message"].as_str().unwrap_or_default();
    assert!(
        message.contains("Deployment shop/waypoint"),
        "message: {message}"
    );
    assert!(
        api.get("apps/v1", "Deployment", Some("shop"), "waypoint")
            .is_none()
    );

    // RBAC fixed: the next retry succeeds.
    api.clear_failures();
    wait_for("shop's waypoint after the fix", || {
        owned(&api, "shop", "waypoint")
    })
    .await;
    cancel.cancel();
}

#[tokio::test]
async fn a_gateway_that_stops_being_a_waypoint_loses_its_objects() {
    let api = FakeApiServer::start().await;
    namespaces(&api, &["shop"]);
    api.insert(gateway("shop", "waypoint", "istio-waypoint"));
    let cancel = start(&api).await;
    wait_for("the waypoint's objects", || owned(&api, "shop", "waypoint")).await;
    let mut gw = api.get(GW, "Gateway", Some("shop"), "waypoint").unwrap();
    gw["spec"]["gatewayClassName"] = json!("istio");
    api.replace(gw);
    wait_for("the objects deleted", || {
        none_left(&api, "shop", "waypoint").then_some(())
    })
    .await;
    cancel.cancel();
}

#[tokio::test]
async fn a_same_named_object_of_someone_else_is_not_overwritten() {
    let api = FakeApiServer::start().await;
    namespaces(&api, &["shop"]);
    api.insert(deployment("shop", "waypoint", json!({"app": "users-own"})));
    api.insert(gateway("shop", "waypoint", "istio-waypoint"));
    let cancel = start(&api).await;
    let gw = wait_for("the refusal in the status", || {
        let gw = api.get(GW, "Gateway", Some("shop"), "waypoint")?;
        condition(&gw, "Programmed").map(|_| gw)
    })
    .await;
    let message = condition(&gw, "Programmed").unwrap()["message"].clone();
    assert!(
        message
            .as_str()
            .unwrap()
            .contains("Deployment shop/waypoint exists and was not made by zmesh-controller"),
        "{message}"
    );
    let dep = api
        .get("apps/v1", "Deployment", Some("shop"), "waypoint")
        .unwrap();
    assert_eq!(dep["metadata"]["labels"], json!({"app": "users-own"}));
    assert!(
        !api.writes()
            .iter()
            .any(|r| r.path.ends_with("/deployments/waypoint")),
        "the user's Deployment was written to"
    );
    cancel.cancel();
}

/// The `zmesh-controller` binary in `--kubernetes` mode wires the reconciler: image, xDS
/// address, control-plane identity and CA root come from its flags and its CA Secret.
#[tokio::test]
async fn the_binary_reconciles_waypoints_in_kubernetes_mode() {
    let api = FakeApiServer::start().await;
    namespaces(&api, &["shop", "zmesh-system"]);
    let dir = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("waypoint-reconcile-bin");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("temp dir");
    let kubeconfig = dir.join("kubeconfig");
    api.write_kubeconfig(&kubeconfig, "fake", None);
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_zmesh-controller"))
        .args([
            "--kubernetes",
            "--namespace",
            "zmesh-system",
            "--xds-plaintext-addr",
            "off",
            "--xds-tls-addr",
            "127.0.0.1:0",
            "--metrics-addr",
            "off",
            "--waypoint-image",
            "example.com/waypoint:9",
        ])
        .env("KUBECONFIG", &kubeconfig)
        .kill_on_drop(true)
        .spawn()
        .expect("start zmesh-controller");
    api.insert(gateway("shop", "waypoint", "istio-waypoint"));
    let [_, cm, dep, _] = wait_long(
        "the waypoint's objects from the binary",
        Duration::from_secs(60),
        || owned(&api, "shop", "waypoint"),
    )
    .await;
    let c = &dep["spec"]["template"]["spec"]["containers"][0];
    assert_eq!(c["image"], "example.com/waypoint:9");
    assert_eq!(
        c["args"],
        json!([
            "--control-plane-identity",
            "spiffe://cluster.local/ns/zmesh-system/sa/zmesh-controller"
        ])
    );
    let xds = c["env"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["name"] == "XDS_ADDRESS")
        .unwrap();
    assert_eq!(
        xds["value"],
        "https://zmesh-controller.zmesh-system.svc:15012"
    );
    // The root in the ConfigMap is the one the controller keeps in its Secret.
    let secret = api
        .get("v1", "Secret", Some("zmesh-system"), "zmesh-ca-root")
        .expect("CA root Secret");
    let pem = cm["data"]["root-cert.pem"].as_str().unwrap();
    assert!(pem.starts_with("-----BEGIN CERTIFICATE-----"), "{pem}");
    let stored: k8s_openapi::ByteString =
        serde_json::from_value(secret["data"]["ca-cert.pem"].clone()).expect("base64 data");
    assert_eq!(String::from_utf8_lossy(&stored.0), pem);
    let _ = child.kill().await;
}
