//! The `waypoint` binary: flags (like ztunnel's) → [`waypoint::app::App`], configured over
//! Delta ADS (Address, Authorization and the zmesh L7 types) with certificates from the
//! control plane's CA; drains on SIGTERM, interrupt or `/quitquitquit`.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::Parser;
use waypoint::app::{App, AppConfig};
use waypoint::store::L7Store;
use waypoint::trace::TracingConfig;
use zmesh_core::identity::Identity;
use zmesh_core::xds::{
    CaClient, CaClientConfig, ControlPlaneEndpoint, ControlPlaneTls, TokenSource, XdsClient,
    XdsConfig,
};

/// zmesh waypoint: the L7 proxy of ambient mode (routing, resilience, L7 authorization,
/// telemetry), reached over HBONE.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Args {
    /// Name of the node this waypoint runs on (xDS node metadata).
    #[arg(long, env = "NODE_NAME", default_value = "local")]
    node: String,
    /// Delta ADS server: https://host:15012 (or http://host:15010, plaintext, local use).
    #[arg(long, env = "XDS_ADDRESS")]
    xds_address: String,
    /// CA server (https://host:15012). Defaults to --xds-address when that is https.
    #[arg(long, env = "CA_ADDRESS")]
    ca_address: Option<String>,
    /// File holding the bearer token for xDS and the CA (re-read on every use).
    #[arg(long, env = "AUTH_TOKEN")]
    token_file: Option<PathBuf>,
    /// PEM root bundle the control plane's TLS certificate must chain to.
    #[arg(long, env = "XDS_ROOT_CA")]
    xds_root_cert: Option<PathBuf>,
    /// SPIFFE identity the control plane must present
    /// (default spiffe://<trust-domain>/ns/istio-system/sa/zmesh-controller).
    #[arg(long)]
    control_plane_identity: Option<String>,
    /// Also accept a control-plane certificate valid for this DNS name (istiod), sent as SNI.
    #[arg(long)]
    control_plane_dns_name: Option<String>,
    #[arg(long, env = "TRUST_DOMAIN", default_value = "cluster.local")]
    trust_domain: String,
    /// Cluster id sent to the control plane (`clusterid` header).
    #[arg(long, env = "CLUSTER_ID")]
    cluster_id: Option<String>,
    /// This waypoint's pod name and IP (xDS node id).
    #[arg(long, env = "POD_NAME", default_value = "waypoint")]
    pod_name: String,
    #[arg(long, env = "INSTANCE_IP")]
    instance_ip: Option<IpAddr>,
    /// Namespace and service account: the waypoint's identity
    /// spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>.
    #[arg(long, env = "POD_NAMESPACE", default_value = "default")]
    namespace: String,
    #[arg(long, env = "SERVICE_ACCOUNT", default_value = "waypoint")]
    service_account: String,
    /// Name of the waypoint Gateway (AuthorizationPolicy targetRefs); default: the service
    /// account, as Istio names waypoint deployments.
    #[arg(long, env = "GATEWAY_NAME")]
    gateway_name: Option<String>,
    #[arg(long, default_value = "0.0.0.0:15008")]
    hbone: SocketAddr,
    #[arg(long, default_value = "127.0.0.1:15000")]
    admin: SocketAddr,
    #[arg(long, default_value = "0.0.0.0:15020")]
    metrics: SocketAddr,
    #[arg(long, default_value = "0.0.0.0:15021")]
    readiness: SocketAddr,
    /// HBONE port of a node's ztunnel, as NODE=PORT (repeatable), when it is not 15008.
    #[arg(long = "peer-hbone-port", value_parser = parse_peer_port)]
    peer_hbone_ports: Vec<(String, u16)>,
    /// Certificate lifetime, in seconds.
    #[arg(long, default_value_t = 86400)]
    cert_lifetime_secs: u64,
    /// Time live connections get to finish after SIGTERM, in seconds.
    #[arg(long, default_value_t = 5)]
    drain_grace_secs: u64,
    /// Log as JSON lines.
    #[arg(long, env = "LOG_FORMAT_JSON")]
    log_json: bool,
    /// Write log lines (one per request) at least this often, in milliseconds, rather than one
    /// `write` each (~10 % of the waypoint's CPU); WARN and ERROR lines are never held back.
    /// 0 writes every line at once.
    #[arg(long, env = "LOG_FLUSH_INTERVAL_MS", default_value_t = 1000)]
    log_flush_interval_ms: u64,
    /// Worker threads serving traffic (Envoy's --concurrency), each with its own HBONE
    /// listener and upstream connections; default: the number of available cores.
    #[arg(long, env = "WAYPOINT_CONCURRENCY")]
    concurrency: Option<usize>,
    /// OTLP/gRPC collector to export spans to (http://host:4317), overriding the control
    /// plane's telemetry (Telemetry resources + mesh config). Without either, the waypoint
    /// neither generates spans nor touches trace headers.
    #[arg(long, env = "TRACING_OTLP_ENDPOINT")]
    tracing_otlp_endpoint: Option<String>,
    /// Percentage of new traces sampled (a caller's decision is always honoured).
    #[arg(long, env = "TRACING_SAMPLING_PERCENT", default_value_t = 1.0)]
    tracing_sampling_percent: f64,
}

fn parse_peer_port(s: &str) -> Result<(String, u16), String> {
    let (node, port) = s
        .split_once('=')
        .ok_or_else(|| format!("expected NODE=PORT, got {s:?}"))?;
    let port = port
        .parse()
        .map_err(|e| format!("bad port in {s:?}: {e}"))?;
    Ok((node.to_string(), port))
}

fn main() -> Result<()> {
    let args = Args::parse();
    zmesh_core::tls::install_default_provider();
    let logs = zmesh_core::telemetry::init_logging(
        "info",
        args.log_json,
        Some(Duration::from_millis(args.log_flush_interval_ms)),
    )?;
    let _ = zmesh_core::socket::raise_fd_limit();
    // Traffic runs on the workers' own runtimes (see `zmesh_core::worker`); this one only has
    // the control plane (xDS, certificates, admin, metrics, readiness): one thread is plenty.
    // Current-thread, as ztunnel's: no hand-off between the `block_on` thread and a worker,
    // and no multi-thread scheduler (its task-time statistics alone pull in libm, ~0.5 MB of
    // resident memory).
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .thread_name("waypoint")
        .build()?;
    let result = rt.block_on(run(args, logs.clone()));
    // Gathered log lines (the flush interval) must not die with the process.
    logs.flush();
    result
}

fn control_plane_tls(args: &Args) -> Result<Option<ControlPlaneTls>> {
    let Some(path) = &args.xds_root_cert else {
        return Ok(None);
    };
    let roots = ControlPlaneTls::load_roots(path)?;
    let identity = args.control_plane_identity.clone().unwrap_or_else(|| {
        format!(
            "spiffe://{}/ns/istio-system/sa/zmesh-controller",
            args.trust_domain
        )
    });
    Ok(Some(ControlPlaneTls {
        roots,
        identities: vec![identity],
        dns_name: args.control_plane_dns_name.clone(),
    }))
}

async fn run(args: Args, logs: zmesh_core::telemetry::LogHandle) -> Result<()> {
    let identity: Identity = format!(
        "spiffe://{}/ns/{}/sa/{}",
        args.trust_domain, args.namespace, args.service_account
    )
    .parse()
    .with_context(|| {
        format!(
            "namespace {:?} and service account {:?} do not form a valid identity",
            args.namespace, args.service_account
        )
    })?;
    let token = args
        .token_file
        .clone()
        .map_or(TokenSource::None, TokenSource::File);
    let tls = control_plane_tls(&args)?;
    let ca_address = args
        .ca_address
        .clone()
        .or_else(|| Some(args.xds_address.clone()).filter(|a| a.starts_with("https://")))
        .context("no CA: give --ca-address, or an https --xds-address (the controller's 15012)")?;
    let mut ca_cfg = CaClientConfig::new(
        ControlPlaneEndpoint::new(ca_address, tls.clone()),
        token.clone(),
    );
    ca_cfg.cluster_id = args.cluster_id.clone();
    let ca = CaClient::new(ca_cfg).context("configuring the CA client")?;

    let mut xcfg = XdsConfig::waypoint(
        ControlPlaneEndpoint::new(args.xds_address.clone(), tls),
        &args.pod_name,
        &args.namespace,
        args.instance_ip,
    );
    xcfg.metadata.insert("NODE_NAME".into(), args.node.clone());
    xcfg.token = token;
    xcfg.cluster_id = args.cluster_id.clone();
    if let Some(c) = &args.cluster_id {
        xcfg.metadata.insert("CLUSTER_ID".into(), c.clone());
    }
    // Surface address/TLS mistakes now rather than as endless reconnects.
    xcfg.endpoint
        .channel()
        .context("configuring the xDS client")?;
    // Flags fix the tracing; without them the control plane's WaypointTelemetry decides (and
    // these are the settings of the tracer it turns on). An empty value (an unset template
    // variable) is no endpoint.
    let mut tracing_defaults = TracingConfig::new("");
    tracing_defaults.sampling_percent = args.tracing_sampling_percent;
    tracing_defaults.node_id = Some(xcfg.node.to_string());
    tracing_defaults.cluster_id = args.cluster_id.clone();
    let endpoint = args.tracing_otlp_endpoint.clone().filter(|e| !e.is_empty());
    let tracing = endpoint.map(|endpoint| TracingConfig {
        endpoint,
        ..tracing_defaults.clone()
    });
    let l7 = L7Store::new();
    let client = l7.subscribe(XdsClient::new(xcfg));
    let status = client.status();

    let mut wcfg = waypoint::Config::new(identity, args.hbone);
    wcfg.gateway_namespace = args.namespace.clone();
    wcfg.gateway_name = args
        .gateway_name
        .clone()
        .unwrap_or_else(|| args.service_account.clone());
    wcfg.peer_hbone_ports = args.peer_hbone_ports.into_iter().collect();
    wcfg.workers = args
        .concurrency
        .unwrap_or_else(zmesh_core::worker::default_concurrency)
        .max(1);
    wcfg.tracing = tracing;
    wcfg.tracing_defaults = tracing_defaults;
    let mut cfg = AppConfig::new(wcfg);
    cfg.admin_addr = Some(args.admin);
    cfg.metrics_addr = Some(args.metrics);
    cfg.readiness_addr = Some(args.readiness);
    cfg.cert_lifetime = Duration::from_secs(args.cert_lifetime_secs);
    cfg.drain_grace = Duration::from_secs(args.drain_grace_secs);

    let app = App::start(
        cfg,
        Box::new(client),
        l7,
        Arc::new(ca),
        Some(status),
        Some(logs),
    )
    .await?;
    let quit = app.quit.clone();
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM received"),
        _ = tokio::signal::ctrl_c() => tracing::info!("interrupt received"),
        _ = quit.cancelled() => tracing::info!("/quitquitquit received"),
    }
    app.shutdown().await;
    Ok(())
}
