//! The Kubernetes kinds the controller reads, and small typed views of the fields translation
//! uses.
//!
//! Objects travel through the store as raw JSON (so both sources stay ignorant of the schema);
//! translation parses them into these structs with [`parse`], which reports the JSON path of a
//! field of the wrong type (`spec.ports[0].port: invalid type: string "x", expected i32`).
//! Every field is optional or defaulted: missing fields are normal (file-mode pods carry only
//! what the user wrote), only a field of the wrong *type* is an error.

use std::collections::BTreeMap;

use serde::Deserialize;
use serde::de::DeserializeOwned;
use serde_json::Value;

/// One kind the controller serves: where it lives in the API and which versions it accepts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KindInfo {
    pub kind: &'static str,
    /// API group; empty for the core group (`apiVersion: v1`).
    pub group: &'static str,
    /// Versions to try, preferred first (the Kubernetes source watches the first one the API
    /// server serves; the file source accepts any version of the group).
    pub versions: &'static [&'static str],
    /// Resource name in URLs (`pods`, `authorizationpolicies`).
    pub plural: &'static str,
    pub namespaced: bool,
}

impl KindInfo {
    /// `apiVersion` for `version` (`v1`, `security.istio.io/v1`).
    pub fn api_version(&self, version: &str) -> String {
        if self.group.is_empty() {
            version.to_string()
        } else {
            format!("{}/{}", self.group, version)
        }
    }

    /// True when `api_version` (`group/version`) belongs to this kind's group. Any version is
    /// accepted: the fields translation reads are the same across Istio's v1alpha3/v1beta1/v1.
    pub fn accepts_api_version(&self, api_version: &str) -> bool {
        match api_version.split_once('/') {
            Some((group, version)) => group == self.group && !version.is_empty(),
            None => self.group.is_empty() && !api_version.is_empty(),
        }
    }
}

/// Every kind the sources feed into the store. The Gateway is the Gateway API one
/// (`gateway.networking.k8s.io`; waypoints are such Gateways): the store keys objects by kind
/// only, so Istio's older `networking.istio.io` Gateway is not served.
pub const KINDS: &[KindInfo] = &[
    KindInfo {
        kind: "Namespace",
        group: "",
        versions: &["v1"],
        plural: "namespaces",
        namespaced: false,
    },
    KindInfo {
        kind: "Pod",
        group: "",
        versions: &["v1"],
        plural: "pods",
        namespaced: true,
    },
    KindInfo {
        kind: "Service",
        group: "",
        versions: &["v1"],
        plural: "services",
        namespaced: true,
    },
    KindInfo {
        kind: "EndpointSlice",
        group: "discovery.k8s.io",
        versions: &["v1"],
        plural: "endpointslices",
        namespaced: true,
    },
    KindInfo {
        kind: "ServiceEntry",
        group: "networking.istio.io",
        versions: &["v1", "v1beta1", "v1alpha3"],
        plural: "serviceentries",
        namespaced: true,
    },
    KindInfo {
        kind: "AuthorizationPolicy",
        group: "security.istio.io",
        versions: &["v1", "v1beta1"],
        plural: "authorizationpolicies",
        namespaced: true,
    },
    KindInfo {
        kind: "PeerAuthentication",
        group: "security.istio.io",
        versions: &["v1", "v1beta1"],
        plural: "peerauthentications",
        namespaced: true,
    },
    KindInfo {
        kind: "VirtualService",
        group: "networking.istio.io",
        versions: &["v1", "v1beta1", "v1alpha3"],
        plural: "virtualservices",
        namespaced: true,
    },
    KindInfo {
        kind: "DestinationRule",
        group: "networking.istio.io",
        versions: &["v1", "v1beta1", "v1alpha3"],
        plural: "destinationrules",
        namespaced: true,
    },
    KindInfo {
        kind: "HTTPRoute",
        group: "gateway.networking.k8s.io",
        versions: &["v1", "v1beta1"],
        plural: "httproutes",
        namespaced: true,
    },
    KindInfo {
        kind: "TCPRoute",
        group: "gateway.networking.k8s.io",
        versions: &["v1alpha2"],
        plural: "tcproutes",
        namespaced: true,
    },
    KindInfo {
        kind: "Gateway",
        group: "gateway.networking.k8s.io",
        versions: &["v1", "v1beta1"],
        plural: "gateways",
        namespaced: true,
    },
    KindInfo {
        kind: "Telemetry",
        group: "telemetry.istio.io",
        versions: &["v1", "v1alpha1"],
        plural: "telemetries",
        namespaced: true,
    },
];

/// The entry of [`KINDS`] for `kind`.
pub fn kind_info(kind: &str) -> Option<&'static KindInfo> {
    KINDS.iter().find(|k| k.kind == kind)
}

/// Why an object could not be parsed: the JSON path of the offending field and the reason.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {reason}")]
pub struct ParseError {
    pub field: String,
    pub reason: String,
}

/// Parse a raw object into a typed view, naming the field on a type mismatch.
pub fn parse<T: DeserializeOwned>(obj: &Value) -> Result<T, ParseError> {
    serde_path_to_error::deserialize(obj).map_err(|e| {
        let field = e.path().to_string();
        ParseError {
            field: if field == "." { String::new() } else { field },
            reason: e.into_inner().to_string(),
        }
    })
}

/// Deserialize `null` as the default (YAML `labels:` with nothing after it is null).
fn null_default<'de, D, T>(d: D) -> Result<T, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Default + Deserialize<'de>,
{
    Ok(Option::<T>::deserialize(d)?.unwrap_or_default())
}

pub type Labels = BTreeMap<String, String>;

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct ObjectMeta {
    pub name: String,
    pub namespace: String,
    pub uid: String,
    #[serde(deserialize_with = "null_default")]
    pub labels: Labels,
    #[serde(deserialize_with = "null_default")]
    pub annotations: Labels,
    #[serde(deserialize_with = "null_default")]
    pub owner_references: Vec<OwnerReference>,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct OwnerReference {
    pub kind: String,
    pub name: String,
    pub controller: Option<bool>,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct Namespace {
    #[serde(deserialize_with = "null_default")]
    pub metadata: ObjectMeta,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct Pod {
    #[serde(deserialize_with = "null_default")]
    pub metadata: ObjectMeta,
    #[serde(deserialize_with = "null_default")]
    pub spec: PodSpec,
    #[serde(deserialize_with = "null_default")]
    pub status: PodStatus,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct PodSpec {
    pub node_name: String,
    pub service_account_name: String,
    /// Deprecated alias of `serviceAccountName`.
    pub service_account: String,
    pub host_network: bool,
    #[serde(deserialize_with = "null_default")]
    pub containers: Vec<Container>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct Container {
    pub name: String,
    #[serde(deserialize_with = "null_default")]
    pub ports: Vec<ContainerPort>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct ContainerPort {
    pub name: String,
    pub container_port: i64,
    pub protocol: Option<String>,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct PodStatus {
    #[serde(rename = "podIP")]
    pub pod_ip: String,
    #[serde(rename = "podIPs", deserialize_with = "null_default")]
    pub pod_ips: Vec<PodIp>,
    pub phase: Option<String>,
    #[serde(deserialize_with = "null_default")]
    pub conditions: Option<Vec<PodCondition>>,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(default)]
pub struct PodIp {
    pub ip: String,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct PodCondition {
    #[serde(rename = "type")]
    pub type_: String,
    #[serde(deserialize_with = "null_default")]
    pub status: String,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct Service {
    #[serde(deserialize_with = "null_default")]
    pub metadata: ObjectMeta,
    #[serde(deserialize_with = "null_default")]
    pub spec: ServiceSpec,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct ServiceSpec {
    #[serde(rename = "type")]
    pub type_: Option<String>,
    /// `None` (or empty): endpoints come from EndpointSlices.
    pub selector: Option<Labels>,
    #[serde(rename = "clusterIP")]
    pub cluster_ip: String,
    #[serde(rename = "clusterIPs", deserialize_with = "null_default")]
    pub cluster_ips: Vec<String>,
    #[serde(deserialize_with = "null_default")]
    pub ports: Vec<ServicePort>,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct ServicePort {
    pub name: String,
    pub port: i64,
    pub target_port: Option<IntOrString>,
    pub protocol: Option<String>,
    pub app_protocol: Option<String>,
}

/// Kubernetes `IntOrString` (a numeric port or a container port name).
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(untagged)]
pub enum IntOrString {
    Int(i64),
    String(String),
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct EndpointSlice {
    #[serde(deserialize_with = "null_default")]
    pub metadata: ObjectMeta,
    pub address_type: String,
    #[serde(deserialize_with = "null_default")]
    pub endpoints: Vec<Endpoint>,
    #[serde(deserialize_with = "null_default")]
    pub ports: Vec<EndpointPort>,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct Endpoint {
    #[serde(deserialize_with = "null_default")]
    pub addresses: Vec<String>,
    #[serde(deserialize_with = "null_default")]
    pub conditions: EndpointConditions,
    pub target_ref: Option<ObjectReference>,
    pub node_name: String,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct EndpointConditions {
    pub ready: Option<bool>,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct ObjectReference {
    pub kind: String,
    pub namespace: String,
    pub name: String,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct EndpointPort {
    pub name: String,
    pub port: Option<i64>,
    pub protocol: Option<String>,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct ServiceEntry {
    #[serde(deserialize_with = "null_default")]
    pub metadata: ObjectMeta,
    #[serde(deserialize_with = "null_default")]
    pub spec: ServiceEntrySpec,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct ServiceEntrySpec {
    #[serde(deserialize_with = "null_default")]
    pub hosts: Vec<String>,
    #[serde(deserialize_with = "null_default")]
    pub addresses: Vec<String>,
    #[serde(deserialize_with = "null_default")]
    pub ports: Vec<ServiceEntryPort>,
    pub location: Option<String>,
    pub resolution: Option<String>,
    #[serde(deserialize_with = "null_default")]
    pub subject_alt_names: Vec<String>,
    pub workload_selector: Option<WorkloadSelector>,
    #[serde(deserialize_with = "null_default")]
    pub endpoints: Vec<WorkloadEntrySpec>,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct ServiceEntryPort {
    pub number: i64,
    pub name: String,
    pub protocol: Option<String>,
    pub target_port: Option<i64>,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct WorkloadSelector {
    #[serde(deserialize_with = "null_default")]
    pub labels: Labels,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct WorkloadEntrySpec {
    pub address: String,
    #[serde(deserialize_with = "null_default")]
    pub ports: BTreeMap<String, i64>,
    #[serde(deserialize_with = "null_default")]
    pub labels: Labels,
    pub service_account: String,
    pub network: String,
}

/// `security.istio.io` label selector (`matchLabels` only, as Istio's `WorkloadSelector`).
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct MatchLabels {
    #[serde(deserialize_with = "null_default")]
    pub match_labels: Labels,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct AuthorizationPolicy {
    #[serde(deserialize_with = "null_default")]
    pub metadata: ObjectMeta,
    #[serde(deserialize_with = "null_default")]
    pub spec: AuthorizationPolicySpec,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct AuthorizationPolicySpec {
    pub selector: Option<MatchLabels>,
    pub target_ref: Option<Value>,
    #[serde(deserialize_with = "null_default")]
    pub target_refs: Vec<Value>,
    pub action: Option<String>,
    #[serde(deserialize_with = "null_default")]
    pub rules: Vec<AuthzRule>,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct AuthzRule {
    #[serde(deserialize_with = "null_default")]
    pub from: Vec<AuthzFrom>,
    #[serde(deserialize_with = "null_default")]
    pub to: Vec<AuthzTo>,
    #[serde(deserialize_with = "null_default")]
    pub when: Vec<AuthzCondition>,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct AuthzFrom {
    #[serde(deserialize_with = "null_default")]
    pub source: AuthzSource,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct AuthzSource {
    #[serde(deserialize_with = "null_default")]
    pub principals: Vec<String>,
    #[serde(deserialize_with = "null_default")]
    pub not_principals: Vec<String>,
    #[serde(deserialize_with = "null_default")]
    pub request_principals: Vec<String>,
    #[serde(deserialize_with = "null_default")]
    pub not_request_principals: Vec<String>,
    #[serde(deserialize_with = "null_default")]
    pub namespaces: Vec<String>,
    #[serde(deserialize_with = "null_default")]
    pub not_namespaces: Vec<String>,
    #[serde(deserialize_with = "null_default")]
    pub service_accounts: Vec<String>,
    #[serde(deserialize_with = "null_default")]
    pub not_service_accounts: Vec<String>,
    #[serde(deserialize_with = "null_default")]
    pub ip_blocks: Vec<String>,
    #[serde(deserialize_with = "null_default")]
    pub not_ip_blocks: Vec<String>,
    #[serde(deserialize_with = "null_default")]
    pub remote_ip_blocks: Vec<String>,
    #[serde(deserialize_with = "null_default")]
    pub not_remote_ip_blocks: Vec<String>,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct AuthzTo {
    #[serde(deserialize_with = "null_default")]
    pub operation: AuthzOperation,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct AuthzOperation {
    #[serde(deserialize_with = "null_default")]
    pub hosts: Vec<String>,
    #[serde(deserialize_with = "null_default")]
    pub not_hosts: Vec<String>,
    #[serde(deserialize_with = "null_default")]
    pub ports: Vec<StringOrInt>,
    #[serde(deserialize_with = "null_default")]
    pub not_ports: Vec<StringOrInt>,
    #[serde(deserialize_with = "null_default")]
    pub methods: Vec<String>,
    #[serde(deserialize_with = "null_default")]
    pub not_methods: Vec<String>,
    #[serde(deserialize_with = "null_default")]
    pub paths: Vec<String>,
    #[serde(deserialize_with = "null_default")]
    pub not_paths: Vec<String>,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct AuthzCondition {
    pub key: String,
    #[serde(deserialize_with = "null_default")]
    pub values: Vec<StringOrInt>,
    #[serde(deserialize_with = "null_default")]
    pub not_values: Vec<StringOrInt>,
}

/// A string field that users often write unquoted as a number (`ports: [8080]`).
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(untagged)]
pub enum StringOrInt {
    Int(i64),
    String(String),
}

impl std::fmt::Display for StringOrInt {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StringOrInt::Int(i) => write!(f, "{i}"),
            StringOrInt::String(s) => f.write_str(s),
        }
    }
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct PeerAuthentication {
    #[serde(deserialize_with = "null_default")]
    pub metadata: ObjectMeta,
    #[serde(deserialize_with = "null_default")]
    pub spec: PeerAuthenticationSpec,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct PeerAuthenticationSpec {
    pub selector: Option<MatchLabels>,
    pub mtls: Option<MtlsMode>,
    #[serde(deserialize_with = "null_default")]
    pub port_level_mtls: BTreeMap<String, MtlsMode>,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct MtlsMode {
    pub mode: Option<String>,
}

/// Gateway API Gateway (waypoints are Gateways of class `istio-waypoint`).
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct Gateway {
    #[serde(deserialize_with = "null_default")]
    pub metadata: ObjectMeta,
    #[serde(deserialize_with = "null_default")]
    pub spec: GatewaySpec,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct GatewaySpec {
    pub gateway_class_name: String,
}

/// True when every `selector` label is on the object (an empty selector selects everything).
pub fn selector_matches(selector: &Labels, labels: &Labels) -> bool {
    selector.iter().all(|(k, v)| labels.get(k) == Some(v))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn parse_names_the_bad_field() {
        let v = json!({"metadata": {"name": "s"}, "spec": {"ports": [{"port": "eighty"}]}});
        let e = parse::<Service>(&v).unwrap_err();
        assert_eq!(e.field, "spec.ports[0].port");
        // YAML `spec:` / `labels:` with nothing after them are null: same as absent.
        let ok = parse::<Service>(&json!({"metadata": {"labels": null}, "spec": null})).unwrap();
        assert!(ok.metadata.labels.is_empty());
    }

    #[test]
    fn api_versions() {
        let ap = kind_info("AuthorizationPolicy").unwrap();
        assert!(ap.accepts_api_version("security.istio.io/v1beta1"));
        assert!(!ap.accepts_api_version("networking.istio.io/v1"));
        assert!(!ap.accepts_api_version("v1"));
        let pod = kind_info("Pod").unwrap();
        assert!(pod.accepts_api_version("v1"));
        assert!(!pod.accepts_api_version("apps/v1"));
        assert_eq!(KINDS.len(), 13);
    }
}
