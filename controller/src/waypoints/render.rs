//! Rendering of the waypoint template (`manifests/templates/waypoint.yaml`) for one Gateway.
//!
//! The template is parsed as YAML first; placeholders are then substituted *structurally*: a
//! placeholder is a whole JSON string value `"{{NAME}}"`, replaced by the computed value. Text
//! is never searched and replaced, so a value (a Gateway name, a PEM certificate) can never
//! change the structure of the output, and any `{{` left in a value or key afterwards is an
//! error rather than something sent to the API server.

use serde_json::{Map, Value};

/// The template shipped in `manifests/` (the CLI and reviewers read the same file).
pub const TEMPLATE: &str = include_str!("../../../manifests/templates/waypoint.yaml");

/// `gatewayClassName` of the Gateways that become waypoints.
pub const WAYPOINT_CLASS: &str = "istio-waypoint";
/// Label naming the Gateway an object belongs to (Gateway API convention, used by Istio too).
pub const GATEWAY_NAME_LABEL: &str = "gateway.networking.k8s.io/gateway-name";
/// Label marking what this controller created; with [`GATEWAY_NAME_LABEL`] it finds the
/// objects of a Gateway that no longer exists.
pub const MANAGED_BY_LABEL: &str = "app.kubernetes.io/managed-by";
pub const MANAGED_BY: &str = "zmesh-controller";
/// API version of the Gateways we reconcile (owner references name it).
pub const GATEWAY_API_VERSION: &str = "gateway.networking.k8s.io/v1";

/// The kinds a template may contain, with where they live in the API.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OwnedKind {
    pub kind: &'static str,
    pub group: &'static str,
    pub version: &'static str,
    pub plural: &'static str,
}

impl OwnedKind {
    pub fn api_version(&self) -> String {
        if self.group.is_empty() {
            self.version.to_string()
        } else {
            format!("{}/{}", self.group, self.version)
        }
    }
}

/// Everything a waypoint may own, in apply order (the ServiceAccount and the CA root exist
/// before the pods that use them). Deletion looks for each of these kinds.
pub const OWNED_KINDS: &[OwnedKind] = &[
    OwnedKind {
        kind: "ServiceAccount",
        group: "",
        version: "v1",
        plural: "serviceaccounts",
    },
    OwnedKind {
        kind: "ConfigMap",
        group: "",
        version: "v1",
        plural: "configmaps",
    },
    OwnedKind {
        kind: "Deployment",
        group: "apps",
        version: "v1",
        plural: "deployments",
    },
    OwnedKind {
        kind: "Service",
        group: "",
        version: "v1",
        plural: "services",
    },
];

/// The entry of [`OWNED_KINDS`] for `kind`.
pub fn owned_kind(kind: &str) -> Option<&'static OwnedKind> {
    OWNED_KINDS.iter().find(|k| k.kind == kind)
}

/// Controller-wide values substituted into every waypoint.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WaypointSettings {
    /// Container image of the `waypoint` binary.
    pub image: String,
    /// The controller's xDS + CA endpoint, `https://host:15012`.
    pub xds_address: String,
    /// SPIFFE identity the controller's serving certificate carries.
    pub control_plane_identity: String,
    pub trust_domain: String,
    pub cluster_id: String,
    /// The mesh CA root (PEM): the waypoint verifies the controller's certificate with it.
    pub ca_root_pem: String,
}

/// The Gateway a waypoint is rendered for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GatewayRef {
    pub namespace: String,
    pub name: String,
    pub uid: String,
}

/// Name of the ConfigMap holding a waypoint's copy of the CA root.
pub fn ca_root_configmap(gateway: &str) -> String {
    format!("{gateway}-ca-root")
}

/// Why the template cannot be used or rendered. The messages name the template path of the
/// offending value.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RenderError {
    #[error("waypoint template: invalid YAML: {0}")]
    Yaml(String),
    #[error(
        "waypoint template: document {index} is not an object with apiVersion, kind and metadata.name"
    )]
    NotAnObject { index: usize },
    #[error(
        "waypoint template: document {index} is a {kind}, which the controller does not manage (it manages ServiceAccount, ConfigMap, Deployment, Service)"
    )]
    UnsupportedKind { index: usize, kind: String },
    #[error(
        "waypoint template: unknown placeholder {placeholder:?} at {path} (known: {})",
        PLACEHOLDERS.join(", ")
    )]
    UnknownPlaceholder { placeholder: String, path: String },
    #[error(
        "waypoint template: {path} has \"{{{{\" inside a longer string ({value:?}); a placeholder must be the whole value"
    )]
    EmbeddedPlaceholder { path: String, value: String },
    #[error("waypoint template: no document has kind {0}")]
    Missing(&'static str),
}

/// Every placeholder name the renderer knows (documented at the top of the template).
pub const PLACEHOLDERS: &[&str] = &[
    "GATEWAY_NAME",
    "GATEWAY_NAMESPACE",
    "GATEWAY_UID",
    "CA_ROOT_CONFIGMAP",
    "CA_ROOT_PEM",
    "WAYPOINT_IMAGE",
    "XDS_ADDRESS",
    "CONTROL_PLANE_IDENTITY",
    "TRUST_DOMAIN",
    "CLUSTER_ID",
];

/// A parsed, checked waypoint template.
#[derive(Clone, Debug)]
pub struct Template {
    docs: Vec<Value>,
}

impl Template {
    /// The template embedded from `manifests/templates/waypoint.yaml`.
    pub fn embedded() -> Result<Template, RenderError> {
        Template::parse(TEMPLATE)
    }

    /// Parse and check a template: every document is an object of a managed kind, and every
    /// placeholder is known (so rendering a Gateway later can only fail on its values).
    pub fn parse(text: &str) -> Result<Template, RenderError> {
        // Same YAML 1.2 scalar rules as the file source: `"15020"` stays a string.
        let options = serde_saphyr::options! {
            strict_booleans: true,
            leading_zero_numbers_as_strings: true,
            underscored_numbers_as_strings: true,
        };
        let docs: Vec<Value> = serde_saphyr::from_multiple_with_options(text, options)
            .map_err(|e| RenderError::Yaml(e.to_string()))?;
        let docs: Vec<Value> = docs.into_iter().filter(|d| !d.is_null()).collect();
        for (index, doc) in docs.iter().enumerate() {
            let name = doc.pointer("/metadata/name").and_then(Value::as_str);
            let kind = doc.get("kind").and_then(Value::as_str);
            let (Some(kind), Some(_), Some(_)) = (kind, doc.get("apiVersion"), name) else {
                return Err(RenderError::NotAnObject { index });
            };
            if owned_kind(kind).is_none() {
                return Err(RenderError::UnsupportedKind {
                    index,
                    kind: kind.to_string(),
                });
            }
            check_placeholders(doc, &mut kind.to_string())?;
        }
        for required in ["Deployment", "Service"] {
            if !docs
                .iter()
                .any(|d| d.get("kind").and_then(Value::as_str) == Some(required))
            {
                return Err(RenderError::Missing(required));
            }
        }
        Ok(Template { docs })
    }

    /// The objects of one waypoint, in apply order.
    pub fn render(
        &self,
        settings: &WaypointSettings,
        gateway: &GatewayRef,
    ) -> Result<Vec<Value>, RenderError> {
        let value_of = |name: &str| -> Option<String> {
            Some(match name {
                "GATEWAY_NAME" => gateway.name.clone(),
                "GATEWAY_NAMESPACE" => gateway.namespace.clone(),
                "GATEWAY_UID" => gateway.uid.clone(),
                "CA_ROOT_CONFIGMAP" => ca_root_configmap(&gateway.name),
                "CA_ROOT_PEM" => settings.ca_root_pem.clone(),
                "WAYPOINT_IMAGE" => settings.image.clone(),
                "XDS_ADDRESS" => settings.xds_address.clone(),
                "CONTROL_PLANE_IDENTITY" => settings.control_plane_identity.clone(),
                "TRUST_DOMAIN" => settings.trust_domain.clone(),
                "CLUSTER_ID" => settings.cluster_id.clone(),
                _ => return None,
            })
        };
        let mut out = self.docs.clone();
        for doc in &mut out {
            let mut path = doc
                .get("kind")
                .and_then(Value::as_str)
                .unwrap_or("object")
                .to_string();
            substitute(doc, &value_of, &mut path)?;
        }
        out.sort_by_key(|d| {
            let kind = d.get("kind").and_then(Value::as_str).unwrap_or("");
            OWNED_KINDS
                .iter()
                .position(|k| k.kind == kind)
                .unwrap_or(usize::MAX)
        });
        Ok(out)
    }
}

/// `{{NAME}}` → `Some("NAME")`.
fn placeholder(s: &str) -> Option<&str> {
    s.strip_prefix("{{")?.strip_suffix("}}").map(str::trim)
}

/// Check that every placeholder in `v` is known and stands alone.
fn check_placeholders(v: &Value, path: &mut String) -> Result<(), RenderError> {
    let any_known = |name: &str| PLACEHOLDERS.contains(&name).then(String::new);
    // Substituting into a copy checks names and positions in the same walk as rendering.
    substitute(&mut v.clone(), &any_known, path)
}

/// Replace placeholders in `v`; `path` is the template path of `v` (for errors).
fn substitute(
    v: &mut Value,
    value_of: &dyn Fn(&str) -> Option<String>,
    path: &mut String,
) -> Result<(), RenderError> {
    match v {
        Value::String(s) => {
            if let Some(name) = placeholder(s) {
                let Some(value) = value_of(name) else {
                    return Err(RenderError::UnknownPlaceholder {
                        placeholder: s.clone(),
                        path: path.clone(),
                    });
                };
                // A substituted value is data: it may contain anything, "{{" included.
                *s = value;
            } else if s.contains("{{") {
                return Err(RenderError::EmbeddedPlaceholder {
                    path: path.clone(),
                    value: s.clone(),
                });
            }
            Ok(())
        }
        Value::Array(items) => {
            for (i, item) in items.iter_mut().enumerate() {
                let len = path.len();
                path.push_str(&format!("[{i}]"));
                substitute(item, value_of, path)?;
                path.truncate(len);
            }
            Ok(())
        }
        Value::Object(map) => substitute_map(map, value_of, path),
        _ => Ok(()),
    }
}

fn substitute_map(
    map: &mut Map<String, Value>,
    value_of: &dyn Fn(&str) -> Option<String>,
    path: &mut String,
) -> Result<(), RenderError> {
    for (key, item) in map.iter_mut() {
        let len = path.len();
        path.push('.');
        path.push_str(key);
        if key.contains("{{") {
            return Err(RenderError::EmbeddedPlaceholder {
                path: path.clone(),
                value: key.clone(),
            });
        }
        substitute(item, value_of, path)?;
        path.truncate(len);
    }
    Ok(())
}
