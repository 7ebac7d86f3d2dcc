#!/bin/bash
# On one carried teacher (TEACHER, trained with seed SEED): the default students plus a pure student
# from random mixers, in one process; then 64 samples a problem from each of the four models, each
# alone on the GPU. Outputs under out/f4 (never carried). EXTRA goes to mamba_distill.py, SEXTRA to
# sample.py (e.g. "--preset tiny" and "--k 4 --n_problems 4" on a CPU).
export PYTHONUNBUFFERED=1
TEACHER=${TEACHER:-.gpu/teacher_t2}; SEED=${SEED:-2}; O=out/f4
mkdir -p out/runlogs; L=out/runlogs
st() { echo "$(date +%T) $*" >> $L/status; }
st "start $(git rev-parse --short HEAD 2>/dev/null)"; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader >> $L/status 2>/dev/null
python -c "import torch, triton, numpy; print(torch.__version__, triton.__version__, numpy.__version__)" >> $L/status
# beside it (its time is not a headline figure): four smoke runs, two with --deterministic and two
# without, to see whether the flag repeats a GPU run bit for bit (and at what throughput)
for r in d1 d2 n1 n2; do
  f=""; [ ${r:0:1} = d ] && f="--deterministic true"
  (t1=$(date +%s); python mamba_distill.py ${DEXTRA:---preset smoke} --students pure --random_baseline "" --eval_n 0 $f --out_dir out/det/$r > $L/det_$r.log 2>&1; st "det $r rc=$? $(( $(date +%s) - t1 ))s") &
done
t0=$(date +%s); python mamba_distill.py $EXTRA --teacher $TEACHER --seed $SEED --random_baseline pure --out_dir $O > $L/f4.log 2>&1
st "distill rc=$? $(( $(date +%s) - t0 ))s"
mkdir -p out/keep && for m in pure hybrid; do bash .gpu/keep_teacher.sh $O/$m out/keep/$m; done; st "packed"
wait
python - >> $L/status 2>&1 <<'PY'
import json
def losses(r, m):
    try:
        return [(x["stage"], x["step"], x.get("loss"), x.get("held_out_loss")) for x in map(json.loads, open(f"out/det/{r}/logs/{m}.jsonl"))]
    except OSError as e:
        return str(e)
for m in ("teacher", "pure"):
    for a, b in (("d1", "d2"), ("n1", "n2")):
        x, y = losses(a, m), losses(b, m)
        first = next((i for i, (p, q) in enumerate(zip(x, y)) if p != q), None) if isinstance(x, list) and isinstance(y, list) else "?"
        print(f"det check {m} {a}/{b}: {len(x)} log lines, identical={x == y}, first difference at line {first}")
PY
for m in teacher pure hybrid pure_random; do
  c=$O/$m; [ $m = teacher ] && c=$TEACHER
  t0=$(date +%s); python sample.py $SEXTRA --checkpoint $c --name $m --out_dir $O > $L/s_$m.log 2>&1; st "sample $m rc=$? $(( $(date +%s) - t0 ))s"
done
python plot_scaling.py --out_dir $O > $L/plot.log 2>&1; st "plot rc=$?"
st "all done"
