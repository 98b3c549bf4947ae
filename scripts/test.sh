#!/usr/bin/env bash
# Set up if needed, then run the tests: pytest over labutils, nbval over every notebook, then the
# notebooks in a real browser (JupyterLab in headless Chromium, tests/test_browser.py).
# Notebooks run in smoke mode (small sizes) whatever the device; nbval compares only the cells
# marked NBVAL_CHECK_OUTPUT, whose output is the same on any device.
# The browser phase needs Debian's chromium: installed here with apt when missing and running as
# root; without it that phase skips with the reason (LAB_BROWSER_TEST=1 makes that a failure).
# Screenshots: build/browser/. Each phase prints its time.
set -euo pipefail
cd "$(dirname "$0")/.."
T0=$SECONDS
phase() {  # phase NAME COMMAND...: run it, then print how long it took
  local name=$1 start=$SECONDS rc=0
  shift
  echo "== phase: $name"
  "$@" || rc=$?
  echo "== phase: $name took $((SECONDS - start)) s (exit $rc; $((SECONDS - T0)) s in all)"
  return "$rc"
}
install_chromium() {
  command -v chromium >/dev/null 2>&1 && return 0
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "installing Debian's chromium for the browser test"
    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; } >/dev/null 2>&1 \
      || echo "could not install chromium with apt: the browser test will say so"
  fi
  return 0
}
phase setup bash scripts/setup.sh
# shellcheck disable=SC1091
. .venv/bin/activate
export LAB_SMOKE=1 PYTHONUNBUFFERED=1
# Each phase runs one pytest-xdist worker per core (up to 4), each worker and every kernel it starts
# on one thread (OMP_NUM_THREADS=1; tests/conftest.py sets torch's threads to 1 in a worker): on an
# idle 2-core machine a fresh clone took 1047 s in one process per phase and 712 s in two workers
# (pytest 513 -> 306 s, nbval 154 -> 120, browser 263 -> 182).
WORKERS=$(python -c "import os; print(max(1, min(4, len(os.sched_getaffinity(0)))))")
export OMP_NUM_THREADS=1
phase pytest python -m pytest tests -q -p no:cacheprovider -m "not browser" -n "$WORKERS" --durations=15 "$@"
# --dist loadfile: one notebook's cells stay on one worker (they share its kernel)
phase nbval python -m pytest --nbval-lax --nbval-current-env --nbval-cell-timeout=1200 -q -p no:cacheprovider \
  -n "$WORKERS" --dist loadfile notebooks/*.ipynb
phase chromium install_chromium
rm -f build/browser/timings.txt
phase browser python -m pytest tests/test_browser.py -q -s -p no:cacheprovider -rs -n "$WORKERS" --dist load
