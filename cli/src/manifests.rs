//! The install manifests embedded at build time (see `build.rs`): rendering them and the
//! `--set` values.
//!
//! Without `--set` the rendering is the files themselves, byte for byte, joined by `---`
//! lines, so `zmesh install --dry-run | kubectl apply -f -` applies exactly what is reviewed in
//! `manifests/`. With `--set` each document is parsed into an order-preserving tree, edited
//! structurally, and written back as YAML.

use indexmap::IndexMap;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::error::CliError;

mod embedded {
    include!(concat!(env!("OUT_DIR"), "/manifests.rs"));
}

/// The embedded files: (path relative to `manifests/`, content), in kustomization order.
pub fn files() -> &'static [(&'static str, &'static str)] {
    embedded::MANIFESTS
}

/// A YAML value that keeps mapping order (serde_json's map sorts keys), so an edited manifest
/// reads like the original.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Yaml {
    Null,
    Bool(bool),
    Int(i64),
    UInt(u64),
    Float(f64),
    Str(String),
    Seq(Vec<Yaml>),
    Map(IndexMap<String, Yaml>),
}

impl Yaml {
    fn get(&self, key: &str) -> Option<&Yaml> {
        match self {
            Yaml::Map(m) => m.get(key),
            _ => None,
        }
    }

    fn get_mut(&mut self, key: &str) -> Option<&mut Yaml> {
        match self {
            Yaml::Map(m) => m.get_mut(key),
            _ => None,
        }
    }

    fn str_at(&self, path: &[&str]) -> Option<&str> {
        let mut cur = self;
        for k in path {
            cur = cur.get(k)?;
        }
        match cur {
            Yaml::Str(s) => Some(s),
            _ => None,
        }
    }

    /// The mapping at `path`, created (as empty mappings) where missing.
    fn map_at(&mut self, path: &[&str]) -> Option<&mut IndexMap<String, Yaml>> {
        let mut cur = self;
        for k in path {
            let Yaml::Map(m) = cur else { return None };
            cur = m
                .entry((*k).to_string())
                .or_insert_with(|| Yaml::Map(IndexMap::new()));
        }
        match cur {
            Yaml::Map(m) => Some(m),
            _ => None,
        }
    }
}

/// One Kubernetes object of the manifests.
#[derive(Debug, Clone)]
pub struct Document {
    /// The file it came from (relative to `manifests/`), for messages.
    pub file: &'static str,
    pub value: Yaml,
}

impl Document {
    pub fn api_version(&self) -> &str {
        self.value.str_at(&["apiVersion"]).unwrap_or_default()
    }
    pub fn kind(&self) -> &str {
        self.value.str_at(&["kind"]).unwrap_or_default()
    }
    pub fn name(&self) -> &str {
        self.value.str_at(&["metadata", "name"]).unwrap_or_default()
    }
    pub fn namespace(&self) -> Option<&str> {
        self.value.str_at(&["metadata", "namespace"])
    }
    pub fn is_crd(&self) -> bool {
        self.kind() == "CustomResourceDefinition"
    }
    /// `Kind namespace/name` or `Kind name`.
    pub fn describe(&self) -> String {
        match self.namespace() {
            Some(ns) => format!("{} {ns}/{}", self.kind(), self.name()),
            None => format!("{} {}", self.kind(), self.name()),
        }
    }
    pub fn to_json(&self) -> Result<Value, CliError> {
        serde_json::to_value(&self.value).map_err(|e| {
            CliError::Manifest(format!(
                "manifests/{}: {} cannot be converted to JSON: {e}",
                self.file,
                self.describe()
            ))
        })
    }
}

/// The files as one multi-document stream, unchanged.
pub fn render_raw(files: &[(&str, &str)]) -> String {
    let mut out = String::new();
    for (_, content) in files {
        if !out.is_empty() && !content.starts_with("---") {
            out.push_str("---\n");
        }
        out.push_str(content);
        if !content.is_empty() && !content.ends_with('\n') {
            out.push('\n');
        }
    }
    out
}

/// Every object of the files, in order (empty documents skipped).
pub fn parse(files: &[(&'static str, &'static str)]) -> Result<Vec<Document>, CliError> {
    let mut docs = Vec::new();
    for (file, content) in files {
        let values: Vec<Yaml> = serde_saphyr::from_multiple(content).map_err(|e| {
            CliError::Manifest(format!(
                "manifests/{file} is not valid YAML: {}",
                crate::error::one_line(&e.to_string())
            ))
        })?;
        for value in values {
            if value == Yaml::Null {
                continue;
            }
            let doc = Document { file, value };
            if doc.api_version().is_empty() || doc.kind().is_empty() || doc.name().is_empty() {
                return Err(CliError::Manifest(format!(
                    "manifests/{file}: a document lacks apiVersion, kind or metadata.name"
                )));
            }
            docs.push(doc);
        }
    }
    Ok(docs)
}

/// Serialize the documents as one multi-document YAML stream.
pub fn render_docs(docs: &[Document]) -> Result<String, CliError> {
    let mut out = String::new();
    for d in docs {
        if !out.is_empty() {
            out.push_str("---\n");
        }
        let s = serde_saphyr::to_string(&d.value).map_err(|e| {
            CliError::Manifest(format!("cannot render {} as YAML: {e}", d.describe()))
        })?;
        out.push_str(&s);
        if !s.ends_with('\n') {
            out.push('\n');
        }
    }
    Ok(out)
}

/// The `--set` keys. Images are `REGISTRY/NAME:TAG`; the workloads are the manifests'
/// Deployments (the controller) and DaemonSets (ztunnel).
pub const SET_KEYS: &str = "\
  image.registry=REG      registry (and path) of every zmesh image, e.g. ghcr.io/acme
  image.tag=TAG           tag of every zmesh image
  image.pullPolicy=P      Always | IfNotPresent | Never
  controller.image=IMG    full image of the controller Deployment
  controller.replicas=N   controller replicas (the manifests' default is 2)
  ztunnel.image=IMG       full image of the ztunnel DaemonSet
  logLevel=LEVEL          RUST_LOG of controller and ztunnel: error|warn|info|debug|trace";

/// One parsed `--set key=value`.
#[derive(Debug, Clone, PartialEq)]
pub enum Setting {
    Registry(String),
    Tag(String),
    PullPolicy(String),
    ControllerImage(String),
    ControllerReplicas(i64),
    ZtunnelImage(String),
    LogLevel(String),
}

impl std::fmt::Display for Setting {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Setting::Registry(v) => write!(f, "image.registry={v}"),
            Setting::Tag(v) => write!(f, "image.tag={v}"),
            Setting::PullPolicy(v) => write!(f, "image.pullPolicy={v}"),
            Setting::ControllerImage(v) => write!(f, "controller.image={v}"),
            Setting::ControllerReplicas(v) => write!(f, "controller.replicas={v}"),
            Setting::ZtunnelImage(v) => write!(f, "ztunnel.image={v}"),
            Setting::LogLevel(v) => write!(f, "logLevel={v}"),
        }
    }
}

/// Parse `key=value` (clap's value parser for `--set`).
pub fn parse_set(s: &str) -> Result<Setting, String> {
    let (key, value) = s
        .split_once('=')
        .ok_or_else(|| format!("expected key=value, got {s:?}"))?;
    let value = value.trim();
    let nonempty = |v: &str| {
        if v.is_empty() || v.contains(char::is_whitespace) {
            Err(format!("{key} needs a value without spaces"))
        } else {
            Ok(v.to_string())
        }
    };
    match key.trim() {
        "image.registry" => Ok(Setting::Registry(nonempty(value.trim_end_matches('/'))?)),
        "image.tag" => {
            let v = nonempty(value)?;
            if v.contains(['/', ':']) {
                return Err(format!("image.tag {v:?} must not contain '/' or ':'"));
            }
            Ok(Setting::Tag(v))
        }
        "image.pullPolicy" => match value {
            "Always" | "IfNotPresent" | "Never" => Ok(Setting::PullPolicy(value.into())),
            _ => Err(format!(
                "image.pullPolicy must be Always, IfNotPresent or Never, not {value:?}"
            )),
        },
        "controller.image" => Ok(Setting::ControllerImage(nonempty(value)?)),
        "ztunnel.image" => Ok(Setting::ZtunnelImage(nonempty(value)?)),
        "controller.replicas" => value
            .parse::<u16>()
            .map(|n| Setting::ControllerReplicas(i64::from(n)))
            .map_err(|_| format!("controller.replicas must be a number ≥ 0, not {value:?}")),
        "logLevel" => match value {
            "error" | "warn" | "info" | "debug" | "trace" => Ok(Setting::LogLevel(value.into())),
            _ => Err(format!(
                "logLevel must be one of error, warn, info, debug, trace, not {value:?}"
            )),
        },
        other => Err(format!(
            "unknown key {other:?} (known: image.registry, image.tag, image.pullPolicy, \
             controller.image, controller.replicas, ztunnel.image, logLevel)"
        )),
    }
}

/// `(registry, name, tag)` of `registry/path/name:tag` (the registry part may be empty; a
/// digest stays part of the name).
fn split_image(image: &str) -> (&str, &str, Option<&str>) {
    let (repo, name) = match image.rsplit_once('/') {
        Some((r, n)) => (r, n),
        None => ("", image),
    };
    match name.split_once(':') {
        Some((n, t)) if !n.contains('@') => (repo, n, Some(t)),
        _ => (repo, name, None),
    }
}

fn join_image(registry: &str, name: &str, tag: Option<&str>) -> String {
    let mut s = String::new();
    if !registry.is_empty() {
        s.push_str(registry);
        s.push('/');
    }
    s.push_str(name);
    if let Some(t) = tag {
        s.push(':');
        s.push_str(t);
    }
    s
}

/// The containers (and init containers) of a workload document.
fn containers(doc: &mut Document) -> Vec<&mut IndexMap<String, Yaml>> {
    let Some(pod) = doc
        .value
        .get_mut("spec")
        .and_then(|s| s.get_mut("template"))
        .and_then(|t| t.get_mut("spec"))
    else {
        return Vec::new();
    };
    let Yaml::Map(pod) = pod else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for (k, v) in pod.iter_mut() {
        if (k == "containers" || k == "initContainers")
            && let Yaml::Seq(list) = v
        {
            for c in list {
                if let Yaml::Map(m) = c {
                    out.push(m);
                }
            }
        }
    }
    out
}

fn set_env(container: &mut IndexMap<String, Yaml>, name: &str, value: &str) {
    let env = container
        .entry("env".to_string())
        .or_insert_with(|| Yaml::Seq(Vec::new()));
    if !matches!(env, Yaml::Seq(_)) {
        *env = Yaml::Seq(Vec::new());
    }
    let Yaml::Seq(list) = env else { return };
    let entry = Yaml::Map(IndexMap::from([
        ("name".to_string(), Yaml::Str(name.to_string())),
        ("value".to_string(), Yaml::Str(value.to_string())),
    ]));
    match list.iter_mut().find(|e| e.str_at(&["name"]) == Some(name)) {
        Some(existing) => *existing = entry,
        None => list.push(entry),
    }
}

/// Apply `--set` values to the documents.
pub fn apply_settings(docs: &mut [Document], settings: &[Setting]) -> Result<(), CliError> {
    let is_workload = |d: &Document| matches!(d.kind(), "Deployment" | "DaemonSet");
    for setting in settings {
        let mut touched = 0;
        for doc in docs.iter_mut().filter(|d| is_workload(d)) {
            let kind = doc.kind().to_string();
            match setting {
                Setting::ControllerReplicas(n) if kind == "Deployment" => {
                    if let Some(spec) = doc.value.map_at(&["spec"]) {
                        spec.insert("replicas".into(), Yaml::Int(*n));
                        touched += 1;
                    }
                }
                Setting::ControllerReplicas(_) => {}
                _ => {
                    for c in containers(doc) {
                        let image = match c.get("image") {
                            Some(Yaml::Str(s)) => s.clone(),
                            _ => String::new(),
                        };
                        let (reg, name, tag) = split_image(&image);
                        let new_image = match setting {
                            Setting::Registry(r) => Some(join_image(r, name, tag)),
                            Setting::Tag(t) => Some(join_image(reg, name, Some(t))),
                            Setting::ControllerImage(i) if kind == "Deployment" => Some(i.clone()),
                            Setting::ZtunnelImage(i) if kind == "DaemonSet" => Some(i.clone()),
                            _ => None,
                        };
                        if let Some(i) = new_image {
                            c.insert("image".into(), Yaml::Str(i));
                            touched += 1;
                        }
                        match setting {
                            Setting::PullPolicy(p) => {
                                c.insert("imagePullPolicy".into(), Yaml::Str(p.clone()));
                                touched += 1;
                            }
                            Setting::LogLevel(l) => {
                                set_env(c, "RUST_LOG", l);
                                touched += 1;
                            }
                            _ => {}
                        }
                    }
                }
            }
        }
        if touched == 0 {
            return Err(CliError::Manifest(format!(
                "--set {setting} matched nothing in the embedded manifests (no such workload)"
            )));
        }
    }
    Ok(())
}

/// The embedded files, or an error saying the binary has none.
pub fn require_files() -> Result<&'static [(&'static str, &'static str)], CliError> {
    let files = files();
    if files.is_empty() {
        return Err(CliError::Manifest(
            "this zmesh binary was built without install manifests (manifests/kustomization.yaml \
             was missing at build time)"
                .into(),
        ));
    }
    Ok(files)
}

/// The rendered install: the files unchanged, or parsed and edited when there are settings.
pub fn render(
    files: &[(&'static str, &'static str)],
    settings: &[Setting],
) -> Result<String, CliError> {
    if settings.is_empty() {
        return Ok(render_raw(files));
    }
    let mut docs = parse(files)?;
    apply_settings(&mut docs, settings)?;
    render_docs(&docs)
}

/// The namespace ztunnel (and the controller) are installed in: the embedded DaemonSet's.
pub fn system_namespace() -> String {
    let docs = parse(files()).unwrap_or_default();
    find(&docs, "DaemonSet")
        .map(|(ns, _)| ns)
        .unwrap_or_else(|| "zmesh-system".into())
}

/// `(namespace, name)` of the first object of `kind` in the manifests.
pub fn find(docs: &[Document], kind: &str) -> Option<(String, String)> {
    docs.iter().find(|d| d.kind() == kind).map(|d| {
        (
            d.namespace().unwrap_or("zmesh-system").to_string(),
            d.name().to_string(),
        )
    })
}

/// The pod label selector (`k=v,k2=v2`) of the first object of `kind`.
pub fn selector(docs: &[Document], kind: &str) -> Option<String> {
    let d = docs.iter().find(|d| d.kind() == kind)?;
    let Some(Yaml::Map(labels)) = d
        .value
        .get("spec")
        .and_then(|s| s.get("selector"))
        .and_then(|s| s.get("matchLabels"))
    else {
        return None;
    };
    let parts: Vec<String> = labels
        .iter()
        .filter_map(|(k, v)| match v {
            Yaml::Str(v) => Some(format!("{k}={v}")),
            _ => None,
        })
        .collect();
    Some(parts.join(","))
}

#[cfg(test)]
mod tests {
    use super::*;

    const NS: &str = "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: zmesh-system\n";
    const DEPLOY: &str = "# the controller\napiVersion: apps/v1
kind: Deployment
metadata:
  name: zmesh-controller
  namespace: zmesh-system
spec:
  replicas: 2
  selector:
    matchLabels:
      app: zmesh-controller
  template:
    metadata:
      labels:
        app: zmesh-controller
    spec:
      containers:
        - name: controller
          image: ghcr.io/zmesh/zmesh-controller:0.1.0
          args: [\"--kubernetes\"]
          env:
            - name: RUST_LOG
              value: info
---
apiVersion: apps/v1
kind: DaemonSet
metadata:
  name: ztunnel
  namespace: zmesh-system
spec:
  selector:
    matchLabels:
      app: ztunnel
  template:
    spec:
      containers:
        - name: ztunnel
          image: ghcr.io/zmesh/ztunnel:0.1.0
";

    fn files() -> Vec<(&'static str, &'static str)> {
        vec![("namespace.yaml", NS), ("controller.yaml", DEPLOY)]
    }

    #[test]
    fn raw_render_is_the_files_joined() {
        let out = render(&files(), &[]).unwrap();
        assert_eq!(out, format!("{NS}---\n{DEPLOY}"));
        // A file already starting with a separator gets no second one; a missing final
        // newline is added so the next separator starts a line.
        let out = render_raw(&[("a", "kind: A"), ("b", "---\nkind: B\n")]);
        assert_eq!(out, "kind: A\n---\nkind: B\n");
    }

    #[test]
    fn parses_documents_in_order() {
        let docs = parse(&files()).unwrap();
        let names: Vec<String> = docs.iter().map(Document::describe).collect();
        assert_eq!(
            names,
            [
                "Namespace zmesh-system",
                "Deployment zmesh-system/zmesh-controller",
                "DaemonSet zmesh-system/ztunnel"
            ]
        );
        assert_eq!(
            find(&docs, "DaemonSet"),
            Some(("zmesh-system".into(), "ztunnel".into()))
        );
        assert_eq!(
            selector(&docs, "Deployment").as_deref(),
            Some("app=zmesh-controller")
        );
    }

    #[test]
    fn settings_edit_structurally_and_keep_order() {
        let settings = [
            parse_set("image.registry=registry.local:5000/mesh/").unwrap(),
            parse_set("image.tag=dev").unwrap(),
            parse_set("controller.replicas=3").unwrap(),
            parse_set("logLevel=debug").unwrap(),
            parse_set("image.pullPolicy=IfNotPresent").unwrap(),
        ];
        let out = render(&files(), &settings).unwrap();
        let docs: Vec<serde_json::Value> = serde_saphyr::from_multiple(&out).unwrap();
        assert_eq!(docs.len(), 3);
        let ctl = &docs[1];
        assert_eq!(ctl["spec"]["replicas"], 3);
        let c = &ctl["spec"]["template"]["spec"]["containers"][0];
        assert_eq!(c["image"], "registry.local:5000/mesh/zmesh-controller:dev");
        assert_eq!(c["imagePullPolicy"], "IfNotPresent");
        assert_eq!(
            c["env"],
            serde_json::json!([{"name": "RUST_LOG", "value": "debug"}])
        );
        assert_eq!(c["args"], serde_json::json!(["--kubernetes"]));
        let zt = &docs[2]["spec"]["template"]["spec"]["containers"][0];
        assert_eq!(zt["image"], "registry.local:5000/mesh/ztunnel:dev");
        assert_eq!(
            zt["env"],
            serde_json::json!([{"name": "RUST_LOG", "value": "debug"}])
        );
        // Key order of the original survives (apiVersion first, spec after metadata).
        let second = out.split("---\n").nth(1).unwrap();
        assert!(
            second.starts_with("apiVersion: apps/v1\nkind: Deployment\nmetadata:"),
            "{second}"
        );
    }

    #[test]
    fn component_images() {
        let settings = [
            parse_set("controller.image=example.com/ctl@sha256:abc").unwrap(),
            parse_set("ztunnel.image=zt:1").unwrap(),
        ];
        let out = render(&files(), &settings).unwrap();
        let docs: Vec<serde_json::Value> = serde_saphyr::from_multiple(&out).unwrap();
        assert_eq!(
            docs[1]["spec"]["template"]["spec"]["containers"][0]["image"],
            "example.com/ctl@sha256:abc"
        );
        assert_eq!(
            docs[2]["spec"]["template"]["spec"]["containers"][0]["image"],
            "zt:1"
        );
    }

    #[test]
    fn bad_settings_are_refused() {
        assert!(parse_set("replicas").unwrap_err().contains("key=value"));
        assert!(
            parse_set("foo=1")
                .unwrap_err()
                .contains("known: image.registry")
        );
        assert!(parse_set("controller.replicas=-1").is_err());
        assert!(parse_set("logLevel=loud").is_err());
        assert!(parse_set("image.tag=a:b").is_err());
        let only_ns = [("namespace.yaml", NS)];
        let err = render(&only_ns, &[Setting::ControllerReplicas(1)]).unwrap_err();
        assert!(err.to_string().contains("matched nothing"), "{err}");
    }

    #[test]
    fn image_split() {
        assert_eq!(split_image("a/b/c:1"), ("a/b", "c", Some("1")));
        assert_eq!(split_image("reg:5000/c"), ("reg:5000", "c", None));
        assert_eq!(split_image("c"), ("", "c", None));
        assert_eq!(split_image("r/c@sha256:ab"), ("r", "c@sha256:ab", None));
    }

    #[test]
    fn yaml_strings_that_look_like_other_types_stay_strings() {
        let src = "a: \"true\"\nb: \"8080\"\nc: 8080\nd: ~\ne: 1.5\n";
        let v: Yaml = serde_saphyr::from_str(src).unwrap();
        let out = serde_saphyr::to_string(&v).unwrap();
        let back: serde_json::Value = serde_saphyr::from_str(&out).unwrap();
        assert_eq!(
            back,
            serde_json::json!({"a": "true", "b": "8080", "c": 8080, "d": null, "e": 1.5})
        );
    }
}
