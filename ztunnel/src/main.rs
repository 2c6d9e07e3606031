//! The `ztunnel` binary.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::Parser;
use zmesh_core::ca::CertificateAuthority;
use zmesh_core::certs::InProcessCa;
use zmesh_core::state::LocalConfig;
use ztunnel::{Config, Ztunnel};

/// zmesh node agent: HBONE tunnels and L4 policy for the enrolled pods of one node.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Args {
    /// Name of this node (workloads with this `node` are served here).
    #[arg(long, env = "NODE_NAME", default_value = "local")]
    node: String,
    /// YAML file with workloads, services and policies (local config source).
    #[arg(long, env = "LOCAL_CONFIG")]
    local_config: PathBuf,
    /// PEM root certificate of the in-process CA (file mode).
    #[arg(long, env = "CA_ROOT_CERT")]
    ca_cert: PathBuf,
    /// PEM PKCS#8 key of the in-process CA (file mode).
    #[arg(long, env = "CA_ROOT_KEY")]
    ca_key: PathBuf,
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
    let logs = zmesh_core::telemetry::init_logging("info", args.log_json)?;
    let _ = zmesh_core::socket::raise_fd_limit();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("ztunnel")
        .build()?;
    rt.block_on(run(args, logs))
}

async fn run(args: Args, logs: zmesh_core::telemetry::LogHandle) -> Result<()> {
    let cert = std::fs::read_to_string(&args.ca_cert)
        .with_context(|| format!("reading CA certificate {}", args.ca_cert.display()))?;
    let key = std::fs::read_to_string(&args.ca_key)
        .with_context(|| format!("reading CA key {}", args.ca_key.display()))?;
    let ca = CertificateAuthority::from_pem(&cert, &key).context("loading the CA")?;
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
        node_ips: args.node_ips,
        redirect: args.redirect.then(|| ztunnel::redirect::RedirectConfig {
            bpffs_dir: args.bpffs_dir.clone(),
            uplinks: args.uplinks.clone(),
        }),
        keep_source_address: args.keep_source_address,
        trust_domain: ca.trust_domain().to_string(),
        cert_lifetime: Duration::from_secs(args.cert_lifetime_secs),
        local_config: Some(args.local_config.clone()),
        peer_hbone_ports: args.peer_hbone_ports.into_iter().collect(),
        ..Config::default()
    };
    let source = Box::new(LocalConfig::from_file(&args.local_config));
    let zt = Ztunnel::start(cfg, source, Arc::new(InProcessCa(Arc::new(ca))), Some(logs)).await?;
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
