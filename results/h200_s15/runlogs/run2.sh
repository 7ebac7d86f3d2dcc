#!/bin/bash
# The merged (slimmer) tree on the GPU: its GPU-only tests, the decode bench at the default run's shapes,
# the smoke preset end to end, and the compiled sampler on the smoke hybrid.
export PYTHONUNBUFFERED=1
L=$OUT/runlogs; mkdir -p $L
st() { echo "$(date +%T) $*" | tee -a $L/status; }
st start; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee -a $L/status
t0=$(date +%s); timeout 150 python -m pytest -q -x test_all.py -k "test_gpu or cuda_graph" > $L/gputests.log 2>&1; st "gputests rc=$? $(( $(date +%s) - t0 ))s"; tail -2 $L/gputests.log
t0=$(date +%s); python sample.py --bench --bench_shapes default --bench_batches "" --bench_gen_lens 256,512,1024,2048,4096 --bench_hf false --compile false --out_dir out_gpu > $L/decode_bench.log 2>&1; st "decode bench rc=$? $(( $(date +%s) - t0 ))s"
t0=$(date +%s); timeout 200 python mamba_distill.py --preset smoke --out_dir out_gpu/smoke > $L/smoke.log 2>&1; st "smoke rc=$? $(( $(date +%s) - t0 ))s"
t0=$(date +%s); timeout 150 python sample.py --checkpoint out_gpu/smoke/hybrid --out_dir out_gpu --n_problems 16 --k 4 > $L/s_smoke.log 2>&1; st "sample smoke hybrid rc=$? $(( $(date +%s) - t0 ))s"
cp -r out_gpu/bench $OUT/ 2>/dev/null; cp out_gpu/smoke/summary.json $OUT/smoke_summary.json 2>/dev/null; cp -r out_gpu/eval $OUT/ 2>/dev/null
st done
