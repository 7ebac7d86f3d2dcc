"""Per layer of a teacher: how much its heads copy (induction score) and look far back, on solution tokens."""
import sys, os; sys.path.insert(0, os.getcwd())
import torch, mamba_distill as md
path, n = sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 8
dev = "cuda" if torch.cuda.is_available() else "cpu"
model, tok = md.load_teacher(path, dev, torch.float32)
rows = md.read_jsonl(path.rsplit("/", 1)[0] + "/data/test.jsonl")[:n]
L, H = model.cfg.num_hidden_layers, model.cfg.num_attention_heads
ind, far, sink = torch.zeros(L, H), torch.zeros(L, H), torch.zeros(L, H)
cnt = 0
for r in rows:
    p = md.encode_prompt(tok, r["question"]); a = tok.encode(r["answer"])
    x = torch.tensor([p + a], device=dev)
    collect = []
    with torch.no_grad():
        model(x, collect=collect, return_hidden=True)
        rope = model.rope(torch.arange(x.shape[1], device=dev)[None], collect[0][0].dtype)
        t = torch.arange(len(p), x.shape[1], device=dev)  # solution tokens
        l = x.shape[1]
        prev = torch.cat([x[0, :1] * 0 - 1, x[0, :-1]])  # token before each key
        match = (prev[None, :] == x[0, t][:, None]) & (torch.arange(l, device=dev)[None] < t[:, None])  # (T, l)
        far_mask = (torch.arange(l, device=dev)[None] < t[:, None] - 32) & (torch.arange(l, device=dev)[None] >= 4)
        for i, blk in enumerate(model.model.layers):
            M = blk.self_attn.matrix(collect[i][0], rope)[0][:, t]  # (h, T, l)
            ind[i] += (M * match).sum(-1).sum(-1).cpu()
            far[i] += (M * far_mask).sum(-1).sum(-1).cpu()
            sink[i] += M[..., :4].sum(-1).sum(-1).cpu()
    cnt += len(t)
ind, far, sink = ind / cnt, far / cnt, sink / cnt
for i in range(L):
    print(f"layer {i}: induction " + " ".join(f"{v:.2f}" for v in ind[i]) + " | far(>32, no sink) "
          + " ".join(f"{v:.2f}" for v in far[i]) + " | sink " + " ".join(f"{v:.2f}" for v in sink[i]))
by_ind = sorted(range(L), key=lambda i: -ind[i].max().item())
by_far = sorted(range(L), key=lambda i: -far[i].max().item())
print("layers by their best head's induction score: " + ",".join(map(str, by_ind)))
print("layers by their best head's far share: " + ",".join(map(str, by_far)))
