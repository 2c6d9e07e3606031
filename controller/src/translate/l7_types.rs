//! Typed views of the `spec` of the Istio and Gateway API objects the L7 translation reads.
//!
//! Only the fields zmesh uses are declared; unknown fields are ignored (users' YAML is accepted
//! unchanged, including fields from newer API versions). Numbers that users may get wrong in a
//! way we must report (negative weights, counts) are `i64` and checked by the translator.

use std::collections::BTreeMap;

use serde::Deserialize;
use serde_json::Value;

// ---------------------------------------------------------------------------------------------
// networking.istio.io VirtualService
// ---------------------------------------------------------------------------------------------

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct VirtualServiceSpec {
    pub hosts: Vec<String>,
    pub gateways: Vec<String>,
    pub http: Vec<HttpRoute>,
    pub tcp: Vec<TcpRoute>,
    pub tls: Vec<Value>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct HttpRoute {
    pub name: String,
    #[serde(rename = "match")]
    pub matches: Vec<HttpMatchRequest>,
    pub route: Vec<HttpRouteDestination>,
    pub redirect: Option<HttpRedirect>,
    pub direct_response: Option<HttpDirectResponse>,
    pub delegate: Option<Value>,
    pub rewrite: Option<HttpRewrite>,
    pub timeout: Option<String>,
    pub retries: Option<HttpRetry>,
    pub fault: Option<HttpFault>,
    pub mirror: Option<Destination>,
    pub mirrors: Vec<HttpMirrorPolicy>,
    pub mirror_percentage: Option<Percent>,
    /// Deprecated integer form of `mirrorPercentage`.
    pub mirror_percent: Option<i64>,
    pub cors_policy: Option<CorsPolicy>,
    pub headers: Option<Headers>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct HttpMatchRequest {
    pub name: String,
    pub uri: Option<StringMatch>,
    pub scheme: Option<StringMatch>,
    pub method: Option<StringMatch>,
    pub authority: Option<StringMatch>,
    pub headers: BTreeMap<String, StringMatch>,
    pub port: Option<u32>,
    pub source_labels: BTreeMap<String, String>,
    pub gateways: Vec<String>,
    pub query_params: BTreeMap<String, StringMatch>,
    pub ignore_uri_case: bool,
    pub without_headers: BTreeMap<String, StringMatch>,
    pub source_namespace: String,
}

/// Istio `StringMatch` (a oneof); all unset means "present" for headers and query params.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct StringMatch {
    pub exact: Option<String>,
    pub prefix: Option<String>,
    pub regex: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct HttpRouteDestination {
    pub destination: Destination,
    pub weight: Option<i64>,
    pub headers: Option<Headers>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct Destination {
    pub host: String,
    pub subset: String,
    pub port: Option<PortSelector>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct PortSelector {
    pub number: u32,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct HttpRedirect {
    pub uri: String,
    pub authority: String,
    pub port: Option<u32>,
    pub scheme: String,
    pub redirect_code: Option<u32>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct HttpDirectResponse {
    pub status: u32,
    pub body: Option<HttpBody>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct HttpBody {
    pub string: Option<String>,
    pub bytes: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct HttpRewrite {
    pub uri: Option<String>,
    pub authority: String,
    pub uri_regex_rewrite: Option<RegexRewrite>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct RegexRewrite {
    #[serde(rename = "match")]
    pub pattern: String,
    pub rewrite: String,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct HttpRetry {
    pub attempts: Option<i64>,
    pub per_try_timeout: Option<String>,
    pub retry_on: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct HttpFault {
    pub delay: Option<FaultDelay>,
    pub abort: Option<FaultAbort>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct FaultDelay {
    pub fixed_delay: Option<String>,
    pub exponential_delay: Option<String>,
    pub percentage: Option<Percent>,
    /// Deprecated integer percentage (seed S0 L1011).
    pub percent: Option<i64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct FaultAbort {
    pub http_status: Option<i64>,
    pub grpc_status: Option<String>,
    pub percentage: Option<Percent>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct Percent {
    pub value: f64,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct HttpMirrorPolicy {
    pub destination: Destination,
    pub percentage: Option<Percent>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct CorsPolicy {
    pub allow_origins: Vec<StringMatch>,
    /// Deprecated exact-origin list.
    pub allow_origin: Vec<String>,
    pub allow_methods: Vec<String>,
    pub allow_headers: Vec<String>,
    pub expose_headers: Vec<String>,
    pub max_age: Option<String>,
    pub allow_credentials: Option<bool>,
    /// `UNSPECIFIED` | `FORWARD` | `IGNORE`.
    pub unmatched_preflights: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct Headers {
    pub request: Option<HeaderOperations>,
    pub response: Option<HeaderOperations>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct HeaderOperations {
    pub set: BTreeMap<String, String>,
    pub add: BTreeMap<String, String>,
    pub remove: Vec<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct TcpRoute {
    #[serde(rename = "match")]
    pub matches: Vec<L4MatchAttributes>,
    pub route: Vec<RouteDestination>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct L4MatchAttributes {
    pub destination_subnets: Vec<String>,
    pub port: Option<u32>,
    pub source_labels: BTreeMap<String, String>,
    pub gateways: Vec<String>,
    pub source_namespace: String,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct RouteDestination {
    pub destination: Destination,
    pub weight: Option<i64>,
}

// ---------------------------------------------------------------------------------------------
// networking.istio.io DestinationRule
// ---------------------------------------------------------------------------------------------

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct DestinationRuleSpec {
    pub host: String,
    pub traffic_policy: Option<TrafficPolicy>,
    pub subsets: Vec<Subset>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct TrafficPolicy {
    pub load_balancer: Option<LoadBalancerSettings>,
    pub connection_pool: Option<ConnectionPoolSettings>,
    pub outlier_detection: Option<OutlierDetection>,
    pub port_level_settings: Vec<PortTrafficPolicy>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct PortTrafficPolicy {
    pub port: Option<PortSelector>,
    pub load_balancer: Option<LoadBalancerSettings>,
    pub connection_pool: Option<ConnectionPoolSettings>,
    pub outlier_detection: Option<OutlierDetection>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct Subset {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub traffic_policy: Option<TrafficPolicy>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct LoadBalancerSettings {
    pub simple: Option<String>,
    pub consistent_hash: Option<ConsistentHashLb>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct ConsistentHashLb {
    pub http_header_name: Option<String>,
    pub http_cookie: Option<HttpCookie>,
    pub use_source_ip: Option<bool>,
    pub http_query_parameter_name: Option<String>,
    pub minimum_ring_size: Option<u64>,
    pub ring_hash: Option<RingHash>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct RingHash {
    pub minimum_ring_size: Option<u64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct HttpCookie {
    pub name: String,
    pub path: String,
    pub ttl: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct ConnectionPoolSettings {
    pub tcp: Option<TcpSettings>,
    pub http: Option<HttpSettings>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct TcpSettings {
    pub max_connections: Option<i64>,
    pub connect_timeout: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct HttpSettings {
    #[serde(rename = "http1MaxPendingRequests")]
    pub http1_max_pending_requests: Option<i64>,
    #[serde(rename = "http2MaxRequests")]
    pub http2_max_requests: Option<i64>,
    pub max_requests_per_connection: Option<i64>,
    pub max_retries: Option<i64>,
    pub idle_timeout: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct OutlierDetection {
    #[serde(rename = "consecutive5xxErrors")]
    pub consecutive_5xx_errors: Option<i64>,
    /// Deprecated name of `consecutive5xxErrors` (seed S0 L2117).
    pub consecutive_errors: Option<i64>,
    pub consecutive_gateway_errors: Option<i64>,
    pub interval: Option<String>,
    pub base_ejection_time: Option<String>,
    pub max_ejection_percent: Option<i64>,
    pub min_health_percent: Option<i64>,
}

// ---------------------------------------------------------------------------------------------
// gateway.networking.k8s.io HTTPRoute / TCPRoute
// ---------------------------------------------------------------------------------------------

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct GwHttpRouteSpec {
    pub parent_refs: Vec<ParentRef>,
    pub hostnames: Vec<String>,
    pub rules: Vec<GwHttpRouteRule>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct ParentRef {
    pub group: Option<String>,
    pub kind: Option<String>,
    pub namespace: Option<String>,
    pub name: String,
    pub port: Option<u32>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct GwHttpRouteRule {
    pub name: Option<String>,
    pub matches: Vec<GwHttpRouteMatch>,
    pub filters: Vec<GwHttpRouteFilter>,
    pub backend_refs: Vec<GwBackendRef>,
    pub timeouts: Option<GwTimeouts>,
    pub retry: Option<GwRetry>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct GwHttpRouteMatch {
    pub path: Option<GwPathMatch>,
    pub headers: Vec<GwNameMatch>,
    pub query_params: Vec<GwNameMatch>,
    pub method: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct GwPathMatch {
    #[serde(rename = "type")]
    pub kind: Option<String>,
    pub value: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct GwNameMatch {
    #[serde(rename = "type")]
    pub kind: Option<String>,
    pub name: String,
    pub value: String,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct GwHttpRouteFilter {
    #[serde(rename = "type")]
    pub kind: String,
    pub request_header_modifier: Option<GwHeaderModifier>,
    pub response_header_modifier: Option<GwHeaderModifier>,
    pub request_redirect: Option<GwRequestRedirect>,
    #[serde(rename = "urlRewrite")]
    pub url_rewrite: Option<GwUrlRewrite>,
    pub request_mirror: Option<GwRequestMirror>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct GwHeaderModifier {
    pub set: Vec<GwHeader>,
    pub add: Vec<GwHeader>,
    pub remove: Vec<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct GwHeader {
    pub name: String,
    pub value: String,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct GwRequestRedirect {
    pub scheme: Option<String>,
    pub hostname: Option<String>,
    pub path: Option<GwPathModifier>,
    pub port: Option<u32>,
    pub status_code: Option<u32>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct GwPathModifier {
    #[serde(rename = "type")]
    pub kind: String,
    pub replace_full_path: Option<String>,
    pub replace_prefix_match: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct GwUrlRewrite {
    pub hostname: Option<String>,
    pub path: Option<GwPathModifier>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct GwRequestMirror {
    pub backend_ref: GwBackendRef,
    pub percent: Option<i64>,
    pub fraction: Option<GwFraction>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct GwFraction {
    pub numerator: i64,
    pub denominator: Option<i64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct GwBackendRef {
    pub group: Option<String>,
    pub kind: Option<String>,
    pub name: String,
    pub namespace: Option<String>,
    pub port: Option<u32>,
    pub weight: Option<i64>,
    pub filters: Vec<GwHttpRouteFilter>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct GwTimeouts {
    pub request: Option<String>,
    pub backend_request: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct GwRetry {
    pub codes: Vec<u32>,
    pub attempts: Option<i64>,
    pub backoff: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct GwTcpRouteSpec {
    pub parent_refs: Vec<ParentRef>,
    pub rules: Vec<GwTcpRouteRule>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct GwTcpRouteRule {
    pub name: Option<String>,
    pub backend_refs: Vec<GwBackendRef>,
}

// ---------------------------------------------------------------------------------------------
// security.istio.io AuthorizationPolicy
// ---------------------------------------------------------------------------------------------

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct AuthorizationPolicySpec {
    pub selector: Option<Value>,
    pub target_ref: Option<PolicyTargetRef>,
    pub target_refs: Vec<PolicyTargetRef>,
    pub action: Option<String>,
    pub rules: Vec<AuthzRule>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct PolicyTargetRef {
    pub group: String,
    pub kind: String,
    pub name: String,
    pub namespace: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct AuthzRule {
    pub from: Vec<AuthzFrom>,
    pub to: Vec<AuthzTo>,
    pub when: Vec<AuthzCondition>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct AuthzFrom {
    pub source: AuthzSource,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct AuthzSource {
    pub principals: Vec<String>,
    pub not_principals: Vec<String>,
    pub request_principals: Vec<String>,
    pub not_request_principals: Vec<String>,
    pub namespaces: Vec<String>,
    pub not_namespaces: Vec<String>,
    pub ip_blocks: Vec<String>,
    pub not_ip_blocks: Vec<String>,
    pub remote_ip_blocks: Vec<String>,
    pub not_remote_ip_blocks: Vec<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct AuthzTo {
    pub operation: AuthzOperation,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct AuthzOperation {
    pub hosts: Vec<String>,
    pub not_hosts: Vec<String>,
    /// Strings in Istio's schema; numbers are accepted too.
    pub ports: Vec<Value>,
    pub not_ports: Vec<Value>,
    pub methods: Vec<String>,
    pub not_methods: Vec<String>,
    pub paths: Vec<String>,
    pub not_paths: Vec<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct AuthzCondition {
    pub key: String,
    pub values: Vec<String>,
    pub not_values: Vec<String>,
}

// ---------------------------------------------------------------------------------------------
// Core objects (only what subset resolution and target validation need)
// ---------------------------------------------------------------------------------------------

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct ServiceSpec {
    pub selector: Option<BTreeMap<String, String>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct GatewaySpec {
    pub gateway_class_name: String,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct ServiceEntrySpec {
    pub hosts: Vec<String>,
}
