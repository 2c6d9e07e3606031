//! The file source against bad input and changes: every problem is reported naming the file,
//! the document and (when known) the object, and everything else in the directory still
//! applies; edits, new files and deletions are picked up by polling.

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use zmesh_controller::sources::file::{FileSource, SourceErrorReason};
use zmesh_controller::store::{ObjectKey, ObjectStore};
use zmesh_controller::translate::{TranslateOptions, translate};

/// A fresh, empty directory under the target dir's tmp (removed at the start of each run).
fn temp_dir(name: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("file-source-{name}"));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

const GOOD: &str = r#"
apiVersion: v1
kind: Namespace
metadata:
  name: shop
  labels:
    istio.io/dataplane-mode: ambient
---
apiVersion: v1
kind: Pod
metadata:
  name: cart
  namespace: shop
  labels: {app: cart}
spec:
  nodeName: node-a
status:
  podIP: 10.1.0.1
"#;

const BROKEN: &str = r#"# first document is fine
apiVersion: v1
kind: Service
metadata:
  name: cart
  namespace: shop
spec:
  clusterIP: 10.96.0.1
  selector: {app: cart}
  ports: [{port: 80}]
---
apiVersion: v1
kind: Pod
metadata:
  name: [unclosed
---
apiVersion: v1
kind: Pod
metadata:
  namespace: shop
spec: {}
---
apiVersion: example.com/v1
kind: Frobnicator
metadata:
  name: frob
---
apiVersion: networking.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: wrong-group
---
apiVersion: zmesh.dev/v1
kind: ZmeshNode
metadata:
  name: node-a
---
# no namespace: defaults to `default`, like kubectl
apiVersion: v1
kind: Pod
metadata:
  name: orphan
status:
  podIP: 10.1.0.9
"#;

const POLICIES: &str = r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: bad-cidr
  namespace: shop
spec:
  action: DENY
  rules:
  - from:
    - source:
        notIpBlocks: ["300.1.2.3/8"]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: good
  namespace: shop
spec:
  action: DENY
  rules:
  - from:
    - source:
        ipBlocks: ["192.0.2.0/24"]
"#;

#[test]
fn bad_input_is_reported_and_the_rest_applies() {
    let dir = temp_dir("bad-input");
    std::fs::write(dir.join("a-good.yaml"), GOOD).unwrap();
    std::fs::write(dir.join("b-broken.yml"), BROKEN).unwrap();
    std::fs::write(dir.join("c-policies.yaml"), POLICIES).unwrap();
    // Not Kubernetes YAML: ignored without errors.
    std::fs::write(dir.join("node-a.token"), "s3cret\n").unwrap();
    std::fs::write(dir.join("README.txt"), "not yaml: [").unwrap();
    std::fs::write(dir.join(".a-good.yaml.swp"), "garbage: [").unwrap();
    std::fs::write(dir.join("d-empty.yaml"), "# nothing here\n---\n").unwrap();

    let store = ObjectStore::new();
    let errors = FileSource::new(&dir).load_once(&store);
    let msgs: Vec<String> = common::render_source_errors(&dir, &errors)
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap().to_string())
        .collect();
    assert_eq!(errors.len(), 4, "{msgs:#?}");

    // Syntax error: file, document index and line.
    assert!(matches!(errors[0].reason, SourceErrorReason::Syntax(_)));
    assert!(
        msgs[0].starts_with("b-broken.yml, document 2 (line 11): YAML syntax error"),
        "{}",
        msgs[0]
    );
    // Missing name: file, document, kind.
    assert_eq!(
        msgs[1],
        "b-broken.yml, document 3 (line 16) (Pod): not a Kubernetes object: missing `metadata.name` (a non-empty string)"
    );
    // Unknown kind: names the object.
    assert!(
        msgs[2].starts_with(
            "b-broken.yml, document 4 (line 22) (Frobnicator frob): unknown kind \"Frobnicator\""
        ),
        "{}",
        msgs[2]
    );
    // Right kind, wrong API group.
    assert!(
        msgs[3].contains("(AuthorizationPolicy wrong-group): apiVersion \"networking.istio.io/v1\" is not a version of kind AuthorizationPolicy"),
        "{}",
        msgs[3]
    );

    // Everything else is in the store.
    let snap = store.snapshot();
    let keys: Vec<String> = ALL
        .iter()
        .flat_map(|k| snap.of_kind(k))
        .map(|(k, _)| k.to_string())
        .collect();
    assert_eq!(
        keys,
        [
            "Namespace shop",
            "Pod default/orphan",
            "Pod shop/cart",
            "Service shop/cart",
            "AuthorizationPolicy shop/bad-cidr",
            "AuthorizationPolicy shop/good",
        ]
    );

    // The invalid CIDR is a translation error naming the policy and the field; the other
    // policy and the workloads still translate.
    let out = translate(&snap, &TranslateOptions::default());
    let errs: Vec<String> = out.errors.iter().map(|e| e.to_string()).collect();
    assert_eq!(
        errs,
        [
            "AuthorizationPolicy shop/bad-cidr: field `spec.rules[0].from[0].source.notIpBlocks[0]`: invalid CIDR or IP address \"300.1.2.3/8\"; policy skipped"
        ]
    );
    let rendered = common::render(&out);
    let policies: Vec<&String> = rendered["authorizations"]
        .as_object()
        .unwrap()
        .keys()
        .collect();
    assert_eq!(policies, ["shop/good"]);
    let addresses: Vec<&String> = rendered["addresses"].as_object().unwrap().keys().collect();
    assert_eq!(
        addresses,
        [
            "Kubernetes//v1/Pod/default/orphan",
            "Kubernetes//v1/Pod/shop/cart",
            "shop/cart.shop.svc.cluster.local"
        ]
    );
}

const ALL: &[&str] = zmesh_controller::sources::file::ALL_KINDS;

#[test]
fn duplicates_keep_the_first_definition() {
    let dir = temp_dir("duplicates");
    let pod = |ip: &str| {
        format!(
            "apiVersion: v1\nkind: Pod\nmetadata: {{name: p, namespace: ns}}\nstatus: {{podIP: {ip}}}\n"
        )
    };
    std::fs::write(dir.join("1.yaml"), pod("10.0.0.1")).unwrap();
    std::fs::write(dir.join("2.yaml"), pod("10.0.0.2")).unwrap();
    let store = ObjectStore::new();
    let errors = FileSource::new(&dir).load_once(&store);
    assert_eq!(errors.len(), 1);
    assert!(
        errors[0].to_string().contains("already defined in"),
        "{}",
        errors[0]
    );
    let snap = store.snapshot();
    let p = snap.get(&ObjectKey::new("Pod", "ns", "p")).unwrap();
    assert_eq!(p["status"]["podIP"], "10.0.0.1");
}

#[test]
fn list_documents_are_expanded() {
    let dir = temp_dir("list");
    std::fs::write(
        dir.join("list.yaml"),
        "apiVersion: v1\nkind: List\nitems:\n- {apiVersion: v1, kind: Namespace, metadata: {name: a}}\n- {apiVersion: v1, kind: Namespace, metadata: {name: b, namespace: ignored}}\n",
    )
    .unwrap();
    let store = ObjectStore::new();
    assert!(FileSource::new(&dir).load_once(&store).is_empty());
    let names: Vec<String> = store
        .snapshot()
        .of_kind("Namespace")
        .map(|(k, _)| k.to_string())
        .collect();
    assert_eq!(names, ["Namespace a", "Namespace b"]);
}

async fn wait_for(store: &ObjectStore, what: &str, cond: impl Fn(&ObjectStore) -> bool) {
    let mut rx = store.generation();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !cond(store) {
        tokio::select! {
            _ = rx.changed() => {}
            _ = tokio::time::sleep_until(deadline) => panic!("timed out waiting for {what}"),
        }
    }
}

#[tokio::test]
async fn reloads_on_change() {
    let dir = temp_dir("reload");
    std::fs::write(dir.join("good.yaml"), GOOD).unwrap();
    let store = ObjectStore::new();
    let cancel = tokio_util::sync::CancellationToken::new();
    let source = FileSource::new(&dir).with_poll_interval(Duration::from_millis(50));
    let errors = source.errors();
    let task = tokio::spawn(source.run(store.clone(), cancel.clone()));
    let pods = |s: &ObjectStore| s.snapshot().of_kind("Pod").count();

    wait_for(&store, "initial load", |s| pods(s) == 1).await;

    // A new file.
    std::fs::write(
        dir.join("more.yaml"),
        "apiVersion: v1\nkind: Pod\nmetadata: {name: extra, namespace: shop}\nstatus: {podIP: 10.1.0.2}\n",
    )
    .unwrap();
    wait_for(&store, "new file", |s| pods(s) == 2).await;

    // An edit that breaks the file: reported, its objects go, the other file stays.
    std::fs::write(
        dir.join("more.yaml"),
        "apiVersion: v1\nkind: Pod\nmetadata: {name: [\n",
    )
    .unwrap();
    wait_for(&store, "broken edit", |s| pods(s) == 1).await;
    assert_eq!(errors.borrow().len(), 1);
    assert!(errors.borrow()[0].to_string().contains("more.yaml"));

    // Deleting a file deletes its objects.
    std::fs::remove_file(dir.join("more.yaml")).unwrap();
    std::fs::remove_file(dir.join("good.yaml")).unwrap();
    wait_for(&store, "deletion", |s| s.snapshot().is_empty()).await;
    assert!(errors.borrow().is_empty());

    cancel.cancel();
    task.await.unwrap();
}

#[test]
fn unreadable_directory_keeps_the_previous_objects() {
    let dir = temp_dir("vanishing");
    std::fs::write(dir.join("good.yaml"), GOOD).unwrap();
    let store = ObjectStore::new();
    let source = FileSource::new(&dir);
    assert!(source.load_once(&store).is_empty());
    std::fs::remove_dir_all(&dir).unwrap();
    let errors = source.load_once(&store);
    assert_eq!(errors.len(), 1);
    assert!(matches!(errors[0].reason, SourceErrorReason::Read(_)));
    assert_eq!(
        store.snapshot().len(),
        2,
        "a transient error must not wipe the mesh"
    );
}
