//! `zmesh status`: is the mesh healthy? The controller Deployment's readiness, one ztunnel per
//! node (with its workload certificates' next expiry, read from its `/config_dump` on the
//! loopback-only admin port through port-forward), the waypoints, and the enrolled namespaces
//! with their pods.
//!
//! Object names come from the embedded manifests, so they cannot drift from what `install`
//! created. Exit status 1 when the controller or a ztunnel is not ready.

use std::sync::Arc;

use k8s_openapi::jiff::Timestamp;
use serde::Serialize;
use serde_json::Value;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;

use crate::config_dump;
use crate::enroll::{AMBIENT, DATAPLANE_MODE, USE_WAYPOINT};
use crate::error::CliError;
use crate::kube::{DEPLOYMENT, Kube, NAMESPACE, POD};
use crate::manifests;
use crate::output::{Format, Table, print, short_duration, structured};
use crate::portforward;
use crate::waypoint::{condition_status, waypoints};

/// Port-forwards open at once while collecting the ztunnels' config dumps.
const PARALLEL_DUMPS: usize = 16;

#[derive(Debug, Serialize)]
pub struct Report {
    pub controller: Controller,
    pub ztunnels: Vec<Ztunnel>,
    pub waypoints: Vec<Waypoint>,
    pub enrolled_namespaces: Vec<Enrolled>,
    pub notes: Vec<String>,
}

#[derive(Debug, Serialize)]
pub struct Controller {
    pub namespace: String,
    pub name: String,
    pub installed: bool,
    pub ready_replicas: i64,
    pub replicas: i64,
}

#[derive(Debug, Serialize)]
pub struct Ztunnel {
    pub node: String,
    pub pod: String,
    pub ready: bool,
    /// Workload certificates held, when its config dump could be read.
    pub certificates: Option<usize>,
    /// The earliest `not_after` of those certificates (RFC 3339).
    pub next_expiry: Option<String>,
}

#[derive(Debug, Serialize)]
pub struct Waypoint {
    pub namespace: String,
    pub name: String,
    pub programmed: String,
}

#[derive(Debug, Serialize)]
pub struct Enrolled {
    pub namespace: String,
    /// Pods in the mesh (not opted out with `istio.io/dataplane-mode=none`).
    pub pods: usize,
    pub opted_out: usize,
    pub waypoint: Option<String>,
}

fn s<'a>(v: &'a Value, p: &str) -> &'a str {
    v.pointer(p).and_then(Value::as_str).unwrap_or_default()
}

fn pod_ready(v: &Value) -> bool {
    crate::kube::condition_true(v, "Ready")
}

/// Count and earliest expiry of the certificates in a ztunnel `/config_dump`.
pub fn certificates(dump: &Value) -> (usize, Option<String>) {
    let certs = dump
        .get("certificates")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    let earliest = certs
        .iter()
        .filter_map(|c| c.get("not_after").and_then(Value::as_str))
        .filter_map(|t| t.parse::<Timestamp>().ok().map(|ts| (ts, t.to_string())))
        .min_by_key(|(ts, _)| *ts)
        .map(|(_, t)| t);
    (certs.len(), earliest)
}

pub async fn collect(kube: &Kube) -> Result<Report, CliError> {
    // Names and selectors as installed; fall back to the defaults if built without manifests.
    let docs = manifests::parse(manifests::files()).unwrap_or_default();
    let (ctl_ns, ctl_name) = manifests::find(&docs, "Deployment")
        .unwrap_or_else(|| ("zmesh-system".into(), "zmesh-controller".into()));
    let (zt_ns, _) = manifests::find(&docs, "DaemonSet")
        .unwrap_or_else(|| ("zmesh-system".into(), "ztunnel".into()));
    let zt_selector =
        manifests::selector(&docs, "DaemonSet").unwrap_or_else(|| "app=ztunnel".into());
    let mut notes = Vec::new();

    let controller = match kube.get_opt(&DEPLOYMENT, Some(&ctl_ns), &ctl_name).await {
        Ok(Some(d)) => {
            let v = serde_json::to_value(d).unwrap_or_default();
            Controller {
                namespace: ctl_ns,
                name: ctl_name,
                installed: true,
                ready_replicas: v
                    .pointer("/status/readyReplicas")
                    .and_then(Value::as_i64)
                    .unwrap_or(0),
                replicas: v
                    .pointer("/spec/replicas")
                    .and_then(Value::as_i64)
                    .unwrap_or(1),
            }
        }
        Ok(None) | Err(CliError::NamespaceNotFound(_)) => Controller {
            namespace: ctl_ns,
            name: ctl_name,
            installed: false,
            ready_replicas: 0,
            replicas: 0,
        },
        Err(e) => return Err(e),
    };

    let pods = match kube.list(&POD, Some(&zt_ns), Some(&zt_selector)).await {
        Ok(p) => p,
        Err(CliError::NamespaceNotFound(_)) => Vec::new(),
        Err(e) => return Err(e),
    };
    let mut ztunnels: Vec<Ztunnel> = pods
        .into_iter()
        .map(|p| serde_json::to_value(p).unwrap_or_default())
        .map(|v| Ztunnel {
            node: s(&v, "/spec/nodeName").to_string(),
            pod: s(&v, "/metadata/name").to_string(),
            ready: pod_ready(&v),
            certificates: None,
            next_expiry: None,
        })
        .collect();
    ztunnels.sort_by(|a, b| (&a.node, &a.pod).cmp(&(&b.node, &b.pod)));

    // Config dumps in parallel: one slow node must not multiply the wait. Bounded, because
    // each is a WebSocket through the API server and a cluster may have hundreds of nodes.
    let slots = Arc::new(Semaphore::new(PARALLEL_DUMPS));
    let mut dumps = JoinSet::new();
    for (i, z) in ztunnels.iter().enumerate() {
        let (kube, ns, pod, slots) = (kube.clone(), zt_ns.clone(), z.pod.clone(), slots.clone());
        dumps.spawn(async move {
            // The semaphore is never closed, so acquiring only waits.
            let _slot = slots.acquire_owned().await;
            let dump = config_dump::fetch(&kube, &ns, &pod, portforward::DEFAULT_TIMEOUT).await;
            (i, dump)
        });
    }
    let mut unreachable = Vec::new();
    while let Some(joined) = dumps.join_next().await {
        let Ok((i, result)) = joined else { continue };
        match result {
            Ok(dump) => {
                let (n, next) = certificates(&dump);
                ztunnels[i].certificates = Some(n);
                ztunnels[i].next_expiry = next;
            }
            Err(e) => unreachable.push(format!("{}: {}", ztunnels[i].pod, e.one_line())),
        }
    }
    if !unreachable.is_empty() {
        unreachable.sort();
        notes.push(format!(
            "certificate expiry unknown for {} ztunnel pod(s) (config_dump not reachable through port-forward to admin port {}): {}",
            unreachable.len(),
            config_dump::ADMIN_PORT,
            unreachable.join("; ")
        ));
    }

    let waypoints = match waypoints(kube, None).await {
        Ok(list) => list
            .iter()
            .map(|v| Waypoint {
                namespace: s(v, "/metadata/namespace").to_string(),
                name: s(v, "/metadata/name").to_string(),
                programmed: condition_status(v, "Programmed"),
            })
            .collect(),
        // Without the Gateway API CRDs there are no waypoints; `zmesh check` explains.
        Err(CliError::NotFound { .. }) => {
            notes.push("the Gateway API CRDs are not installed (see `zmesh check`)".into());
            Vec::new()
        }
        Err(e) => return Err(e),
    };

    let namespaces = kube
        .list(
            &NAMESPACE,
            None,
            Some(&format!("{DATAPLANE_MODE}={AMBIENT}")),
        )
        .await?;
    let mut enrolled = Vec::new();
    for ns in namespaces {
        let v = serde_json::to_value(ns).unwrap_or_default();
        let name = s(&v, "/metadata/name").to_string();
        let pods = kube.list(&POD, Some(&name), None).await?;
        let opted_out = pods
            .iter()
            .filter(|p| {
                p.metadata
                    .labels
                    .as_ref()
                    .and_then(|l| l.get(DATAPLANE_MODE))
                    .is_some_and(|m| m == "none")
            })
            .count();
        enrolled.push(Enrolled {
            waypoint: v
                .pointer("/metadata/labels")
                .and_then(|l| l.get(USE_WAYPOINT))
                .and_then(Value::as_str)
                .map(str::to_string),
            namespace: name,
            pods: pods.len() - opted_out,
            opted_out,
        });
    }
    enrolled.sort_by(|a, b| a.namespace.cmp(&b.namespace));

    Ok(Report {
        controller,
        ztunnels,
        waypoints,
        enrolled_namespaces: enrolled,
        notes,
    })
}

/// Problems that make `zmesh status` exit 1.
pub fn problems(r: &Report) -> Vec<String> {
    let mut p = Vec::new();
    if !r.controller.installed {
        p.push(format!(
            "the controller Deployment {}/{} does not exist (run `zmesh install`)",
            r.controller.namespace, r.controller.name
        ));
    } else if r.controller.ready_replicas < r.controller.replicas.max(1) {
        p.push(format!(
            "the controller has {}/{} ready replicas",
            r.controller.ready_replicas, r.controller.replicas
        ));
    }
    if r.controller.installed && r.ztunnels.is_empty() {
        p.push("no ztunnel pods are running".into());
    }
    let unready: Vec<&str> = r
        .ztunnels
        .iter()
        .filter(|z| !z.ready)
        .map(|z| z.pod.as_str())
        .collect();
    if !unready.is_empty() {
        p.push(format!("ztunnel pods not ready: {}", unready.join(", ")));
    }
    p
}

pub fn render(r: &Report, now: Timestamp) -> String {
    let mut out = String::from("CONTROLLER\n");
    let mut t = Table::new(&["namespace", "name", "ready"]);
    t.row(vec![
        r.controller.namespace.clone(),
        r.controller.name.clone(),
        if r.controller.installed {
            format!("{}/{}", r.controller.ready_replicas, r.controller.replicas)
        } else {
            "not installed".into()
        },
    ]);
    out.push_str(&t.render());

    out.push_str("\nZTUNNELS\n");
    if r.ztunnels.is_empty() {
        out.push_str("none\n");
    } else {
        let mut t = Table::new(&["node", "pod", "ready", "certs", "next cert expiry"]);
        for z in &r.ztunnels {
            let expiry = match &z.next_expiry {
                Some(t) => match t.parse::<Timestamp>() {
                    Ok(ts) if ts > now => format!(
                        "{t} (in {})",
                        short_duration(std::time::Duration::from_secs(
                            (ts.as_second() - now.as_second()).unsigned_abs()
                        ))
                    ),
                    Ok(_) => format!("{t} (EXPIRED)"),
                    Err(_) => t.clone(),
                },
                None => "-".into(),
            };
            t.row(vec![
                z.node.clone(),
                z.pod.clone(),
                if z.ready { "True" } else { "False" }.into(),
                z.certificates.map_or("?".into(), |n| n.to_string()),
                expiry,
            ]);
        }
        out.push_str(&t.render());
    }

    out.push_str("\nWAYPOINTS\n");
    if r.waypoints.is_empty() {
        out.push_str("none\n");
    } else {
        let mut t = Table::new(&["namespace", "name", "programmed"]);
        for w in &r.waypoints {
            t.row(vec![
                w.namespace.clone(),
                w.name.clone(),
                w.programmed.clone(),
            ]);
        }
        out.push_str(&t.render());
    }

    out.push_str("\nENROLLED NAMESPACES\n");
    if r.enrolled_namespaces.is_empty() {
        out.push_str("none\n");
    } else {
        let mut t = Table::new(&["namespace", "pods", "opted out", "waypoint"]);
        for e in &r.enrolled_namespaces {
            t.row(vec![
                e.namespace.clone(),
                e.pods.to_string(),
                e.opted_out.to_string(),
                e.waypoint.clone().unwrap_or_else(|| "-".into()),
            ]);
        }
        out.push_str(&t.render());
    }
    for n in &r.notes {
        out.push_str(&format!("\nnote: {n}\n"));
    }
    out
}

pub async fn run(kube: &Kube, format: Format) -> Result<(), CliError> {
    let report = collect(kube).await?;
    if format == Format::Table {
        print(&render(&report, Timestamp::now()))?;
    } else {
        print(&structured(format, &report)?)?;
    }
    let problems = problems(&report);
    if problems.is_empty() {
        Ok(())
    } else {
        Err(CliError::Failed(format!(
            "zmesh is not healthy: {}",
            problems.join("; ")
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn certificate_expiry_from_a_config_dump() {
        let dump = json!({"certificates": [
            {"identity": "spiffe://cluster.local/ns/a/sa/x", "state": "Available", "not_after": "2026-03-02T00:00:00Z"},
            {"identity": "spiffe://cluster.local/ns/b/sa/y", "state": "Available", "not_after": "2026-03-01T12:00:00Z"},
            {"identity": "spiffe://cluster.local/ns/c/sa/z", "state": "Initializing"}]});
        assert_eq!(
            certificates(&dump),
            (3, Some("2026-03-01T12:00:00Z".to_string()))
        );
        assert_eq!(certificates(&json!({})), (0, None));
    }

    #[test]
    fn renders_and_judges() {
        let r = Report {
            controller: Controller {
                namespace: "zmesh-system".into(),
                name: "zmesh-controller".into(),
                installed: true,
                ready_replicas: 2,
                replicas: 2,
            },
            ztunnels: vec![Ztunnel {
                node: "node-a".into(),
                pod: "ztunnel-a".into(),
                ready: true,
                certificates: Some(2),
                next_expiry: Some("2026-01-01T12:00:00Z".into()),
            }],
            waypoints: vec![],
            enrolled_namespaces: vec![Enrolled {
                namespace: "shop".into(),
                pods: 3,
                opted_out: 1,
                waypoint: Some("waypoint".into()),
            }],
            notes: vec![],
        };
        let now: Timestamp = "2026-01-01T00:00:00Z".parse().unwrap();
        let text = render(&r, now);
        assert!(
            text.contains("zmesh-system   zmesh-controller   2/2"),
            "{text}"
        );
        assert!(
            text.contains("node-a   ztunnel-a   True    2       2026-01-01T12:00:00Z (in 12h)"),
            "{text}"
        );
        assert!(
            text.contains("shop        3      1           waypoint"),
            "{text}"
        );
        assert!(problems(&r).is_empty());
        let mut r = r;
        r.ztunnels[0].ready = false;
        r.controller.ready_replicas = 1;
        assert_eq!(problems(&r).len(), 2);
    }
}
