#!/bin/bash
# run book notebooks on the device; copy executed notebooks, results and logs to $OUT
export PYTHONPATH=/tmp/site:$PWD LABUTILS_GGUF=/tmp/lab/SmolLM2-135M-Instruct.Q4_1.gguf LABUTILS_CACHE=/tmp/labcache PYTHONUNBUFFERED=1
for nb in "$@"; do
  rm -f results/${nb}_*.json
  python3 -m labutils.book run --only $nb --deadline ${DEADLINE:-560} > $OUT/book$nb.log 2>&1; echo "$nb rc=$?"
  grep -v "Warning\|warn(" $OUT/book$nb.log | tail -40
  cp notebooks/${nb}_*.ipynb results/${nb}_*.json $OUT/ 2>/dev/null
  cp build/notebooks/${nb}_*.ipynb $OUT/failed_${nb}.ipynb 2>/dev/null
done
true
