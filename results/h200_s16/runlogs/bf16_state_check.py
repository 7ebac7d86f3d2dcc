# Does an SSM state kept in bf16 between decode steps drift from the fp32 one over long generations?
import torch, mamba_distill as md
torch.manual_seed(0)
cfg = md.ModelConfig(vocab_size=862, hidden_size=384, intermediate_size=1024, num_hidden_layers=8,
                     num_attention_heads=6, num_key_value_heads=2, head_dim=64, ssm_layers=list(range(8)))
m = md.LM(cfg).eval()
L = 2000
idx = torch.randint(0, 862, (1, L))
with torch.no_grad():
    ref = m(idx, return_hidden=True)[0].float()  # (L, d)
    for amp in (False, True):
        for sd in (torch.float32, torch.bfloat16):
            cache = m.allocate_cache(1, L, torch.float32, "cpu", sd)
            out = []
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
                for t in range(L):
                    out.append(m(idx[:, t:t+1], cache, start=t, return_hidden=True)[0, -1].float())
            out = torch.stack(out)
            rel = (out - ref).norm(dim=-1) / ref.norm(dim=-1)  # (L,)
            print(f"autocast {amp} state {sd}:", " ".join(f"[{a},{a+250}) {rel[a:a+250].mean():.4f}" for a in range(0, L, 500)), flush=True)
