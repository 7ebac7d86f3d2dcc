# A pure-Mamba LM trained from scratch on the relay task's text (CPU, minutes), then its teacher-forced
# next-token loss by position: parallel forward vs token-by-token decode with an fp32 or a bf16 SSM state.
import time, math, sys, torch, torch.nn.functional as F, mamba_distill as md
torch.manual_seed(0); torch.set_num_threads(2)
argv = ["--out_dir", "/tmp/ml", "--max_steps", "4", "--digits", "3"]
cfg = md.apply_preset(md.parse_config(md.DistillConfig, argv), argv)
train = md.synthetic_rows(cfg, "train", 4000); test = md.synthetic_rows(cfg, "test", 16)
tok = md.train_bpe([r["question"] + "\n" + r["answer"] for r in train[:2000]], 512, "/tmp/ml_tok2.model")
mc = md.ModelConfig(vocab_size=tok.n_words, hidden_size=128, intermediate_size=384, num_hidden_layers=4,
                    num_attention_heads=4, num_key_value_heads=2, head_dim=32, ssm_layers=[0, 1, 2, 3])
model = md.LM(mc)
for name, p in model.named_parameters():
    if p.dim() == 2 and 'conv' not in name: torch.nn.init.normal_(p, std=0.02)
batches = md.Batches(tok, train, 1024, 0)
print("mean len", batches.mean_len, flush=True)
opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
steps = int(sys.argv[1]); t0 = time.time()
for step in range(steps):
    lr = 3e-3 * min(1, (step + 1) / 50) * 0.5 * (1 + math.cos(math.pi * step / steps))
    for g in opt.param_groups: g["lr"] = lr
    x, y, m, _ = batches.get("lm", step, 8)
    logits = model(x)
    loss = (F.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="none") * m.flatten()).sum() / m.sum()
    opt.zero_grad(); loss.backward(); torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0); opt.step()
    if step % 100 == 0: print(step, round(loss.item(), 4), round(time.time() - t0), flush=True)
model.eval()
A = [-(torch.exp(b.mixer.A_log) * F.softplus(b.mixer.dt_bias)) for b in model.model.layers]
print("dt*A at bias (per layer, min |.|):", [f"{a.abs().min():.2e}" for a in A])
rows = [md.encode_prompt(tok, r["question"]) + tok.encode(r["answer"]) for r in test]
L = min(map(len, rows)); idx = torch.tensor([r[:L] for r in rows])
with torch.no_grad():
    ref = F.cross_entropy(model(idx)[:, :-1].flatten(0, 1), idx[:, 1:].flatten(), reduction="none").view(len(rows), -1)
    for sd in (torch.float32, torch.bfloat16):
        cache = model.allocate_cache(len(rows), L, torch.float32, "cpu", sd); out = []
        for t in range(L - 1):
            out.append(model(idx[:, t:t + 1], cache, start=t)[:, -1])
        ce = F.cross_entropy(torch.stack(out, 1).flatten(0, 1), idx[:, 1:].flatten(), reduction="none").view(len(rows), -1)
        w = (L - 1) // 4
        print(sd, "L", L, "loss by quarter: parallel", [f"{ref[:, i*w:(i+1)*w].mean():.4f}" for i in range(4)],
              "decode", [f"{ce[:, i*w:(i+1)*w].mean():.4f}" for i in range(4)],
              "max |dlogp| by quarter", [f"{(ce - ref)[:, i*w:(i+1)*w].abs().max():.4f}" for i in range(4)], flush=True)
