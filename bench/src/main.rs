//! zmesh benchmarks: side-by-side measurements of the data plane against a baseline, in one
//! run, reported as JSON and a table (DESIGN.md §8). Benchmarks report; they exit non-zero
//! only when the harness itself broke.

mod client;
mod l4;
mod l4_netns;
mod l7_netns;
mod mesh;
mod output;
mod phases;
mod report;
mod sink;
mod sys;
mod xds_scale;

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
    /// The same pod pair on the netns cluster (2 nodes, eBPF redirection), out of the mesh vs
    /// enrolled: throughput ratio, added p99, ztunnel CPU per request and RSS.
    L4Netns(Box<l4_netns::NetnsArgs>),
    /// HTTP/1.1 and HTTP/2 request/response on the netns cluster through ztunnel → waypoint
    /// → ztunnel vs the L4-only path: added p99, waypoint CPU per request, RSS, max rate.
    L7Netns(Box<l7_netns::L7Args>),
    /// The controller serving 10k pods, 1k services and 1k policies to 100 Delta ADS clients:
    /// initial push time, update latency, controller and client RSS.
    XdsScale(Box<xds_scale::XdsArgs>),
    /// Internal: the controller of `xds-scale`, run as a child process.
    #[command(hide = true)]
    XdsController(xds_scale::ControllerChildArgs),
    /// Internal: the real XdsClient of `xds-scale`, run as a child process.
    #[command(hide = true)]
    XdsClient(xds_scale::ClientChildArgs),
    /// Internal: the HTTP echo server of `l7-netns`, run as a child process in a pod.
    #[command(hide = true)]
    HttpSink {
        #[arg(long)]
        ip: IpAddr,
        #[arg(long)]
        port: u16,
    },
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
        Cmd::L4Netns(args) => l4_netns::run(*args),
        Cmd::L7Netns(args) => l7_netns::run(*args),
        Cmd::HttpSink { ip, port } => l7_netns::run_http_sink(ip, port),
        Cmd::XdsScale(args) => xds_scale::run(*args),
        Cmd::XdsController(args) => xds_scale::run_controller(args),
        Cmd::XdsClient(args) => xds_scale::run_client(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("zmesh-bench: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
