"""How much of each attention layer's output a freshly transferred mixer reproduces, before any training.

Run from the repository root on a CPU: python results/cpu_transfer/init_error.py TEACHER_DIR [SEED]
(the teacher is a directory written by mamba_distill.py; SEED the seed it was trained with, which made
its data). Four test problems, their first 1,024 tokens. Per layer, two errors of the mixer's output
against the attention output it replaces, fed the teacher's input to that layer: the relative squared
error (stage 1's loss; 1 = a mixer that outputs nothing) and 1 - cos^2 (what no rescaling of the output
can remove), for random mixers, the transfer as mamba_distill.py makes it, the same without the gated
norm's random gate z, and with other dt and A.
"""
import math
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, ".")
import mamba_distill as md  # noqa: E402

teacher, tok = md.load_teacher(sys.argv[1])
seed = int(sys.argv[2]) if len(sys.argv) > 2 else 0
L = 1024
rows = [r for r in md.synthetic_split("test", 40, seed=seed, task="relay", digits=4)
        if len(tok.encode(r["answer"])) > L][:4]
x = torch.tensor([(md.encode_prompt(tok, r["question"]) + tok.encode(r["answer"]))[:L] for r in rows])  # (4, L)
layers = list(range(teacher.cfg.num_hidden_layers))
with torch.no_grad():
    collect = []
    teacher(x, collect=collect, return_hidden=True)  # each layer's (input, attention output)


def errors(student):
    rel, cos = [], []
    with torch.no_grad():
        for i in layers:
            h_in, target = collect[i]  # (4, L, d) each
            out = student.model.layers[i].mixer(h_in).float()  # (4, L, d)
            t = target.float()
            rel.append(((out - t).pow(2).sum(-1) / t.pow(2).sum(-1)).mean().item())
            cos.append((1 - F.cosine_similarity(out, t, dim=-1).pow(2)).mean().item())
    return rel, cos


def variant(label, init, dt=None, a=None, gate=True):
    torch.manual_seed(0)
    s = md.transfer_attention_to_mamba(teacher, layers, init=init)
    with torch.no_grad():
        for i in layers:
            m = s.model.layers[i].mixer
            if dt is not None:
                m.dt_bias.fill_(math.log(math.expm1(dt)))  # softplus(dt_bias) = dt
            if a is not None:
                m.A_log.fill_(math.log(a))
            if not gate:  # the gated norm without its gate: y / rms(y)
                m.norm.forward = (lambda norm: lambda y, gate=None: md.RMSNorm.forward(norm, y))(m.norm)
    rel, cos = errors(s)
    print(f"{label:44s} {sum(rel) / len(rel):6.3f} {sum(cos) / len(cos):6.3f}   " + " ".join(f"{c:.3f}" for c in cos))


print(f"{len(rows)} test problems, {L} tokens; mean over layers of: relative error, 1 - cos^2; then 1 - cos^2 per layer")
variant("random mixers (Mamba-2 init)", "random")
variant("transfer, Mamba-2 dt and A (mamba_distill.py)", "attention")
variant("transfer, Mamba-2 dt and A, no gate", "attention", gate=False)
for dt, a in ((1.0, 1e-3), (0.1, 0.1), (0.01, 1.0)):
    variant(f"transfer, dt {dt}, A {a}", "attention", dt, a)
    variant(f"transfer, dt {dt}, A {a}, no gate", "attention", dt, a, gate=False)
