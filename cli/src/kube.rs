//! Reaching the API server the way kubectl does: `--kubeconfig` (one file), else `$KUBECONFIG`
//! (a list, merged), else `~/.kube/config`, else the in-cluster service account; `--context`
//! picks the context and `-n` overrides its namespace. Every API error is turned into a
//! [`CliError`] that names the operation (verb, resource, object, namespace) and the reason.

use std::ffi::OsString;
use std::path::{Path, PathBuf};

use kube::api::{ApiResource, DynamicObject, GroupVersionKind, Patch, PatchParams};
use kube::config::{KubeConfigOptions, Kubeconfig, KubeconfigError};
use kube::discovery::Scope;
use kube::{Api, Client, Config};
use serde_json::Value;

use crate::error::{CliError, chain};

/// The field manager of every server-side apply, so `kubectl` and others see who owns what.
pub const FIELD_MANAGER: &str = "zmesh";

/// Connection options shared by every cluster command.
#[derive(Debug, Default, Clone)]
pub struct ConnectOptions {
    pub kubeconfig: Option<PathBuf>,
    pub context: Option<String>,
    pub namespace: Option<String>,
}

/// A client plus what commands need to describe where they act.
#[derive(Clone)]
pub struct Kube {
    pub client: Client,
    /// `-n`, else the context's namespace, else `default`.
    pub namespace: String,
    /// The API server URL (for "cannot reach" messages).
    pub server: String,
}

/// Where the configuration comes from, decided before anything is read.
#[derive(Debug, PartialEq)]
enum Source {
    Files(Vec<PathBuf>),
    InCluster,
}

/// kubectl's lookup order. `tried` lists every place looked at, for the "no kubeconfig" error.
fn locate(
    flag: Option<&Path>,
    env: Option<OsString>,
    home: Option<PathBuf>,
    in_cluster: bool,
) -> Result<Source, CliError> {
    if let Some(f) = flag {
        return if f.is_file() {
            Ok(Source::Files(vec![f.to_path_buf()]))
        } else {
            Err(CliError::NoKubeconfig {
                tried: format!("--kubeconfig {}", f.display()),
            })
        };
    }
    let mut tried = Vec::new();
    if let Some(env) = env.filter(|e| !e.is_empty()) {
        let listed: Vec<PathBuf> = std::env::split_paths(&env)
            .filter(|p| !p.as_os_str().is_empty())
            .collect();
        // kubectl skips listed files that do not exist, as long as one does.
        let existing: Vec<PathBuf> = listed.iter().filter(|p| p.is_file()).cloned().collect();
        if !existing.is_empty() {
            return Ok(Source::Files(existing));
        }
        tried.push(format!("KUBECONFIG={}", env.to_string_lossy()));
    } else {
        match home {
            Some(h) => {
                let p = h.join(".kube").join("config");
                if p.is_file() {
                    return Ok(Source::Files(vec![p]));
                }
                tried.push(p.display().to_string());
            }
            None => tried.push("~/.kube/config ($HOME is not set)".into()),
        }
    }
    if in_cluster {
        return Ok(Source::InCluster);
    }
    tried.push("the in-cluster service account (KUBERNETES_SERVICE_HOST is not set)".into());
    Err(CliError::NoKubeconfig {
        tried: tried.join(", "),
    })
}

fn display_paths(paths: &[PathBuf]) -> String {
    paths
        .iter()
        .map(|p| p.display().to_string())
        .collect::<Vec<_>>()
        .join(":")
}

/// Load the configuration (no network I/O yet).
pub async fn config(opts: &ConnectOptions) -> Result<Config, CliError> {
    let source = locate(
        opts.kubeconfig.as_deref(),
        std::env::var_os("KUBECONFIG"),
        std::env::var_os("HOME").map(PathBuf::from),
        std::env::var_os("KUBERNETES_SERVICE_HOST").is_some(),
    )?;
    let mut config = match source {
        Source::InCluster => {
            if opts.context.is_some() {
                return Err(CliError::Usage(
                    "--context needs a kubeconfig, but none was found (running in-cluster)".into(),
                ));
            }
            Config::incluster().map_err(|e| CliError::Kubeconfig {
                path: "in-cluster service account".into(),
                reason: chain(&e),
            })?
        }
        Source::Files(paths) => {
            let shown = display_paths(&paths);
            let mut merged: Option<Kubeconfig> = None;
            for p in &paths {
                let kc = Kubeconfig::read_from(p).map_err(|e| CliError::Kubeconfig {
                    path: p.display().to_string(),
                    reason: chain(&e),
                })?;
                merged = Some(match merged {
                    None => kc,
                    Some(m) => m.merge(kc).map_err(|e| CliError::Kubeconfig {
                        path: shown.clone(),
                        reason: chain(&e),
                    })?,
                });
            }
            let kc = merged.unwrap_or_default();
            let options = KubeConfigOptions {
                context: opts.context.clone(),
                ..Default::default()
            };
            Config::from_custom_kubeconfig(kc, &options)
                .await
                .map_err(|e| CliError::Kubeconfig {
                    reason: match &e {
                        KubeconfigError::LoadContext(name) => {
                            format!("context {name:?} not found")
                        }
                        KubeconfigError::CurrentContextNotSet => {
                            "no current-context is set; pass --context NAME".into()
                        }
                        _ => chain(&e),
                    },
                    path: shown,
                })?
        }
    };
    if let Some(ns) = &opts.namespace {
        config.default_namespace = ns.clone();
    }
    // kube-rs retries 429/503/504 with exponential backoff for minutes by default; a CLI
    // reports the error at once (the operator re-runs it), like kubectl.
    config.default_retry = false;
    Ok(config)
}

/// The namespace commands default to, without requiring a usable kubeconfig (for commands
/// such as `waypoint generate` that need no cluster).
pub async fn default_namespace(opts: &ConnectOptions) -> String {
    match &opts.namespace {
        Some(ns) => ns.clone(),
        None => config(opts)
            .await
            .map(|c| c.default_namespace)
            .unwrap_or_else(|_| "default".into()),
    }
}

/// Build a client. Nothing is sent until the first request.
pub async fn connect(opts: &ConnectOptions) -> Result<Kube, CliError> {
    let config = config(opts).await?;
    let server = config.cluster_url.to_string();
    let namespace = config.default_namespace.clone();
    let client = Client::try_from(config).map_err(|e| CliError::Kubeconfig {
        path: server.clone(),
        reason: chain(&e),
    })?;
    Ok(Kube {
        client,
        namespace,
        server: server.trim_end_matches('/').to_string(),
    })
}

/// One API operation, described for error messages: `patch namespaces "shop"`,
/// `list pods in namespace "shop"`, `get gateways "waypoint" in namespace "shop"`.
#[derive(Debug, Clone)]
pub struct Op {
    pub verb: &'static str,
    pub resource: String,
    pub namespace: Option<String>,
    pub name: Option<String>,
}

impl Op {
    pub fn new(
        verb: &'static str,
        resource: impl Into<String>,
        namespace: Option<&str>,
        name: Option<&str>,
    ) -> Op {
        Op {
            verb,
            resource: resource.into(),
            namespace: namespace.map(str::to_string),
            name: name.map(str::to_string),
        }
    }

    /// The object or collection, without the verb.
    pub fn object(&self) -> String {
        let mut s = self.resource.clone();
        if let Some(n) = &self.name {
            s.push_str(&format!(" {n:?}"));
        }
        match (&self.namespace, &self.name) {
            (Some(ns), _) => s.push_str(&format!(" in namespace {ns:?}")),
            (None, None) if self.verb == "list" => s.push_str(" in all namespaces"),
            _ => {}
        }
        s
    }

    pub fn describe(&self) -> String {
        format!("{} {}", self.verb, self.object())
    }
}

impl Kube {
    /// Turn a kube error into the CLI's one-line error for `op`.
    pub fn error(&self, op: &Op, e: kube::Error) -> CliError {
        api_error(&self.server, op, e)
    }
}

pub fn api_error(server: &str, op: &Op, e: kube::Error) -> CliError {
    match e {
        kube::Error::Api(status) => {
            let message = if status.message.is_empty() {
                status.reason.clone()
            } else {
                status.message.clone()
            };
            match status.code {
                // The API server's message repeats the object before "is forbidden:"; keep
                // the part naming the user, verb, resource and scope.
                403 => CliError::Forbidden {
                    what: op.describe(),
                    message: match message.split_once(" is forbidden: ") {
                        Some((_, why)) => why.to_string(),
                        None => message,
                    },
                },
                404 => {
                    // A namespaced request into a missing namespace is answered with a 404
                    // about the namespace, not about the object.
                    let details = status.details.as_ref();
                    if let Some(d) =
                        details.filter(|d| d.kind == "namespaces" && !d.name.is_empty())
                    {
                        CliError::NamespaceNotFound(d.name.clone())
                    } else if op.resource == "namespaces"
                        && let Some(n) = &op.name
                    {
                        CliError::NamespaceNotFound(n.clone())
                    } else {
                        CliError::NotFound { what: op.object() }
                    }
                }
                code => CliError::Api {
                    what: op.describe(),
                    code,
                    reason: status.reason.clone(),
                    message,
                },
            }
        }
        e @ (kube::Error::HyperError(_) | kube::Error::Service(_)) => CliError::Unreachable {
            server: server.to_string(),
            reason: root_cause(&e),
        },
        e => CliError::Request {
            what: op.describe(),
            reason: chain(&e),
        },
    }
}

/// The innermost error's text ("Connection refused (os error 111)", "invalid peer
/// certificate: UnknownIssuer"): the layers above it only repeat which client failed.
fn root_cause(e: &(dyn std::error::Error + 'static)) -> String {
    let mut cur = e;
    while let Some(next) = cur.source() {
        cur = next;
    }
    crate::error::one_line(&cur.to_string())
}

/// `Ok(None)` for a 404 about the object itself (a missing namespace is still an error).
pub fn found<T>(r: Result<T, CliError>) -> Result<Option<T>, CliError> {
    match r {
        Ok(v) => Ok(Some(v)),
        Err(CliError::NotFound { .. }) => Ok(None),
        Err(e) => Err(e),
    }
}

/// A resource of a known kind (no discovery round trip needed).
#[derive(Debug, Clone)]
pub struct Kind {
    pub group: &'static str,
    pub version: &'static str,
    pub kind: &'static str,
    pub plural: &'static str,
}

impl Kind {
    pub fn api_resource(&self) -> ApiResource {
        ApiResource::from_gvk_with_plural(
            &GroupVersionKind::gvk(self.group, self.version, self.kind),
            self.plural,
        )
    }

    /// `gateways.gateway.networking.k8s.io`, or `pods` for the core group.
    pub fn resource_name(&self) -> String {
        if self.group.is_empty() {
            self.plural.to_string()
        } else {
            format!("{}.{}", self.plural, self.group)
        }
    }
}

pub const GATEWAY: Kind = Kind {
    group: "gateway.networking.k8s.io",
    version: "v1",
    kind: "Gateway",
    plural: "gateways",
};

pub const CRD: Kind = Kind {
    group: "apiextensions.k8s.io",
    version: "v1",
    kind: "CustomResourceDefinition",
    plural: "customresourcedefinitions",
};

pub const NAMESPACE: Kind = Kind {
    group: "",
    version: "v1",
    kind: "Namespace",
    plural: "namespaces",
};

pub const POD: Kind = Kind {
    group: "",
    version: "v1",
    kind: "Pod",
    plural: "pods",
};

pub const NODE: Kind = Kind {
    group: "",
    version: "v1",
    kind: "Node",
    plural: "nodes",
};

pub const DEPLOYMENT: Kind = Kind {
    group: "apps",
    version: "v1",
    kind: "Deployment",
    plural: "deployments",
};

pub const ACCESS_REVIEW: Kind = Kind {
    group: "authorization.k8s.io",
    version: "v1",
    kind: "SelfSubjectAccessReview",
    plural: "selfsubjectaccessreviews",
};

pub const DAEMONSET: Kind = Kind {
    group: "apps",
    version: "v1",
    kind: "DaemonSet",
    plural: "daemonsets",
};

impl Kube {
    /// `Api<DynamicObject>` for `ar`, in `namespace` (or cluster-wide / all namespaces).
    pub fn dynamic(&self, ar: &ApiResource, namespace: Option<&str>) -> Api<DynamicObject> {
        match namespace {
            Some(ns) => Api::namespaced_with(self.client.clone(), ns, ar),
            None => Api::all_with(self.client.clone(), ar),
        }
    }

    /// GET one object; `Ok(None)` when it does not exist.
    pub async fn get_opt(
        &self,
        kind: &Kind,
        namespace: Option<&str>,
        name: &str,
    ) -> Result<Option<DynamicObject>, CliError> {
        let api = self.dynamic(&kind.api_resource(), namespace);
        let op = Op::new("get", kind.resource_name(), namespace, Some(name));
        match found(api.get(name).await.map_err(|e| self.error(&op, e))) {
            // Looking up a namespace that does not exist is not an error here.
            Err(CliError::NamespaceNotFound(n)) if kind.plural == "namespaces" && n == name => {
                Ok(None)
            }
            other => other,
        }
    }

    /// LIST objects (namespace `None` = all namespaces or cluster-scoped).
    pub async fn list(
        &self,
        kind: &Kind,
        namespace: Option<&str>,
        label_selector: Option<&str>,
    ) -> Result<Vec<DynamicObject>, CliError> {
        let api = self.dynamic(&kind.api_resource(), namespace);
        let op = Op::new("list", kind.resource_name(), namespace, None);
        let mut lp = kube::api::ListParams::default();
        if let Some(sel) = label_selector {
            lp = lp.labels(sel);
        }
        api.list(&lp)
            .await
            .map(|l| l.items)
            .map_err(|e| self.error(&op, e))
    }

    /// May the kubeconfig's user `verb` `resource` (`"pods/portforward"` for a subresource) of
    /// API group `group`, in `namespace` (None: cluster-wide)? A SelfSubjectAccessReview, as
    /// `kubectl auth can-i` does; it changes nothing.
    pub async fn can_i(
        &self,
        verb: &str,
        group: &str,
        resource: &str,
        namespace: Option<&str>,
    ) -> Result<bool, CliError> {
        let (res, sub) = resource.split_once('/').unwrap_or((resource, ""));
        let op = Op::new("create", ACCESS_REVIEW.resource_name(), None, None);
        let review: DynamicObject = serde_json::from_value(serde_json::json!({
            "apiVersion": "authorization.k8s.io/v1",
            "kind": "SelfSubjectAccessReview",
            "metadata": {},
            "spec": {"resourceAttributes": {
                "verb": verb, "group": group, "resource": res, "subresource": sub,
                "namespace": namespace.unwrap_or(""),
            }},
        }))
        .map_err(|e| CliError::Request {
            what: op.describe(),
            reason: e.to_string(),
        })?;
        let answer = self
            .dynamic(&ACCESS_REVIEW.api_resource(), None)
            .create(&kube::api::PostParams::default(), &review)
            .await
            .map_err(|e| self.error(&op, e))?;
        Ok(answer
            .data
            .pointer("/status/allowed")
            .and_then(Value::as_bool)
            .unwrap_or(false))
    }

    /// Server-side apply (force: zmesh owns the fields it writes, as `kubectl apply
    /// --server-side --force-conflicts` would).
    pub async fn apply(
        &self,
        ar: &ApiResource,
        scope: &Scope,
        obj: &Value,
    ) -> Result<DynamicObject, CliError> {
        let name = obj
            .pointer("/metadata/name")
            .and_then(Value::as_str)
            .unwrap_or_default();
        let ns = match scope {
            Scope::Namespaced => Some(
                obj.pointer("/metadata/namespace")
                    .and_then(Value::as_str)
                    .unwrap_or(&self.namespace),
            ),
            Scope::Cluster => None,
        };
        let resource = if ar.group.is_empty() {
            ar.plural.clone()
        } else {
            format!("{}.{}", ar.plural, ar.group)
        };
        let op = Op::new("apply", resource, ns, Some(name));
        let api = self.dynamic(ar, ns);
        api.patch(
            name,
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(obj),
        )
        .await
        .map_err(|e| self.error(&op, e))
    }
}

/// The status of condition `type_` in `obj.status.conditions` (`"True"`, `"False"`, `"Unknown"`).
pub fn condition<'a>(obj: &'a Value, type_: &str) -> Option<&'a Value> {
    obj.pointer("/status/conditions")?
        .as_array()?
        .iter()
        .find(|c| c.get("type").and_then(Value::as_str) == Some(type_))
}

pub fn condition_true(obj: &Value, type_: &str) -> bool {
    condition(obj, type_)
        .and_then(|c| c.get("status"))
        .and_then(Value::as_str)
        == Some("True")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kubeconfig_flag_wins_and_must_exist() {
        let err = locate(Some(Path::new("/nonexistent/kc")), None, None, true).unwrap_err();
        assert_eq!(
            err.to_string(),
            "no kubeconfig found (tried --kubeconfig /nonexistent/kc); pass --kubeconfig FILE or set KUBECONFIG"
        );
    }

    #[test]
    fn lists_every_place_tried() {
        let err = locate(
            None,
            Some(OsString::from("/nonexistent/a:/nonexistent/b")),
            Some(PathBuf::from("/home/u")),
            false,
        )
        .unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.contains("KUBECONFIG=/nonexistent/a:/nonexistent/b"),
            "{msg}"
        );
        assert!(msg.contains("in-cluster"), "{msg}");
        let err = locate(None, None, Some(PathBuf::from("/nonexistent-home")), false).unwrap_err();
        assert!(
            err.to_string().contains("/nonexistent-home/.kube/config"),
            "{err}"
        );
    }

    #[test]
    fn env_list_keeps_existing_files_and_falls_back_to_in_cluster() {
        let dir = std::env::temp_dir().join(format!("zmesh-kc-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("config");
        std::fs::write(&f, "apiVersion: v1\nkind: Config\n").unwrap();
        let env = std::env::join_paths([Path::new("/nonexistent/a"), &f]).unwrap();
        assert_eq!(
            locate(None, Some(env), None, false).unwrap(),
            Source::Files(vec![f.clone()])
        );
        assert_eq!(
            locate(None, None, Some(PathBuf::from("/nonexistent")), true).unwrap(),
            Source::InCluster
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn describes_operations() {
        let op = Op::new("patch", "namespaces", None, Some("shop"));
        assert_eq!(op.describe(), "patch namespaces \"shop\"");
        let op = Op::new("list", "pods", None, None);
        assert_eq!(op.describe(), "list pods in all namespaces");
        let op = Op::new(
            "get",
            GATEWAY.resource_name(),
            Some("shop"),
            Some("waypoint"),
        );
        assert_eq!(
            op.describe(),
            "get gateways.gateway.networking.k8s.io \"waypoint\" in namespace \"shop\""
        );
    }

    #[test]
    fn maps_api_statuses() {
        let status = |code: u16, details: Option<(&str, &str)>| {
            let mut s =
                kube::core::Status::failure("denied by policy", "Forbidden").with_code(code);
            if let Some((kind, name)) = details {
                s.details = Some(kube::core::response::StatusDetails {
                    kind: kind.into(),
                    name: name.into(),
                    group: String::new(),
                    uid: String::new(),
                    causes: Vec::new(),
                    retry_after_seconds: 0,
                });
            }
            kube::Error::Api(s.boxed())
        };
        let op = Op::new("patch", "namespaces", None, Some("shop"));
        let e = api_error("https://k", &op, status(403, None));
        assert_eq!(
            e.to_string(),
            "forbidden: cannot patch namespaces \"shop\": denied by policy"
        );
        let e = api_error("https://k", &op, status(404, None));
        assert_eq!(e.to_string(), "namespace \"shop\" not found");
        let op = Op::new(
            "apply",
            "gateways.gateway.networking.k8s.io",
            Some("x"),
            Some("w"),
        );
        let e = api_error("https://k", &op, status(404, Some(("namespaces", "x"))));
        assert_eq!(e.to_string(), "namespace \"x\" not found");
        let e = api_error("https://k", &op, status(404, None));
        assert!(matches!(e, CliError::NotFound { .. }));
    }

    #[test]
    fn conditions() {
        let gw = serde_json::json!({"status": {"conditions": [
            {"type": "Accepted", "status": "True"},
            {"type": "Programmed", "status": "False", "reason": "Pending"}]}});
        assert!(condition_true(&gw, "Accepted"));
        assert!(!condition_true(&gw, "Programmed"));
        assert!(!condition_true(&gw, "Missing"));
    }
}
