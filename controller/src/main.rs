//! The `zmesh-controller` binary.
//!
//! - File mode (`--config-dir`): a directory of Kubernetes YAML, bootstrap tokens in
//!   `<dir>/nodes/<node>.token`, CA root in `<dir>/ca/`.
//! - Kubernetes mode (`--kubernetes`): watches the API server (in-cluster config or
//!   KUBECONFIG), reviews service-account tokens with TokenReview, keeps the CA root in a Secret,
//!   and turns `istio-waypoint` Gateways into waypoint Deployments (`--waypoint-image`).
//!
//! Admin (`--admin-addr`, loopback) and readiness (`--readiness-addr`) open first; SIGTERM,
//! an interrupt or `POST /quitquitquit` stop the controller, also while it is still starting.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::Parser;
use std::sync::Arc;

use tokio_util::sync::CancellationToken;
use zmesh_controller::admin::{AdminServers, Status};
use zmesh_controller::ca::{KubeAuthenticator, KubeTokenReviewer, load_or_create_root_secret};
use zmesh_controller::controller::{Controller, ControllerConfig};
use zmesh_controller::mesh::MeshConfig;
use zmesh_controller::sources::kube::KubeSource;
use zmesh_controller::store::ObjectStore;
use zmesh_controller::translate::TranslateOptions;
use zmesh_controller::waypoints::{Template, WaypointReconciler, WaypointSettings};

/// zmesh's xDS controller and CA.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Args {
    /// Directory of Kubernetes YAML (file mode); also holds nodes/*.token and ca/.
    #[arg(long, env = "ZMESH_CONFIG_DIR")]
    config_dir: Option<PathBuf>,
    /// Watch the Kubernetes API instead of a directory.
    #[arg(long)]
    kubernetes: bool,
    /// Kubernetes mode: Secret (in --namespace) holding the CA root; created when missing.
    #[arg(long, default_value = "zmesh-ca-root")]
    ca_secret: String,
    /// Kubernetes mode: service account of the node agents, as NAMESPACE/NAME (repeatable).
    #[arg(long = "node-agent", default_value = "istio-system/ztunnel")]
    node_agents: Vec<String>,
    /// Kubernetes mode: audience workload tokens must carry.
    #[arg(long, default_value = "istio-ca")]
    token_audience: String,
    /// Plaintext Delta ADS (local use only; no CA on this port). "off" disables it.
    #[arg(long, default_value = "127.0.0.1:15010")]
    xds_plaintext_addr: String,
    /// TLS Delta ADS + CA. "off" disables it.
    #[arg(long, default_value = "0.0.0.0:15012")]
    xds_tls_addr: String,
    /// Prometheus metrics. "off" disables it.
    #[arg(long, default_value = "0.0.0.0:15014")]
    metrics_addr: String,
    /// Admin API (/config_dump, /logging, /quitquitquit); must be a loopback address.
    /// "off" disables it.
    #[arg(long, default_value = "127.0.0.1:15000")]
    admin_addr: String,
    /// Readiness (/healthz/ready: 503 until the config source has synced, the CA root is
    /// loaded and the xDS ports are bound). "off" disables it.
    #[arg(long, default_value = "0.0.0.0:15021")]
    readiness_addr: String,
    /// Trust domain of a newly generated CA root.
    #[arg(long, env = "TRUST_DOMAIN", default_value = "cluster.local")]
    trust_domain: String,
    /// Namespace the controller runs in (part of its identity).
    #[arg(long, env = "POD_NAMESPACE", default_value = "istio-system")]
    namespace: String,
    /// Cluster id put on workloads.
    #[arg(long, env = "CLUSTER_ID", default_value = "Kubernetes")]
    cluster_id: String,
    /// Network of this cluster.
    #[arg(long, env = "NETWORK", default_value = "")]
    network: String,
    /// CA root certificate (default <config-dir>/ca/root-cert.pem; generated when missing).
    #[arg(long)]
    root_cert: Option<PathBuf>,
    /// CA root key (default <config-dir>/ca/root-key.pem).
    #[arg(long)]
    root_key: Option<PathBuf>,
    /// Debounce window for config changes, in milliseconds.
    #[arg(long, default_value_t = 100)]
    debounce_ms: u64,
    /// Maximum certificate lifetime, in seconds.
    #[arg(long, default_value_t = 86400)]
    max_cert_ttl_secs: u64,
    /// Log as JSON lines.
    #[arg(long, env = "LOG_FORMAT_JSON")]
    log_json: bool,
    /// Kubernetes mode: image of the waypoint Deployments made for `istio-waypoint` Gateways.
    #[arg(long, env = "WAYPOINT_IMAGE", default_value = concat!("ghcr.io/zmesh/waypoint:", env!("CARGO_PKG_VERSION")))]
    waypoint_image: String,
    /// Kubernetes mode: xDS + CA address waypoints connect to
    /// (default https://zmesh-controller.<namespace>.svc:15012).
    #[arg(long)]
    waypoint_xds_address: Option<String>,
    /// Kubernetes mode: waypoint template to use instead of the built-in
    /// manifests/templates/waypoint.yaml (same placeholders).
    #[arg(long)]
    waypoint_template: Option<PathBuf>,
    /// Kubernetes mode: do not create Deployments for waypoint Gateways.
    #[arg(long)]
    no_waypoint_reconcile: bool,
    /// Istio mesh config (the `mesh` key of the `istio` ConfigMap): tracing extension
    /// providers and defaults. Read at start; a missing file is the default config.
    #[arg(long, env = "MESH_CONFIG")]
    mesh_config: Option<PathBuf>,
}

fn parse_addr(flag: &str, s: &str) -> Result<Option<SocketAddr>> {
    if s == "off" {
        return Ok(None);
    }
    s.parse()
        .map(Some)
        .with_context(|| format!("--{flag} {s:?} is not host:port or \"off\""))
}

fn main() -> Result<()> {
    let args = Args::parse();
    zmesh_core::tls::install_default_provider();
    let logs = zmesh_core::telemetry::init_logging("info", args.log_json, None)?;
    let dir = match (&args.config_dir, args.kubernetes) {
        (Some(dir), false) if !dir.is_dir() => {
            bail!("--config-dir {} is not a directory", dir.display())
        }
        (Some(dir), false) => Some(dir.clone()),
        (None, false) => bail!("give --config-dir (file mode) or --kubernetes"),
        (Some(_), true) => bail!("--config-dir and --kubernetes exclude each other"),
        (None, true) => None,
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("zmesh-controller")
        .build()?;
    rt.block_on(run(args, dir, logs))
}

/// How long start-up waits for the Kubernetes watches' first lists before serving what it
/// has (readiness stays 503 until every kind is listed).
const INITIAL_SYNC_WAIT: Duration = Duration::from_secs(60);

/// Wait (bounded) until every watched kind has been listed once, so clients never see a
/// partial first snapshot.
async fn wait_for_initial_sync(
    mut pending: tokio::sync::watch::Receiver<std::collections::BTreeSet<&'static str>>,
) {
    let listed = tokio::time::timeout(INITIAL_SYNC_WAIT, pending.wait_for(|p| p.is_empty()))
        .await
        .is_ok();
    if !listed {
        let kinds: Vec<&str> = pending.borrow().iter().copied().collect();
        tracing::warn!(
            ?kinds,
            "not every kind listed after {INITIAL_SYNC_WAIT:?}; serving what is there (not ready until they are)"
        );
    }
}

/// Kubernetes mode: source, CA root and token review from the API server.
async fn kubernetes_parts(
    args: &Args,
    cfg: &mut ControllerConfig,
    status: &Arc<Status>,
    stop: CancellationToken,
) -> Result<()> {
    let client = kube::Client::try_default()
        .await
        .context("connecting to the Kubernetes API (in-cluster service account or KUBECONFIG)")?;
    let store = ObjectStore::new();
    let source = KubeSource::new(client.clone());
    let pending = source.pending_kinds();
    status.track_kube_sync(pending.clone(), stop.clone());
    let st = store.clone();
    let source_stop = stop.clone();
    tokio::spawn(async move { source.run(st, source_stop).await });
    wait_for_initial_sync(pending).await;
    let (root, root_source) = load_or_create_root_secret(
        client.clone(),
        &args.namespace,
        &args.ca_secret,
        &args.trust_domain,
    )
    .await
    .context("loading the CA root from its Secret")?;
    let mut agents = Vec::new();
    for a in &args.node_agents {
        let (ns, sa) = a
            .split_once('/')
            .with_context(|| format!("--node-agent {a:?} is not NAMESPACE/NAME"))?;
        agents.push((ns.to_string(), sa.to_string()));
    }
    if !args.no_waypoint_reconcile {
        start_waypoint_reconciler(args, client.clone(), &root, stop.clone())?;
    }
    let reviewer = KubeTokenReviewer::new(client, vec![args.token_audience.clone()]);
    cfg.authenticator = Some(Arc::new(KubeAuthenticator::new(
        reviewer,
        agents,
        store.clone(),
    )));
    cfg.root = Some(Arc::new(root));
    cfg.root_source = Some(root_source);
    cfg.store = Some(store);
    cfg.file_source = false;
    Ok(())
}

/// Kubernetes mode: turn `istio-waypoint` Gateways into waypoint Deployments.
fn start_waypoint_reconciler(
    args: &Args,
    client: kube::Client,
    root: &zmesh_core::ca::CertificateAuthority,
    stop: CancellationToken,
) -> Result<()> {
    let template = match &args.waypoint_template {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("reading --waypoint-template {}", path.display()))?;
            Template::parse(&text)
                .with_context(|| format!("--waypoint-template {}", path.display()))?
        }
        None => Template::embedded()?,
    };
    let identity = zmesh_controller::ca::controller_identity(root.trust_domain(), &args.namespace)?;
    let settings = WaypointSettings {
        image: args.waypoint_image.clone(),
        xds_address: args
            .waypoint_xds_address
            .clone()
            .unwrap_or_else(|| format!("https://zmesh-controller.{}.svc:15012", args.namespace)),
        control_plane_identity: identity.to_string(),
        trust_domain: root.trust_domain().to_string(),
        cluster_id: args.cluster_id.clone(),
        ca_root_pem: root.root_pem(),
    };
    tracing::info!(image = %settings.image, xds = %settings.xds_address, "reconciling waypoint Gateways");
    let reconciler = WaypointReconciler::new(client, template, settings);
    tokio::spawn(reconciler.run(stop));
    Ok(())
}

async fn run(
    args: Args,
    dir: Option<PathBuf>,
    logs: zmesh_core::telemetry::LogHandle,
) -> Result<()> {
    let mut ca = zmesh_controller::ca::CaOptions::default();
    ca.max_ttl = Duration::from_secs(args.max_cert_ttl_secs);
    ca.default_ttl = ca.default_ttl.min(ca.max_ttl);
    let mesh = match &args.mesh_config {
        Some(path) => MeshConfig::load(path)?,
        None => MeshConfig::default(),
    };
    let mut cfg = ControllerConfig {
        config_dir: dir,
        xds_plaintext_addr: parse_addr("xds-plaintext-addr", &args.xds_plaintext_addr)?,
        xds_tls_addr: parse_addr("xds-tls-addr", &args.xds_tls_addr)?,
        metrics_addr: parse_addr("metrics-addr", &args.metrics_addr)?,
        admin_addr: parse_addr("admin-addr", &args.admin_addr)?,
        readiness_addr: parse_addr("readiness-addr", &args.readiness_addr)?,
        logs: Some(logs),
        trust_domain: args.trust_domain.clone(),
        namespace: args.namespace.clone(),
        root_cert: args.root_cert.clone(),
        root_key: args.root_key.clone(),
        debounce: Duration::from_millis(args.debounce_ms),
        translate: TranslateOptions {
            cluster_id: args.cluster_id.clone(),
            trust_domain: args.trust_domain.clone(),
            network: args.network.clone(),
            mesh,
            ..TranslateOptions::default()
        },
        ca,
        ..ControllerConfig::default()
    };
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let admin = AdminServers::start(&cfg)
        .await
        .context("starting the admin and readiness servers")?;
    let quit = admin.quit.clone();
    let source_stop = CancellationToken::new();
    let starting = async {
        if args.kubernetes {
            let status = admin.status.clone();
            kubernetes_parts(&args, &mut cfg, &status, source_stop.clone()).await?;
        }
        Controller::start_with(cfg, admin)
            .await
            .context("starting the controller")
    };
    // why: the Kubernetes start-up can wait a minute for its lists; a stop request then must
    // not wait for it.
    let stopped = tokio::select! {
        r = starting => Some(r?),
        _ = term.recv() => { tracing::info!("SIGTERM received while starting"); None }
        _ = tokio::signal::ctrl_c() => { tracing::info!("interrupt received while starting"); None }
        _ = quit.cancelled() => { tracing::info!("/quitquitquit received while starting"); None }
    };
    let Some(controller) = stopped else {
        source_stop.cancel();
        return Ok(());
    };
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM received"),
        _ = tokio::signal::ctrl_c() => tracing::info!("interrupt received"),
        _ = quit.cancelled() => tracing::info!("/quitquitquit received"),
    }
    source_stop.cancel();
    controller.shutdown().await;
    Ok(())
}
