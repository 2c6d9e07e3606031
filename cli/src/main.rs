//! `zmesh`: the command line of the mesh — install it, enroll namespaces, manage waypoints,
//! look at its state — plus `zmesh demo`, the guided tour on a local network-namespace cluster.
//!
//! Cluster commands take kubectl's connection flags; errors are one `error: …` line on stderr.
//! Exit codes: 0 success, 1 failure, 2 usage error.

mod check;
mod config_dump;
mod demo;
mod enroll;
mod error;
mod install;
mod kube;
mod manifests;
mod output;
mod portforward;
mod status;
mod waypoint;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use crate::error::CliError;
use crate::kube::ConnectOptions;
use crate::output::Format;

/// zmesh: a sidecar-less service mesh (Istio ambient mode compatible).
#[derive(Parser, Debug)]
#[command(
    name = "zmesh",
    version,
    after_help = "Examples:\n  \
        zmesh check                               pre-flight checks (kernel, BPF, CRDs, other meshes)\n  \
        zmesh install                             install the controller, ztunnel, CRDs and RBAC\n  \
        zmesh enroll shop                         put namespace shop in the mesh\n  \
        zmesh waypoint apply -n shop --enroll-namespace --wait\n  \
        zmesh status                              controller, ztunnels, waypoints, enrolled namespaces\n  \
        zmesh config-dump ztunnel ztunnel-x7k2p   a ztunnel's configuration and certificates\n  \
        sudo zmesh demo                           a guided tour on a local 2-node cluster\n\n\
        Exit codes: 0 success, 1 failure, 2 usage error."
)]
struct Cli {
    /// Path to the kubeconfig file (default: $KUBECONFIG, then ~/.kube/config).
    #[arg(long, global = true, value_name = "FILE")]
    kubeconfig: Option<PathBuf>,
    /// The kubeconfig context to use.
    #[arg(long, global = true, value_name = "NAME")]
    context: Option<String>,
    /// The namespace (default: the context's namespace, else `default`).
    #[arg(short = 'n', long, global = true, value_name = "NS")]
    namespace: Option<String>,
    /// Output format.
    #[arg(short = 'o', long, global = true, value_enum, default_value_t)]
    output: Format,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Install zmesh: CRDs, RBAC, the controller Deployment and the ztunnel DaemonSet.
    #[command(after_help = format!("Examples:\n  \
        zmesh install --dry-run > zmesh.yaml        the manifests, exactly as in manifests/\n  \
        zmesh install --set image.registry=registry.local:5000 --set image.tag=dev\n  \
        zmesh install --set controller.replicas=1 --timeout 10m\n\n\
        --set keys:\n{}", manifests::SET_KEYS))]
    Install(install::InstallArgs),
    /// Remove what `zmesh install` created (keeps the CRDs unless --purge).
    #[command(after_help = "Examples:\n  zmesh uninstall\n  zmesh uninstall --purge")]
    Uninstall(install::UninstallArgs),
    /// Put a namespace's pods in the mesh (label istio.io/dataplane-mode=ambient).
    #[command(after_help = "Example:\n  zmesh enroll shop")]
    Enroll {
        /// The namespace.
        namespace: String,
    },
    /// Take a namespace out of the mesh (remove istio.io/dataplane-mode).
    #[command(after_help = "Example:\n  zmesh unenroll shop")]
    Unenroll {
        /// The namespace.
        namespace: String,
    },
    /// Manage waypoints (L7 proxies; Gateways of class istio-waypoint).
    #[command(subcommand)]
    Waypoint(waypoint::WaypointCommand),
    /// Show the controller, ztunnels per node, waypoints, enrolled namespaces and certificate expiry.
    #[command(after_help = "Examples:\n  zmesh status\n  zmesh status -o yaml")]
    Status,
    /// Print a component's /config_dump (admin port 15000), fetched through port-forward.
    #[command(after_help = "Examples:\n  \
        zmesh config-dump ztunnel ztunnel-x7k2p\n  \
        zmesh config-dump waypoint waypoint-5d9f8-abcde -n shop -o yaml\n  \
        zmesh config-dump controller zmesh-controller-6c9f7d-xk2lp\n\n\
        The admin server listens on the pod's loopback only; the API server's port-forward\n\
        reaches it, so your kubeconfig's user needs `create` on `pods/portforward`.")]
    ConfigDump(config_dump::ConfigDumpArgs),
    /// Pre-flight checks: kernel, BPF, API server, CRDs, conflicting meshes.
    #[command(after_help = "Example:\n  zmesh check            exit status 1 if any check FAILs")]
    Check,
    /// Run the guided demo: a 2-node network-namespace cluster fed by zmesh-controller, traffic,
    /// identities, a policy denial, metrics, then cleanup (needs root).
    #[command(after_help = "Example:\n  sudo ./target/debug/zmesh demo --check\n\n\
        The cluster lives in network namespaces named zmt<pid>x<n>...; an interrupted run's\n\
        leftovers are removed by the next run.")]
    Demo(demo::DemoArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Command::Demo(args) = &cli.command {
        return match demo::run(args) {
            Ok(outcome) if args.check && outcome.failed > 0 => ExitCode::FAILURE,
            Ok(_) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("error: {}", error::one_line(&format!("{e:#}")));
                ExitCode::FAILURE
            }
        };
    }
    // Only aws-lc-rs is compiled in; installing it explicitly keeps rustls from panicking should
    // a dependency ever enable a second provider.
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", e.one_line());
            e.exit_code()
        }
    }
}

async fn run(cli: Cli) -> Result<(), CliError> {
    let opts = ConnectOptions {
        kubeconfig: cli.kubeconfig.clone(),
        context: cli.context.clone(),
        namespace: cli.namespace.clone(),
    };
    let format = cli.output;
    match cli.command {
        Command::Demo(_) => Ok(()), // handled in main (synchronous)
        Command::Install(args) if args.dry_run => {
            output::print(&manifests::render(manifests::require_files()?, &args.set)?)
        }
        Command::Install(args) => install::install(&kube::connect(&opts).await?, &args).await,
        Command::Uninstall(args) => install::uninstall(&kube::connect(&opts).await?, &args).await,
        Command::Enroll { namespace } => {
            enroll::enroll(&kube::connect(&opts).await?, &namespace).await
        }
        Command::Unenroll { namespace } => {
            enroll::unenroll(&kube::connect(&opts).await?, &namespace).await
        }
        Command::Waypoint(waypoint::WaypointCommand::Generate(args)) => {
            let ns = kube::default_namespace(&opts).await;
            waypoint::generate(&args, &ns, format)
        }
        Command::Waypoint(cmd) => {
            let kube = kube::connect(&opts).await?;
            match cmd {
                waypoint::WaypointCommand::Apply(a) => waypoint::apply(&kube, &a).await,
                waypoint::WaypointCommand::List(a) => waypoint::list(&kube, &a, format).await,
                waypoint::WaypointCommand::Delete(a) => waypoint::delete(&kube, &a).await,
                waypoint::WaypointCommand::Status(a) => waypoint::status(&kube, &a, format).await,
                waypoint::WaypointCommand::Generate(_) => Ok(()),
            }
        }
        Command::Status => status::run(&kube::connect(&opts).await?, format).await,
        Command::ConfigDump(args) => {
            let kube = kube::connect(&opts).await?;
            // ztunnel and controller pods live in zmesh's namespace, whatever the context's
            // namespace is.
            let ns = match (&cli.namespace, args.component) {
                (Some(ns), _) => ns.clone(),
                (None, config_dump::Component::Ztunnel | config_dump::Component::Controller) => {
                    manifests::system_namespace()
                }
                (None, config_dump::Component::Waypoint) => kube.namespace.clone(),
            };
            config_dump::run(&kube, &args, &ns, format).await
        }
        Command::Check => check::run(&opts, format).await,
    }
}
