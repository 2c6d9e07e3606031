//! `zmesh config-dump (ztunnel|waypoint|controller) POD`: a component's `/config_dump` (admin port 15000),
//! fetched through the API server's `pods/portforward` subresource (see [`crate::portforward`]):
//! the admin server listens on the pod's loopback only, which port-forward reaches and the pod
//! proxy subresource (it dials the pod IP) does not.

use std::time::Duration;

use serde_json::Value;

use crate::error::CliError;
use crate::install::parse_duration;
use crate::kube::Kube;
use crate::output::{Format, print, structured};
use crate::portforward;

pub const ADMIN_PORT: u16 = 15000;

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Component {
    Ztunnel,
    Waypoint,
    /// zmesh-controller: what it serves, to which proxies, their ACK/NACK, its CA root.
    Controller,
}

#[derive(clap::Args, Debug)]
pub struct ConfigDumpArgs {
    /// Which component the pod runs.
    #[arg(value_enum)]
    pub component: Component,
    /// The pod (a ztunnel or controller pod defaults to zmesh's namespace, a waypoint pod to
    /// -n / the context's namespace).
    pub pod: String,
    /// How long to wait for the port-forward and the answer (e.g. 30s, 1m).
    #[arg(long, default_value = "15s", value_parser = parse_duration)]
    pub timeout: Duration,
}

/// A pod name is a DNS subdomain; anything else could change the request path.
fn valid_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 253
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
}

/// Parse the body of `/config_dump`.
pub fn parse_dump(namespace: &str, pod: &str, body: &[u8]) -> Result<Value, CliError> {
    serde_json::from_slice(body).map_err(|e| CliError::Failed(format!(
        "pod {namespace}/{pod}: /config_dump is not JSON ({e}); is port {ADMIN_PORT} a zmesh admin port?"
    )))
}

/// GET `/config_dump` of a pod's admin port through port-forward.
pub async fn fetch(
    kube: &Kube,
    namespace: &str,
    pod: &str,
    timeout: Duration,
) -> Result<Value, CliError> {
    if !valid_name(pod) || !valid_name(namespace) {
        return Err(CliError::Usage(format!(
            "{namespace}/{pod} is not a valid pod name (lowercase letters, digits, '-' and '.')"
        )));
    }
    let body = portforward::get(kube, namespace, pod, ADMIN_PORT, "/config_dump", timeout).await?;
    parse_dump(namespace, pod, &body)
}

pub async fn run(
    kube: &Kube,
    args: &ConfigDumpArgs,
    namespace: &str,
    format: Format,
) -> Result<(), CliError> {
    let dump = fetch(kube, namespace, &args.pod, args.timeout).await?;
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
    fn names() {
        assert!(valid_name("ztunnel-x.y"));
        assert!(!valid_name("a/../b"));
        assert!(!valid_name("A"));
        assert!(!valid_name(""));
    }

    #[test]
    fn dump_must_be_json() {
        assert!(parse_dump("ns", "p", b"{\"node\": \"n\"}").is_ok());
        let e = parse_dump("ns", "p", b"<html>").unwrap_err();
        assert!(
            e.to_string()
                .starts_with("pod ns/p: /config_dump is not JSON"),
            "{e}"
        );
    }
}
