use super::render::*;
use super::*;

fn settings() -> WaypointSettings {
    WaypointSettings {
        image: "ghcr.io/zmesh/waypoint:1.2.3".into(),
        xds_address: "https://zmesh-controller.zmesh-system.svc:15012".into(),
        control_plane_identity: "spiffe://cluster.local/ns/zmesh-system/sa/zmesh-controller".into(),
        trust_domain: "cluster.local".into(),
        cluster_id: "Kubernetes".into(),
        ca_root_pem: "-----BEGIN CERTIFICATE-----\nMIIB{{x}}\n-----END CERTIFICATE-----\n".into(),
    }
}

fn gw_ref() -> GatewayRef {
    GatewayRef {
        namespace: "shop".into(),
        name: "waypoint".into(),
        uid: "0e5c-uid".into(),
    }
}

fn render_default() -> Vec<Value> {
    Template::embedded()
        .expect("embedded template parses")
        .render(&settings(), &gw_ref())
        .expect("renders")
}

fn find<'a>(docs: &'a [Value], kind: &str) -> &'a Value {
    docs.iter()
        .find(|d| d["kind"] == kind)
        .unwrap_or_else(|| panic!("no {kind}"))
}

fn strings(v: &Value, out: &mut Vec<String>) {
    match v {
        Value::String(s) => out.push(s.clone()),
        Value::Array(a) => a.iter().for_each(|x| strings(x, out)),
        Value::Object(m) => m.iter().for_each(|(k, x)| {
            out.push(k.clone());
            strings(x, out)
        }),
        _ => {}
    }
}

#[test]
fn renders_four_objects_in_apply_order() {
    let docs = render_default();
    let kinds: Vec<&str> = docs.iter().map(|d| d["kind"].as_str().unwrap()).collect();
    assert_eq!(
        kinds,
        ["ServiceAccount", "ConfigMap", "Deployment", "Service"]
    );
    for d in &docs {
        assert_eq!(d["metadata"]["namespace"], "shop");
        let name = d["metadata"]["name"].as_str().unwrap();
        if d["kind"] == "ConfigMap" {
            assert_eq!(name, "waypoint-ca-root");
        } else {
            assert_eq!(name, "waypoint", "{}", d["kind"]);
        }
        // Owner reference to the Gateway, controller + blockOwnerDeletion.
        assert_eq!(
            d["metadata"]["ownerReferences"],
            json!([{"apiVersion": "gateway.networking.k8s.io/v1", "kind": "Gateway",
                    "name": "waypoint", "uid": "0e5c-uid",
                    "controller": true, "blockOwnerDeletion": true}]),
            "{}",
            d["kind"]
        );
        let labels = &d["metadata"]["labels"];
        assert_eq!(labels[MANAGED_BY_LABEL], MANAGED_BY);
        assert_eq!(labels[GATEWAY_NAME_LABEL], "waypoint");
        // Every placeholder substituted; the PEM's own "{{" (data) is left alone.
        let mut all = Vec::new();
        strings(d, &mut all);
        for s in all {
            assert!(
                !s.contains("{{") || s.contains("MIIB{{x}}"),
                "{} left a placeholder: {s}",
                d["kind"]
            );
        }
    }
}

#[test]
fn deployment_runs_the_waypoint_safely() {
    let docs = render_default();
    let dep = find(&docs, "Deployment");
    let pod = &dep["spec"]["template"];
    assert_eq!(
        dep["spec"]["selector"]["matchLabels"],
        json!({GATEWAY_NAME_LABEL: "waypoint"})
    );
    let pod_labels = &pod["metadata"]["labels"];
    assert_eq!(pod_labels[GATEWAY_NAME_LABEL], "waypoint");
    assert_eq!(pod_labels["istio.io/dataplane-mode"], "none");
    assert_eq!(pod["spec"]["serviceAccountName"], "waypoint");
    let c = &pod["spec"]["containers"][0];
    assert_eq!(c["image"], "ghcr.io/zmesh/waypoint:1.2.3");
    assert_eq!(
        c["args"],
        json!([
            "--control-plane-identity",
            "spiffe://cluster.local/ns/zmesh-system/sa/zmesh-controller"
        ])
    );
    let env: BTreeMap<&str, &Value> = c["env"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| (e["name"].as_str().unwrap(), e))
        .collect();
    assert_eq!(
        env["XDS_ADDRESS"]["value"],
        "https://zmesh-controller.zmesh-system.svc:15012"
    );
    assert_eq!(env["GATEWAY_NAME"]["value"], "waypoint");
    assert_eq!(env["TRUST_DOMAIN"]["value"], "cluster.local");
    assert_eq!(env["CLUSTER_ID"]["value"], "Kubernetes");
    assert_eq!(
        env["SERVICE_ACCOUNT"]["valueFrom"]["fieldRef"]["fieldPath"],
        "spec.serviceAccountName"
    );
    assert_eq!(
        env["AUTH_TOKEN"]["value"],
        "/var/run/secrets/tokens/istio-token"
    );
    assert_eq!(
        env["XDS_ROOT_CA"]["value"],
        "/var/run/secrets/zmesh/ca/root-cert.pem"
    );
    // Probes: readiness on the waypoint's real path, liveness only on the port.
    assert_eq!(
        c["readinessProbe"]["httpGet"],
        json!({"path": "/healthz/ready", "port": 15021})
    );
    assert_eq!(
        c["livenessProbe"]["httpGet"],
        json!({"path": "/healthz/live", "port": 15021})
    );
    let ports: Vec<i64> = c["ports"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["containerPort"].as_i64().unwrap())
        .collect();
    assert_eq!(ports, [15008, 15020, 15021]);
    assert_eq!(c["resources"]["requests"]["cpu"], "100m");
    assert_eq!(c["resources"]["limits"]["memory"], "1Gi");
    let sc = &c["securityContext"];
    assert_eq!(sc["readOnlyRootFilesystem"], true);
    assert_eq!(sc["runAsNonRoot"], true);
    assert_eq!(sc["allowPrivilegeEscalation"], false);
    assert_eq!(sc["capabilities"]["drop"], json!(["ALL"]));
    // The token the CA reviews, and the root the controller's certificate chains to.
    let volumes = pod["spec"]["volumes"].as_array().unwrap();
    assert!(
        volumes
            .iter()
            .any(|v| v["projected"]["sources"][0]["serviceAccountToken"]["audience"] == "istio-ca")
    );
    assert!(
        volumes
            .iter()
            .any(|v| v["configMap"]["name"] == "waypoint-ca-root")
    );
    // Annotation values stay strings (YAML "15020").
    assert_eq!(
        pod["metadata"]["annotations"]["prometheus.io/port"],
        "15020"
    );
}

#[test]
fn service_and_configmap() {
    let docs = render_default();
    let svc = find(&docs, "Service");
    assert_eq!(svc["spec"]["type"], "ClusterIP");
    assert_eq!(
        svc["spec"]["selector"],
        json!({GATEWAY_NAME_LABEL: "waypoint"})
    );
    assert_eq!(svc["spec"]["ports"][0]["port"], 15008);
    let cm = find(&docs, "ConfigMap");
    assert_eq!(cm["data"]["root-cert.pem"], settings().ca_root_pem);
    let sa = find(&docs, "ServiceAccount");
    assert_eq!(sa["automountServiceAccountToken"], false);
}

#[test]
fn values_are_data_not_structure() {
    // A value that looks like YAML or a placeholder is inserted verbatim.
    let mut s = settings();
    s.image = "evil\n  hostNetwork: true".into();
    s.cluster_id = "{{GATEWAY_UID}}".into();
    let docs = Template::embedded().unwrap().render(&s, &gw_ref()).unwrap();
    let dep = find(&docs, "Deployment");
    let c = &dep["spec"]["template"]["spec"]["containers"][0];
    assert_eq!(c["image"], "evil\n  hostNetwork: true");
    assert!(dep["spec"]["template"]["spec"]["hostNetwork"].is_null());
    let cluster = c["env"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["name"] == "CLUSTER_ID")
        .unwrap();
    assert_eq!(cluster["value"], "{{GATEWAY_UID}}");
}

#[test]
fn template_errors_are_named() {
    let head = "apiVersion: v1\nkind: Service\nmetadata:\n  name: x\n";
    let dep = "---\napiVersion: apps/v1\nkind: Deployment\nmetadata:\n  name: x\n";
    let e = Template::parse(&format!("{head}  namespace: \"{{{{NOPE}}}}\"\n{dep}")).unwrap_err();
    assert!(
        matches!(&e, RenderError::UnknownPlaceholder { placeholder, path }
            if placeholder == "{{NOPE}}" && path == "Service.metadata.namespace"),
        "{e}"
    );
    let e = Template::parse(&format!(
        "{head}  namespace: \"ns-{{{{GATEWAY_NAME}}}}\"\n{dep}"
    ))
    .unwrap_err();
    assert!(matches!(&e, RenderError::EmbeddedPlaceholder { .. }), "{e}");
    assert!(
        e.to_string()
            .contains("a placeholder must be the whole value")
    );
    let e = Template::parse(&format!(
        "{head}  labels:\n    \"{{{{GATEWAY_NAME}}}}\": a\n{dep}"
    ))
    .unwrap_err();
    assert!(matches!(e, RenderError::EmbeddedPlaceholder { .. }), "{e}");
    let e = Template::parse(&format!(
        "{head}{dep}---\napiVersion: v1\nkind: Secret\nmetadata:\n  name: s\n"
    ))
    .unwrap_err();
    assert_eq!(
        e,
        RenderError::UnsupportedKind {
            index: 2,
            kind: "Secret".into()
        }
    );
    assert_eq!(
        Template::parse(head).unwrap_err(),
        RenderError::Missing("Deployment")
    );
    assert!(matches!(
        Template::parse("a: [").unwrap_err(),
        RenderError::Yaml(_)
    ));
    assert_eq!(
        Template::parse("- 1\n").unwrap_err(),
        RenderError::NotAnObject { index: 0 }
    );
}

fn gateway(status: Value) -> Value {
    json!({"apiVersion": "gateway.networking.k8s.io/v1", "kind": "Gateway",
           "metadata": {"name": "waypoint", "namespace": "shop", "uid": "u1", "generation": 3,
                        "resourceVersion": "17"},
           "spec": {"gatewayClassName": "istio-waypoint"},
           "status": status})
}

fn condition<'a>(patch: &'a Value, t: &str) -> &'a Value {
    patch["status"]["conditions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["type"] == t)
        .unwrap()
}

#[test]
fn status_follows_service_and_deployment() {
    let gw = gateway(json!({}));
    let mut obs = Observed {
        error: None,
        deployment: Some(("shop/waypoint".into(), 0)),
        service: Some(("shop/waypoint".into(), vec![])),
    };
    let p = status_patch(&gw, &obs, "T1").unwrap();
    assert_eq!(p["metadata"]["resourceVersion"], "17");
    let acc = condition(&p, "Accepted");
    assert_eq!(acc["status"], "True");
    assert_eq!(acc["observedGeneration"], 3);
    let prog = condition(&p, "Programmed");
    assert_eq!(prog["status"], "False");
    assert_eq!(prog["reason"], "AddressNotAssigned");
    assert_eq!(prog["lastTransitionTime"], "T1");
    assert!(p["status"]["addresses"].is_null());

    obs.service = Some(("shop/waypoint".into(), vec!["10.96.0.10".into()]));
    let p = status_patch(&gw, &obs, "T1").unwrap();
    assert_eq!(condition(&p, "Programmed")["reason"], "Pending");
    assert_eq!(
        p["status"]["addresses"],
        json!([{"type": "IPAddress", "value": "10.96.0.10"}])
    );

    obs.deployment = Some(("shop/waypoint".into(), 1));
    let p = status_patch(&gw, &obs, "T2").unwrap();
    let prog = condition(&p, "Programmed");
    assert_eq!(prog["status"], "True");
    assert_eq!(prog["reason"], "Programmed");
    assert!(
        prog["message"]
            .as_str()
            .unwrap()
            .contains("waypoint.shop.svc.cluster.local:15008")
    );

    // Written back: nothing more to write, even at a later time.
    let written = gateway(p["status"].clone());
    assert_eq!(status_patch(&written, &obs, "T3"), None);

    // A transition changes lastTransitionTime of that condition only.
    obs.deployment = Some(("shop/waypoint".into(), 0));
    let p = status_patch(&written, &obs, "T4").unwrap();
    assert_eq!(condition(&p, "Programmed")["lastTransitionTime"], "T4");
    assert_eq!(condition(&p, "Accepted")["lastTransitionTime"], "T2");
}

#[test]
fn status_reports_apply_errors_and_keeps_foreign_conditions() {
    let foreign = json!({"type": "ResolvedRefs", "status": "True", "reason": "x",
                         "message": "", "lastTransitionTime": "T0"});
    let gw = gateway(json!({"conditions": [foreign.clone()]}));
    let obs = Observed {
        error: Some("applying Deployment shop/waypoint: forbidden".into()),
        ..Observed::default()
    };
    let p = status_patch(&gw, &obs, "T1").unwrap();
    let prog = condition(&p, "Programmed");
    assert_eq!(prog["status"], "False");
    assert_eq!(prog["reason"], "Pending");
    assert!(prog["message"].as_str().unwrap().contains("forbidden"));
    assert_eq!(condition(&p, "ResolvedRefs"), &foreign);
}

#[test]
fn observed_service_ips() {
    let mut o = Observed::default();
    o.observe(
        "Service",
        "ns",
        "s",
        &json!({"spec": {"clusterIP": "None"}}),
    );
    assert_eq!(o.service, Some(("ns/s".into(), vec![])));
    o.observe(
        "Service",
        "ns",
        "s",
        &json!({"spec": {"clusterIP": "10.0.0.1", "clusterIPs": ["10.0.0.1", "fd00::1"]}}),
    );
    assert_eq!(
        o.service,
        Some(("ns/s".into(), vec!["10.0.0.1".into(), "fd00::1".into()]))
    );
    o.observe(
        "Deployment",
        "ns",
        "d",
        &json!({"status": {"availableReplicas": 2}}),
    );
    assert_eq!(o.deployment, Some(("ns/d".into(), 2)));
}

#[test]
fn live_waypoints_and_keys() {
    let gw = gateway(json!({}));
    assert!(is_live_waypoint(&gw));
    let mut other = gw.clone();
    other["spec"]["gatewayClassName"] = json!("istio");
    assert!(!is_live_waypoint(&other));
    let mut deleting = gw.clone();
    deleting["metadata"]["deletionTimestamp"] = json!("2025-01-01T00:00:00Z");
    assert!(!is_live_waypoint(&deleting));
    let owned = json!({"metadata": {"namespace": "shop", "name": "waypoint-ca-root",
        "labels": {MANAGED_BY_LABEL: MANAGED_BY, GATEWAY_NAME_LABEL: "waypoint"}}});
    assert_eq!(
        owner_key(&owned),
        Some(GatewayKey {
            namespace: "shop".into(),
            name: "waypoint".into()
        })
    );
    let foreign = json!({"metadata": {"namespace": "shop", "name": "x",
        "labels": {GATEWAY_NAME_LABEL: "waypoint"}}});
    assert_eq!(owner_key(&foreign), None);
}

#[test]
fn backoff_grows_and_caps() {
    let t = Timing::default();
    assert_eq!(backoff(t, 0), Duration::from_millis(500));
    assert_eq!(backoff(t, 1), Duration::from_secs(1));
    assert_eq!(backoff(t, 30), t.backoff_max);
}
