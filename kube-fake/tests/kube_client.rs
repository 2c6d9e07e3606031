//! The fake API server driven by a real kube-rs client: discovery, CRUD, patches, watch,
//! CRDs, failure injection and the pods' proxy subresource.

use std::time::Duration;

use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Namespace, ServiceAccount};
use kube::api::{Api, DeleteParams, DynamicObject, ListParams, Patch, PatchParams, PostParams};
use kube::discovery::{ApiResource, Discovery};
use kube::runtime::watcher;
use serde_json::json;
use zmesh_kube_fake::FakeApiServer;

fn ns(name: &str) -> serde_json::Value {
    json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}})
}

#[tokio::test]
async fn crud_patch_and_errors_through_kube_rs() {
    let api = FakeApiServer::start().await;
    let client = api.client();

    // A namespaced create in a missing namespace is refused like a real server does.
    let sas: Api<ServiceAccount> = Api::namespaced(client.clone(), "shop");
    let sa: ServiceAccount = serde_json::from_value(json!({"metadata": {"name": "w"}})).unwrap();
    let err = sas.create(&PostParams::default(), &sa).await.unwrap_err();
    assert!(
        err.to_string().contains("namespaces \"shop\" not found"),
        "{err}"
    );

    api.insert(ns("shop"));
    let created = sas.create(&PostParams::default(), &sa).await.unwrap();
    assert!(created.metadata.uid.is_some() && created.metadata.resource_version.is_some());
    let err = sas.create(&PostParams::default(), &sa).await.unwrap_err();
    assert!(err.to_string().contains("already exists"), "{err}");

    // Merge patch on a label, then removal with null.
    let nss: Api<Namespace> = Api::all(client.clone());
    let p = json!({"metadata": {"labels": {"istio.io/dataplane-mode": "ambient"}}});
    nss.patch("shop", &PatchParams::default(), &Patch::Merge(&p))
        .await
        .unwrap();
    let stored = api.get("v1", "Namespace", None, "shop").unwrap();
    assert_eq!(
        stored["metadata"]["labels"]["istio.io/dataplane-mode"],
        "ambient"
    );
    let p = json!({"metadata": {"labels": {"istio.io/dataplane-mode": null}}});
    nss.patch("shop", &PatchParams::default(), &Patch::Merge(&p))
        .await
        .unwrap();
    let stored = api.get("v1", "Namespace", None, "shop").unwrap();
    assert!(
        stored["metadata"]["labels"]
            .get("istio.io/dataplane-mode")
            .is_none()
    );

    // Server-side apply creates, then updates (generation moves only with the spec), and the
    // status subresource is separate.
    let deps: Api<Deployment> = Api::namespaced(client.clone(), "shop");
    let d = json!({"apiVersion": "apps/v1", "kind": "Deployment",
                   "metadata": {"name": "w", "labels": {"app": "w"}},
                   "spec": {"replicas": 1, "selector": {"matchLabels": {"app": "w"}},
                            "template": {"metadata": {"labels": {"app": "w"}},
                                         "spec": {"containers": [{"name": "c", "image": "i"}]}}}});
    let ssa = PatchParams::apply("zmesh").force();
    let a = deps.patch("w", &ssa, &Patch::Apply(&d)).await.unwrap();
    assert_eq!(a.metadata.generation, Some(1));
    let mut d2 = d.clone();
    d2["spec"]["replicas"] = json!(2);
    let b = deps.patch("w", &ssa, &Patch::Apply(&d2)).await.unwrap();
    assert_eq!(b.metadata.generation, Some(2));
    let s = json!({"status": {"availableReplicas": 2}});
    deps.patch_status("w", &PatchParams::default(), &Patch::Merge(&s))
        .await
        .unwrap();
    let c = deps.patch("w", &ssa, &Patch::Apply(&d2)).await.unwrap();
    assert_eq!(c.metadata.generation, Some(2));
    assert_eq!(
        c.status.unwrap().available_replicas,
        Some(2),
        "apply keeps status"
    );
    let writes = api.writes();
    let last = writes.last().unwrap();
    assert_eq!(last.method, "PATCH");
    assert_eq!(
        last.content_type.as_deref(),
        Some("application/apply-patch+yaml")
    );
    assert_eq!(last.body.as_ref().unwrap()["spec"]["replicas"], 2);

    // Injected 403 with a kubectl-like message, then cleared.
    api.fail("DELETE", "/apis/apps/v1/namespaces/shop/deployments", 403);
    let err = deps
        .delete("w", &DeleteParams::default())
        .await
        .unwrap_err();
    assert!(
        err.to_string().contains(
            "cannot delete resource \"deployments\" in API group \"apps\" in the namespace \"shop\""
        ),
        "{err}"
    );
    api.clear_failures();
    deps.delete("w", &DeleteParams::default()).await.unwrap();
    assert!(
        api.get("apps/v1", "Deployment", Some("shop"), "w")
            .is_none()
    );

    // Selectors on list.
    api.insert(json!({"apiVersion": "v1", "kind": "ServiceAccount",
                      "metadata": {"name": "x", "namespace": "shop", "labels": {"k": "v"}}}));
    let l = sas
        .list(&ListParams::default().labels("k=v"))
        .await
        .unwrap();
    assert_eq!(l.items.len(), 1);
}

#[tokio::test]
async fn crds_become_served_and_discoverable() {
    let api = FakeApiServer::start().await;
    let client = api.client();
    let crd = json!({"apiVersion": "apiextensions.k8s.io/v1", "kind": "CustomResourceDefinition",
        "metadata": {"name": "widgets.example.com"},
        "spec": {"group": "example.com", "scope": "Namespaced",
                 "names": {"kind": "Widget", "plural": "widgets", "singular": "widget"},
                 "versions": [{"name": "v1", "served": true, "storage": true,
                               "schema": {"openAPIV3Schema": {"type": "object"}}}]}});
    let crds: Api<DynamicObject> = Api::all_with(
        client.clone(),
        &ApiResource::from_gvk_with_plural(
            &kube::core::GroupVersionKind::gvk(
                "apiextensions.k8s.io",
                "v1",
                "CustomResourceDefinition",
            ),
            "customresourcedefinitions",
        ),
    );
    let obj: DynamicObject = serde_json::from_value(crd).unwrap();
    crds.patch(
        "widgets.example.com",
        &PatchParams::apply("t"),
        &Patch::Apply(&obj),
    )
    .await
    .unwrap();
    let stored = api
        .get(
            "apiextensions.k8s.io/v1",
            "CustomResourceDefinition",
            None,
            "widgets.example.com",
        )
        .unwrap();
    assert!(
        stored["status"]["conditions"]
            .as_array()
            .unwrap()
            .iter()
            .any(|c| c["type"] == "Established")
    );

    let discovery = Discovery::new(client.clone()).run().await.unwrap();
    let (res, _) = discovery
        .groups()
        .flat_map(|g| g.recommended_resources())
        .find(|(r, _)| r.kind == "Widget")
        .expect("Widget discovered");
    assert_eq!(res.plural, "widgets");
    api.insert(ns("a"));
    let widgets: Api<DynamicObject> = Api::namespaced_with(client, "a", &res);
    let w: DynamicObject = serde_json::from_value(
        json!({"apiVersion": "example.com/v1", "kind": "Widget", "metadata": {"name": "w1"}}),
    )
    .unwrap();
    widgets.create(&PostParams::default(), &w).await.unwrap();
    assert_eq!(api.list("example.com/v1", "Widget", Some("a")).len(), 1);
}

#[tokio::test]
async fn watch_sees_changes_from_the_api_and_from_the_test() {
    let api = FakeApiServer::start().await;
    api.insert(ns("shop"));
    let client = api.client();
    let sas: Api<ServiceAccount> = Api::namespaced(client, "shop");
    let mut stream = watcher(sas.clone(), watcher::Config::default()).boxed();
    // Initial list done.
    let deadline = Duration::from_secs(10);
    loop {
        let e = tokio::time::timeout(deadline, stream.try_next())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        if matches!(e, watcher::Event::InitDone) {
            break;
        }
    }
    api.insert(json!({"apiVersion": "v1", "kind": "ServiceAccount",
                      "metadata": {"name": "late", "namespace": "shop"}}));
    let e = tokio::time::timeout(deadline, stream.try_next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert!(
        matches!(&e, watcher::Event::Apply(sa) if sa.metadata.name.as_deref() == Some("late")),
        "{e:?}"
    );
    assert!(api.delete("v1", "ServiceAccount", Some("shop"), "late"));
    let e = tokio::time::timeout(deadline, stream.try_next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert!(
        matches!(&e, watcher::Event::Delete(sa) if sa.metadata.name.as_deref() == Some("late")),
        "{e:?}"
    );
}

#[tokio::test]
async fn pod_proxy_answers_what_the_test_set() {
    let api = FakeApiServer::start().await;
    api.set_pod_proxy(
        "zmesh-system",
        "ztunnel-a:15000",
        "config_dump",
        200,
        "{\"ok\":true}",
    );
    let client = api.client();
    let req = http::Request::get(
        "/api/v1/namespaces/zmesh-system/pods/ztunnel-a:15000/proxy/config_dump",
    )
    .body(Vec::new())
    .unwrap();
    let text = client.request_text(req).await.unwrap();
    assert_eq!(text, "{\"ok\":true}");
    let req =
        http::Request::get("/api/v1/namespaces/zmesh-system/pods/other:15000/proxy/config_dump")
            .body(Vec::new())
            .unwrap();
    assert!(client.request_text(req).await.is_err());
}
