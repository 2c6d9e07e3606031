//! `L7Store`: the waypoint's L7 configuration (decoded `ServiceConfig`s by service key,
//! waypoint-bound `Authorization`s and the waypoints' resolved `WaypointTelemetry`), swapped
//! atomically so a request sees one consistent view.
//!
//! It is fed either directly ([`L7Store::apply`], [`L7Store::replace`]: tests, embedders) or
//! over xDS as the [`ResourceHandler`] of the `zmesh.l7.v1` type URLs (see
//! [`L7Store::subscribe`]): each Delta ADS response is one atomic swap, and resources that do
//! not decode, or hold values [`crate::validate`] refuses, are NACKed while the previous
//! version stays in use.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};

use arc_swap::ArcSwap;
use prost::Message;
use zmesh_core::state::Service;
use zmesh_core::xds::{ReceivedResource, ResourceError, ResourceHandler, XdsClient};
use zmesh_proto::l7;

use crate::cors::CorsIndex;
use crate::validate as V;

/// Why a resource could not be applied.
#[derive(Debug, thiserror::Error)]
pub enum L7StoreError {
    #[error("L7 resource {name} of type {type_url} does not decode: {source}")]
    Decode {
        type_url: String,
        name: String,
        #[source]
        source: prost::DecodeError,
    },
    #[error("L7 resource {name} of type {type_url} is refused: {source}")]
    Invalid {
        type_url: String,
        name: String,
        #[source]
        source: crate::validate::Invalid,
    },
    #[error("resource type {0} is not an L7 type this waypoint understands")]
    UnknownType(String),
}

/// One immutable view of the L7 configuration.
#[derive(Debug, Default)]
pub struct L7Config {
    /// Keyed by `"<namespace>/<hostname>"` (the resource name).
    pub services: HashMap<String, Arc<l7::ServiceConfig>>,
    /// Keyed by `"<namespace>/<name>"`.
    pub authorizations: HashMap<String, Arc<l7::Authorization>>,
    /// The routes' CORS policies, compiled when their service config was applied.
    pub cors: CorsIndex,
    /// Keyed by "<namespace>/<gateway name>" (each waypoint uses its own).
    pub telemetry: HashMap<String, Arc<l7::WaypointTelemetry>>,
}

impl L7Config {
    /// The config for a service key ("ns/hostname") or a bare hostname.
    pub fn service(&self, key_or_host: &str) -> Option<Arc<l7::ServiceConfig>> {
        if let Some(s) = self.services.get(key_or_host) {
            return Some(s.clone());
        }
        self.services
            .values()
            .find(|s| s.hostname == key_or_host)
            .cloned()
    }

    /// The config for `svc`: by its key ("ns/hostname"), else by its hostname.
    pub fn service_for(&self, svc: &Service) -> Option<Arc<l7::ServiceConfig>> {
        self.service(&svc.key())
            .or_else(|| self.service(&svc.hostname))
    }
}

/// Holds the current [`L7Config`]; writers are serialised, readers never block.
#[derive(Debug, Default)]
pub struct L7Store {
    current: ArcSwap<L7Config>,
    write: Mutex<()>,
    /// Woken after every change (whoever follows the config without polling it).
    changed: tokio::sync::Notify,
}

/// The L7 type URLs a waypoint subscribes to.
const TYPES: [&str; 3] = [
    zmesh_proto::L7_SERVICE_TYPE_URL,
    zmesh_proto::L7_AUTHZ_TYPE_URL,
    zmesh_proto::L7_TELEMETRY_TYPE_URL,
];

/// Upsert/remove decoded resources of one type; a resource that does not decode keeps its old
/// version and is reported.
#[allow(clippy::too_many_arguments)]
fn merge<M: Message + Default>(
    map: &mut HashMap<String, Arc<M>>,
    type_url: &str,
    updated: &[(String, Vec<u8>)],
    removed: &[String],
    replace_all: bool,
    validate: fn(&M) -> Result<(), crate::validate::Invalid>,
    errors: &mut Vec<L7StoreError>,
) {
    if replace_all {
        map.retain(|k, _| updated.iter().any(|(n, _)| n == k));
    }
    for (name, bytes) in updated {
        match decode(type_url, name, bytes, validate) {
            Ok(m) => {
                map.insert(name.clone(), Arc::new(m));
            }
            Err(e) => errors.push(e),
        }
    }
    for n in removed {
        map.remove(n);
    }
}

impl L7Store {
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    pub fn load(&self) -> Arc<L7Config> {
        self.current.load_full()
    }

    /// Apply a delta for one type URL: upserts and removals by resource name. With
    /// `replace_all`, resources of that type not in `updated` are dropped (state-of-the-world).
    /// Decoding and validation errors skip that resource only (the old version stays) and are
    /// returned.
    pub fn apply(
        &self,
        type_url: &str,
        updated: &[(String, Vec<u8>)],
        removed: &[String],
        replace_all: bool,
    ) -> Vec<L7StoreError> {
        let _w = self.write.lock().unwrap_or_else(PoisonError::into_inner);
        let old = self.current.load_full();
        let mut services = old.services.clone();
        let mut authorizations = old.authorizations.clone();
        let mut telemetry = old.telemetry.clone();
        let mut errors = Vec::new();
        let (u, r, all) = (updated, removed, replace_all);
        match type_url {
            zmesh_proto::L7_SERVICE_TYPE_URL => {
                merge(
                    &mut services,
                    type_url,
                    u,
                    r,
                    all,
                    V::service_config,
                    &mut errors,
                );
            }
            zmesh_proto::L7_AUTHZ_TYPE_URL => {
                merge(
                    &mut authorizations,
                    type_url,
                    u,
                    r,
                    all,
                    V::authorization,
                    &mut errors,
                );
            }
            zmesh_proto::L7_TELEMETRY_TYPE_URL => {
                merge(
                    &mut telemetry,
                    type_url,
                    u,
                    r,
                    all,
                    V::telemetry,
                    &mut errors,
                );
            }
            other => {
                errors.push(L7StoreError::UnknownType(other.to_string()));
                return errors;
            }
        }
        for e in &errors {
            tracing::warn!("{e}");
        }
        // Only configs not seen before are compiled.
        let cors = if type_url == zmesh_proto::L7_SERVICE_TYPE_URL {
            CorsIndex::rebuild(services.values(), &old.cors)
        } else {
            old.cors.clone()
        };
        self.current.store(Arc::new(L7Config {
            services,
            authorizations,
            cors,
            telemetry,
        }));
        self.changed.notify_waiters();
        errors
    }

    /// Completes after the next change. Create it (and `enable` it) before reading the
    /// current config, so a change in between is not missed.
    pub fn changed(&self) -> tokio::sync::futures::Notified<'_> {
        self.changed.notified()
    }

    /// Replace everything of every L7 type with `resources` (type URL → name → bytes).
    pub fn replace(
        &self,
        resources: &HashMap<String, Vec<(String, Vec<u8>)>>,
    ) -> Vec<L7StoreError> {
        let mut errors = Vec::new();
        for t in TYPES {
            let empty = Vec::new();
            let r = resources.get(t).unwrap_or(&empty);
            errors.extend(self.apply(t, r, &[], true));
        }
        errors
    }

    /// Make `client` deliver every L7 type URL to this store. Telemetry is optional: the
    /// waypoint serves without it (no tracing), and a controller that predates the type must
    /// not keep the waypoint unready.
    pub fn subscribe(self: &Arc<Self>, client: XdsClient) -> XdsClient {
        TYPES.iter().fold(client, |c, t| {
            if *t == zmesh_proto::L7_TELEMETRY_TYPE_URL {
                c.with_optional_type(*t, self.clone())
            } else {
                c.with_extra_type(*t, self.clone())
            }
        })
    }

    /// JSON for config_dump: every resource held, by name, rendered as proto3 JSON.
    pub fn dump(&self) -> serde_json::Value {
        fn render<M: Message>(type_url: &str, m: &M) -> serde_json::Value {
            zmesh_proto::reflect::to_json(type_url, &m.encode_to_vec())
                .unwrap_or_else(|e| serde_json::Value::String(e.to_string()))
        }
        let c = self.load();
        let services: serde_json::Map<String, serde_json::Value> = c
            .services
            .iter()
            .map(|(k, v)| {
                (
                    k.clone(),
                    render(zmesh_proto::L7_SERVICE_TYPE_URL, v.as_ref()),
                )
            })
            .collect();
        let authorizations: serde_json::Map<String, serde_json::Value> = c
            .authorizations
            .iter()
            .map(|(k, v)| {
                (
                    k.clone(),
                    render(zmesh_proto::L7_AUTHZ_TYPE_URL, v.as_ref()),
                )
            })
            .collect();
        let telemetry: serde_json::Map<String, serde_json::Value> = c
            .telemetry
            .iter()
            .map(|(k, v)| {
                (
                    k.clone(),
                    render(zmesh_proto::L7_TELEMETRY_TYPE_URL, v.as_ref()),
                )
            })
            .collect();
        serde_json::json!({
            "services": services,
            "authorizations": authorizations,
            "telemetry": telemetry,
        })
    }
}

/// Decode resource `name` and check it with `validate`.
fn decode<M: Message + Default>(
    type_url: &str,
    name: &str,
    bytes: &[u8],
    validate: fn(&M) -> Result<(), crate::validate::Invalid>,
) -> Result<M, L7StoreError> {
    let m = M::decode(bytes).map_err(|source| L7StoreError::Decode {
        type_url: type_url.into(),
        name: name.into(),
        source,
    })?;
    validate(&m).map_err(|source| L7StoreError::Invalid {
        type_url: type_url.into(),
        name: name.into(),
        source,
    })?;
    Ok(m)
}

impl ResourceHandler for L7Store {
    fn apply_resources(
        &self,
        type_url: &str,
        updated: &[ReceivedResource],
        removed: &[String],
    ) -> Vec<ResourceError> {
        let items: Vec<(String, Vec<u8>)> = updated
            .iter()
            .map(|r| (r.name.clone(), r.value.clone()))
            .collect();
        self.apply(type_url, &items, removed, false)
            .into_iter()
            .flat_map(|e| match e {
                L7StoreError::Decode { ref name, .. } | L7StoreError::Invalid { ref name, .. } => {
                    vec![ResourceError {
                        name: name.clone(),
                        message: e.to_string(),
                    }]
                }
                L7StoreError::UnknownType(_) => updated
                    .iter()
                    .map(|r| ResourceError {
                        name: r.name.clone(),
                        message: e.to_string(),
                    })
                    .collect(),
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn xds_handler_applies_and_rejects_per_resource() {
        let store = L7Store::new();
        let good = l7::ServiceConfig {
            hostname: "reviews.default.svc.cluster.local".into(),
            ..Default::default()
        };
        let r = |name: &str, value: Vec<u8>| ReceivedResource {
            name: name.into(),
            version: "1".into(),
            value,
        };
        let errs = store.apply_resources(
            zmesh_proto::L7_SERVICE_TYPE_URL,
            &[
                r("default/reviews", good.encode_to_vec()),
                r("default/broken", vec![0xff, 0xff, 0xff]),
            ],
            &[],
        );
        assert_eq!(errs.len(), 1, "{errs:?}");
        assert_eq!(errs[0].name, "default/broken");
        assert!(
            errs[0].message.contains("does not decode"),
            "{}",
            errs[0].message
        );
        assert!(store.load().service("default/reviews").is_some());
        let dump = store.dump();
        assert_eq!(
            dump["services"]["default/reviews"]["hostname"],
            "reviews.default.svc.cluster.local"
        );
        let errs = store.apply_resources(
            zmesh_proto::L7_SERVICE_TYPE_URL,
            &[],
            &["default/reviews".into()],
        );
        assert!(errs.is_empty());
        assert!(store.load().services.is_empty());
        let errs = store.apply_resources("type.googleapis.com/x", &[r("a", vec![])], &[]);
        assert_eq!(errs[0].name, "a");
    }

    #[test]
    fn cors_policies_are_compiled_when_applied_and_kept_while_unchanged() {
        let store = L7Store::new();
        let svc = |host: &str| l7::ServiceConfig {
            hostname: host.into(),
            http_routes: vec![l7::HttpRoute {
                cors: Some(l7::CorsPolicy {
                    allow_origins: vec![l7::StringMatch {
                        match_type: Some(l7::string_match::MatchType::Regex("https://.*".into())),
                        ignore_case: false,
                    }],
                    ..Default::default()
                }),
                ..Default::default()
            }],
            ..Default::default()
        };
        let t = zmesh_proto::L7_SERVICE_TYPE_URL;
        let put = |name: &str, host: &str| (name.to_string(), svc(host).encode_to_vec());
        store.apply(t, &[put("default/a", "a")], &[], false);
        let policy = |c: &L7Config| {
            let a = c.service("default/a")?;
            c.cors.policy(&a, &a.http_routes[0]).cloned()
        };
        let first = policy(&store.load()).expect("compiled on apply");
        // Another service, then an authorization: `a`'s policy is not compiled again.
        store.apply(t, &[put("default/b", "b")], &[], false);
        store.apply(zmesh_proto::L7_AUTHZ_TYPE_URL, &[], &[], false);
        let c = store.load();
        assert!(Arc::ptr_eq(&first, &policy(&c).expect("kept")));
        let b = c.service("default/b").expect("b");
        assert!(c.cors.policy(&b, &b.http_routes[0]).is_some());
        // A new version of `a` is compiled anew; a removed service leaves the index.
        store.apply(t, &[put("default/a", "a")], &[], false);
        assert!(!Arc::ptr_eq(&first, &policy(&store.load()).expect("new")));
        store.apply(t, &[], &["default/a".into()], false);
        assert!(policy(&store.load()).is_none());
    }

    #[tokio::test]
    async fn telemetry_resources_and_change_notification() {
        let store = L7Store::new();
        let changed = store.changed();
        tokio::pin!(changed);
        changed.as_mut().enable();
        let t = l7::WaypointTelemetry {
            tracing: Some(l7::Tracing {
                otlp_endpoint: "http://otel:4317".into(),
                ..Default::default()
            }),
        };
        let errs = store.apply(
            zmesh_proto::L7_TELEMETRY_TYPE_URL,
            &[("default/waypoint".into(), t.encode_to_vec())],
            &[],
            false,
        );
        assert!(errs.is_empty(), "{errs:?}");
        tokio::time::timeout(std::time::Duration::from_secs(1), changed)
            .await
            .expect("a change wakes whoever follows the store");
        assert_eq!(
            store.load().telemetry["default/waypoint"],
            std::sync::Arc::new(t)
        );
        assert_eq!(
            store.dump()["telemetry"]["default/waypoint"]["tracing"]["otlpEndpoint"],
            "http://otel:4317"
        );
    }
}
