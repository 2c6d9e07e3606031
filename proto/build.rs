//! Generates Rust from `protos/` with protox (pure Rust; no system protoc).

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let files = [
        "protos/istio/workload/workload.proto",
        "protos/istio/security/authorization.proto",
        "protos/istio/v1/auth/ca.proto",
        "protos/google/rpc/status.proto",
        "protos/envoy/service/discovery/v3/discovery.proto",
        "protos/zmesh/l7/v1/l7.proto",
        "protos/opentelemetry/proto/common/v1/common.proto",
        "protos/opentelemetry/proto/resource/v1/resource.proto",
        "protos/opentelemetry/proto/trace/v1/trace.proto",
        "protos/opentelemetry/proto/collector/trace/v1/trace_service.proto",
    ];
    for f in &files {
        println!("cargo:rerun-if-changed={f}");
    }
    let fds = protox::compile(files, ["protos"])?;
    // The descriptor set (with imports) backs `reflect` (proto3 JSON for config dumps and the
    // golden tests).
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(
        out.join("zmesh_descriptor.bin"),
        prost::Message::encode_to_vec(&fds),
    )?;
    tonic_prost_build::configure()
        // Maps encode in key order: resources must be byte-identical for equal content.
        .btree_map(".zmesh.l7.v1")
        .build_client(true)
        .build_server(true)
        .skip_protoc_run()
        .compile_fds(fds)?;

    // The ADS server side again, answering with `DeltaDiscoveryResponseWire` (resources
    // pre-encoded, byte-identical on the wire; see `src/ads_wire.rs`).
    let codec = "tonic_prost::ProstCodec";
    let ads = tonic_build::manual::Service::builder()
        .name("AggregatedDiscoveryService")
        .package("envoy.service.discovery.v3")
        .method(
            tonic_build::manual::Method::builder()
                .name("stream_aggregated_resources")
                .route_name("StreamAggregatedResources")
                .input_type("crate::discovery::DiscoveryRequest")
                .output_type("crate::discovery::DiscoveryResponse")
                .codec_path(codec)
                .client_streaming()
                .server_streaming()
                .build(),
        )
        .method(
            tonic_build::manual::Method::builder()
                .name("delta_aggregated_resources")
                .route_name("DeltaAggregatedResources")
                .input_type("crate::discovery::DeltaDiscoveryRequest")
                .output_type("crate::ads_wire::DeltaDiscoveryResponseWire")
                .codec_path(codec)
                .client_streaming()
                .server_streaming()
                .build(),
        )
        .build();
    tonic_build::manual::Builder::new()
        .build_client(false)
        .compile(&[ads]);
    Ok(())
}
