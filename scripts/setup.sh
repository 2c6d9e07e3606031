#!/usr/bin/env bash
# Installs the system packages zmesh builds and tests with, if they are missing.
# Idempotent; needs root (or sudo) only when something is missing.
set -euo pipefail
# clang + libbpf-dev: eBPF programs; iproute2: network namespaces; tcpdump: capture checks in tests.
pkgs=(clang libbpf-dev iproute2 tcpdump)
need=()
for p in "${pkgs[@]}"; do
  dpkg -s "$p" >/dev/null 2>&1 || need+=("$p")
done
[ ${#need[@]} -eq 0 ] && exit 0
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
