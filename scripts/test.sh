#!/usr/bin/env bash
# The project's test command (README "Run the tests"; CI runs exactly this through .ci/run).
# Manifest validation, format and lint gates first, then every test of the workspace.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# Kubernetes manifests and the Dockerfile, offline (seconds; before the long Rust steps).
bash scripts/validate-manifests.sh
# Lint gates need the rustfmt/clippy components (in rustup's default profile); say so clearly
# rather than fail obscurely when a toolchain lacks them.
if cargo fmt --version >/dev/null 2>&1; then
  cargo fmt --all -- --check
else
  echo "warning: rustfmt is not installed (rustup component add rustfmt); format check skipped" >&2
fi
if cargo clippy --version >/dev/null 2>&1; then
  cargo clippy --workspace --all-targets --locked -- -D warnings
else
  echo "warning: clippy is not installed (rustup component add clippy); lint skipped" >&2
fi
# ring must never come back into the tree (two rustls providers => panic at start).
ring_users=$(cargo tree --locked -i ring -e normal,build,dev 2>/dev/null || true)
if [ -n "$ring_users" ]; then
  echo "error: the 'ring' crate is in the dependency tree; only aws-lc-rs may be used:" >&2
  echo "$ring_users" >&2
  exit 1
fi
# The proxies run current-thread runtimes; tokio's multi-thread scheduler (and libm with it)
# must not come back into their own build through a dependency's features.
proxy_mt=$(cargo tree --locked -p ztunnel -p waypoint -e normal,features -i tokio 2>/dev/null \
  | grep 'tokio feature "rt-multi-thread"' || true)
if [ -n "$proxy_mt" ]; then
  echo "error: a dependency of ztunnel/waypoint enables tokio's rt-multi-thread:" >&2
  cargo tree --locked -p ztunnel -p waypoint -e normal,features -i tokio >&2
  exit 1
fi
# --no-fail-fast: one CI run reports every failing test binary, not only the first.
cargo test --workspace --locked --no-fail-fast
