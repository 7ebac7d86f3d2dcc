#!/bin/bash
export PYTHONUNBUFFERED=1
st() { echo "$(date +%T) $*" >> out/runlogs/status; }
while ! grep -q "A done" out/runlogs/status; do sleep 5; done
best=""
for n in alt ind; do
  acc=$(python -c "import json;d=json.load(open('out/h_$n/distill_summary.json'));print(d['models']['hybrid']['greedy_acc'])" 2>/dev/null)
  st "h_$n greedy $acc"
  if [ -z "$best" ] && python -c "import sys; sys.exit(0 if float('$acc' or 0) >= 0.8 else 1)"; then best=$n; fi
done
[ -z "$best" ] && best=half
st "B start best=$best"
t0=$(date +%s)
python sample.py --checkpoint out/teacher --name teacher > out/runlogs/s_teacher.log 2>&1
st "s_teacher rc=$? $(( $(date +%s) - t0 ))s"
t0=$(date +%s)
python sample.py --checkpoint out/h_$best/hybrid --name hybrid_$best > out/runlogs/s_hybrid.log 2>&1
st "s_hybrid rc=$? $(( $(date +%s) - t0 ))s"
st "B done"
