//! PLACEHOLDER (from branch h-ads) so the controller glue compiles and the binary runs before
//! the real file source lands: on merge, take the file-source branch's version of this file
//! wholesale. Same API: `FileSource::new(dir)`, `load_once(&self, &ObjectStore) -> Vec<_>`
//! (errors, `Display`), `async fn run(self, store, stop)`.
//!
//! Behaviour: every `*.yaml`/`*.yml` file directly in `dir` (multi-document), objects keyed by
//! kind/namespace/name; polled every second and reloaded when a file changes.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime};

use serde_json::Value;
use tokio_util::sync::CancellationToken;

use crate::store::{ObjectKey, ObjectStore};

/// A directory of Kubernetes YAML.
pub struct FileSource {
    dir: PathBuf,
    kinds: Mutex<BTreeSet<String>>,
}

impl FileSource {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        FileSource {
            dir: dir.into(),
            kinds: Mutex::new(BTreeSet::new()),
        }
    }

    fn files(&self) -> Vec<(PathBuf, Option<SystemTime>, u64)> {
        let mut out = Vec::new();
        if let Ok(rd) = std::fs::read_dir(&self.dir) {
            for e in rd.flatten() {
                let p = e.path();
                let yaml = matches!(p.extension().and_then(|x| x.to_str()), Some("yaml" | "yml"));
                if yaml && let Ok(m) = e.metadata() {
                    out.push((p, m.modified().ok(), m.len()));
                }
            }
        }
        out.sort();
        out
    }

    /// Load the directory into `store` once; returns the problems found.
    pub fn load_once(&self, store: &ObjectStore) -> Vec<String> {
        let mut errors = Vec::new();
        let mut objects = Vec::new();
        for (path, _, _) in self.files() {
            load_file(&path, &mut objects, &mut errors);
        }
        let mut kinds = self.kinds.lock().unwrap_or_else(PoisonError::into_inner);
        kinds.extend(
            objects
                .iter()
                .map(|(k, _): &(ObjectKey, Value)| k.kind.clone()),
        );
        let list: Vec<&str> = kinds.iter().map(String::as_str).collect();
        store.replace_kinds(&list, objects);
        errors
    }

    pub async fn run(self, store: Arc<ObjectStore>, stop: CancellationToken) {
        let mut last = self.files();
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            }
            let now = self.files();
            if now != last {
                last = now;
                for e in self.load_once(&store) {
                    tracing::warn!("{e}");
                }
            }
        }
    }
}

fn load_file(path: &Path, objects: &mut Vec<(ObjectKey, Value)>, errors: &mut Vec<String>) {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) => {
            errors.push(format!("{}: {e}", path.display()));
            return;
        }
    };
    match serde_saphyr::from_multiple::<Value>(&text) {
        Ok(docs) => {
            for (i, d) in docs.into_iter().enumerate() {
                if d.is_null() {
                    continue;
                }
                match ObjectKey::of(&d) {
                    Some(k) => objects.push((k, d)),
                    None => errors.push(format!(
                        "{}: document {i}: no kind/metadata.name",
                        path.display()
                    )),
                }
            }
        }
        Err(e) => errors.push(format!("{}: {e}", path.display())),
    }
}
