//! Telemetry (`telemetry.istio.io`) and the mesh config ([`crate::mesh`]) → one
//! `zmesh.l7.v1.WaypointTelemetry` per waypoint Gateway (resource name
//! `<namespace>/<gateway name>`): whether the waypoint traces, to which OTLP endpoint, and at
//! which sampling percentage. The waypoint only looks up its own resource.
//!
//! Istio's rules, as far as tracing goes:
//! - Scopes, least to most specific: the root namespace's Telemetry without `selector` and
//!   `targetRefs` (mesh-wide), the Gateway's namespace's without them (namespace-wide), and one
//!   in the Gateway's namespace whose `targetRefs` (or `targetRef`) names the Gateway. A more
//!   specific scope overrides field by field (`providers`, `randomSamplingPercentage`,
//!   `disableSpanReporting`); within a scope the oldest Telemetry (creationTimestamp, then
//!   name) with a tracing entry wins. `selector` does not select waypoints (Istio: use
//!   `targetRefs`), so such a Telemetry is not applied to them.
//! - Of a Telemetry's `tracing` list, the first entry whose `match.mode` is unset, `SERVER` or
//!   `CLIENT_AND_SERVER` applies: the waypoint reports SERVER spans (see the waypoint's
//!   `trace` module). Of its `providers`, the first (Envoy takes one tracer).
//! - No provider named anywhere: MeshConfig `defaultProviders.tracing`; none either: no
//!   tracing. `enableTracing: false` in the mesh config, or `disableSpanReporting: true`:
//!   no tracing. Sampling: `randomSamplingPercentage`, else MeshConfig
//!   `defaultConfig.tracing.sampling`, else 1 %.
//! - A provider must be an `opentelemetry` extension provider of the mesh config (waypoints
//!   export OTLP/gRPC to `http://<service>:<port>`).
//!
//! A Telemetry that names an unknown or non-OpenTelemetry provider, or a percentage outside
//! 0..=100, is reported and not applied (the rest of the mesh still is).

use std::collections::BTreeMap;

use serde::Deserialize;
use serde_json::Value;
use zmesh_proto::l7;

use super::{TranslateOptions, Translated};
use crate::mesh::{MeshConfig, ProviderKind};
use crate::store::{ObjectKey, Snapshot};

const TELEMETRY_GROUP: &str = "telemetry.istio.io";
const GATEWAY_GROUP: &str = "gateway.networking.k8s.io";
const WAYPOINT_CLASS: &str = "istio-waypoint";

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", default)]
struct TelemetryObject {
    spec: TelemetrySpec,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", default)]
struct TelemetrySpec {
    selector: Option<Value>,
    target_ref: Option<TargetRef>,
    target_refs: Vec<TargetRef>,
    tracing: Vec<TracingEntry>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", default)]
struct TargetRef {
    group: String,
    kind: String,
    name: String,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", default)]
struct TracingEntry {
    #[serde(rename = "match")]
    match_: Option<TracingMatch>,
    providers: Vec<ProviderRef>,
    random_sampling_percentage: Option<f64>,
    disable_span_reporting: Option<bool>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", default)]
struct TracingMatch {
    mode: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct ProviderRef {
    name: String,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", default)]
struct GatewayObject {
    spec: GatewaySpec,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", default)]
struct GatewaySpec {
    gateway_class_name: String,
}

/// What one Telemetry says about tracing (validated).
#[derive(Clone, Debug, Default, PartialEq)]
struct TracingOpinion {
    provider: Option<String>,
    sampling: Option<f64>,
    disable: Option<bool>,
}

impl TracingOpinion {
    /// `self` overridden by the more specific `other`, field by field.
    fn overlay(self, other: &TracingOpinion) -> TracingOpinion {
        TracingOpinion {
            provider: other.provider.clone().or(self.provider),
            sampling: other.sampling.or(self.sampling),
            disable: other.disable.or(self.disable),
        }
    }
}

/// Where a Telemetry applies.
#[derive(Debug)]
enum Scope {
    /// No selector, no targets: its whole namespace (the mesh, in the root namespace).
    Namespace,
    /// `targetRefs`: these Gateways of its namespace.
    Gateways(Vec<String>),
    /// A workload selector: not waypoints.
    Selector,
}

struct Applicable {
    namespace: String,
    scope: Scope,
    opinion: TracingOpinion,
}

/// Translate Telemetry + mesh config into waypoint telemetry resources.
pub fn translate(snap: &Snapshot, opts: &TranslateOptions, out: &mut Translated) {
    let telemetries = telemetries(snap, &opts.mesh, out);
    for (ns, name) in waypoint_gateways(snap) {
        let mut merged = TracingOpinion::default();
        // Least specific first: mesh, namespace, the Gateway itself.
        let levels: [&dyn Fn(&Applicable) -> bool; 3] = [
            &|t| t.namespace == opts.root_namespace && matches!(t.scope, Scope::Namespace),
            &|t| t.namespace == ns && matches!(t.scope, Scope::Namespace),
            &|t| t.namespace == ns && matches!(&t.scope, Scope::Gateways(g) if g.contains(&name)),
        ];
        for applies in levels {
            // Oldest first: the first applicable one wins its level.
            if let Some(t) = telemetries.iter().find(|t| applies(t)) {
                merged = merged.overlay(&t.opinion);
            }
        }
        if let Some(tracing) = resolve(&merged, &opts.mesh) {
            out.add(
                zmesh_proto::L7_TELEMETRY_TYPE_URL,
                format!("{ns}/{name}"),
                &l7::WaypointTelemetry {
                    tracing: Some(tracing),
                },
            );
        }
    }
}

/// The tracing a waypoint gets from its merged opinion and the mesh defaults.
fn resolve(o: &TracingOpinion, mesh: &MeshConfig) -> Option<l7::Tracing> {
    if !mesh.enable_tracing || o.disable == Some(true) {
        return None;
    }
    let provider = o
        .provider
        .clone()
        .or_else(|| mesh.default_tracing_providers.first().cloned())?;
    let Some(endpoint) = mesh.provider(&provider).and_then(|p| p.otlp_endpoint()) else {
        // Only a default provider can get here (a Telemetry's is checked when parsed).
        tracing::warn!(
            provider,
            "mesh config: default tracing provider is not an opentelemetry extension provider; waypoints do not trace"
        );
        return None;
    };
    Some(l7::Tracing {
        provider,
        otlp_endpoint: endpoint,
        random_sampling_percentage: o.sampling.or(mesh.default_sampling).unwrap_or(1.0),
    })
}

/// Waypoint Gateways (namespace, name), in key order.
fn waypoint_gateways(snap: &Snapshot) -> Vec<(String, String)> {
    snap.of_kind("Gateway")
        .filter(|(_, v)| api_group(v) == GATEWAY_GROUP)
        .filter(|(k, _)| {
            matches!(snap.parsed::<GatewayObject>(k), Some(Ok(g)) if g.spec.gateway_class_name == WAYPOINT_CLASS)
        })
        .map(|(k, _)| (k.namespace.clone(), k.name.clone()))
        .collect()
}

fn api_group(v: &Value) -> &str {
    v.get("apiVersion")
        .and_then(Value::as_str)
        .and_then(|a| a.split_once('/'))
        .map_or("", |(g, _)| g)
}

/// Every valid Telemetry with an opinion on waypoint tracing, oldest first; invalid ones are
/// reported.
fn telemetries(snap: &Snapshot, mesh: &MeshConfig, out: &mut Translated) -> Vec<Applicable> {
    let mut res = Vec::new();
    for (key, _) in snap
        .oldest_first("Telemetry")
        .into_iter()
        .filter(|(_, v)| api_group(v) == TELEMETRY_GROUP)
    {
        let t = match snap.parsed::<TelemetryObject>(key) {
            Some(Ok(t)) => t,
            Some(Err(e)) => {
                let field = if e.field.is_empty() {
                    "spec".to_string()
                } else {
                    e.field.clone()
                };
                report(out, key, field, e.reason.clone());
                continue;
            }
            None => continue,
        };
        match opinion(&t.spec, mesh) {
            Ok(Some(opinion)) => res.push(Applicable {
                namespace: key.namespace.clone(),
                scope: scope(&t.spec),
                opinion,
            }),
            Ok(None) => {}
            Err((field, reason)) => report(out, key, field, reason),
        }
    }
    res
}

fn report(out: &mut Translated, key: &ObjectKey, field: String, reason: String) {
    tracing::warn!(object = %key, %field, %reason, "invalid Telemetry");
    out.error(key, field, reason);
}

fn scope(spec: &TelemetrySpec) -> Scope {
    let refs = spec.target_refs.iter().chain(spec.target_ref.as_ref());
    let gateways: Vec<String> = refs
        .filter(|r| r.kind == "Gateway" && (r.group.is_empty() || r.group == GATEWAY_GROUP))
        .map(|r| r.name.clone())
        .collect();
    if spec.target_ref.is_some() || !spec.target_refs.is_empty() {
        // Targets that are not Gateways (a Service): not a waypoint's own telemetry.
        Scope::Gateways(gateways)
    } else if spec.selector.as_ref().is_some_and(|s| !s.is_null()) {
        Scope::Selector
    } else {
        Scope::Namespace
    }
}

/// The tracing entry that applies to a waypoint, validated against the mesh config.
/// `Ok(None)`: the Telemetry says nothing about waypoint tracing.
fn opinion(
    spec: &TelemetrySpec,
    mesh: &MeshConfig,
) -> Result<Option<TracingOpinion>, (String, String)> {
    let Some((i, entry)) = spec.tracing.iter().enumerate().find(|(_, e)| {
        matches!(
            e.match_.as_ref().and_then(|m| m.mode.as_deref()),
            None | Some("SERVER" | "CLIENT_AND_SERVER")
        )
    }) else {
        return Ok(None);
    };
    let provider = match entry.providers.first() {
        None => None,
        Some(p) => {
            let field = format!("spec.tracing[{i}].providers[0].name");
            match mesh.provider(&p.name).map(|x| &x.kind) {
                Some(ProviderKind::OpenTelemetry { .. }) => Some(p.name.clone()),
                Some(ProviderKind::Other(kind)) => {
                    return Err((
                        field,
                        format!(
                            "provider `{}` is a {kind} provider; waypoints export spans to opentelemetry providers only",
                            p.name
                        ),
                    ));
                }
                None => {
                    let known: Vec<&str> = mesh
                        .extension_providers
                        .iter()
                        .map(|p| p.name.as_str())
                        .collect();
                    return Err((
                        field,
                        format!(
                            "provider `{}` is not defined in the mesh config's extensionProviders (defined: {})",
                            p.name,
                            if known.is_empty() {
                                "none".to_string()
                            } else {
                                known.join(", ")
                            }
                        ),
                    ));
                }
            }
        }
    };
    if let Some(s) = entry.random_sampling_percentage
        && !(0.0..=100.0).contains(&s)
    {
        return Err((
            format!("spec.tracing[{i}].randomSamplingPercentage"),
            format!("percentage {s} is outside 0..=100"),
        ));
    }
    Ok(Some(TracingOpinion {
        provider,
        sampling: entry.random_sampling_percentage,
        disable: entry.disable_span_reporting,
    }))
}

/// The resolved telemetry resources of a translation, by name (tests, config dumps).
pub fn resources(t: &Translated) -> BTreeMap<String, l7::WaypointTelemetry> {
    use prost::Message;
    t.resources
        .get(zmesh_proto::L7_TELEMETRY_TYPE_URL)
        .into_iter()
        .flatten()
        .filter_map(|(n, any)| {
            Some((
                n.clone(),
                l7::WaypointTelemetry::decode(any.value.as_slice()).ok()?,
            ))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::translate::translate;

    const MESH: &str = r#"
defaultConfig:
  tracing: {}
enableTracing: true
extensionProviders:
- name: jaeger
  opentelemetry: {port: 4317, service: jaeger-collector.istio-system.svc.cluster.local}
- name: otel-ns
  opentelemetry: {port: 4317, service: otel.team.svc.cluster.local}
- name: zipkin
  zipkin: {service: zipkin.istio-system.svc.cluster.local, port: 9411}
"#;

    const GATEWAYS: &str = r#"
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: waypoint, namespace: default}
spec: {gatewayClassName: istio-waypoint}
---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: wp2, namespace: default}
spec: {gatewayClassName: istio-waypoint}
---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: waypoint, namespace: team}
spec: {gatewayClassName: istio-waypoint}
---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: ingress, namespace: default}
spec: {gatewayClassName: istio}
"#;

    fn run(mesh: &str, yaml: &str) -> (BTreeMap<String, l7::WaypointTelemetry>, Translated) {
        let all = format!("{GATEWAYS}\n---\n{yaml}");
        let docs: Vec<Value> = serde_saphyr::from_multiple(&all).unwrap();
        let snap = Snapshot::from_objects(docs.into_iter().filter(|d| !d.is_null()));
        let opts = TranslateOptions {
            mesh: MeshConfig::parse(mesh, None).unwrap(),
            ..Default::default()
        };
        let t = translate(&snap, &opts);
        (resources(&t), t)
    }

    fn tracing_of<'a>(
        r: &'a BTreeMap<String, l7::WaypointTelemetry>,
        name: &str,
    ) -> Option<&'a l7::Tracing> {
        r.get(name).and_then(|t| t.tracing.as_ref())
    }

    /// The seeds' A21: `Telemetry mesh-default` in istio-system with provider jaeger.
    #[test]
    fn mesh_default_telemetry_enables_every_waypoint() {
        let (r, t) = run(
            MESH,
            r#"
apiVersion: telemetry.istio.io/v1
kind: Telemetry
metadata: {name: mesh-default, namespace: istio-system}
spec:
  tracing:
  - providers:
    - name: jaeger
"#,
        );
        assert!(t.errors.is_empty(), "{:?}", t.errors);
        assert_eq!(
            r.keys().collect::<Vec<_>>(),
            ["default/waypoint", "default/wp2", "team/waypoint"],
            "waypoint Gateways only (not the istio-class one)"
        );
        let tr = tracing_of(&r, "default/waypoint").unwrap();
        assert_eq!(tr.provider, "jaeger");
        assert_eq!(
            tr.otlp_endpoint,
            "http://jaeger-collector.istio-system.svc.cluster.local:4317"
        );
        assert_eq!(tr.random_sampling_percentage, 1.0, "Istio's default");
    }

    #[test]
    fn no_telemetry_no_default_provider_no_tracing() {
        let (r, t) = run(MESH, "");
        assert!(t.errors.is_empty());
        assert!(r.is_empty(), "{r:?}");
        // A default provider alone enables tracing (as Istio), at the mesh default sampling.
        let mesh = format!("{MESH}defaultProviders: {{tracing: [jaeger]}}\n");
        let mesh = mesh.replace("tracing: {}", "tracing: {sampling: 10}");
        let (r, _) = run(&mesh, "");
        assert_eq!(r.len(), 3);
        assert_eq!(
            tracing_of(&r, "team/waypoint")
                .unwrap()
                .random_sampling_percentage,
            10.0
        );
        // enableTracing: false wins over everything.
        let off = mesh.replace("enableTracing: true", "enableTracing: false");
        let (r, _) = run(
            &off,
            "apiVersion: telemetry.istio.io/v1\nkind: Telemetry\nmetadata: {name: t, namespace: istio-system}\nspec: {tracing: [{providers: [{name: jaeger}]}]}",
        );
        assert!(r.is_empty(), "{r:?}");
    }

    #[test]
    fn specific_scopes_override_field_by_field() {
        let (r, t) = run(
            MESH,
            r#"
apiVersion: telemetry.istio.io/v1
kind: Telemetry
metadata: {name: mesh-default, namespace: istio-system}
spec:
  tracing: [{providers: [{name: jaeger}], randomSamplingPercentage: 5}]
---
# Namespace-wide in team: another provider; sampling inherited from the mesh level.
apiVersion: telemetry.istio.io/v1
kind: Telemetry
metadata: {name: ns, namespace: team}
spec:
  tracing: [{providers: [{name: otel-ns}]}]
---
# On one Gateway of default: 100 %, provider inherited.
apiVersion: telemetry.istio.io/v1
kind: Telemetry
metadata: {name: wp2-all, namespace: default}
spec:
  targetRefs: [{group: gateway.networking.k8s.io, kind: Gateway, name: wp2}]
  tracing: [{randomSamplingPercentage: 100}]
---
# A workload selector does not select waypoints.
apiVersion: telemetry.istio.io/v1
kind: Telemetry
metadata: {name: pods, namespace: default}
spec:
  selector: {matchLabels: {app: reviews}}
  tracing: [{disableSpanReporting: true}]
---
# A CLIENT-only entry is not the waypoint's (it reports SERVER spans).
apiVersion: telemetry.istio.io/v1alpha1
kind: Telemetry
metadata: {name: client-only, namespace: default}
spec:
  tracing: [{match: {mode: CLIENT}, disableSpanReporting: true}]
"#,
        );
        assert!(t.errors.is_empty(), "{:?}", t.errors);
        let d = tracing_of(&r, "default/waypoint").unwrap();
        assert_eq!(
            (d.provider.as_str(), d.random_sampling_percentage),
            ("jaeger", 5.0)
        );
        let w2 = tracing_of(&r, "default/wp2").unwrap();
        assert_eq!(
            (w2.provider.as_str(), w2.random_sampling_percentage),
            ("jaeger", 100.0)
        );
        let team = tracing_of(&r, "team/waypoint").unwrap();
        assert_eq!(
            team.otlp_endpoint,
            "http://otel.team.svc.cluster.local:4317"
        );
        assert_eq!(team.random_sampling_percentage, 5.0);
    }

    #[test]
    fn disable_and_oldest_wins() {
        let (r, _) = run(
            MESH,
            r#"
apiVersion: telemetry.istio.io/v1
kind: Telemetry
metadata: {name: mesh-default, namespace: istio-system}
spec:
  tracing: [{providers: [{name: jaeger}]}]
---
apiVersion: telemetry.istio.io/v1
kind: Telemetry
metadata: {name: b-newer, namespace: default, creationTimestamp: "2025-02-01T00:00:00Z"}
spec:
  tracing: [{randomSamplingPercentage: 50}]
---
apiVersion: telemetry.istio.io/v1
kind: Telemetry
metadata: {name: z-older, namespace: default, creationTimestamp: "2025-01-01T00:00:00Z"}
spec:
  tracing: [{randomSamplingPercentage: 20}]
---
apiVersion: telemetry.istio.io/v1
kind: Telemetry
metadata: {name: quiet, namespace: team}
spec:
  targetRefs: [{kind: Gateway, group: gateway.networking.k8s.io, name: waypoint}]
  tracing: [{disableSpanReporting: true}]
"#,
        );
        assert_eq!(
            tracing_of(&r, "default/waypoint")
                .unwrap()
                .random_sampling_percentage,
            20.0,
            "the oldest namespace-wide Telemetry wins"
        );
        assert!(tracing_of(&r, "team/waypoint").is_none(), "{r:?}");
    }

    #[test]
    fn invalid_telemetry_is_reported_and_skipped() {
        let (r, t) = run(
            MESH,
            r#"
apiVersion: telemetry.istio.io/v1
kind: Telemetry
metadata: {name: unknown, namespace: istio-system}
spec:
  tracing: [{providers: [{name: nope}]}]
---
apiVersion: telemetry.istio.io/v1
kind: Telemetry
metadata: {name: zipkin, namespace: default}
spec:
  tracing: [{providers: [{name: zipkin}]}]
---
apiVersion: telemetry.istio.io/v1
kind: Telemetry
metadata: {name: pct, namespace: team}
spec:
  tracing: [{providers: [{name: jaeger}], randomSamplingPercentage: 150}]
---
apiVersion: telemetry.istio.io/v1
kind: Telemetry
metadata: {name: shape, namespace: team}
spec:
  tracing: {providers: []}
"#,
        );
        assert!(r.is_empty(), "nothing valid enables tracing: {r:?}");
        let errs: BTreeMap<String, (String, String)> = t
            .errors
            .iter()
            .map(|e| (e.object.name.clone(), (e.field.clone(), e.reason.clone())))
            .collect();
        assert_eq!(errs.len(), 4, "{errs:?}");
        assert_eq!(errs["unknown"].0, "spec.tracing[0].providers[0].name");
        assert!(
            errs["unknown"].1.contains("jaeger, otel-ns, zipkin"),
            "{errs:?}"
        );
        assert!(
            errs["zipkin"].1.contains("opentelemetry providers only"),
            "{errs:?}"
        );
        assert_eq!(errs["pct"].0, "spec.tracing[0].randomSamplingPercentage");
        assert!(errs["shape"].0.starts_with("spec.tracing"), "{errs:?}");
    }
}
