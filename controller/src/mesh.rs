//! The mesh config: what Istio keeps in the `mesh` key of the `istio` ConfigMap (istiod reads
//! it from `/etc/istio/config/mesh`). zmesh reads the fields its translation uses — today the
//! tracing ones — from the same YAML (`zmesh-controller --mesh-config`) and ignores the rest:
//!
//! ```yaml
//! enableTracing: true                # default true; false turns tracing off mesh-wide
//! defaultConfig:
//!   tracing:
//!     sampling: 1.0                  # percentage when no Telemetry sets one (default 1)
//! defaultProviders:
//!   tracing: [otel]                  # used when no Telemetry names a provider
//! extensionProviders:
//! - name: otel
//!   opentelemetry:
//!     service: opentelemetry-collector.observability.svc.cluster.local
//!     port: 4317
//! ```
//!
//! A provider's `service` may be written `<namespace>/<hostname>` (Istio accepts both).

use std::path::Path;

use serde::Deserialize;

/// Why the mesh config could not be used.
#[derive(Debug, thiserror::Error)]
pub enum MeshConfigError {
    #[error("mesh config {path}: {source}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("mesh config{}: {field}: {reason}", origin.as_deref().map(|p| format!(" {p}")).unwrap_or_default())]
    Invalid {
        origin: Option<String>,
        field: String,
        reason: String,
    },
}

/// The fields of Istio's MeshConfig that zmesh uses.
#[derive(Clone, Debug, PartialEq)]
pub struct MeshConfig {
    /// `enableTracing` (Istio's default: true).
    pub enable_tracing: bool,
    /// `defaultConfig.tracing.sampling`: percentage of new traces sampled when no Telemetry
    /// says otherwise.
    pub default_sampling: Option<f64>,
    /// `defaultProviders.tracing`.
    pub default_tracing_providers: Vec<String>,
    /// `extensionProviders`.
    pub extension_providers: Vec<ExtensionProvider>,
}

impl Default for MeshConfig {
    fn default() -> Self {
        MeshConfig {
            enable_tracing: true,
            default_sampling: None,
            default_tracing_providers: Vec::new(),
            extension_providers: Vec::new(),
        }
    }
}

/// One `extensionProviders` entry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExtensionProvider {
    pub name: String,
    pub kind: ProviderKind,
}

/// What an extension provider is. Only OpenTelemetry is used (waypoints export OTLP/gRPC);
/// the other kinds are recognised so a Telemetry naming one gets a precise error.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ProviderKind {
    OpenTelemetry {
        service: String,
        port: u16,
    },
    /// Another kind (`zipkin`, `skywalking`, `envoyExtAuthzHttp`, ...), by its field name.
    Other(String),
}

impl ExtensionProvider {
    /// The OTLP/gRPC endpoint of an OpenTelemetry provider: `http://<hostname>:<port>`.
    pub fn otlp_endpoint(&self) -> Option<String> {
        match &self.kind {
            ProviderKind::OpenTelemetry { service, port } => {
                let host = service
                    .rsplit_once('/')
                    .map_or(service.as_str(), |(_, h)| h);
                Some(format!("http://{host}:{port}"))
            }
            ProviderKind::Other(_) => None,
        }
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", default)]
struct RawMesh {
    enable_tracing: Option<bool>,
    default_config: Option<RawProxyConfig>,
    default_providers: Option<RawDefaultProviders>,
    extension_providers: Vec<serde_json::Map<String, serde_json::Value>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", default)]
struct RawProxyConfig {
    tracing: Option<RawProxyTracing>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", default)]
struct RawProxyTracing {
    sampling: Option<f64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", default)]
struct RawDefaultProviders {
    tracing: Vec<String>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawOtel {
    service: String,
    port: u16,
}

impl MeshConfig {
    /// Parse the YAML of the `mesh` key. `origin` (a path) is only for error messages.
    pub fn parse(text: &str, origin: Option<&str>) -> Result<MeshConfig, MeshConfigError> {
        let invalid = |field: String, reason: String| MeshConfigError::Invalid {
            origin: origin.map(str::to_string),
            field,
            reason,
        };
        let value: serde_json::Value = if text.trim().is_empty() {
            serde_json::Value::Null
        } else {
            serde_saphyr::from_str(text).map_err(|e| invalid(String::new(), e.to_string()))?
        };
        let raw: RawMesh = if value.is_null() {
            RawMesh::default()
        } else {
            serde_path_to_error::deserialize(&value)
                .map_err(|e| invalid(e.path().to_string(), e.into_inner().to_string()))?
        };
        let default_sampling = raw
            .default_config
            .and_then(|c| c.tracing)
            .and_then(|t| t.sampling);
        if let Some(s) = default_sampling
            && !(0.0..=100.0).contains(&s)
        {
            return Err(invalid(
                "defaultConfig.tracing.sampling".into(),
                format!("percentage {s} is outside 0..=100"),
            ));
        }
        let mut extension_providers = Vec::new();
        for (i, p) in raw.extension_providers.iter().enumerate() {
            let field = |f: &str| format!("extensionProviders[{i}]{f}");
            let Some(name) = p
                .get("name")
                .and_then(|n| n.as_str())
                .filter(|n| !n.is_empty())
            else {
                return Err(invalid(
                    field(".name"),
                    "a non-empty name is required".into(),
                ));
            };
            if extension_providers
                .iter()
                .any(|e: &ExtensionProvider| e.name == name)
            {
                return Err(invalid(
                    field(".name"),
                    format!("provider `{name}` is defined twice"),
                ));
            }
            let kind = match p.get("opentelemetry") {
                Some(o) => {
                    let o: RawOtel = serde_path_to_error::deserialize(o).map_err(|e| {
                        invalid(
                            format!("{}.{}", field(".opentelemetry"), e.path()),
                            e.into_inner().to_string(),
                        )
                    })?;
                    if o.service.is_empty() || o.port == 0 {
                        return Err(invalid(
                            field(".opentelemetry"),
                            "service and a non-zero port are required".into(),
                        ));
                    }
                    ProviderKind::OpenTelemetry {
                        service: o.service,
                        port: o.port,
                    }
                }
                None => ProviderKind::Other(
                    p.keys()
                        .find(|k| *k != "name")
                        .cloned()
                        .unwrap_or_else(|| "unknown".into()),
                ),
            };
            extension_providers.push(ExtensionProvider {
                name: name.to_string(),
                kind,
            });
        }
        Ok(MeshConfig {
            enable_tracing: raw.enable_tracing.unwrap_or(true),
            default_sampling,
            default_tracing_providers: raw.default_providers.map(|d| d.tracing).unwrap_or_default(),
            extension_providers,
        })
    }

    /// Read a mesh config file. A missing file is the default config (the `istio` ConfigMap
    /// is optional, and its mount is then empty).
    pub fn load(path: &Path) -> Result<MeshConfig, MeshConfigError> {
        match std::fs::read_to_string(path) {
            Ok(text) => MeshConfig::parse(&text, Some(&path.display().to_string())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(MeshConfig::default()),
            Err(source) => Err(MeshConfigError::Read {
                path: path.display().to_string(),
                source,
            }),
        }
    }

    pub fn provider(&self, name: &str) -> Option<&ExtensionProvider> {
        self.extension_providers.iter().find(|p| p.name == name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seeds_tracing_config() {
        // The seeds' IstioOperator meshConfig (A21), as the `mesh` key holds it.
        let m = MeshConfig::parse(
            r#"
defaultConfig:
  tracing: {}
enableTracing: true
extensionProviders:
- name: jaeger
  opentelemetry:
    port: 4317
    service: jaeger-collector.istio-system.svc.cluster.local
- name: zipkin
  zipkin: {service: zipkin.istio-system.svc.cluster.local, port: 9411}
accessLogFile: /dev/stdout
"#,
            None,
        )
        .unwrap();
        assert!(m.enable_tracing);
        assert_eq!(m.default_sampling, None);
        assert_eq!(
            m.provider("jaeger").unwrap().otlp_endpoint().as_deref(),
            Some("http://jaeger-collector.istio-system.svc.cluster.local:4317")
        );
        assert_eq!(
            m.provider("zipkin").unwrap().kind,
            ProviderKind::Other("zipkin".into())
        );
        assert_eq!(m.provider("zipkin").unwrap().otlp_endpoint(), None);
    }

    #[test]
    fn defaults_and_namespaced_service() {
        assert_eq!(MeshConfig::parse("", None).unwrap(), MeshConfig::default());
        let m = MeshConfig::parse(
            "enableTracing: false\ndefaultConfig: {tracing: {sampling: 25}}\ndefaultProviders: {tracing: [otel]}\nextensionProviders: [{name: otel, opentelemetry: {service: observability/otel.observability.svc.cluster.local, port: 4317}}]",
            None,
        )
        .unwrap();
        assert!(!m.enable_tracing);
        assert_eq!(m.default_sampling, Some(25.0));
        assert_eq!(m.default_tracing_providers, ["otel"]);
        assert_eq!(
            m.provider("otel").unwrap().otlp_endpoint().as_deref(),
            Some("http://otel.observability.svc.cluster.local:4317")
        );
        let missing = MeshConfig::load(Path::new("/nonexistent/zmesh/mesh")).unwrap();
        assert_eq!(missing, MeshConfig::default());
    }

    #[test]
    fn invalid_configs_name_the_field() {
        for (yaml, field) in [
            (
                "extensionProviders: [{name: a, opentelemetry: {service: s, port: 70000}}]",
                "extensionProviders[0].opentelemetry.port",
            ),
            (
                "extensionProviders: [{opentelemetry: {service: s, port: 1}}]",
                "extensionProviders[0].name",
            ),
            (
                "extensionProviders: [{name: a, opentelemetry: {service: s, port: 1}}, {name: a, zipkin: {}}]",
                "extensionProviders[1].name",
            ),
            (
                "defaultConfig: {tracing: {sampling: 101}}",
                "defaultConfig.tracing.sampling",
            ),
            ("enableTracing: maybe", "enableTracing"),
        ] {
            let e = MeshConfig::parse(yaml, Some("/etc/istio/config/mesh")).unwrap_err();
            let msg = e.to_string();
            assert!(
                msg.contains(field) && msg.contains("/etc/istio/config/mesh"),
                "{yaml}: {msg}"
            );
        }
    }
}
