#!/bin/bash
# Does stage 1 (layer-wise output alignment) level attention-initialised and random mixers? On one
# carried teacher (TEACHER, trained with seed SEED), side by side, each an attention-initialised student
# beside its random-mixer twin, both without stage 1: a pure student (a0), a hybrid (a0h), and a pure
# student with a longer stage 2 (a0k). Outputs under out/ (never carried). EXTRA goes to every
# mamba_distill.py (e.g. "--preset tiny" on a CPU).
export PYTHONUNBUFFERED=1
TEACHER=${TEACHER:-.gpu/teacher_t2}; SEED=${SEED:-2}
mkdir -p out/runlogs; L=out/runlogs
st() { echo "$(date +%T) $*" >> $L/status; }
st "start $(git rev-parse --short HEAD 2>/dev/null)"; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader >> $L/status 2>/dev/null
python -c "import torch, triton, numpy; print(torch.__version__, triton.__version__, numpy.__version__)" >> $L/status
run() {  # name, flags
  local n=$1; shift; local t0=$(date +%s)
  python mamba_distill.py $EXTRA --teacher $TEACHER --seed $SEED --align_steps 0 --out_dir out/$n "$@" > $L/$n.log 2>&1
  st "$n rc=$? $(( $(date +%s) - t0 ))s"; grep -E "greedy accuracy|stage wall" $L/$n.log | sed "s/^/$n: /" >> $L/status
}
run a0 --students pure --random_baseline pure &
run a0h --students hybrid --random_baseline hybrid &
run a0k --students pure --random_baseline pure --kl_steps 2000 &
wait
st "all done"
