//! zmesh benchmarks: side-by-side measurements of the data plane against a baseline, in one
//! run, reported as JSON and a table (DESIGN.md §8). Benchmarks report; they exit non-zero
//! only when the harness itself broke.

mod client;
mod l4;
mod mesh;
mod phases;
mod report;
mod sink;
mod sys;

use std::net::IpAddr;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser, Debug)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Direct loopback TCP vs HBONE through two ztunnel processes: throughput, fixed-rate
    /// latency, CPU per request, connection rate, RSS with 10k idle connections.
    L4Loopback(Box<l4::L4Args>),
    /// Internal: the server workload (discard + echo listeners), run as a child process.
    #[command(hide = true)]
    Sink {
        #[arg(long)]
        ip: IpAddr,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.cmd {
        Cmd::L4Loopback(args) => l4::run(*args),
        Cmd::Sink { ip } => sink::run(ip),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("zmesh-bench: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
