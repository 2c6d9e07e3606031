//! The fake's state: objects, resource versions, the event history that watches replay, the
//! recorded requests and the injected failures.

use std::collections::{BTreeMap, HashMap};

use serde_json::{Value, json};

use crate::kinds::{self, Kind};
use crate::patch;

/// A change, as a watch reports it.
#[derive(Clone, Debug)]
pub struct Event {
    pub rv: u64,
    pub group: String,
    pub plural: String,
    pub namespace: String,
    /// `ADDED`, `MODIFIED` or `DELETED`.
    pub kind: &'static str,
    pub object: Value,
}

/// One request the server received (discovery requests included).
#[derive(Clone, Debug, PartialEq)]
pub struct RecordedRequest {
    pub method: String,
    pub path: String,
    pub query: String,
    pub content_type: Option<String>,
    /// The body parsed as JSON or YAML (server-side apply sends YAML), when there was one.
    pub body: Option<Value>,
}

/// A failure to inject: requests whose method and path match get `status`.
#[derive(Clone, Debug)]
pub struct Failure {
    pub method: String,
    pub path_prefix: String,
    pub status: u16,
}

/// An API error, rendered as a `Status` object.
#[derive(Debug)]
pub struct ApiError {
    pub code: u16,
    pub reason: &'static str,
    pub message: String,
    pub name: String,
    pub kind: Option<Box<Kind>>,
}

impl ApiError {
    pub fn new(code: u16, reason: &'static str, message: impl Into<String>) -> ApiError {
        ApiError {
            code,
            reason,
            message: message.into(),
            name: String::new(),
            kind: None,
        }
    }

    fn about(mut self, kind: &Kind, name: &str) -> ApiError {
        self.kind = Some(Box::new(kind.clone()));
        self.name = name.to_string();
        self
    }

    pub fn not_found(kind: &Kind, name: &str) -> ApiError {
        ApiError::new(
            404,
            "NotFound",
            format!("{} \"{name}\" not found", kind.qualified_plural()),
        )
        .about(kind, name)
    }

    pub fn status(&self) -> Value {
        let mut details = json!({"name": self.name});
        if let Some(k) = &self.kind {
            details["group"] = json!(k.group);
            details["kind"] = json!(k.plural);
        }
        json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
               "message": self.message, "reason": self.reason, "details": details,
               "code": self.code})
    }
}

pub type Key = (String, String, String, String);

/// How a write treats an existing object.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Write {
    /// POST: the object must not exist.
    Create,
    /// PUT: the object must exist.
    Replace,
    /// Direct test setup: create or overwrite everything, status included.
    Force,
}

pub struct State {
    pub kinds: Vec<Kind>,
    pub objects: BTreeMap<Key, Value>,
    pub rv: u64,
    pub history: Vec<Event>,
    pub requests: Vec<RecordedRequest>,
    pub failures: Vec<Failure>,
    /// `ns/pod:port/path` → (status, body) for the pods' `proxy` subresource.
    pub proxies: HashMap<String, (u16, String)>,
    /// `ns/pod` → port → where the `portforward` subresource connects for that port.
    pub port_forwards: HashMap<String, HashMap<u16, std::net::SocketAddr>>,
    /// Permissions the fake's user lacks; everything else is allowed.
    pub denied: Vec<AccessRule>,
    uid: u64,
}

/// A permission SelfSubjectAccessReview answers `allowed: false` for: `verb` on `resource`
/// (`"pods/portforward"` for a subresource), in `namespace` or (None) everywhere.
#[derive(Clone, Debug)]
pub struct AccessRule {
    pub verb: String,
    pub resource: String,
    pub namespace: Option<String>,
}

impl Default for State {
    fn default() -> State {
        State {
            kinds: kinds::builtin(),
            objects: BTreeMap::new(),
            rv: 1000,
            history: Vec::new(),
            requests: Vec::new(),
            failures: Vec::new(),
            proxies: HashMap::new(),
            port_forwards: HashMap::new(),
            denied: Vec::new(),
            uid: 0,
        }
    }
}

pub fn key(kind: &Kind, ns: &str, name: &str) -> Key {
    let ns = if kind.namespaced { ns } else { "" };
    (
        kind.group.clone(),
        kind.plural.clone(),
        ns.to_string(),
        name.to_string(),
    )
}

/// Everything but metadata and status: a change here bumps `metadata.generation`.
fn spec_part(obj: &Value) -> Value {
    let mut v = obj.clone();
    if let Some(m) = v.as_object_mut() {
        for k in ["metadata", "status", "apiVersion", "kind"] {
            m.remove(k);
        }
    }
    v
}

fn now() -> String {
    time::OffsetDateTime::now_utc()
        .replace_nanosecond(0)
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_else(|| "2026-01-01T00:00:00Z".to_string())
}

impl State {
    /// The answer to a SelfSubjectAccessReview: `review` with `status.allowed` from
    /// [`State::denied`]; it is not stored.
    pub fn access_review(
        &self,
        kind: &Kind,
        version: &str,
        review: Value,
    ) -> Result<Value, ApiError> {
        let Value::Object(mut obj) = review else {
            return Err(ApiError::new(
                400,
                "BadRequest",
                "the review is not a JSON object",
            ));
        };
        let attrs = obj
            .get("spec")
            .and_then(|s| s.get("resourceAttributes"))
            .cloned()
            .ok_or_else(|| {
                ApiError::new(422, "Invalid", "spec.resourceAttributes: Required value")
            })?;
        let field = |k: &str| {
            attrs
                .get(k)
                .and_then(Value::as_str)
                .unwrap_or("")
                .to_string()
        };
        let (verb, sub, ns) = (field("verb"), field("subresource"), field("namespace"));
        let resource = if sub.is_empty() {
            field("resource")
        } else {
            format!("{}/{sub}", field("resource"))
        };
        let denied = self.denied.iter().any(|r| {
            r.verb == verb
                && r.resource == resource
                && r.namespace.as_ref().is_none_or(|n| *n == ns)
        });
        obj.insert(
            "apiVersion".into(),
            Value::String(kind.api_version(version)),
        );
        obj.insert("kind".into(), Value::String(kind.kind.clone()));
        obj.insert(
            "status".into(),
            serde_json::json!({
                "allowed": !denied,
                "reason": if denied { "denied by the fake API server's access rules" } else { "" },
            }),
        );
        Ok(Value::Object(obj))
    }

    /// The kind of `apiVersion`/`kind` (`apps/v1`, `Deployment`).
    pub fn kind_of(&self, api_version: &str, kind: &str) -> Option<Kind> {
        let (group, _) = api_version.rsplit_once('/').unwrap_or(("", api_version));
        self.kinds
            .iter()
            .find(|k| k.group == group && k.kind == kind)
            .cloned()
    }

    /// The kind served at `group/version/plural`.
    pub fn kind_at(&self, group: &str, version: &str, plural: &str) -> Option<Kind> {
        self.kinds
            .iter()
            .find(|k| {
                k.group == group && k.plural == plural && k.versions.iter().any(|v| v == version)
            })
            .cloned()
    }

    /// A stored object as served at `version`.
    pub fn view(kind: &Kind, version: &str, obj: &Value) -> Value {
        let mut o = obj.clone();
        o["apiVersion"] = json!(kind.api_version(version));
        o["kind"] = json!(kind.kind);
        o
    }

    pub fn list(&self, kind: &Kind, ns: Option<&str>) -> Vec<Value> {
        self.objects
            .iter()
            .filter(|((g, p, n, _), _)| {
                *g == kind.group && *p == kind.plural && ns.is_none_or(|ns| ns == n)
            })
            .map(|(_, v)| v.clone())
            .collect()
    }

    fn bump(&mut self) -> u64 {
        self.rv += 1;
        self.rv
    }

    fn record(&mut self, kind: &Kind, ns: &str, ev: &'static str, object: &Value) -> Event {
        let e = Event {
            rv: self.rv,
            group: kind.group.clone(),
            plural: kind.plural.clone(),
            namespace: ns.to_string(),
            kind: ev,
            object: object.clone(),
        };
        self.history.push(e.clone());
        e
    }

    /// Creates or updates an object; returns it as stored and the event to broadcast (none on
    /// a dry run).
    pub fn write(
        &mut self,
        kind: &Kind,
        ns: &str,
        mut obj: Value,
        mode: Write,
        dry_run: bool,
    ) -> Result<(Value, Option<Event>), ApiError> {
        if !obj.is_object() {
            return Err(ApiError::new(
                400,
                "BadRequest",
                "the body must be an object",
            ));
        }
        if obj
            .pointer("/metadata/name")
            .and_then(Value::as_str)
            .is_none()
        {
            if let Some(prefix) = obj
                .pointer("/metadata/generateName")
                .and_then(Value::as_str)
            {
                self.uid += 1;
                obj["metadata"]["name"] = json!(format!("{prefix}{:05x}", self.uid));
            } else {
                return Err(ApiError::new(
                    400,
                    "Invalid",
                    format!("{} is invalid: metadata.name: Required value", kind.kind),
                ));
            }
        }
        let name = obj["metadata"]["name"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        if kind.namespaced {
            match obj.pointer("/metadata/namespace").and_then(Value::as_str) {
                Some(n) if n != ns => {
                    return Err(ApiError::new(
                        400,
                        "BadRequest",
                        format!(
                            "the namespace of the object ({n}) does not match the namespace on the request ({ns})"
                        ),
                    ));
                }
                _ => obj["metadata"]["namespace"] = json!(ns),
            }
            if mode != Write::Force && !self.objects.contains_key(&namespace_key(ns)) {
                let nsk = self.kind_of("v1", "Namespace").expect("builtin kind");
                return Err(ApiError::not_found(&nsk, ns));
            }
        }
        let k = key(kind, ns, &name);
        let old = self.objects.get(&k).cloned();
        match (mode, &old) {
            (Write::Create, Some(_)) => {
                return Err(ApiError::new(
                    409,
                    "AlreadyExists",
                    format!("{} \"{name}\" already exists", kind.qualified_plural()),
                )
                .about(kind, &name));
            }
            (Write::Replace, None) => return Err(ApiError::not_found(kind, &name)),
            _ => {}
        }
        let m = obj["metadata"].as_object_mut().expect("checked object");
        match &old {
            Some(old) => {
                for f in ["uid", "creationTimestamp"] {
                    if let Some(v) = old["metadata"].get(f) {
                        m.insert(f.into(), v.clone());
                    }
                }
                let generation = old["metadata"]["generation"].as_i64().unwrap_or(1);
                let changed = spec_part(old) != spec_part(&obj);
                obj["metadata"]["generation"] = json!(generation + i64::from(changed));
                // The main resource does not write status (the status subresource does).
                if mode != Write::Force {
                    match old.get("status") {
                        Some(s) => obj["status"] = s.clone(),
                        None => {
                            if let Some(o) = obj.as_object_mut() {
                                o.remove("status");
                            }
                        }
                    }
                }
            }
            None => {
                self.uid += 1;
                m.insert(
                    "uid".into(),
                    json!(format!("00000000-0000-0000-0000-{:012}", self.uid)),
                );
                m.insert("creationTimestamp".into(), json!(now()));
                m.insert("generation".into(), json!(1));
            }
        }
        self.finish(kind, ns, k, obj, old.is_some(), dry_run)
    }

    /// Updates only `.status` of an existing object.
    pub fn write_status(
        &mut self,
        kind: &Kind,
        ns: &str,
        name: &str,
        status: Option<Value>,
        dry_run: bool,
    ) -> Result<(Value, Option<Event>), ApiError> {
        let k = key(kind, ns, name);
        let mut obj = self
            .objects
            .get(&k)
            .cloned()
            .ok_or_else(|| ApiError::not_found(kind, name))?;
        match status {
            Some(s) => obj["status"] = s,
            None => {
                if let Some(o) = obj.as_object_mut() {
                    o.remove("status");
                }
            }
        }
        self.finish(kind, ns, k, obj, true, dry_run)
    }

    fn finish(
        &mut self,
        kind: &Kind,
        ns: &str,
        k: Key,
        mut obj: Value,
        existed: bool,
        dry_run: bool,
    ) -> Result<(Value, Option<Event>), ApiError> {
        if dry_run {
            return Ok((obj, None));
        }
        let rv = self.bump();
        obj["metadata"]["resourceVersion"] = json!(rv.to_string());
        if kind.group == "apiextensions.k8s.io" {
            self.register_crd(&mut obj);
        }
        self.objects.insert(k, obj.clone());
        let ev = self.record(kind, ns, if existed { "MODIFIED" } else { "ADDED" }, &obj);
        Ok((obj, Some(ev)))
    }

    /// A CRD makes its kind served and is immediately Established (as on a real server a
    /// moment later).
    fn register_crd(&mut self, crd: &mut Value) {
        let Some(new) = kinds::from_crd(crd) else {
            return;
        };
        self.kinds
            .retain(|k| !(k.group == new.group && k.plural == new.plural));
        crd["status"] = json!({
            "conditions": [
                {"type": "NamesAccepted", "status": "True", "reason": "NoConflicts",
                 "lastTransitionTime": now()},
                {"type": "Established", "status": "True", "reason": "InitialNamesAccepted",
                 "lastTransitionTime": now()}
            ],
            "acceptedNames": crd["spec"]["names"].clone(),
            "storedVersions": [new.versions[0].clone()],
        });
        self.kinds.push(new);
    }

    /// Deletes an object (a namespace takes its objects with it, a CRD its kind and objects).
    pub fn delete(
        &mut self,
        kind: &Kind,
        ns: &str,
        name: &str,
        dry_run: bool,
    ) -> Result<(Value, Vec<Event>), ApiError> {
        let k = key(kind, ns, name);
        let obj = self
            .objects
            .get(&k)
            .cloned()
            .ok_or_else(|| ApiError::not_found(kind, name))?;
        if dry_run {
            return Ok((obj, Vec::new()));
        }
        let mut events = Vec::new();
        let mut doomed: Vec<Key> = Vec::new();
        if kind.group.is_empty() && kind.plural == "namespaces" {
            doomed.extend(
                self.objects
                    .keys()
                    .filter(|(_, _, n, _)| n == name)
                    .cloned(),
            );
        }
        if kind.group == "apiextensions.k8s.io"
            && let Some(defined) = kinds::from_crd(&obj)
        {
            doomed.extend(
                self.objects
                    .keys()
                    .filter(|(g, p, _, _)| *g == defined.group && *p == defined.plural)
                    .cloned(),
            );
            self.kinds.retain(|k| {
                !(k.from_crd && k.group == defined.group && k.plural == defined.plural)
            });
        }
        doomed.push(k);
        for dk in doomed {
            if let Some(mut o) = self.objects.remove(&dk) {
                let rv = self.bump();
                o["metadata"]["resourceVersion"] = json!(rv.to_string());
                let dkind = self
                    .kinds
                    .iter()
                    .find(|x| x.group == dk.0 && x.plural == dk.1)
                    .cloned()
                    .unwrap_or_else(|| kind.clone());
                events.push(self.record(&dkind, &dk.2, "DELETED", &o));
            }
        }
        Ok((obj, events))
    }

    /// Applies a patch of `content_type` to the object (server-side apply creates it).
    #[allow(clippy::too_many_arguments)]
    pub fn patch(
        &mut self,
        kind: &Kind,
        ns: &str,
        name: &str,
        content_type: &str,
        body: &Value,
        status_only: bool,
        dry_run: bool,
    ) -> Result<(Value, Option<Event>), ApiError> {
        let k = key(kind, ns, name);
        let apply = content_type.starts_with("application/apply-patch");
        let existing = self.objects.get(&k).cloned();
        let mut obj = match (&existing, apply) {
            (Some(o), _) => o.clone(),
            (None, true) if !status_only => json!({"metadata": {"name": name}}),
            (None, _) => return Err(ApiError::not_found(kind, name)),
        };
        if content_type.starts_with("application/json-patch") {
            patch::json_patch(&mut obj, body)
                .map_err(|e| ApiError::new(422, "Invalid", format!("invalid JSON patch: {e}")))?;
        } else {
            patch::merge(&mut obj, body);
        }
        if obj.pointer("/metadata/name").and_then(Value::as_str) != Some(name) {
            return Err(ApiError::new(
                400,
                "BadRequest",
                format!("the name of the object does not match the name on the URL ({name})"),
            ));
        }
        if status_only {
            return self.write_status(kind, ns, name, obj.get("status").cloned(), dry_run);
        }
        let mode = if existing.is_some() {
            Write::Replace
        } else {
            Write::Create
        };
        self.write(kind, ns, obj, mode, dry_run)
    }

    pub fn failure_for(&self, method: &str, path: &str) -> Option<u16> {
        self.failures
            .iter()
            .find(|f| {
                (f.method == "*" || f.method.eq_ignore_ascii_case(method))
                    && path.starts_with(&f.path_prefix)
            })
            .map(|f| f.status)
    }
}

fn namespace_key(ns: &str) -> Key {
    (String::new(), "namespaces".into(), String::new(), ns.into())
}
