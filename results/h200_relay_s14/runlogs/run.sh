#!/bin/bash
# phase A: teacher, layer scores, hybrid variants in parallel, compiled-sampler check
export PYTHONUNBUFFERED=1
mkdir -p out/runlogs
st() { echo "$(date +%T) $*" >> out/runlogs/status; }
st "A start"; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader >> out/runlogs/status
t0=$(date +%s)
python mamba_distill.py --students "" --random_baseline= > out/runlogs/teacher.log 2>&1
st "teacher rc=$? $(( $(date +%s) - t0 ))s"
python .gpu/induction.py out/teacher 8 > out/runlogs/induction.log 2>&1
st "induction rc=$?"
top=$(grep "induction score" out/runlogs/induction.log | sed 's/.*: //' | cut -d, -f1,2)
top=$(echo $top | tr ',' '\n' | sort -n | paste -sd,)
alt="0,1"; [ "$top" = "0,1" ] && alt="2,6"
st "variants ind=$top alt=$alt"
t1=$(date +%s)
for v in "ind:--attn_layers $top" "alt:--attn_layers $alt" "half:--attn_fraction 0.5"; do
  n=${v%%:*}; a=${v#*:}
  ( python mamba_distill.py --teacher out/teacher --students hybrid --random_baseline= $a --out_dir out/h_$n > out/runlogs/h_$n.log 2>&1; st "h_$n rc=$? $(( $(date +%s) - t1 ))s" ) &
done
sleep 60
( timeout 400 python sample.py --checkpoint out/teacher --name compile_check --n_problems 8 --k 2 > out/runlogs/compile_check.log 2>&1; st "compile_check rc=$? $(( $(date +%s) - t1 ))s" ) &
wait
st "A done"
