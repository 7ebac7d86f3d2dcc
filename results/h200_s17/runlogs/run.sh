#!/bin/bash
# The recorded default run: README's commands, each model alone on the GPU, the pure student sampled
# right after the teacher. If sampling costs it more than twice what it costs the teacher (k = 1
# coverage over greedy accuracy), two quick checks follow at once: greedy through the sampler, and the bf16 state. Outputs under out/
# (never carried).
export PYTHONUNBUFFERED=1
mkdir -p out/runlogs
L=out/runlogs
st() { echo "$(date +%T) $*" >> $L/status; }
st "start $(git rev-parse --short HEAD 2>/dev/null)"; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader >> $L/status
python -c "import torch, triton, numpy; print(torch.__version__, triton.__version__, numpy.__version__)" >> $L/status
t0=$(date +%s); python mamba_distill.py > $L/distill.log 2>&1; st "default run rc=$? $(( $(date +%s) - t0 ))s"
for m in teacher pure hybrid hybrid_random; do
  t0=$(date +%s); python sample.py --checkpoint out/$m > $L/s_$m.log 2>&1; st "sample $m rc=$? $(( $(date +%s) - t0 ))s"
  # the checks when sampling costs the pure student more than twice what it costs the teacher
  if [ $m = pure ] && python -c "
import json; g = json.load(open('out/distill_summary.json'))['models']
r = {m: json.load(open(f'out/eval/{m}/summary.json'))['coverage'][0] / max(g[m]['greedy_acc'], 1e-9) for m in ('teacher', 'pure')}
print('k=1 coverage / greedy:', r); raise SystemExit(r['pure'] > 0.5 * r['teacher'])" >> $L/status; then
    t0=$(date +%s); python sample.py --checkpoint out/pure --name pure_t0 --out_dir out/diag --data out/data/test.jsonl --temperature 0 --k 1 --compile false > $L/s_pure_t0.log 2>&1; st "pure greedy via sampler rc=$? $(( $(date +%s) - t0 ))s"
    t0=$(date +%s); python sample.py --checkpoint out/pure --name pure_bf16 --out_dir out/diag --data out/data/test.jsonl --state_dtype model --k 8 --compile false > $L/s_pure_bf16.log 2>&1; st "pure bf16 state rc=$? $(( $(date +%s) - t0 ))s"
  fi
done
python plot_scaling.py > $L/plot.log 2>&1; st "plot rc=$?"
st "all done"
