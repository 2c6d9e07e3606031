//! `zmesh enroll NS` / `zmesh unenroll NS`: the namespace label `istio.io/dataplane-mode=ambient`
//! that puts a namespace's pods in the mesh (Istio's opt-in, so existing tooling agrees).
//!
//! A JSON merge patch touches only that label (a `null` value removes it), so other labels and
//! concurrent writers are left alone, and enrolling twice is harmless.

use kube::api::{Patch, PatchParams};
use serde_json::{Value, json};

use crate::error::CliError;
use crate::kube::{Kube, NAMESPACE, Op};
use crate::output::print;

pub const DATAPLANE_MODE: &str = "istio.io/dataplane-mode";
pub const AMBIENT: &str = "ambient";
pub const USE_WAYPOINT: &str = "istio.io/use-waypoint";

/// Set (`Some`) or remove (`None`) one label of a namespace with a merge patch. A missing
/// namespace is reported as such.
pub async fn label_namespace(
    kube: &Kube,
    namespace: &str,
    key: &str,
    value: Option<&str>,
) -> Result<Value, CliError> {
    let api = kube.dynamic(&NAMESPACE.api_resource(), None);
    let op = Op::new("patch", "namespaces", None, Some(namespace));
    let patch = json!({"metadata": {"labels": {key: value}}});
    let obj = api
        .patch(namespace, &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .map_err(|e| match kube.error(&op, e) {
            CliError::NotFound { .. } => CliError::NamespaceNotFound(namespace.to_string()),
            other => other,
        })?;
    Ok(serde_json::to_value(obj).unwrap_or_default())
}

pub async fn enroll(kube: &Kube, namespace: &str) -> Result<(), CliError> {
    label_namespace(kube, namespace, DATAPLANE_MODE, Some(AMBIENT)).await?;
    print(&format!(
        "namespace/{namespace} enrolled ({DATAPLANE_MODE}={AMBIENT}): its pods' traffic now goes through ztunnel\n"
    ))
}

pub async fn unenroll(kube: &Kube, namespace: &str) -> Result<(), CliError> {
    label_namespace(kube, namespace, DATAPLANE_MODE, None).await?;
    print(&format!(
        "namespace/{namespace} unenrolled ({DATAPLANE_MODE} removed)\n"
    ))
}
