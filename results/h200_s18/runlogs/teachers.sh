#!/bin/bash
# Two teacher draws (seeds 0 and 1) side by side, then on each the default hybrid (attention in 1,3,5,7)
# and one with attention in 3,4,5,6, all four side by side; greedy accuracy only. Outputs under out/.
export PYTHONUNBUFFERED=1
mkdir -p out/runlogs; L=out/runlogs
st() { echo "$(date +%T) $*" >> $L/status; }
st "start $(git rev-parse --short HEAD 2>/dev/null)"; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader >> $L/status
for s in 0 1; do
  (t0=$(date +%s); python mamba_distill.py --students "" --random_baseline "" --out_dir out/t$s --seed $s > $L/t$s.log 2>&1; st "teacher $s rc=$? $(( $(date +%s) - t0 ))s") &
done; wait
for s in 0 1; do
  (t0=$(date +%s); python mamba_distill.py --teacher out/t$s/teacher --data out/t$s/data/train.jsonl --test_data out/t$s/data/test.jsonl --students hybrid --random_baseline "" --out_dir out/h$s > $L/h$s.log 2>&1; st "hybrid on t$s rc=$? $(( $(date +%s) - t0 ))s") &
  (t0=$(date +%s); python mamba_distill.py --teacher out/t$s/teacher --data out/t$s/data/train.jsonl --test_data out/t$s/data/test.jsonl --students hybrid --random_baseline "" --attn_layers 3,4,5,6 --out_dir out/m$s > $L/m$s.log 2>&1; st "hybrid 3-6 on t$s rc=$? $(( $(date +%s) - t0 ))s") &
done; wait
st "all done"
