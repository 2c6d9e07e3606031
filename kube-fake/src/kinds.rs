//! The kinds the fake serves, and the discovery documents kube-rs and kubectl-like clients read.

use serde_json::{Value, json};

/// One served resource type.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Kind {
    /// API group; empty for the core group.
    pub group: String,
    /// Served versions, preferred first.
    pub versions: Vec<String>,
    pub kind: String,
    pub plural: String,
    pub namespaced: bool,
    /// Defined by a CustomResourceDefinition created through the fake (removed with it).
    pub from_crd: bool,
}

impl Kind {
    fn builtin(group: &str, versions: &[&str], kind: &str, plural: &str, namespaced: bool) -> Kind {
        Kind {
            group: group.to_string(),
            versions: versions.iter().map(|v| v.to_string()).collect(),
            kind: kind.to_string(),
            plural: plural.to_string(),
            namespaced,
            from_crd: false,
        }
    }

    pub fn api_version(&self, version: &str) -> String {
        if self.group.is_empty() {
            version.to_string()
        } else {
            format!("{}/{}", self.group, version)
        }
    }

    /// `deployments.apps`, `pods`: how the API server names a resource in error messages.
    pub fn qualified_plural(&self) -> String {
        if self.group.is_empty() {
            self.plural.clone()
        } else {
            format!("{}.{}", self.plural, self.group)
        }
    }
}

/// Built-in kinds plus the Istio and Gateway API kinds zmesh reads (a cluster with those CRDs
/// installed). Tests can add more through CRDs.
pub fn builtin() -> Vec<Kind> {
    let istio_net = &["v1", "v1beta1", "v1alpha3"][..];
    let istio_sec = &["v1", "v1beta1"][..];
    vec![
        Kind::builtin("", &["v1"], "Namespace", "namespaces", false),
        Kind::builtin("", &["v1"], "Node", "nodes", false),
        Kind::builtin("", &["v1"], "Pod", "pods", true),
        Kind::builtin("", &["v1"], "Service", "services", true),
        Kind::builtin("", &["v1"], "ServiceAccount", "serviceaccounts", true),
        Kind::builtin("", &["v1"], "ConfigMap", "configmaps", true),
        Kind::builtin("", &["v1"], "Secret", "secrets", true),
        Kind::builtin("", &["v1"], "Event", "events", true),
        Kind::builtin("", &["v1"], "Endpoints", "endpoints", true),
        Kind::builtin("", &["v1"], "ResourceQuota", "resourcequotas", true),
        Kind::builtin("apps", &["v1"], "Deployment", "deployments", true),
        Kind::builtin("apps", &["v1"], "DaemonSet", "daemonsets", true),
        Kind::builtin("apps", &["v1"], "ReplicaSet", "replicasets", true),
        Kind::builtin(
            "policy",
            &["v1"],
            "PodDisruptionBudget",
            "poddisruptionbudgets",
            true,
        ),
        Kind::builtin(
            "discovery.k8s.io",
            &["v1"],
            "EndpointSlice",
            "endpointslices",
            true,
        ),
        Kind::builtin("coordination.k8s.io", &["v1"], "Lease", "leases", true),
        Kind::builtin(
            "scheduling.k8s.io",
            &["v1"],
            "PriorityClass",
            "priorityclasses",
            false,
        ),
        Kind::builtin(
            "rbac.authorization.k8s.io",
            &["v1"],
            "ClusterRole",
            "clusterroles",
            false,
        ),
        Kind::builtin(
            "rbac.authorization.k8s.io",
            &["v1"],
            "ClusterRoleBinding",
            "clusterrolebindings",
            false,
        ),
        Kind::builtin("rbac.authorization.k8s.io", &["v1"], "Role", "roles", true),
        Kind::builtin(
            "rbac.authorization.k8s.io",
            &["v1"],
            "RoleBinding",
            "rolebindings",
            true,
        ),
        Kind::builtin(
            "apiextensions.k8s.io",
            &["v1"],
            "CustomResourceDefinition",
            "customresourcedefinitions",
            false,
        ),
        Kind::builtin(
            "authentication.k8s.io",
            &["v1"],
            "TokenReview",
            "tokenreviews",
            false,
        ),
        // Answered from the fake's access rules, never stored (see `server.rs`).
        Kind::builtin(
            "authorization.k8s.io",
            &["v1"],
            "SelfSubjectAccessReview",
            "selfsubjectaccessreviews",
            false,
        ),
        Kind::builtin(
            "gateway.networking.k8s.io",
            &["v1", "v1beta1"],
            "Gateway",
            "gateways",
            true,
        ),
        Kind::builtin(
            "gateway.networking.k8s.io",
            &["v1", "v1beta1"],
            "GatewayClass",
            "gatewayclasses",
            false,
        ),
        Kind::builtin(
            "gateway.networking.k8s.io",
            &["v1", "v1beta1"],
            "HTTPRoute",
            "httproutes",
            true,
        ),
        Kind::builtin(
            "gateway.networking.k8s.io",
            &["v1alpha2"],
            "TCPRoute",
            "tcproutes",
            true,
        ),
        Kind::builtin(
            "security.istio.io",
            istio_sec,
            "AuthorizationPolicy",
            "authorizationpolicies",
            true,
        ),
        Kind::builtin(
            "security.istio.io",
            istio_sec,
            "PeerAuthentication",
            "peerauthentications",
            true,
        ),
        Kind::builtin(
            "networking.istio.io",
            istio_net,
            "VirtualService",
            "virtualservices",
            true,
        ),
        Kind::builtin(
            "networking.istio.io",
            istio_net,
            "DestinationRule",
            "destinationrules",
            true,
        ),
        Kind::builtin(
            "networking.istio.io",
            istio_net,
            "ServiceEntry",
            "serviceentries",
            true,
        ),
    ]
}

/// The kinds a CustomResourceDefinition object defines (one per served version set).
pub fn from_crd(crd: &Value) -> Option<Kind> {
    let spec = crd.get("spec")?;
    let names = spec.get("names")?;
    let versions: Vec<String> = spec
        .get("versions")?
        .as_array()?
        .iter()
        .filter(|v| v.get("served").and_then(Value::as_bool).unwrap_or(true))
        .filter_map(|v| v.get("name")?.as_str().map(str::to_string))
        .collect();
    if versions.is_empty() {
        return None;
    }
    Some(Kind {
        group: spec.get("group")?.as_str()?.to_string(),
        versions,
        kind: names.get("kind")?.as_str()?.to_string(),
        plural: names.get("plural")?.as_str()?.to_string(),
        namespaced: spec.get("scope").and_then(Value::as_str) != Some("Cluster"),
        from_crd: true,
    })
}

/// `/api`: the core group's versions.
pub fn core_versions() -> Value {
    json!({"kind": "APIVersions", "versions": ["v1"],
           "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0", "serverAddress": "127.0.0.1"}]})
}

/// `/apis`: every named group and its versions.
pub fn group_list(kinds: &[Kind]) -> Value {
    let mut groups: Vec<(String, Vec<String>)> = Vec::new();
    for k in kinds.iter().filter(|k| !k.group.is_empty()) {
        let entry = match groups.iter_mut().find(|(g, _)| *g == k.group) {
            Some(e) => e,
            None => {
                groups.push((k.group.clone(), Vec::new()));
                groups.last_mut().expect("just pushed")
            }
        };
        for v in &k.versions {
            if !entry.1.contains(v) {
                entry.1.push(v.clone());
            }
        }
    }
    let groups: Vec<Value> = groups
        .into_iter()
        .map(|(name, versions)| {
            let vs: Vec<Value> = versions
                .iter()
                .map(|v| json!({"groupVersion": format!("{name}/{v}"), "version": v}))
                .collect();
            json!({"name": name, "versions": vs, "preferredVersion": vs[0]})
        })
        .collect();
    json!({"kind": "APIGroupList", "apiVersion": "v1", "groups": groups})
}

/// `/api/v1`, `/apis/G/V`: the resources of one group version (with their status subresources).
pub fn resource_list(kinds: &[Kind], group: &str, version: &str) -> Option<Value> {
    let mut resources = Vec::new();
    for k in kinds
        .iter()
        .filter(|k| k.group == group && k.versions.iter().any(|v| v == version))
    {
        let verbs = json!([
            "create", "delete", "get", "list", "patch", "update", "watch"
        ]);
        resources.push(
            json!({"name": k.plural, "singularName": k.kind.to_lowercase(),
            "namespaced": k.namespaced, "kind": k.kind, "verbs": verbs}),
        );
        resources.push(
            json!({"name": format!("{}/status", k.plural), "singularName": "",
            "namespaced": k.namespaced, "kind": k.kind, "verbs": ["get", "patch", "update"]}),
        );
    }
    if resources.is_empty() {
        return None;
    }
    let gv = if group.is_empty() {
        version.to_string()
    } else {
        format!("{group}/{version}")
    };
    Some(
        json!({"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": gv,
                "resources": resources}),
    )
}
