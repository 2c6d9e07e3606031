#!/usr/bin/env bash
# Creates the virtualenv target/manifest-venv with the pinned packages of
# scripts/manifest-tools.txt (for scripts/validate-manifests.sh). Idempotent: rebuilt only
# when it is missing or the pins changed. Needs python3 with the venv module (Debian:
# python3-venv, installed by scripts/setup.sh) and PyPI the first time.
set -euo pipefail
cd "$(dirname "$0")/.."
venv=target/manifest-venv
req=scripts/manifest-tools.txt
stamp="$venv/.pins-$(sha256sum "$req" | cut -c1-16)"
[ -e "$stamp" ] && exit 0
if ! python3 -c 'import venv, ensurepip' 2>/dev/null; then
  echo "error: python3 with the venv module is needed (Debian: apt-get install -y python3-venv)" >&2
  exit 1
fi
echo "setting up $venv (pinned Python tools for the manifest validation)" >&2
rm -rf "$venv"
python3 -m venv "$venv"
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check --no-input -r "$req"
touch "$stamp"
