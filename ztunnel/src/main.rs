//! The `ztunnel` binary.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::Parser;
use zmesh_core::ca::CertificateAuthority;
use zmesh_core::certs::CertificateProvider;
use zmesh_core::certs::InProcessCa;
use zmesh_core::state::{ConfigSource, LocalConfig};
use zmesh_core::xds::{
    CaClient, CaClientConfig, ControlPlaneEndpoint, ControlPlaneTls, TokenSource, XdsClient,
    XdsConfig,
};
use ztunnel::{Config, Ztunnel};

/// zmesh node agent: HBONE tunnels and L4 policy for the enrolled pods of one node.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Args {
    /// Name of this node (workloads with this `node` are served here).
    #[arg(long, env = "NODE_NAME", default_value = "local")]
    node: String,
    /// YAML file with workloads, services and policies (local config source; used when
    /// --xds-address is not given).
    #[arg(long, env = "LOCAL_CONFIG")]
    local_config: Option<PathBuf>,
    /// PEM root certificate of the in-process CA (used when --ca-address is not given).
    #[arg(long, env = "CA_ROOT_CERT")]
    ca_cert: Option<PathBuf>,
    /// PEM PKCS#8 key of the in-process CA.
    #[arg(long, env = "CA_ROOT_KEY")]
    ca_key: Option<PathBuf>,
    /// Delta ADS server: http://host:15010 (plaintext, local) or https://host:15012.
    #[arg(long, env = "XDS_ADDRESS")]
    xds_address: Option<String>,
    /// CA server (https://host:15012). Defaults to --xds-address when that is https.
    #[arg(long, env = "CA_ADDRESS")]
    ca_address: Option<String>,
    /// File holding the bearer token for xDS and the CA (node bootstrap token or projected
    /// service-account token; re-read on every use).
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
    /// Trust domain (taken from the CA root in local-CA mode).
    #[arg(long, env = "TRUST_DOMAIN", default_value = "cluster.local")]
    trust_domain: String,
    /// Cluster id sent to the control plane (`clusterid` header).
    #[arg(long, env = "CLUSTER_ID")]
    cluster_id: Option<String>,
    /// This ztunnel's pod name, namespace and IP (xDS node id).
    #[arg(long, env = "POD_NAME", default_value = "ztunnel")]
    pod_name: String,
    #[arg(long, env = "POD_NAMESPACE", default_value = "istio-system")]
    pod_namespace: String,
    #[arg(long, env = "INSTANCE_IP")]
    instance_ip: Option<std::net::IpAddr>,
    /// Make the capture listeners transparent (needed with eBPF redirection).
    #[arg(long)]
    transparent: bool,
    /// Connect upstream from the original client address.
    #[arg(long)]
    keep_source_address: bool,
    #[arg(long, default_value = "0.0.0.0:15001")]
    outbound: SocketAddr,
    #[arg(long, default_value = "0.0.0.0:15006")]
    inbound_plaintext: SocketAddr,
    #[arg(long, default_value = "0.0.0.0:15008")]
    hbone: SocketAddr,
    #[arg(long, default_value = "127.0.0.1:15080")]
    socks5: SocketAddr,
    #[arg(long, default_value = "127.0.0.1:15000")]
    admin: SocketAddr,
    #[arg(long, default_value = "0.0.0.0:15020")]
    metrics: SocketAddr,
    #[arg(long, default_value = "0.0.0.0:15021")]
    readiness: SocketAddr,
    /// HBONE port of another node, as NODE=PORT (repeatable), when it is not 15008
    /// (several ztunnels on one host).
    #[arg(long = "peer-hbone-port", value_parser = parse_peer_port)]
    peer_hbone_ports: Vec<(String, u16)>,
    /// Certificate lifetime, in seconds.
    #[arg(long, default_value_t = 86400)]
    cert_lifetime_secs: u64,
    /// Capture enrolled pods with eBPF (tc + bpf_sk_assign); implies --transparent. Needs root.
    #[arg(long)]
    redirect: bool,
    /// bpffs directory for the pinned redirection maps and links.
    #[arg(long, default_value = zmesh_ebpf::DEFAULT_BPFFS_DIR)]
    bpffs_dir: PathBuf,
    /// Interface where other nodes' traffic arrives (repeatable; with --redirect).
    #[arg(long = "uplink")]
    uplinks: Vec<String>,
    /// This node's own address (repeatable): HBONE arriving on it may target any local pod.
    #[arg(long = "node-ip")]
    node_ips: Vec<std::net::IpAddr>,
    /// Log as JSON lines.
    #[arg(long, env = "LOG_FORMAT_JSON")]
    log_json: bool,
    /// Gather log lines and write them at least this often, in milliseconds; WARN and ERROR
    /// lines are never held back. 0 (the default: ztunnel logs a line per connection, not per
    /// request) writes every line at once.
    #[arg(long, env = "LOG_FLUSH_INTERVAL_MS", default_value_t = 0)]
    log_flush_interval_ms: u64,
    /// Time live connections get to finish after SIGTERM, in seconds (keep it below the
    /// pod's terminationGracePeriodSeconds).
    #[arg(long, default_value_t = 5)]
    drain_grace_secs: u64,
    /// Data-path worker threads (Istio's ZTUNNEL_WORKER_THREADS; default 2 as Istio's). Each
    /// worker is a single-threaded runtime with its own SO_REUSEPORT listeners on
    /// 15001/15006/15008/15080 and its own HBONE connection pool, so a connection and every
    /// task it needs stay on one thread (Envoy's model). xDS, certificates, eBPF redirection,
    /// admin and metrics run on a separate control thread, so no number of workers lets a
    /// large config push or a CA call hold up connections; more workers add capacity (use at
    /// most one per core), 1 is enough for a node whose traffic one core can carry.
    #[arg(long, env = "ZTUNNEL_WORKER_THREADS", default_value_t = 2)]
    worker_threads: usize,
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
    zmesh_core::process::tune_allocator();
    zmesh_core::tls::install_default_provider();
    let logs = zmesh_core::telemetry::init_logging(
        "info",
        args.log_json,
        Some(Duration::from_millis(args.log_flush_interval_ms)),
    )?;
    let _ = zmesh_core::socket::raise_fd_limit();
    if args.worker_threads == 0 {
        anyhow::bail!("--worker-threads must be at least 1");
    }
    // The control runtime: config source, certificates, eBPF redirection, connection manager,
    // admin, metrics, readiness. Traffic runs on the workers' own runtimes
    // (`Config::workers`, see `zmesh_core::worker`). Current-thread: that work is light and
    // waits on the network, and one thread (this one, blocked on `run`) serves it without
    // the cross-thread wake-ups a multi-thread runtime would add even with one worker
    // (`block_on` on one thread, spawned tasks on another). A slow control task delays only
    // other control tasks, never a connection. (Nor does it link libm: the multi-thread
    // scheduler's task-time statistics are its only user, ~0.5 MB of resident memory.)
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .thread_name("ztunnel")
        .build()?;
    let result = rt.block_on(run(args, logs.clone()));
    // Gathered log lines (the flush interval) must not die with the process.
    logs.flush();
    result
}

/// The control plane's TLS settings from the flags.
fn control_plane_tls(args: &Args, trust_domain: &str) -> Result<Option<ControlPlaneTls>> {
    let Some(path) = &args.xds_root_cert else {
        return Ok(None);
    };
    let roots = ControlPlaneTls::load_roots(path)?;
    let identity = args
        .control_plane_identity
        .clone()
        .unwrap_or_else(|| format!("spiffe://{trust_domain}/ns/istio-system/sa/zmesh-controller"));
    Ok(Some(ControlPlaneTls {
        roots,
        identities: vec![identity],
        dns_name: args.control_plane_dns_name.clone(),
    }))
}

async fn run(args: Args, logs: zmesh_core::telemetry::LogHandle) -> Result<()> {
    // Start-up (the kernel BTF parsed to load the eBPF programs) and bulk transfers leave free
    // heap that glibc would keep; hand it back within a second (~15 MB at start otherwise).
    tokio::spawn(zmesh_core::process::trim_free_memory_every(
        Duration::from_secs(1),
    ));
    let token = args
        .token_file
        .clone()
        .map_or(TokenSource::None, TokenSource::File);
    // Certificates: the controller's CA, or an in-process CA from root files.
    let ca_address = args.ca_address.clone().or_else(|| {
        args.xds_address
            .clone()
            .filter(|a| a.starts_with("https://"))
    });
    let (provider, trust_domain): (Arc<dyn CertificateProvider>, String) = match &ca_address {
        Some(address) => {
            let tls = control_plane_tls(&args, &args.trust_domain)?;
            let mut cfg = CaClientConfig::new(
                ControlPlaneEndpoint::new(address.clone(), tls),
                token.clone(),
            );
            cfg.cluster_id = args.cluster_id.clone();
            let client = CaClient::new(cfg).context("configuring the CA client")?;
            (Arc::new(client), args.trust_domain.clone())
        }
        None => {
            let (Some(cert_path), Some(key_path)) = (&args.ca_cert, &args.ca_key) else {
                anyhow::bail!(
                    "no CA: give --ca-address (or an https --xds-address), or --ca-cert and --ca-key"
                );
            };
            let cert = std::fs::read_to_string(cert_path)
                .with_context(|| format!("reading CA certificate {}", cert_path.display()))?;
            let key = std::fs::read_to_string(key_path)
                .with_context(|| format!("reading CA key {}", key_path.display()))?;
            let ca = CertificateAuthority::from_pem(&cert, &key).context("loading the CA")?;
            let td = ca.trust_domain().to_string();
            (Arc::new(InProcessCa(Arc::new(ca))), td)
        }
    };
    // Configuration: xDS, or a local YAML file.
    let source: Box<dyn ConfigSource> = match (&args.xds_address, &args.local_config) {
        (Some(address), _) => {
            let tls = control_plane_tls(&args, &trust_domain)?;
            let mut cfg = XdsConfig::ztunnel(
                ControlPlaneEndpoint::new(address.clone(), tls),
                &args.node,
                &args.pod_name,
                &args.pod_namespace,
                args.instance_ip,
            );
            cfg.token = token.clone();
            cfg.cluster_id = args.cluster_id.clone();
            if let Some(c) = &args.cluster_id {
                cfg.metadata.insert("CLUSTER_ID".into(), c.clone());
            }
            // Surface address/TLS mistakes now rather than as endless reconnects.
            cfg.endpoint
                .channel()
                .context("configuring the xDS client")?;
            Box::new(XdsClient::new(cfg))
        }
        (None, Some(path)) => Box::new(LocalConfig::from_file(path)),
        (None, None) => anyhow::bail!("no configuration: give --xds-address or --local-config"),
    };
    let cfg = Config {
        node: args.node,
        outbound_addr: Some(args.outbound),
        inbound_plaintext_addr: Some(args.inbound_plaintext),
        hbone_addr: args.hbone,
        socks5_addr: Some(args.socks5),
        admin_addr: Some(args.admin),
        metrics_addr: Some(args.metrics),
        readiness_addr: Some(args.readiness),
        transparent: args.transparent || args.redirect,
        workers: args.worker_threads,
        node_ips: args.node_ips,
        redirect: args.redirect.then(|| ztunnel::redirect::RedirectConfig {
            bpffs_dir: args.bpffs_dir.clone(),
            uplinks: args.uplinks.clone(),
        }),
        keep_source_address: args.keep_source_address,
        trust_domain,
        cert_lifetime: Duration::from_secs(args.cert_lifetime_secs),
        local_config: args.local_config.clone(),
        peer_hbone_ports: args.peer_hbone_ports.into_iter().collect(),
        drain_grace: Duration::from_secs(args.drain_grace_secs),
        ..Config::default()
    };
    let zt = Ztunnel::start(cfg, source, provider, Some(logs)).await?;
    let quit = zt.quit.clone();
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM received"),
        _ = tokio::signal::ctrl_c() => tracing::info!("interrupt received"),
        _ = quit.cancelled() => tracing::info!("/quitquitquit received"),
    }
    zt.shutdown().await;
    Ok(())
}
