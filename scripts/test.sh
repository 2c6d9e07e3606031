#!/usr/bin/env bash
# The project's test command (README "Run the tests"; CI runs exactly this through .ci/run).
# Format and lint gates first, then every test of the workspace.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
cargo fmt --all -- --check
cargo clippy --workspace --all-targets --locked -- -D warnings
# ring must never come back into the tree (two rustls providers => panic at start).
ring_users=$(cargo tree --locked -i ring -e normal,build,dev 2>/dev/null || true)
if [ -n "$ring_users" ]; then
  echo "error: the 'ring' crate is in the dependency tree; only aws-lc-rs may be used:" >&2
  echo "$ring_users" >&2
  exit 1
fi
cargo test --workspace --locked
