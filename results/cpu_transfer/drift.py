"""How far distillation moved a student's transferred weights from the teacher's.

Run from the repository root: python results/cpu_transfer/drift.py TEACHER_DIR STUDENT_DIR
Per Mamba layer, for each row of the transfer table (Q -> C, K -> B, V -> x, O -> out), the cosine
between the teacher's matrix and the student's (1 = unchanged direction) and the ratio of their norms;
then how far the MLP matrices moved (|student - teacher| / |teacher|).
"""
import sys

import torch.nn.functional as F

sys.path.insert(0, ".")
import mamba_distill as md  # noqa: E402

T = md.load_safetensors(sys.argv[1] + "/model.safetensors")
student = md.load_model(sys.argv[2])
S = student.state_dict()
for i in student.cfg.ssm_layers:
    mixer = student.model.layers[i].mixer
    cells = []
    for t_name, s_name, block in md.ATTENTION_TO_SSM:
        src = T[f"model.layers.{i}.{t_name}"].float()
        dst = S[f"model.layers.{i}.{s_name}"].float()
        dst = dst[mixer.rows(block)] if block else dst
        cos = F.cosine_similarity(src.flatten(), dst.flatten(), dim=0).item()
        cells.append(f"{block or 'out'} cos {cos:.2f} norm x{dst.norm().item() / src.norm().item():.2f}")
    print(f"layer {i}: " + ", ".join(cells))
moved = [(S[k].float() - T[k].float()).norm().item() / T[k].float().norm().item() for k in S if k in T and ".mlp." in k]
print(f"MLP matrices moved by {sum(moved) / len(moved):.3f} on average (largest {max(moved):.3f}) of their norm")
