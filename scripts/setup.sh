#!/usr/bin/env bash
# Installs the system packages zmesh builds and tests with, if they are missing, and the
# pinned Python tools of the manifest validation. Idempotent; needs root (or sudo) only when
# a system package is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
# clang + libbpf-dev: eBPF programs; iproute2: network namespaces; tcpdump: capture checks in
# tests; python3-venv: the manifest validation's virtualenv (scripts/setup-manifest-tools.sh).
pkgs=(clang libbpf-dev iproute2 tcpdump python3-venv)
need=()
for p in "${pkgs[@]}"; do
  dpkg -s "$p" >/dev/null 2>&1 || need+=("$p")
done
if [ ${#need[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ]; then
    sudo=""
  elif command -v sudo >/dev/null; then
    sudo="sudo"
  else
    echo "missing packages: ${need[*]} (run as root: apt-get install -y ${need[*]})" >&2
    exit 1
  fi
  export DEBIAN_FRONTEND=noninteractive
  $sudo apt-get update -qq
  $sudo apt-get install -y -qq "${need[@]}" >/dev/null
fi
bash scripts/setup-manifest-tools.sh
