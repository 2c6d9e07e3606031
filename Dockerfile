# syntax=docker/dockerfile:1
# zmesh images, one target per component, all from one build of the workspace:
#
#   docker build --target zmesh-controller -t ghcr.io/zmesh/zmesh-controller:0.1.0 .
#   docker build --target ztunnel          -t ghcr.io/zmesh/ztunnel:0.1.0 .
#   docker build --target waypoint         -t ghcr.io/zmesh/waypoint:0.1.0 .
#   docker build --target zmesh            -t ghcr.io/zmesh/zmesh:0.1.0 .
#
# Needs BuildKit (the default builder of current Docker) for the cache mounts. The tag is the
# workspace version (Cargo.toml), which is what manifests/ refer to.

# ---- build: every binary, once ---------------------------------------------------------
# The Rust release the workspace requires (Cargo.toml rust-version), on Debian 12 like the
# runtime images, so the binaries link against the same glibc.
FROM rust:1.95-bookworm AS build
# clang + libbpf-dev: ebpf/build.rs compiles the redirection programs (C) with clang against
# libbpf's headers (ebpf/README.md). protoc is not needed (protox compiles the .proto files).
RUN apt-get update \
 && apt-get install -y --no-install-recommends clang libbpf-dev \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY proto proto
COPY core core
COPY ebpf ebpf
COPY ztunnel ztunnel
COPY waypoint waypoint
COPY controller controller
COPY cli cli
COPY tests tests
COPY bench bench
COPY kube-fake kube-fake
# Kubernetes YAML embedded in binaries (the waypoint template in the controller, the install
# manifests in the CLI).
COPY manifests manifests
# The registry and target directories are cache mounts (kept between builds, not in the
# image), so the binaries are copied out in the same step. The proxies are built on their own:
# cargo unifies features per invocation, and the controller's tokio "rt-multi-thread" would
# otherwise end up in ztunnel and the waypoint (bigger resident code, libm). ztunnel ships
# size-optimized (profile release-ztunnel, see Cargo.toml).
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --profile release-ztunnel --locked -p ztunnel --bins \
 && cargo build --release --locked -p waypoint --bins \
 && cargo build --release --locked -p zmesh-controller -p zmesh-cli --bins \
 && mkdir -p /out \
 && cp target/release-ztunnel/ztunnel target/release/waypoint target/release/zmesh-controller \
       target/release/zmesh /out/

# ---- runtime images ----------------------------------------------------------------------
# distroless/cc: glibc, libgcc and CA certificates, no shell or package manager. TLS is
# rustls with aws-lc-rs linked in statically, so no libssl is needed.

# Controller: runs as the distroless "nonroot" user (65532); it only needs the network and the
# API server (manifests/controller.yaml drops every capability).
FROM gcr.io/distroless/cc-debian12:nonroot AS zmesh-controller
COPY --from=build /out/zmesh-controller /usr/local/bin/zmesh-controller
USER 65532:65532
EXPOSE 15012 15014
ENTRYPOINT ["/usr/local/bin/zmesh-controller"]

# Waypoint: an ordinary L7 proxy on 15008, non-root like the controller.
FROM gcr.io/distroless/cc-debian12:nonroot AS waypoint
COPY --from=build /out/waypoint /usr/local/bin/waypoint
USER 65532:65532
EXPOSE 15008 15020 15021
ENTRYPOINT ["/usr/local/bin/waypoint"]

# ztunnel: runs as root, on purpose. It needs CAP_BPF and CAP_NET_ADMIN in its effective set
# (eBPF programs and maps, tc links, policy routing, IP_TRANSPARENT listeners), which
# Kubernetes grants only to uid 0 (no ambient capabilities for other users; file capabilities
# would be ignored under allowPrivilegeEscalation: false), and it pins its maps under the
# node's root-owned /sys/fs/bpf. manifests/ztunnel.yaml drops every other capability and
# keeps the root filesystem read-only. Same base image as the others, with the user switched.
FROM gcr.io/distroless/cc-debian12:nonroot AS ztunnel
COPY --from=build /out/ztunnel /usr/local/bin/ztunnel
USER 0:0
EXPOSE 15001 15006 15008 15020 15021
ENTRYPOINT ["/usr/local/bin/ztunnel"]

# The CLI, for running `zmesh` from a pod or a CI job (it needs only a kubeconfig or the
# in-cluster service account).
FROM gcr.io/distroless/cc-debian12:nonroot AS zmesh
COPY --from=build /out/zmesh /usr/local/bin/zmesh
USER 65532:65532
ENTRYPOINT ["/usr/local/bin/zmesh"]
