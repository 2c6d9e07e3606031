#!/usr/bin/env bash
# Offline validation of manifests/ (no cluster needed; details in validate_manifests.py):
# every manifest against the Kubernetes schemas of releases 1.31 to 1.37 (strict: unknown
# fields are errors), CRD schemas structural and in line with the kinds the controller
# watches, every manifests/examples/ object against its CRD's schema, flags/env/images/RBAC
# consistent with the code. Then the self-test: deliberately broken copies must fail.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup-manifest-tools.sh
py=target/manifest-venv/bin/python
"$py" scripts/validate_manifests.py
"$py" scripts/validate_manifests.py --self-test
