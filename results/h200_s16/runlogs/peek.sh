#!/bin/bash
# What the run has written so far, without weights, samples and data.
cat out/runlogs/status 2>/dev/null; tail -n 4 out/runlogs/*.log 2>/dev/null; nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv,noheader
tar czf $OUT/out.tgz --exclude='*.safetensors' --exclude='samples*.jsonl' --exclude='out/data' --exclude='ckpt*' --exclude='tokenizer*' out 2>/dev/null; ls -la $OUT
