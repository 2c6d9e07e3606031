//! The `zmesh` binary against an in-memory API server (`zmesh-kube-fake`), through a kubeconfig
//! the fake writes: what it sends (recorded requests), what ends up stored, what it prints,
//! and how it fails (one `error:` line, non-zero exit).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Output;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio::process::Command;
use tokio_util::sync::CancellationToken;
use zmesh_kube_fake::{FakeApiServer, RecordedRequest};

const BIN: &str = env!("CARGO_BIN_EXE_zmesh");

/// A scratch directory (kubeconfig, HOME) removed on drop.
struct Scratch(PathBuf);

impl Scratch {
    fn new() -> Scratch {
        static N: AtomicUsize = AtomicUsize::new(0);
        let dir = std::env::temp_dir().join(format!(
            "zmesh-cli-test-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir).expect("create scratch dir");
        Scratch(dir)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

struct Env {
    api: FakeApiServer,
    dir: Scratch,
    kubeconfig: PathBuf,
}

async fn env() -> Env {
    let api = FakeApiServer::start().await;
    let dir = Scratch::new();
    let kubeconfig = dir.0.join("kubeconfig");
    api.write_kubeconfig(&kubeconfig, "fake", None);
    Env {
        api,
        dir,
        kubeconfig,
    }
}

/// `zmesh ARGS` with only what the test gives it: no inherited kubeconfig or cluster env.
fn command(home: &Path, kubeconfig: Option<&Path>, args: &[&str]) -> Command {
    let mut c = Command::new(BIN);
    if let Some(kc) = kubeconfig {
        c.arg("--kubeconfig").arg(kc);
    }
    c.args(args)
        .env_remove("KUBECONFIG")
        .env_remove("KUBERNETES_SERVICE_HOST")
        .env("HOME", home)
        .kill_on_drop(true);
    c
}

async fn run(c: &mut Command) -> Output {
    tokio::time::timeout(Duration::from_secs(60), c.output())
        .await
        .expect("zmesh finished within 60 s")
        .expect("zmesh ran")
}

impl Env {
    async fn zmesh(&self, args: &[&str]) -> Output {
        run(&mut command(&self.dir.0, Some(&self.kubeconfig), args)).await
    }

    fn namespace(&self, name: &str, labels: Value) {
        self.api
            .insert(json!({"apiVersion": "v1", "kind": "Namespace",
            "metadata": {"name": name, "labels": labels}}));
    }
}

impl Env {
    /// Run `zmesh ARGS` while playing the part of a cluster controller: `play` is called until
    /// it reports that it did its job (e.g. wrote a status the command waits for).
    async fn zmesh_with(
        &self,
        args: &[&str],
        what: &str,
        play: impl Fn(&FakeApiServer) -> bool,
    ) -> Output {
        let child = command(&self.dir.0, Some(&self.kubeconfig), args)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("start zmesh");
        let mut done = false;
        for _ in 0..200 {
            if play(&self.api) {
                done = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert!(done, "{what}");
        tokio::time::timeout(Duration::from_secs(60), child.wait_with_output())
            .await
            .expect("zmesh finished within 60 s")
            .expect("zmesh ran")
    }
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn assert_ok(o: &Output) {
    assert!(
        o.status.success(),
        "zmesh failed: {}\n--- stdout ---\n{}\n--- stderr ---\n{}",
        o.status,
        stdout(o),
        stderr(o)
    );
}

/// Exit code 1 and exactly one stderr line, starting with `error: ` and containing `needles`.
fn assert_one_line_error(o: &Output, needles: &[&str]) {
    let err = stderr(o);
    assert_eq!(o.status.code(), Some(1), "exit status; stderr: {err}");
    assert_eq!(err.lines().count(), 1, "one line on stderr, got: {err:?}");
    assert!(err.starts_with("error: "), "{err:?}");
    for n in needles {
        assert!(err.contains(n), "stderr {err:?} lacks {n:?}");
    }
}

fn manifests_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../manifests")
}

/// The kustomization's resources, in order, with their contents.
fn manifest_files() -> Vec<(String, String)> {
    #[derive(serde::Deserialize)]
    struct K {
        resources: Vec<String>,
    }
    let dir = manifests_dir();
    let k: K = serde_saphyr::from_str(
        &std::fs::read_to_string(dir.join("kustomization.yaml")).expect("read kustomization"),
    )
    .expect("parse kustomization");
    k.resources
        .into_iter()
        .map(|r| {
            let text = std::fs::read_to_string(dir.join(&r)).expect("read a manifest");
            (r, text)
        })
        .collect()
}

/// (kind, namespace, name) of every object of the manifests, in file order.
fn manifest_objects() -> Vec<(String, Option<String>, String)> {
    let mut out = Vec::new();
    for (_, text) in manifest_files() {
        let docs: Vec<Value> = serde_saphyr::from_multiple(&text).expect("manifest YAML");
        for d in docs.into_iter().filter(|d| !d.is_null()) {
            out.push((
                d["kind"].as_str().unwrap().to_string(),
                d["metadata"]["namespace"].as_str().map(str::to_string),
                d["metadata"]["name"].as_str().unwrap().to_string(),
            ));
        }
    }
    out
}

fn is_apply(r: &RecordedRequest) -> bool {
    r.method == "PATCH" && r.content_type.as_deref() == Some("application/apply-patch+yaml")
}

#[tokio::test]
async fn install_dry_run_prints_the_manifests_byte_for_byte() {
    let dir = Scratch::new();
    // No kubeconfig at all: a dry run needs no cluster.
    let out = run(&mut command(&dir.0, None, &["install", "--dry-run"])).await;
    assert_ok(&out);
    let files = manifest_files();
    assert!(files.len() >= 5, "the kustomization lists the manifests");
    let mut expected = String::new();
    for (_, text) in &files {
        if !expected.is_empty() && !text.starts_with("---") {
            expected.push_str("---\n");
        }
        expected.push_str(text);
        if !text.ends_with('\n') {
            expected.push('\n');
        }
    }
    assert!(
        stdout(&out) == expected,
        "install --dry-run differs from the manifests"
    );

    // With --set the objects are the same, edited.
    let out = run(&mut command(
        &dir.0,
        None,
        &[
            "install",
            "--dry-run",
            "--set",
            "image.tag=dev",
            "--set",
            "controller.replicas=1",
        ],
    ))
    .await;
    assert_ok(&out);
    let docs: Vec<Value> = serde_saphyr::from_multiple(&stdout(&out)).expect("valid YAML");
    assert_eq!(docs.len(), manifest_objects().len());
    let deploy = docs
        .iter()
        .find(|d| d["kind"] == "Deployment")
        .expect("a Deployment");
    assert_eq!(deploy["spec"]["replicas"], 1);
    for d in docs
        .iter()
        .filter(|d| d["kind"] == "Deployment" || d["kind"] == "DaemonSet")
    {
        for c in d["spec"]["template"]["spec"]["containers"]
            .as_array()
            .unwrap()
        {
            assert!(c["image"].as_str().unwrap().ends_with(":dev"), "{c}");
        }
    }

    // An unknown key is a usage error (exit 2).
    let out = run(&mut command(
        &dir.0,
        None,
        &["install", "--dry-run", "--set", "nope=1"],
    ))
    .await;
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr(&out).contains("unknown key \"nope\""),
        "{}",
        stderr(&out)
    );
}

/// Marks the installed workloads rolled out, as the Deployment and DaemonSet controllers would.
fn mark_ready(api: &FakeApiServer) -> bool {
    let Some(mut d) = api.get(
        "apps/v1",
        "Deployment",
        Some("zmesh-system"),
        "zmesh-controller",
    ) else {
        return false;
    };
    let Some(mut ds) = api.get("apps/v1", "DaemonSet", Some("zmesh-system"), "ztunnel") else {
        return false;
    };
    let replicas = d["spec"]["replicas"].as_i64().unwrap_or(1);
    d["status"] = json!({"observedGeneration": d["metadata"]["generation"], "replicas": replicas,
        "updatedReplicas": replicas, "readyReplicas": replicas, "availableReplicas": replicas});
    ds["status"] = json!({"observedGeneration": ds["metadata"]["generation"],
        "desiredNumberScheduled": 2, "currentNumberScheduled": 2, "updatedNumberScheduled": 2,
        "numberReady": 2, "numberAvailable": 2});
    api.replace(d);
    api.replace(ds);
    true
}

#[tokio::test]
async fn install_applies_crds_first_then_the_rest_in_order_and_waits() {
    let e = env().await;
    // The install waits for the workloads; play the part of their controllers once they exist.
    let out = e
        .zmesh_with(
            &["install", "--timeout", "60s"],
            "the controller Deployment and ztunnel DaemonSet were applied",
            mark_ready,
        )
        .await;
    assert_ok(&out);
    assert!(
        stdout(&out).contains("Installation complete"),
        "{}",
        stdout(&out)
    );

    let objects = manifest_objects();
    let (crds, rest): (Vec<_>, Vec<_>) = objects
        .iter()
        .partition(|(k, _, _)| k == "CustomResourceDefinition");
    assert!(!crds.is_empty());
    let expected: Vec<String> = crds
        .iter()
        .chain(rest.iter())
        .map(|(_, _, name)| name.clone())
        .collect();
    let applies: Vec<RecordedRequest> = e.api.requests().into_iter().filter(is_apply).collect();
    let applied: Vec<String> = applies
        .iter()
        .map(|r| r.path.rsplit('/').next().unwrap().to_string())
        .collect();
    assert_eq!(applied, expected, "CRDs first, then the manifests' order");
    for r in &applies {
        assert!(r.query.contains("fieldManager=zmesh"), "{}", r.query);
        assert!(r.query.contains("force=true"), "{}", r.query);
    }
    // Nothing but server-side apply was written.
    assert!(e.api.writes().iter().all(is_apply));
    // Each CRD's Established condition was read before the first non-CRD object was applied.
    let reqs = e.api.requests();
    let first_other = reqs
        .iter()
        .position(|r| is_apply(r) && !r.path.contains("customresourcedefinitions"))
        .unwrap();
    for (_, _, name) in &crds {
        let read = reqs[..first_other].iter().any(|r| {
            r.method == "GET"
                && r.path
                    .ends_with(&format!("/customresourcedefinitions/{name}"))
        });
        assert!(read, "{name} was checked for Established before the rest");
    }
    // Everything is stored.
    for (kind, ns, name) in &objects {
        let api_version = match kind.as_str() {
            "CustomResourceDefinition" => "apiextensions.k8s.io/v1",
            "Deployment" | "DaemonSet" => "apps/v1",
            _ => continue,
        };
        assert!(
            e.api.get(api_version, kind, ns.as_deref(), name).is_some(),
            "{kind} {name}"
        );
    }

    // Uninstall: reverse order, CRDs kept.
    let before = e.api.requests().len();
    let out = e.zmesh(&["uninstall"]).await;
    assert_ok(&out);
    let deletes: Vec<String> = e.api.requests()[before..]
        .iter()
        .filter(|r| r.method == "DELETE")
        .map(|r| r.path.rsplit('/').next().unwrap().to_string())
        .collect();
    let expected: Vec<String> = rest.iter().rev().map(|(_, _, n)| n.clone()).collect();
    assert_eq!(deletes, expected, "reverse order without the CRDs");
    assert!(stdout(&out).contains("kept"), "{}", stdout(&out));
    let crd = &crds[0].2;
    assert!(
        e.api
            .get(
                "apiextensions.k8s.io/v1",
                "CustomResourceDefinition",
                None,
                crd
            )
            .is_some()
    );
    let out = e.zmesh(&["uninstall", "--purge"]).await;
    assert_ok(&out);
    assert!(
        e.api
            .get(
                "apiextensions.k8s.io/v1",
                "CustomResourceDefinition",
                None,
                crd
            )
            .is_none()
    );
}

#[tokio::test]
async fn install_times_out_with_one_line() {
    let e = env().await;
    let out = e.zmesh(&["install", "--timeout", "2s"]).await;
    assert_one_line_error(
        &out,
        &[
            "timed out after 2s",
            "Deployment zmesh-system/zmesh-controller",
        ],
    );
}

#[tokio::test]
async fn enroll_and_unenroll_patch_only_the_label() {
    let e = env().await;
    e.namespace("shop", json!({"team": "shop"}));
    let out = e.zmesh(&["enroll", "shop"]).await;
    assert_ok(&out);
    let writes = e.api.writes();
    assert_eq!(writes.len(), 1, "{writes:?}");
    assert_eq!(writes[0].method, "PATCH");
    assert_eq!(writes[0].path, "/api/v1/namespaces/shop");
    assert_eq!(
        writes[0].content_type.as_deref(),
        Some("application/merge-patch+json")
    );
    assert_eq!(
        writes[0].body,
        Some(json!({"metadata": {"labels": {"istio.io/dataplane-mode": "ambient"}}}))
    );
    let ns = e.api.get("v1", "Namespace", None, "shop").unwrap();
    assert_eq!(
        ns["metadata"]["labels"],
        json!({"team": "shop", "istio.io/dataplane-mode": "ambient"})
    );

    let out = e.zmesh(&["unenroll", "shop"]).await;
    assert_ok(&out);
    let writes = e.api.writes();
    assert_eq!(
        writes[1].body,
        Some(json!({"metadata": {"labels": {"istio.io/dataplane-mode": null}}}))
    );
    let ns = e.api.get("v1", "Namespace", None, "shop").unwrap();
    assert_eq!(ns["metadata"]["labels"], json!({"team": "shop"}));
}

#[tokio::test]
async fn waypoint_apply_creates_the_gateway_and_labels_the_namespace() {
    let e = env().await;
    e.namespace("shop", json!({}));
    let out = e
        .zmesh(&["waypoint", "apply", "-n", "shop", "--enroll-namespace"])
        .await;
    assert_ok(&out);
    let applies: Vec<RecordedRequest> = e.api.writes().into_iter().filter(is_apply).collect();
    assert_eq!(applies.len(), 1);
    assert_eq!(
        applies[0].path,
        "/apis/gateway.networking.k8s.io/v1/namespaces/shop/gateways/waypoint"
    );
    assert!(applies[0].query.contains("fieldManager=zmesh"));
    let gw = e
        .api
        .get(
            "gateway.networking.k8s.io/v1",
            "Gateway",
            Some("shop"),
            "waypoint",
        )
        .unwrap();
    assert_eq!(gw["spec"]["gatewayClassName"], "istio-waypoint");
    assert_eq!(
        gw["spec"]["listeners"],
        json!([{"name": "mesh", "port": 15008, "protocol": "HBONE"}])
    );
    assert_eq!(gw["metadata"]["labels"]["istio.io/waypoint-for"], "service");
    let ns = e.api.get("v1", "Namespace", None, "shop").unwrap();
    assert_eq!(
        ns["metadata"]["labels"]["istio.io/use-waypoint"],
        "waypoint"
    );
}

#[tokio::test]
async fn waypoint_apply_wait_returns_once_programmed() {
    let e = env().await;
    e.namespace("shop", json!({}));
    // Play the controller: write the Programmed condition once the Gateway exists.
    let out = e
        .zmesh_with(
            &["waypoint", "apply", "-n", "shop", "--name", "wp", "--wait", "--timeout", "60s"],
            "the Gateway was applied",
            |api| {
                let Some(mut gw) = api.get("gateway.networking.k8s.io/v1", "Gateway", Some("shop"), "wp") else {
                    return false;
                };
                gw["status"] = json!({"conditions": [
                    {"type": "Accepted", "status": "True", "reason": "Accepted", "message": ""},
                    {"type": "Programmed", "status": "True", "reason": "Programmed", "message": ""}]});
                api.replace(gw);
                true
            },
        )
        .await;
    assert_ok(&out);
    assert!(
        stdout(&out).contains("waypoint shop/wp programmed"),
        "{}",
        stdout(&out)
    );
}

fn gateway(ns: &str, name: &str, class: &str, programmed: Option<&str>) -> Value {
    let mut gw = json!({"apiVersion": "gateway.networking.k8s.io/v1", "kind": "Gateway",
        "metadata": {"name": name, "namespace": ns},
        "spec": {"gatewayClassName": class,
                 "listeners": [{"name": "mesh", "port": 15008, "protocol": "HBONE"}]}});
    if let Some(p) = programmed {
        gw["status"] = json!({"conditions": [{"type": "Programmed", "status": p}]});
    }
    gw
}

#[tokio::test]
async fn waypoint_list_renders_a_table() {
    let e = env().await;
    e.namespace("shop", json!({}));
    e.namespace("bookinfo", json!({}));
    e.api
        .insert(gateway("shop", "waypoint", "istio-waypoint", Some("True")));
    e.api
        .insert(gateway("bookinfo", "reviews-wp", "istio-waypoint", None));
    e.api
        .insert(gateway("shop", "ingress", "istio", Some("True")));

    let out = e.zmesh(&["waypoint", "list", "-n", "shop"]).await;
    assert_ok(&out);
    let text = stdout(&out);
    let rows: Vec<Vec<&str>> = text
        .lines()
        .map(|l| l.split_whitespace().collect())
        .collect();
    assert_eq!(rows.len(), 2, "{text}");
    assert_eq!(rows[0], ["NAME", "REVISION", "PROGRAMMED", "AGE"]);
    assert_eq!(rows[1][..3], ["waypoint", "default", "True"]);
    // Columns are aligned: every cell of a column starts at the same offset.
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines[0].find("REVISION"), lines[1].find("default"));

    let out = e.zmesh(&["waypoint", "list", "-A"]).await;
    assert_ok(&out);
    let text = stdout(&out);
    let rows: Vec<Vec<&str>> = text
        .lines()
        .map(|l| l.split_whitespace().collect())
        .collect();
    assert_eq!(rows.len(), 3, "{text}");
    assert_eq!(
        rows[0],
        ["NAMESPACE", "NAME", "REVISION", "PROGRAMMED", "AGE"]
    );
    assert_eq!(
        rows[1][..4],
        ["bookinfo", "reviews-wp", "default", "Unknown"]
    );
    assert_eq!(rows[2][..4], ["shop", "waypoint", "default", "True"]);

    let out = e.zmesh(&["waypoint", "list", "-A", "-o", "json"]).await;
    assert_ok(&out);
    let list: Value = serde_json::from_slice(&out.stdout).expect("JSON");
    assert_eq!(list["kind"], "List");
    assert_eq!(list["items"].as_array().unwrap().len(), 2);

    // Status and delete of one of them; an ingress Gateway is not touched.
    let out = e.zmesh(&["waypoint", "status", "-n", "shop"]).await;
    assert_ok(&out);
    assert!(stdout(&out).contains("Programmed"), "{}", stdout(&out));
    let out = e
        .zmesh(&["waypoint", "delete", "-n", "shop", "ingress"])
        .await;
    assert_one_line_error(&out, &["not a waypoint"]);
    let out = e.zmesh(&["waypoint", "delete", "-n", "shop"]).await;
    assert_ok(&out);
    assert!(
        e.api
            .get(
                "gateway.networking.k8s.io/v1",
                "Gateway",
                Some("shop"),
                "waypoint"
            )
            .is_none()
    );
    assert!(
        e.api
            .get(
                "gateway.networking.k8s.io/v1",
                "Gateway",
                Some("shop"),
                "ingress"
            )
            .is_some()
    );
}

#[tokio::test]
async fn waypoint_generate_prints_the_gateway_without_a_cluster() {
    let dir = Scratch::new();
    let out = run(&mut command(
        &dir.0,
        None,
        &["waypoint", "generate", "-n", "shop"],
    ))
    .await;
    assert_ok(&out);
    assert_eq!(
        stdout(&out),
        "apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata:
  labels:
    istio.io/waypoint-for: service
  name: waypoint
  namespace: shop
spec:
  gatewayClassName: istio-waypoint
  listeners:
  - name: mesh
    port: 15008
    protocol: HBONE
"
    );
}

#[tokio::test]
async fn errors_are_one_clear_line() {
    let e = env().await;
    e.namespace("shop", json!({}));

    // No kubeconfig anywhere: say where we looked.
    let out = run(&mut command(&e.dir.0, None, &["enroll", "shop"])).await;
    let kc = e.dir.0.join(".kube/config");
    assert_one_line_error(
        &out,
        &[
            "no kubeconfig found",
            &kc.display().to_string(),
            "in-cluster",
        ],
    );
    let out = run(&mut command(
        &e.dir.0,
        Some(Path::new("/nonexistent/kc")),
        &["status"],
    ))
    .await;
    assert_one_line_error(
        &out,
        &["no kubeconfig found", "--kubeconfig /nonexistent/kc"],
    );

    // Unknown context.
    let out = e.zmesh(&["--context", "prod", "enroll", "shop"]).await;
    assert_one_line_error(&out, &["context \"prod\" not found"]);

    // Forbidden: the verb, resource, object and the user from the Status.
    e.api.fail("PATCH", "/api/v1/namespaces/shop", 403);
    let out = e.zmesh(&["enroll", "shop"]).await;
    assert_one_line_error(
        &out,
        &[
            "forbidden",
            "cannot patch namespaces \"shop\"",
            "system:serviceaccount:test:fake",
        ],
    );
    e.api.clear_failures();
    e.api.fail(
        "GET",
        "/apis/gateway.networking.k8s.io/v1/namespaces/shop/gateways",
        403,
    );
    let out = e.zmesh(&["waypoint", "list", "-n", "shop"]).await;
    assert_one_line_error(
        &out,
        &[
            "forbidden",
            "list gateways.gateway.networking.k8s.io in namespace \"shop\"",
        ],
    );
    e.api.clear_failures();

    // Missing namespace.
    let out = e.zmesh(&["enroll", "nope"]).await;
    assert_one_line_error(&out, &["namespace \"nope\" not found"]);
    let out = e.zmesh(&["waypoint", "apply", "-n", "nope"]).await;
    assert_one_line_error(&out, &["namespace \"nope\" not found"]);
    assert!(e.api.get("v1", "Namespace", None, "nope").is_none());
    assert!(
        e.api
            .list("gateway.networking.k8s.io/v1", "Gateway", None)
            .is_empty()
    );

    // API server unreachable.
    let dead = e.dir.0.join("dead-kubeconfig");
    std::fs::write(
        &dead,
        "apiVersion: v1\nkind: Config\nclusters:\n- name: c\n  cluster:\n    server: http://127.0.0.1:1\n\
         users:\n- name: u\n  user: {}\ncontexts:\n- name: x\n  context:\n    cluster: c\n    user: u\n\
         current-context: x\n",
    )
    .unwrap();
    let out = run(&mut command(&e.dir.0, Some(&dead), &["enroll", "shop"])).await;
    assert_one_line_error(&out, &["cannot reach the API server at http://127.0.0.1:1"]);

    // KUBECONFIG is honoured when there is no --kubeconfig.
    let out =
        run(command(&e.dir.0, None, &["enroll", "shop"]).env("KUBECONFIG", &e.kubeconfig)).await;
    assert_ok(&out);
}

const ZTUNNEL_DUMP: &str = r#"{"node": "node-a", "trust_domain": "cluster.local",
 "certificates": [
  {"identity": "spiffe://cluster.local/ns/shop/sa/reviews", "state": "Available", "serial": "01",
   "not_before": "2026-01-01T00:00:00Z", "not_after": "2099-01-02T00:00:00Z"},
  {"identity": "spiffe://cluster.local/ns/shop/sa/ratings", "state": "Available", "serial": "02",
   "not_before": "2026-01-01T00:00:00Z", "not_after": "2099-01-01T12:00:00Z"}]}"#;

/// zmesh-core's real admin server, on loopback as in a pod, serving `dump` as `/config_dump`.
/// It stops when the returned guard is dropped.
async fn admin_server(dump: &str) -> (SocketAddr, tokio_util::sync::DropGuard) {
    struct Dump(Value);
    impl zmesh_core::admin::AdminHandler for Dump {
        fn config_dump(&self) -> Value {
            self.0.clone()
        }
    }
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let stop = CancellationToken::new();
    let handler = Arc::new(Dump(serde_json::from_str(dump).unwrap()));
    tokio::spawn(zmesh_core::admin::serve_admin(
        listener,
        handler,
        None,
        stop.clone(),
    ));
    (addr, stop.drop_guard())
}

/// A server that accepts connections and never answers (a hung proxy).
async fn silent_server() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((tcp, _)) = listener.accept().await {
            held.push(tcp);
        }
    });
    addr
}

#[tokio::test]
async fn config_dump_through_port_forward() {
    let e = env().await;
    let (admin, _stop) = admin_server(ZTUNNEL_DUMP).await;
    e.api
        .set_port_forward("zmesh-system", "ztunnel-abc", 15000, admin);
    let out = e.zmesh(&["config-dump", "ztunnel", "ztunnel-abc"]).await;
    assert_ok(&out);
    let got: Value = serde_json::from_slice(&out.stdout).expect("JSON output");
    assert_eq!(got, serde_json::from_str::<Value>(ZTUNNEL_DUMP).unwrap());
    // Through the portforward subresource (a WebSocket GET), never the pod proxy.
    let requests = e.api.requests();
    assert!(requests.iter().any(|r| r.method == "GET"
        && r.path == "/api/v1/namespaces/zmesh-system/pods/ztunnel-abc/portforward"
        && r.query.contains("ports=15000")));
    assert!(!requests.iter().any(|r| r.path.contains("/proxy")));

    let out = e
        .zmesh(&["config-dump", "ztunnel", "ztunnel-abc", "-o", "yaml"])
        .await;
    assert_ok(&out);
    let got: Value = serde_saphyr::from_str(&stdout(&out)).expect("YAML output");
    assert_eq!(got["node"], "node-a");

    // The controller's admin port, in zmesh's namespace by default too.
    let (ctl_admin, _ctl_stop) = admin_server(r#"{"component": "zmesh-controller"}"#).await;
    e.api
        .set_port_forward("zmesh-system", "zmesh-controller-abc", 15000, ctl_admin);
    let out = e
        .zmesh(&["config-dump", "controller", "zmesh-controller-abc"])
        .await;
    assert_ok(&out);
    let got: Value = serde_json::from_slice(&out.stdout).expect("JSON output");
    assert_eq!(got["component"], "zmesh-controller");

    // A waypoint pod in -n's namespace where nothing listens on 15000: the kubelet's dial
    // inside the pod is refused and says so on the error channel.
    e.api
        .insert(pod("shop", "waypoint-xyz", "node-a", json!({}), true));
    let out = e
        .zmesh(&["config-dump", "waypoint", "waypoint-xyz", "-n", "shop"])
        .await;
    assert_one_line_error(
        &out,
        &[
            "pod shop/waypoint-xyz: port-forward to port 15000",
            "connection refused inside the pod",
        ],
    );
}

#[tokio::test]
async fn config_dump_errors_are_one_line() {
    let e = env().await;

    // No such pod: 404 before any upgrade.
    let out = e.zmesh(&["config-dump", "ztunnel", "ztunnel-nope"]).await;
    assert_one_line_error(
        &out,
        &["pod \"ztunnel-nope\" in namespace \"zmesh-system\" not found"],
    );

    // RBAC: the kubeconfig's user may not create pods/portforward.
    let (admin, _stop) = admin_server(ZTUNNEL_DUMP).await;
    e.api
        .set_port_forward("zmesh-system", "ztunnel-abc", 15000, admin);
    e.api.fail(
        "GET",
        "/api/v1/namespaces/zmesh-system/pods/ztunnel-abc/portforward",
        403,
    );
    let out = e.zmesh(&["config-dump", "ztunnel", "ztunnel-abc"]).await;
    assert_one_line_error(
        &out,
        &[
            "forbidden",
            "cannot create pods/portforward \"ztunnel-abc\" in namespace \"zmesh-system\"",
            "system:serviceaccount:test:fake",
        ],
    );
    e.api.clear_failures();

    // A proxy that accepts and never answers: the timeout, not a hang.
    e.api
        .set_port_forward("zmesh-system", "ztunnel-hung", 15000, silent_server().await);
    let started = std::time::Instant::now();
    let out = e
        .zmesh(&["config-dump", "ztunnel", "ztunnel-hung", "--timeout", "1s"])
        .await;
    assert_one_line_error(
        &out,
        &[
            "timed out after 1s",
            "GET /config_dump on port 15000 of pod zmesh-system/ztunnel-hung",
        ],
    );
    assert!(started.elapsed() < Duration::from_secs(10));
}

fn pod(ns: &str, name: &str, node: &str, labels: Value, ready: bool) -> Value {
    json!({"apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": ns, "labels": labels},
        "spec": {"nodeName": node, "containers": [{"name": "c", "image": "i"}]},
        "status": {"phase": "Running", "conditions": [
            {"type": "Ready", "status": if ready { "True" } else { "False" }}]}})
}

#[tokio::test]
async fn status_shows_controller_ztunnels_waypoints_and_enrolled_namespaces() {
    let e = env().await;
    e.namespace("zmesh-system", json!({}));
    e.namespace(
        "shop",
        json!({"istio.io/dataplane-mode": "ambient", "istio.io/use-waypoint": "waypoint"}),
    );
    e.namespace("legacy", json!({}));
    e.api
        .insert(json!({"apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": "zmesh-controller", "namespace": "zmesh-system"},
        "spec": {"replicas": 2, "selector": {"matchLabels": {"app": "c"}},
                 "template": {"metadata": {"labels": {"app": "c"}}, "spec": {"containers": []}}},
        "status": {"readyReplicas": 2, "availableReplicas": 2}}));
    let zt = json!({"app.kubernetes.io/name": "ztunnel"});
    e.api
        .insert(pod("zmesh-system", "ztunnel-a", "node-a", zt.clone(), true));
    e.api
        .insert(pod("zmesh-system", "ztunnel-b", "node-b", zt, true));
    // ztunnel-a's admin server answers through port-forward; nothing listens in ztunnel-b.
    let (admin, _stop) = admin_server(ZTUNNEL_DUMP).await;
    e.api
        .set_port_forward("zmesh-system", "ztunnel-a", 15000, admin);
    e.api
        .insert(pod("shop", "reviews-1", "node-a", json!({}), true));
    e.api.insert(pod(
        "shop",
        "batch-1",
        "node-b",
        json!({"istio.io/dataplane-mode": "none"}),
        true,
    ));
    e.api
        .insert(pod("legacy", "old-1", "node-b", json!({}), true));
    e.api
        .insert(gateway("shop", "waypoint", "istio-waypoint", Some("True")));

    let out = e.zmesh(&["status"]).await;
    assert_ok(&out);
    let text = stdout(&out);
    let has_row = |cells: &[&str]| {
        text.lines().any(|l| {
            l.split_whitespace()
                .take(cells.len())
                .eq(cells.iter().copied())
        })
    };
    assert!(
        has_row(&["zmesh-system", "zmesh-controller", "2/2"]),
        "{text}"
    );
    assert!(
        has_row(&["node-a", "ztunnel-a", "True", "2", "2099-01-01T12:00:00Z"]),
        "{text}"
    );
    assert!(
        has_row(&["node-b", "ztunnel-b", "True", "?", "-"]),
        "{text}"
    );
    assert!(has_row(&["shop", "waypoint", "True"]), "{text}");
    assert!(has_row(&["shop", "1", "1", "waypoint"]), "{text}");
    assert!(!text.contains("legacy"), "{text}");
    assert!(
        text.contains("note: certificate expiry unknown for 1 ztunnel pod(s)")
            && text.contains("ztunnel-b: pod zmesh-system/ztunnel-b: port-forward to port 15000: connection refused inside the pod"),
        "{text}"
    );

    let out = e.zmesh(&["status", "-o", "json"]).await;
    assert_ok(&out);
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["ztunnels"][0]["certificates"], 2);
    assert_eq!(v["enrolled_namespaces"][0]["namespace"], "shop");

    // An unready ztunnel makes status fail.
    e.api.insert(pod(
        "zmesh-system",
        "ztunnel-b",
        "node-b",
        json!({"app.kubernetes.io/name": "ztunnel"}),
        false,
    ));
    let out = e.zmesh(&["status"]).await;
    assert_one_line_error(&out, &["not healthy", "ztunnel-b"]);
}

#[tokio::test]
async fn check_reports_ok_warn_fail() {
    let e = env().await;
    for (name, kernel) in [
        ("node-a", "6.12.38+deb13-amd64"),
        ("node-b", "6.8.0-1021-azure"),
    ] {
        e.api.insert(
            json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": name},
            "status": {"nodeInfo": {"kernelVersion": kernel}}}),
        );
    }
    let gateway_crd = json!({"apiVersion": "apiextensions.k8s.io/v1", "kind": "CustomResourceDefinition",
        "metadata": {"name": "gateways.gateway.networking.k8s.io"},
        "spec": {"group": "gateway.networking.k8s.io", "scope": "Namespaced",
                 "names": {"kind": "Gateway", "plural": "gateways"},
                 "versions": [{"name": "v1", "served": true, "storage": true}]}});
    e.api.insert(gateway_crd);

    let out = e.zmesh(&["check"]).await;
    let text = stdout(&out);
    let status_of = |check: &str| -> String {
        text.lines()
            .find(|l| l.starts_with(check))
            .and_then(|l| l[check.len()..].split_whitespace().next())
            .unwrap_or("")
            .to_string()
    };
    assert_eq!(status_of("API server"), "OK", "{text}");
    assert_eq!(status_of("node kernels"), "OK", "{text}");
    assert_eq!(status_of("Gateway API CRDs"), "OK", "{text}");
    assert_eq!(status_of("zmesh CRDs"), "WARN", "{text}");
    assert_eq!(status_of("other meshes"), "OK", "{text}");
    assert_eq!(status_of("permissions"), "OK", "{text}");
    // Local checks depend on the machine; they only must not FAIL the run when fine here.
    let local_fail = text.lines().skip(1).take(3).any(|l| l.contains(" FAIL "));
    assert_eq!(out.status.success(), !local_fail, "{text}");

    // A user who may not port-forward into zmesh's namespace: a WARN naming the commands
    // that will not work (not a FAIL: check may run as someone else than the operator).
    e.api
        .deny_access("create", "pods/portforward", Some("zmesh-system"));
    let permission = |out: &std::process::Output| -> Value {
        let checks: Value = serde_json::from_slice(&out.stdout).unwrap();
        checks
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["check"] == "permissions")
            .cloned()
            .unwrap_or_else(|| panic!("no permissions check: {checks}"))
    };
    let p = permission(&e.zmesh(&["check", "-o", "json"]).await);
    assert_eq!(p["status"], "WARN", "{p}");
    let msg = p["message"].as_str().unwrap();
    assert!(
        msg.contains("pods/portforward in zmesh-system") && msg.contains("zmesh config-dump"),
        "{p}"
    );
    // The review itself forbidden: cannot check, a WARN too.
    e.api.fail(
        "POST",
        "/apis/authorization.k8s.io/v1/selfsubjectaccessreviews",
        403,
    );
    let p = permission(&e.zmesh(&["check", "-o", "json"]).await);
    assert_eq!(p["status"], "WARN", "{p}");
    assert!(
        p["message"].as_str().unwrap().starts_with("cannot check"),
        "{p}"
    );
    e.api.clear_failures();

    // An old node kernel (Debian 12's 6.1 has no TCX links) and a running istiod are FAILs:
    // exit 1.
    e.api.insert(
        json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": "node-old"},
        "status": {"nodeInfo": {"kernelVersion": "6.1.0-18-amd64"}}}),
    );
    e.namespace("istio-system", json!({}));
    e.api.insert(json!({"apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": "istiod", "namespace": "istio-system"},
        "spec": {"selector": {"matchLabels": {"app": "istiod"}},
                 "template": {"metadata": {"labels": {"app": "istiod"}}, "spec": {"containers": []}}}}));
    let out = e.zmesh(&["check", "-o", "json"]).await;
    assert_eq!(out.status.code(), Some(1));
    let checks: Value = serde_json::from_slice(&out.stdout).unwrap();
    let fails: Vec<&str> = checks
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c["status"] == "FAIL")
        .map(|c| c["check"].as_str().unwrap())
        .collect();
    assert!(fails.contains(&"node kernels"), "{checks}");
    let kernels = checks
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["check"] == "node kernels")
        .unwrap();
    let msg = kernels["message"].as_str().unwrap_or_default();
    assert!(
        msg.contains("older than 6.6") && msg.contains("node-old"),
        "{kernels}"
    );
    assert!(fails.contains(&"other meshes"), "{checks}");
    assert!(stderr(&out).starts_with("error: "), "{}", stderr(&out));
}
