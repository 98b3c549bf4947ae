#!/usr/bin/env bash
# Set up if needed, then run the tests: pytest over labutils, then nbval over every notebook.
# Notebooks run in smoke mode (small sizes) whatever the device; nbval compares only the cells
# marked NBVAL_CHECK_OUTPUT, whose output is the same on any device.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# shellcheck disable=SC1091
. .venv/bin/activate
export LAB_SMOKE=1 PYTHONUNBUFFERED=1
python -m pytest tests -q -p no:cacheprovider "$@"
python -m pytest --nbval-lax --nbval-current-env --nbval-cell-timeout=1200 -q -p no:cacheprovider notebooks/*.ipynb
