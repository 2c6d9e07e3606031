//! The file source: a directory of Kubernetes YAML (the same objects a cluster would hold —
//! Namespaces, Pods with `status.podIP`/`spec.nodeName`, Services, Istio and Gateway API
//! resources), multi-document files allowed.
//!
//! The directory is the whole truth for the kinds it serves: every load replaces all objects of
//! [`ALL_KINDS`] in the store, so deleting a file deletes its objects. A bad document (YAML
//! syntax error, no `kind`/`metadata.name`, unknown kind) is reported naming the file, the
//! document and — when it has one — the object, and skipped; everything else still applies.
//! The directory is polled (file list, sizes, modification times) and reloaded on change.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use serde_json::Value;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::k8s;
use crate::store::{ObjectKey, ObjectStore};

/// Every kind the file (and Kubernetes) source serves.
pub const ALL_KINDS: &[&str] = &[
    "Namespace",
    "Pod",
    "Service",
    "EndpointSlice",
    "ServiceEntry",
    "AuthorizationPolicy",
    "PeerAuthentication",
    "VirtualService",
    "DestinationRule",
    "HTTPRoute",
    "TCPRoute",
    "Gateway",
    "Telemetry",
];

/// Kinds that may sit in the same directory for other parts of zmesh (the CA's node
/// registrations): skipped without an error.
pub const IGNORED_KINDS: &[&str] = &["ZmeshNode"];

/// How often the directory is checked for changes.
pub const DEFAULT_POLL_INTERVAL: Duration = Duration::from_secs(1);

/// One problem found while loading the directory. The rest of the directory still applies.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{}{}{}: {reason}", file.display(), fmt_document(*document, *line), fmt_object(object))]
pub struct SourceError {
    pub file: PathBuf,
    /// 1-based index of the YAML document in the file (None: the whole file or directory).
    pub document: Option<usize>,
    /// 1-based line where the document starts.
    pub line: Option<usize>,
    /// `Kind namespace/name` when the document got that far.
    pub object: Option<String>,
    pub reason: SourceErrorReason,
}

fn fmt_document(document: Option<usize>, line: Option<usize>) -> String {
    match (document, line) {
        (Some(d), Some(l)) => format!(", document {d} (line {l})"),
        (Some(d), None) => format!(", document {d}"),
        _ => String::new(),
    }
}

fn fmt_object(object: &Option<String>) -> String {
    object
        .as_ref()
        .map(|o| format!(" ({o})"))
        .unwrap_or_default()
}

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum SourceErrorReason {
    #[error("cannot read: {0}")]
    Read(String),
    #[error("YAML syntax error: {0}")]
    Syntax(String),
    #[error("not a Kubernetes object: {0}")]
    NotAnObject(String),
    #[error("unknown kind {kind:?} (apiVersion {api_version:?}); served kinds: {}", ALL_KINDS.join(", "))]
    UnknownKind { kind: String, api_version: String },
    #[error(
        "apiVersion {api_version:?} is not a version of kind {kind} (expected group {group:?})"
    )]
    WrongApiVersion {
        kind: String,
        api_version: String,
        group: String,
    },
    #[error("duplicate object, already defined in {first}; the first definition is kept")]
    Duplicate { first: String },
}

/// Reads a directory of Kubernetes YAML into the store.
pub struct FileSource {
    dir: PathBuf,
    poll_interval: Duration,
    errors: Arc<watch::Sender<Vec<SourceError>>>,
}

/// What the directory looked like at the last load (to detect changes cheaply).
type Fingerprint = Vec<(PathBuf, Option<SystemTime>, u64)>;

impl FileSource {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        FileSource {
            dir: dir.into(),
            poll_interval: DEFAULT_POLL_INTERVAL,
            errors: Arc::new(watch::channel(Vec::new()).0),
        }
    }

    pub fn with_poll_interval(mut self, interval: Duration) -> Self {
        self.poll_interval = interval;
        self
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The errors of the latest load (for status reporting and metrics).
    pub fn errors(&self) -> watch::Receiver<Vec<SourceError>> {
        self.errors.subscribe()
    }

    /// Load the directory once and replace every [`ALL_KINDS`] object in the store with its
    /// content. Returns (and logs) the problems found; when the directory itself cannot be
    /// read the store is left as it was (a transient error must not wipe the mesh).
    pub fn load_once(&self, store: &ObjectStore) -> Vec<SourceError> {
        let (objects, errors) = match self.read_dir() {
            Ok(loaded) => loaded,
            Err(e) => {
                tracing::error!(error = %e, "file source: directory not loaded; keeping the previous objects");
                let errors = vec![e];
                self.errors.send_replace(errors.clone());
                return errors;
            }
        };
        for e in &errors {
            tracing::error!(error = %e, "file source: document skipped");
        }
        let count = objects.len();
        let changed = store.replace_kinds(ALL_KINDS, objects);
        tracing::info!(dir = %self.dir.display(), objects = count, errors = errors.len(), changed, "file source loaded");
        self.errors.send_replace(errors.clone());
        errors
    }

    /// Load now, then reload whenever the directory changes, until `cancel`.
    pub async fn run(self, store: Arc<ObjectStore>, cancel: CancellationToken) {
        let mut last = self.fingerprint();
        self.load_once(&store);
        let mut tick = tokio::time::interval(self.poll_interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = tick.tick() => {}
            }
            let now = self.fingerprint();
            if now != last {
                tracing::debug!(dir = %self.dir.display(), "file source: change detected");
                last = now;
                self.load_once(&store);
            }
        }
    }

    /// The YAML files of the directory, sorted (deterministic load order).
    fn yaml_files(&self) -> std::io::Result<Vec<PathBuf>> {
        let mut files = Vec::new();
        for entry in std::fs::read_dir(&self.dir)? {
            let path = entry?.path();
            let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
                continue;
            };
            // Hidden files are editors' swap and backup files.
            if name.starts_with('.') || !(name.ends_with(".yaml") || name.ends_with(".yml")) {
                continue;
            }
            if path.is_file() {
                files.push(path);
            }
        }
        files.sort();
        Ok(files)
    }

    fn fingerprint(&self) -> Fingerprint {
        let Ok(files) = self.yaml_files() else {
            return Vec::new();
        };
        files
            .into_iter()
            .map(|p| {
                let meta = std::fs::metadata(&p).ok();
                let mtime = meta.as_ref().and_then(|m| m.modified().ok());
                let len = meta.map(|m| m.len()).unwrap_or(0);
                (p, mtime, len)
            })
            .collect()
    }

    /// Err: the directory itself could not be listed.
    #[allow(clippy::type_complexity, clippy::result_large_err)]
    fn read_dir(&self) -> Result<(Vec<(ObjectKey, Value)>, Vec<SourceError>), SourceError> {
        let files = self.yaml_files().map_err(|e| SourceError {
            file: self.dir.clone(),
            document: None,
            line: None,
            object: None,
            reason: SourceErrorReason::Read(e.to_string()),
        })?;
        let mut errors = Vec::new();
        // Key → (object, "file, document n") of its first definition.
        let mut objects: BTreeMap<ObjectKey, (Value, String)> = BTreeMap::new();
        for file in files {
            let text = match std::fs::read_to_string(&file) {
                Ok(t) => t,
                Err(e) => {
                    errors.push(SourceError {
                        file: file.clone(),
                        document: None,
                        line: None,
                        object: None,
                        reason: SourceErrorReason::Read(e.to_string()),
                    });
                    continue;
                }
            };
            for (key, obj, doc) in parse_file(&file, &text, &mut errors) {
                let here = format!("{}, document {doc}", file.display());
                if let Some((_, first)) = objects.get(&key) {
                    errors.push(SourceError {
                        file: file.clone(),
                        document: Some(doc),
                        line: None,
                        object: Some(key.to_string()),
                        reason: SourceErrorReason::Duplicate {
                            first: first.clone(),
                        },
                    });
                    continue;
                }
                objects.insert(key, (obj, here));
            }
        }
        Ok((
            objects.into_iter().map(|(k, (v, _))| (k, v)).collect(),
            errors,
        ))
    }
}

/// One YAML document of a file: its 1-based index, 1-based start line and text.
struct Document {
    index: usize,
    line: usize,
    text: String,
}

/// Split a multi-document YAML file at its `---` markers. Done by hand (rather than letting the
/// parser read the whole stream) so that a syntax error costs only its own document. A marker
/// is a line starting with `---` at column 0; inside block scalars content is indented, so such
/// a line is always a marker.
fn split_documents(text: &str) -> Vec<Document> {
    let mut docs = Vec::new();
    let mut cur = Document {
        index: 1,
        line: 1,
        text: String::new(),
    };
    for (i, line) in text.lines().enumerate() {
        let rest = line.strip_prefix("---");
        let is_marker = rest.is_some_and(|r| r.is_empty() || r.starts_with([' ', '\t']));
        if is_marker {
            let next = Document {
                index: cur.index + 1,
                line: i + 1,
                // `--- # comment` or `--- {inline: doc}`: keep what follows the marker.
                text: format!("{}\n", rest.unwrap_or("").trim_start()),
            };
            docs.push(std::mem::replace(&mut cur, next));
        } else if line == "..." {
            // Explicit document end: the next marker starts the next document.
        } else {
            cur.text.push_str(line);
            cur.text.push('\n');
        }
    }
    docs.push(cur);
    docs
}

fn is_blank_yaml(text: &str) -> bool {
    text.lines().all(|l| {
        let l = l.trim();
        l.is_empty() || l.starts_with('#') || l.starts_with('%')
    })
}

/// Parse one file into objects (with the index of the document each came from); problems go
/// to `errors`.
#[doc(hidden)] // pub for the fuzz targets and tests/parsers_never_panic.rs
pub fn parse_file(
    file: &Path,
    text: &str,
    errors: &mut Vec<SourceError>,
) -> Vec<(ObjectKey, Value, usize)> {
    let mut out = Vec::new();
    for doc in split_documents(text) {
        if is_blank_yaml(&doc.text) {
            continue;
        }
        let err = |object: Option<String>, reason| SourceError {
            file: file.to_path_buf(),
            document: Some(doc.index),
            line: Some(doc.line),
            object,
            reason,
        };
        // YAML 1.2 scalars: `name: on` or `version: 1.10` keep their meaning as strings where
        // Kubernetes expects strings; the same options as zmesh-core's local config.
        let options = serde_saphyr::options! {
            strict_booleans: true,
            leading_zero_numbers_as_strings: true,
            underscored_numbers_as_strings: true,
        };
        // Padded so that the parser's line numbers are the file's.
        let padded = "\n".repeat(doc.line.saturating_sub(1)) + &doc.text;
        let value: Value = match serde_saphyr::from_str_with_options(&padded, options) {
            Ok(v) => v,
            Err(e) => {
                errors.push(err(None, SourceErrorReason::Syntax(e.to_string())));
                continue;
            }
        };
        if value.is_null() {
            continue;
        }
        let mut items = Vec::new();
        expand_lists(value, &mut items);
        for item in items {
            match check_object(item) {
                Ok(Some((key, obj))) => out.push((key, obj, doc.index)),
                Ok(None) => {}
                Err((object, reason)) => errors.push(err(object, reason)),
            }
        }
    }
    out
}

/// `kind: List` (what `kubectl get -o yaml` prints) holds its objects in `items`.
fn expand_lists(value: Value, out: &mut Vec<Value>) {
    let is_list = value
        .get("kind")
        .and_then(Value::as_str)
        .is_some_and(|k| k == "List" || (k.ends_with("List") && value.get("items").is_some()));
    if is_list && let Some(Value::Array(items)) = value.get("items") {
        for item in items.clone() {
            expand_lists(item, out);
        }
        return;
    }
    out.push(value);
}

/// Validate one object and normalise its namespace. `Ok(None)`: an ignored kind.
#[allow(clippy::type_complexity)]
fn check_object(
    mut obj: Value,
) -> Result<Option<(ObjectKey, Value)>, (Option<String>, SourceErrorReason)> {
    let not_object = |why: &str| (None, SourceErrorReason::NotAnObject(why.to_string()));
    if !obj.is_object() {
        return Err(not_object("the document is not a mapping"));
    }
    let kind = match obj.get("kind") {
        Some(Value::String(k)) if !k.is_empty() => k.clone(),
        _ => return Err(not_object("missing `kind` (a non-empty string)")),
    };
    let api_version = match obj.get("apiVersion") {
        Some(Value::String(v)) if !v.is_empty() => v.clone(),
        _ => return Err(not_object("missing `apiVersion` (a non-empty string)")),
    };
    let name = match obj.pointer("/metadata/name") {
        Some(Value::String(n)) if !n.is_empty() => n.clone(),
        _ => {
            return Err((
                Some(kind),
                SourceErrorReason::NotAnObject(
                    "missing `metadata.name` (a non-empty string)".into(),
                ),
            ));
        }
    };
    if IGNORED_KINDS.contains(&kind.as_str()) {
        tracing::debug!(kind, name, "file source: ignored kind");
        return Ok(None);
    }
    let Some(info) = k8s::kind_info(&kind) else {
        return Err((
            Some(format!("{kind} {name}")),
            SourceErrorReason::UnknownKind { kind, api_version },
        ));
    };
    if !info.accepts_api_version(&api_version) {
        return Err((
            Some(format!("{kind} {name}")),
            SourceErrorReason::WrongApiVersion {
                kind,
                api_version,
                group: info.group.to_string(),
            },
        ));
    }
    let meta = obj
        .get_mut("metadata")
        .and_then(Value::as_object_mut)
        .ok_or_else(|| not_object("`metadata` is not a mapping"))?;
    if info.namespaced {
        // As kubectl does: no namespace means `default`.
        let ns = meta.get("namespace").and_then(Value::as_str).unwrap_or("");
        if ns.is_empty() {
            meta.insert("namespace".into(), Value::String("default".into()));
        }
    } else {
        meta.remove("namespace");
    }
    let key = ObjectKey::of(&obj).ok_or_else(|| not_object("no key"))?;
    Ok(Some((key, obj)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_documents() {
        let docs = split_documents("a: 1\n---\nb: 2\n--- # c\n...\n---\n\n");
        let texts: Vec<_> = docs.iter().map(|d| d.text.as_str()).collect();
        // The marker line stays (emptied) in its document, so that the parser's line numbers
        // count from the marker, which is the document's reported start line.
        assert_eq!(texts, vec!["a: 1\n", "\nb: 2\n", "# c\n", "\n\n"]);
        assert_eq!(docs[1].line, 2);
        assert_eq!(docs[2].index, 3);
        // `----` and `---x` are content, not markers.
        assert_eq!(split_documents("a: |\n---x\n").len(), 1);
    }

    #[test]
    fn all_kinds_match_the_kind_table() {
        let table: Vec<_> = k8s::KINDS.iter().map(|k| k.kind).collect();
        assert_eq!(table, ALL_KINDS);
    }
}
