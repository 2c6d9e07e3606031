//! `L7Store`: the waypoint's L7 configuration (decoded `ServiceConfig`s by service key and
//! waypoint-bound `Authorization`s), swapped atomically so a request sees one consistent view.
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
use zmesh_core::xds::{ReceivedResource, ResourceError, ResourceHandler, XdsClient};
use zmesh_proto::l7;

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
    /// Keyed by "<namespace>/<hostname>" (the resource name).
    pub services: HashMap<String, Arc<l7::ServiceConfig>>,
    /// Keyed by "<namespace>/<name>".
    pub authorizations: HashMap<String, Arc<l7::Authorization>>,
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
}

/// Holds the current [`L7Config`]; writers are serialised, readers never block.
#[derive(Debug, Default)]
pub struct L7Store {
    current: ArcSwap<L7Config>,
    write: Mutex<()>,
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
        let mut errors = Vec::new();
        match type_url {
            zmesh_proto::L7_SERVICE_TYPE_URL => {
                if replace_all {
                    services.retain(|k, _| updated.iter().any(|(n, _)| n == k));
                }
                for (name, bytes) in updated {
                    match decode(type_url, name, bytes, crate::validate::service_config) {
                        Ok(m) => {
                            services.insert(name.clone(), Arc::new(m));
                        }
                        Err(e) => errors.push(e),
                    }
                }
                for n in removed {
                    services.remove(n);
                }
            }
            zmesh_proto::L7_AUTHZ_TYPE_URL => {
                if replace_all {
                    authorizations.retain(|k, _| updated.iter().any(|(n, _)| n == k));
                }
                for (name, bytes) in updated {
                    match decode(type_url, name, bytes, crate::validate::authorization) {
                        Ok(m) => {
                            authorizations.insert(name.clone(), Arc::new(m));
                        }
                        Err(e) => errors.push(e),
                    }
                }
                for n in removed {
                    authorizations.remove(n);
                }
            }
            other => {
                errors.push(L7StoreError::UnknownType(other.to_string()));
                return errors;
            }
        }
        for e in &errors {
            tracing::warn!("{e}");
        }
        self.current.store(Arc::new(L7Config {
            services,
            authorizations,
        }));
        errors
    }

    /// Replace everything of both types with `resources` (type URL → name → bytes).
    pub fn replace(
        &self,
        resources: &HashMap<String, Vec<(String, Vec<u8>)>>,
    ) -> Vec<L7StoreError> {
        let mut errors = Vec::new();
        for t in [
            zmesh_proto::L7_SERVICE_TYPE_URL,
            zmesh_proto::L7_AUTHZ_TYPE_URL,
        ] {
            let empty = Vec::new();
            let r = resources.get(t).unwrap_or(&empty);
            errors.extend(self.apply(t, r, &[], true));
        }
        errors
    }

    /// Make `client` deliver both L7 type URLs to this store.
    pub fn subscribe(self: &Arc<Self>, client: XdsClient) -> XdsClient {
        client
            .with_extra_type(zmesh_proto::L7_SERVICE_TYPE_URL, self.clone())
            .with_extra_type(zmesh_proto::L7_AUTHZ_TYPE_URL, self.clone())
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
        serde_json::json!({ "services": services, "authorizations": authorizations })
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
}
