//! `zmesh config-dump (ztunnel|waypoint) POD`: a proxy's `/config_dump` (admin port 15000),
//! fetched through the API server's pod proxy subresource
//! (`/api/v1/namespaces/NS/pods/POD:15000/proxy/config_dump`), so no port-forward or direct
//! network path to the pod is needed — only RBAC for `pods/proxy`.

use serde_json::Value;

use crate::error::CliError;
use crate::kube::{Kube, Op};
use crate::output::{Format, print, structured};

pub const ADMIN_PORT: u16 = 15000;

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Component {
    Ztunnel,
    Waypoint,
}

#[derive(clap::Args, Debug)]
pub struct ConfigDumpArgs {
    /// Which proxy the pod runs.
    #[arg(value_enum)]
    pub component: Component,
    /// The pod (a ztunnel pod defaults to zmesh's namespace, a waypoint pod to -n / the
    /// context's namespace).
    pub pod: String,
}

/// A pod name is a DNS subdomain; anything else could change the proxied path.
fn valid_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 253
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
}

/// The API server path that proxies to `path` on the pod's admin port.
pub fn proxy_path(namespace: &str, pod: &str, path: &str) -> String {
    format!("/api/v1/namespaces/{namespace}/pods/{pod}:{ADMIN_PORT}/proxy/{path}")
}

/// Parse the body of `/config_dump`.
pub fn parse_dump(namespace: &str, pod: &str, body: &str) -> Result<Value, CliError> {
    serde_json::from_str(body).map_err(|e| CliError::Failed(format!(
        "pod {namespace}/{pod}: /config_dump is not JSON ({e}); is port {ADMIN_PORT} a zmesh admin port?"
    )))
}

/// GET `/config_dump` of a pod through the API server.
pub async fn fetch(kube: &Kube, namespace: &str, pod: &str) -> Result<Value, CliError> {
    if !valid_name(pod) || !valid_name(namespace) {
        return Err(CliError::Usage(format!(
            "{namespace}/{pod} is not a valid pod name (lowercase letters, digits, '-' and '.')"
        )));
    }
    let op = Op::new(
        "get",
        format!("pods/proxy (port {ADMIN_PORT}, /config_dump)"),
        Some(namespace),
        Some(pod),
    );
    let body = kube
        .get_path(&proxy_path(namespace, pod, "config_dump"), &op)
        .await
        .map_err(|e| match e {
            // The pod exists but its admin port did not answer the API server.
            CliError::Api {
                code: 502..=504,
                message,
                ..
            } => CliError::Failed(format!(
                "pod {namespace}/{pod}: the API server could not reach admin port {ADMIN_PORT}: {message}"
            )),
            CliError::NotFound { .. } => CliError::NotFound {
                what: format!("pod {pod:?} in namespace {namespace:?}"),
            },
            other => other,
        })?;
    parse_dump(namespace, pod, &body)
}

pub async fn run(
    kube: &Kube,
    args: &ConfigDumpArgs,
    namespace: &str,
    format: Format,
) -> Result<(), CliError> {
    let dump = fetch(kube, namespace, &args.pod).await?;
    let format = if format == Format::Table {
        Format::Json
    } else {
        format
    };
    print(&structured(format, &dump)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_and_names() {
        assert_eq!(
            proxy_path("zmesh-system", "ztunnel-abcde", "config_dump"),
            "/api/v1/namespaces/zmesh-system/pods/ztunnel-abcde:15000/proxy/config_dump"
        );
        assert!(valid_name("ztunnel-x.y"));
        assert!(!valid_name("a/../b"));
        assert!(!valid_name("A"));
        assert!(!valid_name(""));
    }

    #[test]
    fn dump_must_be_json() {
        assert!(parse_dump("ns", "p", "{\"node\": \"n\"}").is_ok());
        let e = parse_dump("ns", "p", "<html>").unwrap_err();
        assert!(
            e.to_string()
                .starts_with("pod ns/p: /config_dump is not JSON"),
            "{e}"
        );
    }
}
