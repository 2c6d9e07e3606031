//! `zmesh install` and `zmesh uninstall`.
//!
//! Install is server-side apply (field manager `zmesh`, forced) of the embedded manifests in
//! their kustomization order, with the CustomResourceDefinitions first: the API server only
//! serves a custom kind once its CRD is Established, so we wait for that before applying the
//! rest. Then it waits for the controller Deployment to be available and the ztunnel DaemonSet
//! to be rolled out on every node, within `--timeout`.
//!
//! Uninstall deletes the same objects in reverse order, keeping the CRDs (and with them every
//! user policy) unless `--purge`.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use kube::api::{ApiResource, DeleteParams, GroupVersionKind};
use kube::discovery::Scope;
use serde_json::Value;

use crate::error::CliError;
use crate::kube::{CRD, Kind, Kube, Op, condition_true, found};
use crate::manifests::{self, Document, Setting};
use crate::output::{Progress, print};

/// How often waits look again.
pub const POLL: Duration = Duration::from_millis(500);

#[derive(clap::Args, Debug)]
pub struct InstallArgs {
    /// Print the manifests that would be applied and exit (no cluster needed). Without --set
    /// this is exactly the files of manifests/.
    #[arg(long)]
    pub dry_run: bool,
    /// Override a value (repeatable). Keys: image.registry, image.tag, image.pullPolicy,
    /// controller.image, controller.replicas, ztunnel.image, logLevel.
    #[arg(long = "set", value_name = "KEY=VALUE", value_parser = manifests::parse_set)]
    pub set: Vec<Setting>,
    /// How long to wait for CRDs, the controller and ztunnel (e.g. 90s, 5m).
    #[arg(long, default_value = "5m", value_parser = parse_duration)]
    pub timeout: Duration,
    /// Apply and return without waiting for the workloads to become ready.
    #[arg(long)]
    pub no_wait: bool,
}

#[derive(clap::Args, Debug)]
pub struct UninstallArgs {
    /// Also delete the CustomResourceDefinitions, and with them every AuthorizationPolicy,
    /// PeerAuthentication, VirtualService, DestinationRule and ServiceEntry in the cluster.
    #[arg(long)]
    pub purge: bool,
}

/// `90`, `90s`, `5m`, `1h`.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (num, unit) = match s.find(|c: char| !c.is_ascii_digit()) {
        Some(i) => s.split_at(i),
        None => (s, "s"),
    };
    let n: u64 = num
        .parse()
        .map_err(|_| format!("invalid duration {s:?} (use e.g. 90s, 5m, 1h)"))?;
    let secs = match unit {
        "s" => n,
        "m" => n * 60,
        "h" => n * 3600,
        _ => return Err(format!("invalid duration {s:?} (use e.g. 90s, 5m, 1h)")),
    };
    Ok(Duration::from_secs(secs))
}

fn embedded_docs(settings: &[Setting]) -> Result<Vec<Document>, CliError> {
    let files = manifests::require_files()?;
    let mut docs = manifests::parse(files)?;
    manifests::apply_settings(&mut docs, settings)?;
    Ok(docs)
}

/// Looks up the resource (plural, scope) of each kind once.
struct Resources<'a> {
    kube: &'a Kube,
    cache: HashMap<(String, String), (ApiResource, Scope)>,
}

impl<'a> Resources<'a> {
    fn new(kube: &'a Kube) -> Self {
        Resources {
            kube,
            cache: HashMap::new(),
        }
    }

    async fn resolve(&mut self, doc: &Document) -> Result<(ApiResource, Scope), CliError> {
        let key = (doc.api_version().to_string(), doc.kind().to_string());
        if let Some(r) = self.cache.get(&key) {
            return Ok(r.clone());
        }
        let (group, version) = match doc.api_version().split_once('/') {
            Some((g, v)) => (g, v),
            None => ("", doc.api_version()),
        };
        let gvk = GroupVersionKind::gvk(group, version, doc.kind());
        let (ar, caps) = kube::discovery::pinned_kind(&self.kube.client, &gvk)
            .await
            .map_err(|e| {
                let op = Op::new(
                    "discover",
                    format!(
                        "{} {} (for {})",
                        doc.api_version(),
                        doc.kind(),
                        doc.describe()
                    ),
                    None,
                    None,
                );
                match self.kube.error(&op, e) {
                    CliError::NotFound { .. } | CliError::Request { .. } => {
                        CliError::Manifest(format!(
                            "the API server does not serve {} {} (needed by {} from manifests/{})",
                            doc.api_version(),
                            doc.kind(),
                            doc.describe(),
                            doc.file
                        ))
                    }
                    other => other,
                }
            })?;
        self.cache.insert(key, (ar.clone(), caps.scope.clone()));
        Ok((ar, caps.scope))
    }
}

pub async fn install(kube: &Kube, args: &InstallArgs) -> Result<(), CliError> {
    let docs = embedded_docs(&args.set)?;
    let started = Instant::now();
    print(&format!("Installing zmesh into {}\n", kube.server))?;

    let (crds, rest): (Vec<&Document>, Vec<&Document>) = docs.iter().partition(|d| d.is_crd());
    let crd_ar = CRD.api_resource();
    for doc in &crds {
        kube.apply(&crd_ar, &Scope::Cluster, &doc.to_json()?)
            .await?;
        print(&format!("  applied {}\n", doc.describe()))?;
    }
    if !crds.is_empty() {
        let mut progress = Progress::new();
        let deadline = started + args.timeout;
        for doc in &crds {
            wait_until(
                &mut progress,
                deadline,
                args.timeout,
                &doc.describe(),
                async || crd_established(kube, doc.name()).await,
            )
            .await?;
        }
        progress.done(&format!(
            "{} CustomResourceDefinitions established",
            crds.len()
        ));
    }

    let mut resources = Resources::new(kube);
    for doc in &rest {
        let (ar, scope) = resources.resolve(doc).await?;
        kube.apply(&ar, &scope, &doc.to_json()?).await?;
        print(&format!("  applied {}\n", doc.describe()))?;
    }

    if !args.no_wait {
        let mut progress = Progress::new();
        let deadline = started + args.timeout;
        for doc in rest
            .iter()
            .filter(|d| matches!(d.kind(), "Deployment" | "DaemonSet"))
        {
            let kind = if doc.kind() == "Deployment" {
                &crate::kube::DEPLOYMENT
            } else {
                &crate::kube::DAEMONSET
            };
            let ns = doc.namespace().unwrap_or(&kube.namespace).to_string();
            wait_until(
                &mut progress,
                deadline,
                args.timeout,
                &doc.describe(),
                async || workload_ready(kube, kind, &ns, doc.name()).await,
            )
            .await?;
            progress.done(&format!("{} ready", doc.describe()));
        }
    }
    print("✔ Installation complete\n")?;
    Ok(())
}

/// Where a wait stands: done, or still waiting with a description of the current state.
pub enum Poll {
    Ready,
    Pending(String),
}

/// Poll `check` until it is ready or `deadline` passes, showing progress.
pub async fn wait_until(
    progress: &mut Progress,
    deadline: Instant,
    timeout: Duration,
    what: &str,
    mut check: impl AsyncFnMut() -> Result<Poll, CliError>,
) -> Result<(), CliError> {
    loop {
        match check().await {
            Ok(Poll::Ready) => return Ok(()),
            Ok(Poll::Pending(state)) => {
                progress.update(&format!("{what}: {state}"));
                if Instant::now() >= deadline {
                    progress.abandon();
                    return Err(CliError::Timeout {
                        what: what.to_string(),
                        secs: timeout.as_secs(),
                        last: state,
                    });
                }
            }
            Err(e) => {
                progress.abandon();
                return Err(e);
            }
        }
        tokio::time::sleep(POLL).await;
    }
}

async fn crd_established(kube: &Kube, name: &str) -> Result<Poll, CliError> {
    match kube.get_opt(&CRD, None, name).await? {
        None => Ok(Poll::Pending("not found yet".into())),
        Some(obj) => {
            let v = serde_json::to_value(&obj).unwrap_or_default();
            if condition_true(&v, "Established") {
                Ok(Poll::Ready)
            } else {
                Ok(Poll::Pending(
                    "waiting for the Established condition".into(),
                ))
            }
        }
    }
}

fn int(v: &Value, path: &str) -> Option<i64> {
    v.pointer(path).and_then(Value::as_i64)
}

/// `kubectl rollout status` semantics for a Deployment or DaemonSet.
pub fn rollout_state(kind: &str, obj: &Value) -> Poll {
    let generation = int(obj, "/metadata/generation").unwrap_or(0);
    let observed = int(obj, "/status/observedGeneration");
    if obj.get("status").is_none() || observed.is_some_and(|o| o < generation) {
        return Poll::Pending("waiting for the rollout to start".into());
    }
    if kind == "Deployment" {
        let want = int(obj, "/spec/replicas").unwrap_or(1);
        let updated = int(obj, "/status/updatedReplicas").unwrap_or(0);
        let available = int(obj, "/status/availableReplicas").unwrap_or(0);
        if updated >= want && available >= want {
            Poll::Ready
        } else {
            Poll::Pending(format!(
                "{available}/{want} replicas available, {updated} updated"
            ))
        }
    } else {
        let want = int(obj, "/status/desiredNumberScheduled").unwrap_or(0);
        let updated = int(obj, "/status/updatedNumberScheduled").unwrap_or(0);
        let available = int(obj, "/status/numberAvailable").unwrap_or(0);
        if updated >= want && available >= want {
            Poll::Ready
        } else {
            Poll::Pending(format!(
                "{available}/{want} nodes available, {updated} updated"
            ))
        }
    }
}

async fn workload_ready(kube: &Kube, kind: &Kind, ns: &str, name: &str) -> Result<Poll, CliError> {
    match kube.get_opt(kind, Some(ns), name).await? {
        None => Ok(Poll::Pending("not found".into())),
        Some(obj) => {
            let v = serde_json::to_value(&obj).unwrap_or_default();
            Ok(rollout_state(kind.kind, &v))
        }
    }
}

pub async fn uninstall(kube: &Kube, args: &UninstallArgs) -> Result<(), CliError> {
    let docs = embedded_docs(&[])?;
    print(&format!("Uninstalling zmesh from {}\n", kube.server))?;
    let mut resources = Resources::new(kube);
    let mut kept = 0;
    for doc in docs.iter().rev() {
        if doc.is_crd() && !args.purge {
            kept += 1;
            continue;
        }
        let (ar, scope) = match resources.resolve(doc).await {
            Ok(r) => r,
            // The kind is no longer served (its CRD is gone): nothing of it is left.
            Err(CliError::Manifest(_)) => {
                print(&format!("  {} already absent\n", doc.describe()))?;
                continue;
            }
            Err(e) => return Err(e),
        };
        let ns = match scope {
            Scope::Namespaced => Some(doc.namespace().unwrap_or(&kube.namespace)),
            Scope::Cluster => None,
        };
        let resource = if ar.group.is_empty() {
            ar.plural.clone()
        } else {
            format!("{}.{}", ar.plural, ar.group)
        };
        let op = Op::new("delete", resource, ns, Some(doc.name()));
        let api = kube.dynamic(&ar, ns);
        let deleted = found(
            api.delete(doc.name(), &DeleteParams::background())
                .await
                .map_err(|e| kube.error(&op, e)),
        );
        match deleted {
            Ok(Some(_)) => print(&format!("  deleted {}\n", doc.describe()))?,
            Ok(None) | Err(CliError::NamespaceNotFound(_)) => {
                print(&format!("  {} already absent\n", doc.describe()))?
            }
            Err(e) => return Err(e),
        }
    }
    if kept > 0 {
        print(&format!(
            "kept {kept} CustomResourceDefinitions (and the policies stored in them); \
             `zmesh uninstall --purge` deletes them\n"
        ))?;
    }
    print("✔ Uninstall complete\n")?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("90").unwrap(), Duration::from_secs(90));
        assert_eq!(parse_duration("90s").unwrap(), Duration::from_secs(90));
        assert_eq!(parse_duration("5m").unwrap(), Duration::from_secs(300));
        assert_eq!(parse_duration("1h").unwrap(), Duration::from_secs(3600));
        assert!(parse_duration("5 minutes").is_err());
        assert!(parse_duration("m").is_err());
    }

    #[test]
    fn rollout_of_a_deployment() {
        let mut d = json!({"metadata": {"generation": 2}, "spec": {"replicas": 2}});
        assert!(matches!(rollout_state("Deployment", &d), Poll::Pending(_)));
        d["status"] =
            json!({"observedGeneration": 1, "updatedReplicas": 2, "availableReplicas": 2});
        assert!(matches!(rollout_state("Deployment", &d), Poll::Pending(_)));
        d["status"] =
            json!({"observedGeneration": 2, "updatedReplicas": 2, "availableReplicas": 1});
        match rollout_state("Deployment", &d) {
            Poll::Pending(s) => assert_eq!(s, "1/2 replicas available, 2 updated"),
            Poll::Ready => panic!("one replica is not available"),
        }
        d["status"]["availableReplicas"] = json!(2);
        assert!(matches!(rollout_state("Deployment", &d), Poll::Ready));
    }

    #[test]
    fn rollout_of_a_daemonset() {
        let mut d = json!({"metadata": {"generation": 1}, "status": {"observedGeneration": 1,
            "desiredNumberScheduled": 3, "updatedNumberScheduled": 3, "numberAvailable": 2}});
        assert!(matches!(rollout_state("DaemonSet", &d), Poll::Pending(_)));
        d["status"]["numberAvailable"] = json!(3);
        assert!(matches!(rollout_state("DaemonSet", &d), Poll::Ready));
    }
}
