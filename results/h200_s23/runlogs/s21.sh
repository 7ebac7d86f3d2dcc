#!/bin/bash
# The README's main job as it stands: `python mamba_distill.py` (the defaults), then 64 samples a problem
# from each of its four models (each alone on the GPU), then the figures. Outputs under out/ (never
# carried); the four models packed in bf16 under out/keep/ at the end, for poll.sh to return. EXTRA goes to
# mamba_distill.py, SEXTRA to sample.py (e.g. "--preset tiny" and "--n_problems 4 --k 4
# --max_new_tokens 32" on a CPU).
export PYTHONUNBUFFERED=1
mkdir -p out/runlogs; L=out/runlogs
st() { echo "$(date +%T) $*" >> $L/status; }
st "start $(git rev-parse --short HEAD 2>/dev/null)"; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader >> $L/status 2>/dev/null
python -c "import torch, triton, numpy; print(torch.__version__, triton.__version__, numpy.__version__)" >> $L/status
t0=$(date +%s); python mamba_distill.py $EXTRA > $L/default.log 2>&1
st "distill rc=$? $(( $(date +%s) - t0 ))s"
grep -E "greedy accuracy|stage wall|has not learnt" $L/default.log >> $L/status
for m in teacher pure hybrid pure_random; do
  t0=$(date +%s); python sample.py $SEXTRA --checkpoint out/$m > $L/s_$m.log 2>&1; st "sample $m rc=$? $(( $(date +%s) - t0 ))s"
  grep -E "^ *k *=|k=64|fit" $L/s_$m.log | tail -3 >> $L/status
done
python plot_scaling.py > $L/plot.log 2>&1; st "plot rc=$?"
mkdir -p out/keep && for m in teacher pure hybrid pure_random; do bash .gpu/keep_teacher.sh out/$m out/keep/$m; done; st "packed"
st "all done"
