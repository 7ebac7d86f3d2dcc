#!/bin/bash
# The recorded default run: README's commands, each model alone on the GPU. Outputs under out/ (not carried).
export PYTHONUNBUFFERED=1
mkdir -p out/runlogs
L=out/runlogs
st() { echo "$(date +%T) $*" >> $L/status; }
st "start $(git rev-parse --short HEAD 2>/dev/null)"; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader >> $L/status
python -c "import torch, triton, numpy; print(torch.__version__, triton.__version__, numpy.__version__)" >> $L/status
t0=$(date +%s); python mamba_distill.py > $L/distill.log 2>&1; st "default run rc=$? $(( $(date +%s) - t0 ))s"
for m in teacher hybrid pure hybrid_random; do
  t0=$(date +%s); TORCH_LOGS=recompiles python sample.py --checkpoint out/$m > $L/s_$m.log 2>&1; st "sample $m rc=$? $(( $(date +%s) - t0 ))s"
done
python plot_scaling.py > $L/plot.log 2>&1; st "plot rc=$?"
st "all done"
