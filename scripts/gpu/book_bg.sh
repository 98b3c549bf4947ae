#!/usr/bin/env bash
# Run the whole book on the GPU machine in the background, drafts included, and collect it.
# A command of the device tool may run 10 minutes; the book takes longer, so it runs detached and
# later calls poll it. After the staging calls (model in /tmp/lab, wheels in /tmp/site; see the
# README's GPU section):
#   bash scripts/gpu/book_bg.sh start [--only 00,05]   copy the tree to /tmp/repo, drafts moved up, start
#   bash scripts/gpu/book_bg.sh poll [SECONDS]         wait up to SECONDS (default 240), print progress,
#                                                      and collect what is there so far (a lost machine
#                                                      then loses only the notebook that was running)
#   bash scripts/gpu/book_bg.sh collect                copy notebooks, results and the log to $OUT
set -uo pipefail
export PYTHONPATH=/tmp/site:/tmp/repo LABUTILS_GGUF=/tmp/lab/SmolLM2-135M-Instruct.Q4_1.gguf \
       LABUTILS_CACHE=/tmp/labcache PYTHONUNBUFFERED=1
# Inductor compiles in the kernel's own process, not in its pool of forked workers: in one run of
# notebook 05 (H200, 2026-12-02) the kernel and its compile worker both sat reading their pipes,
# GPU idle, for over 11 minutes after the acceptance sweep (scripts/probes/README.md)
export TORCHINDUCTOR_COMPILE_THREADS=1
case "${1:-}" in
  start)
    shift
    rm -rf /tmp/repo /tmp/book.log /tmp/book.done && cp -r "$PWD" /tmp/repo && cd /tmp/repo || exit 1
    # a draft replaces its notebook for this run; the GPU machine has no jupytext, so the .ipynb of
    # each draft is made beforehand, here: .venv/bin/jupytext --to ipynb notebooks/drafts/[0-9]*.py
    for d in notebooks/drafts/[0-9][0-9]_*.py; do
      [ -e "$d" ] || continue
      b=$(basename "$d" .py)
      [ -s "notebooks/drafts/$b.ipynb" ] || { echo "missing notebooks/drafts/$b.ipynb (run jupytext first)"; exit 1; }
      cp "$d" "notebooks/$b.py" && cp "notebooks/drafts/$b.ipynb" "notebooks/$b.ipynb"
    done
    rm -f results/*.json
    setsid nohup bash -c "python3 -m labutils.book run $* > /tmp/book.log 2>&1; echo rc=\$? > /tmp/book.done" \
      > /dev/null 2>&1 &
    sleep 5; cat /tmp/book.log ;;
  poll)
    for _ in $(seq 1 $(( ${2:-240} / 5 ))); do [ -f /tmp/book.done ] && break; sleep 5; done
    grep -v "Warning\|warn(\|WARNING" /tmp/book.log | tail -25; cat /tmp/book.done 2>/dev/null
    bash "$0" collect > /dev/null; true ;;
  collect)  # one archive: the device tool returns a limited number of files
    cd /tmp/repo && mkdir -p /tmp/collect/notebooks /tmp/collect/results /tmp/collect/failed
    cp notebooks/[0-9][0-9]_*.ipynb /tmp/collect/notebooks/; cp results/*.json /tmp/collect/results/ 2>/dev/null
    cp build/notebooks/*.ipynb /tmp/collect/failed/ 2>/dev/null; cp /tmp/book.log /tmp/collect/
    tar -C /tmp/collect -czf "$OUT/book.tgz" . && tar -tzf "$OUT/book.tgz" | head -40 ;;
  *) echo "usage: $0 start|poll|collect"; exit 2 ;;
esac
