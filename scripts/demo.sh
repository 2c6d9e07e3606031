#!/usr/bin/env bash
# The demo (README, first command): a 2-node cluster in network namespaces, fed by the
# controller, with eBPF redirection. Needs root (it uses sudo when not root).
# Pass --check to fail if any step's outcome is wrong, --keep to explore the cluster.
# The loopback variant without root: cargo run -p ztunnel --example loopback_demo
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# Build first: the demo starts these binaries, and cargo is not on root's PATH under sudo.
cargo build --quiet -p zmesh-cli -p ztunnel -p waypoint -p zmesh-controller -p zmesh-tests --bins
if [ "$(id -u)" = 0 ]; then
  exec ./target/debug/zmesh demo "$@"
else
  exec sudo ./target/debug/zmesh demo "$@"
fi
