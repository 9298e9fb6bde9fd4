#!/usr/bin/env bash
# Run the test suite (after scripts/setup.sh):
#   bash scripts/run_tests.sh [pytest options]
# As root, the SLURM tests get a real single-node cluster (scripts/slurm_local.sh), which is
# stopped afterwards; elsewhere they are skipped with the reason. detectron2 tests run where
# detectron2 is installed. Paper-scale checks are opt-in: --runslow. Lint, format and the docs
# site (mkdocs build --strict) are checked first.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "$(id -u)" = 0 ]; then
    bash scripts/slurm_local.sh start
    trap 'bash scripts/slurm_local.sh stop' EXIT
fi
# Lint and format (ruff, configured in pyproject.toml) and the docs site, strictly: no dangling link.
.venv/bin/ruff check . && .venv/bin/ruff format --check .
NO_MKDOCS_2_WARNING=1 .venv/bin/mkdocs build --strict --quiet --site-dir "$(mktemp -d)"
# Checkpoints of the training tests go to the temporary directory: a full disk fails them.
echo "[run_tests] free disk: $(df -h --output=avail "${TMPDIR:-/tmp}" | tail -1 | tr -d ' ') in ${TMPDIR:-/tmp}"
.venv/bin/python -m pytest --durations=15 "$@"  # the slowest tests listed: where CI time goes
