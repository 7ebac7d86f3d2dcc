#!/bin/bash
# Teachers for seeds 1 and 2 side by side; then four students side by side, greedy accuracy only: on
# each teacher the default hybrid, on the seed-1 teacher a hybrid with twice stage 2's steps, on the
# seed-2 teacher the pure student. Outputs under out/; EXTRA (e.g. "--preset tiny") goes to every run.
export PYTHONUNBUFFERED=1
mkdir -p out/runlogs; L=out/runlogs
st() { echo "$(date +%T) $*" >> $L/status; }
st "start $(git rev-parse --short HEAD 2>/dev/null)"; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader >> $L/status 2>/dev/null
job() {  # job NAME ARGS...: one process, its log and its status line
  local name=$1; shift; local t0=$(date +%s)
  python mamba_distill.py $EXTRA "$@" > $L/$name.log 2>&1; st "$name rc=$? $(( $(date +%s) - t0 ))s"
}
for s in 1 2; do
  (job t$s --students "" --random_baseline "" --out_dir out/t$s --seed $s; st "teacher $s rc=$(test -f out/t$s/teacher/config.json; echo $?)") &
done; wait
job h1 --teacher out/t1/teacher --seed 1 --students hybrid --random_baseline "" --out_dir out/h1 &
job k1 --teacher out/t1/teacher --seed 1 --students hybrid --random_baseline "" --kl_steps 2800 --out_dir out/k1 &
job h2 --teacher out/t2/teacher --seed 2 --students hybrid --random_baseline "" --out_dir out/h2 &
job p2 --teacher out/t2/teacher --seed 2 --students pure --random_baseline "" --out_dir out/p2 &
wait
st "all done"
