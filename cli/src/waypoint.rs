//! `zmesh waypoint …`: waypoints are Gateway API `Gateway`s of class `istio-waypoint` with one
//! `mesh` listener (15008, HBONE) — the object `istioctl waypoint generate` prints — so
//! existing Istio YAML and tools keep working. The controller turns each into a Deployment,
//! Service and ServiceAccount and reports back through the Gateway's `Programmed` condition.

use std::time::{Duration, Instant};

use kube::api::DeleteParams;
use kube::discovery::Scope;
use serde_json::{Value, json};

use crate::enroll::{USE_WAYPOINT, label_namespace};
use crate::error::CliError;
use crate::install::{Poll, parse_duration, wait_until};
use crate::kube::{GATEWAY, Kube, NAMESPACE, Op, condition, found};
use crate::output::{Format, Progress, Table, age, print, structured};

pub const WAYPOINT_CLASS: &str = "istio-waypoint";
pub const WAYPOINT_FOR: &str = "istio.io/waypoint-for";
const REVISION: &str = "istio.io/rev";

#[derive(clap::Subcommand, Debug)]
pub enum WaypointCommand {
    /// Create or update a namespace's waypoint (server-side apply of its Gateway).
    #[command(after_help = "Examples:\n  \
        zmesh waypoint apply -n shop                       the waypoint `waypoint` in shop\n  \
        zmesh waypoint apply -n shop --enroll-namespace    ...and send shop's traffic through it\n  \
        zmesh waypoint apply -n shop --name reviews-wp --wait")]
    Apply(ApplyArgs),
    /// Print a waypoint's Gateway YAML (no cluster needed).
    #[command(
        after_help = "Example:\n  zmesh waypoint generate -n shop > waypoint.yaml && kubectl apply -f waypoint.yaml"
    )]
    Generate(GenerateArgs),
    /// List waypoints (in the namespace, or all namespaces with -A).
    #[command(
        after_help = "Examples:\n  zmesh waypoint list -n shop\n  zmesh waypoint list -A -o yaml"
    )]
    List(ListArgs),
    /// Delete waypoints of a namespace.
    #[command(
        after_help = "Examples:\n  zmesh waypoint delete -n shop\n  zmesh waypoint delete -n shop reviews-wp\n  zmesh waypoint delete -n shop --all"
    )]
    Delete(DeleteArgs),
    /// Show a waypoint's status conditions (Accepted, Programmed) as written by the controller.
    #[command(after_help = "Example:\n  zmesh waypoint status -n shop")]
    Status(StatusArgs),
}

/// Which traffic a waypoint handles (Istio's `istio.io/waypoint-for` label).
#[derive(clap::ValueEnum, Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum TrafficType {
    #[default]
    Service,
    Workload,
    All,
    None,
}

impl TrafficType {
    fn label(self) -> &'static str {
        match self {
            TrafficType::Service => "service",
            TrafficType::Workload => "workload",
            TrafficType::All => "all",
            TrafficType::None => "none",
        }
    }
}

#[derive(clap::Args, Debug)]
pub struct GenerateArgs {
    /// The waypoint's name.
    #[arg(long, default_value = "waypoint")]
    pub name: String,
    /// Traffic the waypoint handles.
    #[arg(long = "for", value_enum, default_value_t)]
    pub traffic_type: TrafficType,
}

#[derive(clap::Args, Debug)]
pub struct ApplyArgs {
    #[command(flatten)]
    pub gateway: GenerateArgs,
    /// Also label the namespace istio.io/use-waypoint=NAME so its services use the waypoint.
    #[arg(long)]
    pub enroll_namespace: bool,
    /// Wait until the controller reports the waypoint Programmed.
    #[arg(long)]
    pub wait: bool,
    /// How long --wait waits (e.g. 90s, 5m).
    #[arg(long, default_value = "5m", value_parser = parse_duration)]
    pub timeout: Duration,
}

#[derive(clap::Args, Debug)]
pub struct ListArgs {
    /// List waypoints in all namespaces.
    #[arg(short = 'A', long)]
    pub all_namespaces: bool,
}

#[derive(clap::Args, Debug)]
pub struct DeleteArgs {
    /// Waypoints to delete (default: `waypoint`).
    pub names: Vec<String>,
    /// Delete every waypoint of the namespace.
    #[arg(long, conflicts_with = "names")]
    pub all: bool,
}

#[derive(clap::Args, Debug)]
pub struct StatusArgs {
    /// The waypoint's name.
    #[arg(long, default_value = "waypoint")]
    pub name: String,
}

/// The waypoint Gateway, exactly as `istioctl waypoint generate` shapes it.
pub fn gateway(name: &str, namespace: &str, traffic_type: TrafficType) -> Value {
    json!({
        "apiVersion": "gateway.networking.k8s.io/v1",
        "kind": "Gateway",
        "metadata": {
            "name": name,
            "namespace": namespace,
            "labels": {WAYPOINT_FOR: traffic_type.label()},
        },
        "spec": {
            "gatewayClassName": WAYPOINT_CLASS,
            "listeners": [{"name": "mesh", "port": 15008, "protocol": "HBONE"}],
        },
    })
}

pub fn generate(args: &GenerateArgs, namespace: &str, format: Format) -> Result<(), CliError> {
    let format = if format == Format::Table {
        Format::Yaml
    } else {
        format
    };
    print(&structured(
        format,
        &gateway(&args.name, namespace, args.traffic_type),
    )?)
}

async fn require_namespace(kube: &Kube, namespace: &str) -> Result<(), CliError> {
    match kube.get_opt(&NAMESPACE, None, namespace).await? {
        Some(_) => Ok(()),
        None => Err(CliError::NamespaceNotFound(namespace.to_string())),
    }
}

pub async fn apply(kube: &Kube, args: &ApplyArgs) -> Result<(), CliError> {
    let ns = kube.namespace.as_str();
    let name = args.gateway.name.as_str();
    // A Gateway in a missing namespace would be refused anyway; saying so up front is clearer
    // than the API server's reply about the Gateway.
    require_namespace(kube, ns).await?;
    let gw = gateway(name, ns, args.gateway.traffic_type);
    kube.apply(&GATEWAY.api_resource(), &Scope::Namespaced, &gw)
        .await?;
    print(&format!("waypoint {ns}/{name} applied\n"))?;
    if args.enroll_namespace {
        label_namespace(kube, ns, USE_WAYPOINT, Some(name)).await?;
        print(&format!(
            "namespace/{ns} labelled {USE_WAYPOINT}={name}: its services now use the waypoint\n"
        ))?;
    }
    if args.wait {
        let mut progress = Progress::new();
        let what = format!("waypoint {ns}/{name}");
        wait_until(
            &mut progress,
            Instant::now() + args.timeout,
            args.timeout,
            &what,
            async || programmed(kube, ns, name).await,
        )
        .await?;
        progress.done(&format!("{what} programmed"));
    }
    Ok(())
}

async fn programmed(kube: &Kube, ns: &str, name: &str) -> Result<Poll, CliError> {
    let Some(obj) = kube.get_opt(&GATEWAY, Some(ns), name).await? else {
        return Ok(Poll::Pending("the Gateway is gone".into()));
    };
    let v = serde_json::to_value(obj).unwrap_or_default();
    Ok(match condition(&v, "Programmed") {
        Some(c) if c.get("status").and_then(Value::as_str) == Some("True") => Poll::Ready,
        Some(c) => Poll::Pending(format!(
            "Programmed={} {}",
            c.get("status").and_then(Value::as_str).unwrap_or("Unknown"),
            c.get("message")
                .or_else(|| c.get("reason"))
                .and_then(Value::as_str)
                .unwrap_or_default()
        )),
        None => Poll::Pending("no Programmed condition yet (is zmesh-controller running?)".into()),
    })
}

fn is_waypoint(v: &Value) -> bool {
    v.pointer("/spec/gatewayClassName").and_then(Value::as_str) == Some(WAYPOINT_CLASS)
}

/// The waypoint Gateways of a namespace (or all namespaces), as JSON.
pub async fn waypoints(kube: &Kube, namespace: Option<&str>) -> Result<Vec<Value>, CliError> {
    let items = kube.list(&GATEWAY, namespace, None).await?;
    let mut out: Vec<Value> = items
        .into_iter()
        .filter_map(|o| serde_json::to_value(o).ok())
        .filter(is_waypoint)
        .collect();
    out.sort_by(|a, b| {
        let key = |v: &Value| {
            (
                v.pointer("/metadata/namespace")
                    .and_then(Value::as_str)
                    .unwrap_or_default()
                    .to_string(),
                v.pointer("/metadata/name")
                    .and_then(Value::as_str)
                    .unwrap_or_default()
                    .to_string(),
            )
        };
        key(a).cmp(&key(b))
    });
    Ok(out)
}

fn str_at<'a>(v: &'a Value, p: &str) -> &'a str {
    v.pointer(p).and_then(Value::as_str).unwrap_or_default()
}

/// `True`/`False`/`Unknown` of a condition, `Unknown` when absent.
pub fn condition_status(v: &Value, type_: &str) -> String {
    condition(v, type_)
        .and_then(|c| c.get("status"))
        .and_then(Value::as_str)
        .unwrap_or("Unknown")
        .to_string()
}

pub fn list_table(
    items: &[Value],
    all_namespaces: bool,
    now: k8s_openapi::jiff::Timestamp,
) -> Table {
    let mut headers = vec!["name", "revision", "programmed", "age"];
    if all_namespaces {
        headers.insert(0, "namespace");
    }
    let mut t = Table::new(&headers);
    for v in items {
        let created = v
            .pointer("/metadata/creationTimestamp")
            .and_then(Value::as_str)
            .and_then(|s| s.parse().ok());
        let revision = v
            .pointer("/metadata/labels")
            .and_then(|l| l.get(REVISION))
            .and_then(Value::as_str)
            .unwrap_or("default");
        let mut row = vec![
            str_at(v, "/metadata/name").to_string(),
            revision.to_string(),
            condition_status(v, "Programmed"),
            age(created, now),
        ];
        if all_namespaces {
            row.insert(0, str_at(v, "/metadata/namespace").to_string());
        }
        t.row(row);
    }
    t
}

/// Objects as kubectl prints a list with `-o yaml|json`.
pub fn as_list(items: Vec<Value>) -> Value {
    json!({"apiVersion": "v1", "kind": "List", "items": items})
}

pub async fn list(kube: &Kube, args: &ListArgs, format: Format) -> Result<(), CliError> {
    let ns = (!args.all_namespaces).then_some(kube.namespace.as_str());
    let items = waypoints(kube, ns).await?;
    if format != Format::Table {
        return print(&structured(format, &as_list(items))?);
    }
    if items.is_empty() {
        match ns {
            Some(ns) => eprintln!("No waypoints found in namespace {ns}."),
            None => eprintln!("No waypoints found."),
        }
        return Ok(());
    }
    print(
        &list_table(
            &items,
            args.all_namespaces,
            k8s_openapi::jiff::Timestamp::now(),
        )
        .render(),
    )
}

pub async fn delete(kube: &Kube, args: &DeleteArgs) -> Result<(), CliError> {
    let ns = kube.namespace.as_str();
    let names: Vec<String> = if args.all {
        waypoints(kube, Some(ns))
            .await?
            .iter()
            .map(|v| str_at(v, "/metadata/name").to_string())
            .collect()
    } else if args.names.is_empty() {
        vec!["waypoint".to_string()]
    } else {
        args.names.clone()
    };
    if names.is_empty() {
        eprintln!("No waypoints found in namespace {ns}.");
        return Ok(());
    }
    let api = kube.dynamic(&GATEWAY.api_resource(), Some(ns));
    for name in &names {
        // Only delete Gateways that are waypoints: an ingress Gateway of the same name is
        // someone else's.
        let Some(obj) = kube.get_opt(&GATEWAY, Some(ns), name).await? else {
            return Err(CliError::NotFound {
                what: format!("waypoint {name:?} in namespace {ns:?}"),
            });
        };
        if !is_waypoint(&serde_json::to_value(obj).unwrap_or_default()) {
            return Err(CliError::Failed(format!(
                "Gateway {ns}/{name} is not a waypoint (its gatewayClassName is not {WAYPOINT_CLASS}); not deleting it"
            )));
        }
        let op = Op::new("delete", GATEWAY.resource_name(), Some(ns), Some(name));
        found(
            api.delete(name, &DeleteParams::background())
                .await
                .map_err(|e| kube.error(&op, e)),
        )?;
        print(&format!("waypoint {ns}/{name} deleted\n"))?;
    }
    if let Some(nsobj) = kube.get_opt(&NAMESPACE, None, ns).await? {
        let v = serde_json::to_value(nsobj).unwrap_or_default();
        let label = v
            .pointer("/metadata/labels")
            .and_then(|l| l.get(USE_WAYPOINT))
            .and_then(Value::as_str);
        if let Some(label) = label.filter(|l| names.iter().any(|n| n == l)) {
            eprintln!(
                "note: namespace {ns} still has {USE_WAYPOINT}={label}; its traffic waits for a waypoint \
                 that no longer exists (remove it with: kubectl label namespace {ns} {USE_WAYPOINT}-)"
            );
        }
    }
    Ok(())
}

pub async fn status(kube: &Kube, args: &StatusArgs, format: Format) -> Result<(), CliError> {
    let ns = kube.namespace.as_str();
    let Some(obj) = kube.get_opt(&GATEWAY, Some(ns), &args.name).await? else {
        return Err(CliError::NotFound {
            what: format!("waypoint {:?} in namespace {ns:?}", args.name),
        });
    };
    let v = serde_json::to_value(obj).unwrap_or_default();
    if format != Format::Table {
        let status = v.get("status").cloned().unwrap_or(Value::Null);
        return print(&structured(format, &status)?);
    }
    print(&status_table(&v).render())
}

pub fn status_table(v: &Value) -> Table {
    let mut t = Table::new(&["namespace", "name", "status", "type", "reason", "message"]);
    let ns = str_at(v, "/metadata/namespace").to_string();
    let name = str_at(v, "/metadata/name").to_string();
    let conditions = v
        .pointer("/status/conditions")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    if conditions.is_empty() {
        t.row(vec![
            ns,
            name,
            "Unknown".into(),
            "-".into(),
            "-".into(),
            "no status yet (is zmesh-controller running?)".into(),
        ]);
        return t;
    }
    for c in &conditions {
        t.row(vec![
            ns.clone(),
            name.clone(),
            str_at(c, "/status").to_string(),
            str_at(c, "/type").to_string(),
            str_at(c, "/reason").to_string(),
            crate::error::one_line(str_at(c, "/message")),
        ]);
    }
    t
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_yaml_matches_istioctl() {
        let gw = gateway("waypoint", "shop", TrafficType::Service);
        assert_eq!(
            structured(Format::Yaml, &gw).unwrap(),
            "apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata:
  labels:
    istio.io/waypoint-for: service
  name: waypoint
  namespace: shop
spec:
  gatewayClassName: istio-waypoint
  listeners:
  - name: mesh
    port: 15008
    protocol: HBONE
"
        );
    }

    #[test]
    fn list_and_status_tables() {
        let now: k8s_openapi::jiff::Timestamp = "2026-01-01T01:00:00Z".parse().unwrap();
        let mut a = gateway("waypoint", "shop", TrafficType::Service);
        a["metadata"]["creationTimestamp"] = json!("2026-01-01T00:00:00Z");
        a["status"] = json!({"conditions": [
            {"type": "Accepted", "status": "True", "reason": "Accepted", "message": ""},
            {"type": "Programmed", "status": "True", "reason": "Programmed", "message": "ready"}]});
        let mut b = gateway("reviews", "bookinfo", TrafficType::Service);
        b["metadata"]["labels"][REVISION] = json!("canary");
        assert_eq!(
            list_table(&[b.clone(), a.clone()], true, now).render(),
            "NAMESPACE   NAME       REVISION   PROGRAMMED   AGE\n\
             bookinfo    reviews    canary     Unknown      <unknown>\n\
             shop        waypoint   default    True         60m\n"
        );
        assert_eq!(
            list_table(&[a.clone()], false, now).render(),
            "NAME       REVISION   PROGRAMMED   AGE\nwaypoint   default    True         60m\n"
        );
        assert_eq!(
            status_table(&a).render(),
            "NAMESPACE   NAME       STATUS   TYPE         REASON       MESSAGE\n\
             shop        waypoint   True     Accepted     Accepted\n\
             shop        waypoint   True     Programmed   Programmed   ready\n"
        );
        assert!(status_table(&b).render().contains("no status yet"));
    }
}
