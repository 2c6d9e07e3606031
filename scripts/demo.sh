#!/usr/bin/env bash
# The demo (README, first command). Pass --check to fail if any step's outcome is wrong.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
cargo run --quiet -p ztunnel --example loopback_demo -- "$@"
