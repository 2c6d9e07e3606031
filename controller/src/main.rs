//! The `zmesh-controller` binary: file mode today (a directory of Kubernetes YAML, bootstrap
//! tokens in `<dir>/nodes/<node>.token`, CA root in `<dir>/ca/`); `--kubernetes` is reserved.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::Parser;
use zmesh_controller::controller::{Controller, ControllerConfig};
use zmesh_controller::translate::TranslateOptions;

/// zmesh's xDS controller and CA.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Args {
    /// Directory of Kubernetes YAML (file mode); also holds nodes/*.token and ca/.
    #[arg(long, env = "ZMESH_CONFIG_DIR")]
    config_dir: Option<PathBuf>,
    /// Watch the Kubernetes API instead of a directory (not wired yet).
    #[arg(long)]
    kubernetes: bool,
    /// Plaintext Delta ADS (local use only; no CA on this port). "off" disables it.
    #[arg(long, default_value = "127.0.0.1:15010")]
    xds_plaintext_addr: String,
    /// TLS Delta ADS + CA. "off" disables it.
    #[arg(long, default_value = "0.0.0.0:15012")]
    xds_tls_addr: String,
    /// Prometheus metrics. "off" disables it.
    #[arg(long, default_value = "0.0.0.0:15014")]
    metrics_addr: String,
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
    let _logs = zmesh_core::telemetry::init_logging("info", args.log_json)?;
    if args.kubernetes {
        bail!(
            "--kubernetes is not yet wired in this build (the Kubernetes source is not available); run in file mode with --config-dir"
        );
    }
    let Some(dir) = args.config_dir.clone() else {
        bail!("--config-dir is required in file mode");
    };
    if !dir.is_dir() {
        bail!("--config-dir {} is not a directory", dir.display());
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("zmesh-controller")
        .build()?;
    rt.block_on(run(args, dir))
}

async fn run(args: Args, dir: PathBuf) -> Result<()> {
    let mut ca = zmesh_controller::ca::CaOptions::default();
    ca.max_ttl = Duration::from_secs(args.max_cert_ttl_secs);
    ca.default_ttl = ca.default_ttl.min(ca.max_ttl);
    let cfg = ControllerConfig {
        config_dir: Some(dir),
        xds_plaintext_addr: parse_addr("xds-plaintext-addr", &args.xds_plaintext_addr)?,
        xds_tls_addr: parse_addr("xds-tls-addr", &args.xds_tls_addr)?,
        metrics_addr: parse_addr("metrics-addr", &args.metrics_addr)?,
        trust_domain: args.trust_domain.clone(),
        namespace: args.namespace,
        root_cert: args.root_cert,
        root_key: args.root_key,
        debounce: Duration::from_millis(args.debounce_ms),
        translate: TranslateOptions {
            cluster_id: args.cluster_id,
            trust_domain: args.trust_domain,
            network: args.network,
            ..TranslateOptions::default()
        },
        ca,
        ..ControllerConfig::default()
    };
    let controller = Controller::start(cfg)
        .await
        .context("starting the controller")?;
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM received"),
        _ = tokio::signal::ctrl_c() => tracing::info!("interrupt received"),
    }
    controller.shutdown().await;
    Ok(())
}
