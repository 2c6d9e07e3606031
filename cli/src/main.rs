//! `zmesh`: the command-line entry point. Today it has one subcommand, `zmesh demo` (a guided
//! tour on a local network-namespace cluster); the operator commands of issue 6 (install,
//! status, config dumps, ...) will sit beside it.

mod demo;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// zmesh: a sidecar-less service mesh (Istio ambient mode compatible).
#[derive(Parser, Debug)]
#[command(
    name = "zmesh",
    version,
    after_help = "Examples:\n  \
        sudo zmesh demo           build a 2-node cluster, show what the mesh does, clean up\n  \
        sudo zmesh demo --check   the same; exit non-zero if any step's outcome is wrong"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the guided demo: a 2-node network-namespace cluster fed by zmesh-controller, traffic,
    /// identities, a policy denial, metrics, then cleanup (needs root).
    #[command(after_help = "Example:\n  sudo ./target/debug/zmesh demo --check\n\n\
        The cluster lives in network namespaces named zmt<pid>x<n>...; an interrupted run's\n\
        leftovers are removed by the next run.")]
    Demo(demo::DemoArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Demo(args) => match demo::run(&args) {
            Ok(outcome) if args.check && outcome.failed > 0 => ExitCode::FAILURE,
            Ok(_) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("error: {e:#}");
                ExitCode::FAILURE
            }
        },
    }
}
