#!/usr/bin/env bash
# Set up if needed, then execute the whole book headless on the embedded model and print the
# headline results. On a GPU: full sizes, notebooks executed in place, results/ written. On a CPU
# (or CI=true / LAB_SMOKE=1): smoke sizes, executed copies in build/notebooks, results in build/results.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# shellcheck disable=SC1091
. .venv/bin/activate
export PYTHONUNBUFFERED=1
python -m labutils.book run "$@"
