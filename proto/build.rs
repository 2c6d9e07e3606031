//! Generates Rust from `protos/` with protox (pure Rust; no system protoc).

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let files = [
        "protos/istio/workload/workload.proto",
        "protos/istio/security/authorization.proto",
        "protos/istio/v1/auth/ca.proto",
        "protos/google/rpc/status.proto",
        "protos/envoy/service/discovery/v3/discovery.proto",
    ];
    for f in &files {
        println!("cargo:rerun-if-changed={f}");
    }
    let fds = protox::compile(files, ["protos"])?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .skip_protoc_run()
        .compile_fds(fds)?;
    Ok(())
}
