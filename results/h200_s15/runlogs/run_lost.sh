#!/bin/bash
# One hold: the GPU-only tests of this tree, then in .run (tree 692ca4a) the default run, the decode bench at
# the default shapes and 64 samples of 200 test problems per model, each alone on the GPU.
export PYTHONUNBUFFERED=1
cd .run
mkdir -p out/runlogs
L=out/runlogs
st() { echo "$(date +%T) $*" >> $L/status; }
st "start"; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader >> $L/status
t0=$(date +%s); python mamba_distill.py > $L/distill.log 2>&1; st "default run rc=$? $(( $(date +%s) - t0 ))s"
t0=$(date +%s); python sample.py --bench --bench_shapes default --bench_batches "" --bench_gen_lens 256,512,1024,2048,4096 --bench_hf false --compile false > $L/decode_bench.log 2>&1; st "decode bench rc=$? $(( $(date +%s) - t0 ))s"
for m in teacher pure hybrid hybrid_random; do
  t0=$(date +%s); python sample.py --checkpoint out/$m > $L/s_$m.log 2>&1; st "sample $m rc=$? $(( $(date +%s) - t0 ))s"
done
python plot_scaling.py > $L/plot.log 2>&1; st "plot rc=$?"
st "all done"
