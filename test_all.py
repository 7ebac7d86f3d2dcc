"""The test suite: `python -m pytest -q test_all.py` (CPU: about a minute; GPU tests skip without CUDA).

Tiny shapes throughout. Triton kernels run under TRITON_INTERPRET=1 when there is no GPU, in fp32.
Sections: the model (step == forward, padding, the linear-attention identity, the transfer table),
tokenizer / safetensors / data, the scan kernel and decode step, decode attention, the fused KL loss,
sample.py, HF parity of teacher files, the whole pipeline (resume, DDP, presets), plot_scaling.py.

Glossary (as in the project's files): b batch, l length, h heads, k key/value heads (GQA groups),
e head dim, p SSM head dim, n SSM state dim, g groups of B and C, v vocabulary, d model width.
"""
import copy
import json
import math
import os
import random
import sys

import matplotlib.image
import pytest
import regex
import torch
import torch.nn.functional as F

if not torch.cuda.is_available():  # must be set before triton is imported anywhere
    os.environ.setdefault("TRITON_INTERPRET", "1")

import mamba_distill as md  # noqa: E402
import plot_scaling as ps  # noqa: E402
import sample  # noqa: E402
from scan_kernel import (conv_step, conv_step_ref, decode_attention, decode_attention_ref, fused_kl_div,  # noqa: E402
                         kl_div_ref, random_inputs, random_logits, ssd_scan, ssd_scan_chunked_torch, ssd_scan_ref,
                         ssd_step, ssd_step_ref)
from mamba_distill import (  # noqa: E402
    LLAMA3_SPLIT_PATTERN, SAFETENSORS_DTYPES, InputError, Tokenizer, gold_answer,
    load_safetensors, load_state_dict, load_tiktoken_bpe_file, make_problem, prompt_text, read_jsonl,
    save_safetensors, synthetic_split, train_bpe, write_jsonl,
)

HERE = os.path.dirname(os.path.abspath(__file__))
SHARED = os.environ.get("SHARED_DIR", os.path.join(HERE, "..", "shared"))
CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")


@pytest.fixture(autouse=True)
def same_start(monkeypatch):
    """Every test starts from the same random state and with torch's fp32 matmuls exact, whatever ran before
    it (setup_env("cuda") turns tf32 on for the rest of the process)."""
    torch.manual_seed(0)
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)


def assert_close(actual, expected, atol=1e-5, rtol=1e-5, what=""):
    """torch.testing.assert_close, with the max abs error always in the message."""
    err = (actual.float() - expected.float()).abs().max().item() if actual.numel() else 0.0
    torch.testing.assert_close(actual.float(), expected.float(), atol=atol, rtol=rtol,
                               msg=lambda m: f"{what} max abs err {err:.3g}\n{m}")


def tiny_config(**kw):
    base = dict(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=256,
                rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                              "high_freq_factor": 4.0, "original_max_position_embeddings": 32})
    base.update(kw)
    return md.ModelConfig(**base)


def tiny_models(seed=0, **kw):
    """A random tiny teacher, and its hybrid (layers 0, 2 -> SSM) and pure students. Untied embeddings:
    a random tied model only repeats its last token, which would make the greedy tests trivial."""
    kw.setdefault("tie_word_embeddings", False)
    torch.manual_seed(seed)
    teacher = md.LM(tiny_config(**kw)).eval()
    hybrid = md.transfer_attention_to_mamba(teacher, [0, 2]).eval()
    pure = md.transfer_attention_to_mamba(teacher, range(4)).eval()
    return {"teacher": teacher, "hybrid": hybrid, "pure": pure}


# -----------------------------------------------------------------------------
# model: recurrent step == parallel forward, ragged batches, the linear-attention identity


@pytest.mark.parametrize("kind", ["teacher", "hybrid", "pure"])
def test_step_equals_forward(kind):
    """Prefill in pieces (one shorter than the conv's w-1 = 3 remembered inputs), then decode steps,
    all through the cache: the logits of one parallel forward."""
    model = tiny_models()[kind]
    torch.manual_seed(1)
    idx = torch.randint(0, 96, (2, 11))
    with torch.no_grad():
        full = model(idx)  # (b, l, v)
        cache = model.allocate_cache(2, 16, torch.float32, "cpu")
        outs = [model(idx[:, :3], cache, start=0), model(idx[:, 3:5], cache, start=3)]
        for t in range(5, 11):  # then step one token at a time
            outs.append(model(idx[:, t:t + 1], cache, start=torch.tensor(t)))
    assert_close(torch.cat(outs, 1), full, atol=1e-4, rtol=1e-4, what=kind)


@pytest.mark.parametrize("kind", ["teacher", "hybrid", "pure"])
def test_left_padding_leaves_no_trace(kind):
    """A left-padded row gives the logits it gives alone: padding reaches no attention or SSM state."""
    model = tiny_models()[kind]
    torch.manual_seed(2)
    short, long_ = torch.randint(0, 96, (1, 4)), torch.randint(0, 96, (1, 9))
    batch = torch.cat([torch.cat([torch.full((1, 5), 7), short], 1), long_])  # (2, 9), row 0 padded by 5
    pad = torch.tensor([5, 0])
    with torch.no_grad():
        cache = model.allocate_cache(2, 12, torch.float32, "cpu")
        both = model(batch, cache, start=0, pad=pad)
        nxt = torch.tensor([[3], [4]])
        both_step = model(nxt, cache, start=torch.tensor(9), pad=pad)
        alone = model(torch.cat([short, nxt[:1]], 1))
    assert_close(both[0, 5:], alone[0, :4], atol=1e-4, rtol=1e-4, what="prefill")
    assert_close(both_step[0, 0], alone[0, 4], atol=1e-4, rtol=1e-4, what="decode step")
    assert_close(both[1], model(long_)[0], atol=1e-4, rtol=1e-4, what="unpadded row")


def test_linear_attention_identity():
    """Freshly transferred, with decay off (A = 0), dt = 1, identity conv, no gate and D = 0, the mixer
    is exactly causal linear attention (no softmax, no RoPE) with the teacher's own Q, K, V, O."""
    teacher = tiny_models()["teacher"]
    student = md.transfer_attention_to_mamba(teacher, [1])
    mixer, attn = student.model.layers[1].mixer, teacher.model.layers[1].self_attn
    with torch.no_grad():
        mixer.A_log.fill_(-float("inf"))  # A = -exp(-inf) = 0: no decay
        mixer.in_proj.weight[mixer.rows("dt")] = 0
        mixer.dt_bias.fill_(torch.log(torch.expm1(torch.tensor(1.0))).item())  # softplus(.) = 1
        mixer.D.zero_()
    mixer.conv = lambda xBC, cache=None, ctx=None: xBC  # identity conv, no activation
    mixer.norm.forward = lambda y, gate=None: y  # no gate, no norm
    torch.manual_seed(3)
    u = torch.randn(2, 7, 64)
    b, l, h, k, e = 2, 7, 4, 2, 16
    q = attn.q_proj(u).view(b, l, h, e).transpose(1, 2)  # (b, h, l, e)
    kk = attn.k_proj(u).view(b, l, k, e).transpose(1, 2).repeat_interleave(h // k, 1)
    v = attn.v_proj(u).view(b, l, k, e).transpose(1, 2).repeat_interleave(h // k, 1)
    scores = (q @ kk.transpose(-1, -2)).tril()  # (b, h, l, l): causal, no softmax
    expected = attn.o_proj((scores @ v).transpose(1, 2).reshape(b, l, h * e))
    with torch.no_grad():
        assert_close(mixer(u), expected, atol=1e-4, rtol=1e-4, what="linear attention")


@pytest.mark.parametrize("conv_init", ["identity", "mamba2"])
def test_conv_init_identity_keeps_q_k_v(conv_init):
    """--conv_init identity: a fresh mixer's C, B, x are silu of the teacher's Q, K, V at the same token;
    Mamba-2's random conv mixes in the tokens before."""
    teacher = tiny_models()["teacher"]
    torch.manual_seed(0)
    mixer = md.transfer_attention_to_mamba(teacher, [1], conv_init=conv_init).model.layers[1].mixer
    attn = teacher.model.layers[1].self_attn
    u = torch.randn(2, 7, 64)
    with torch.no_grad():
        _, x, B, C, _ = mixer.project(u)
        same = [torch.allclose(got, F.silu(proj(u)), atol=1e-5)
                for got, proj in ((C, attn.q_proj), (B, attn.k_proj), (x, attn.v_proj))]
    assert same == [conv_init == "identity"] * 3, same


def test_mixing_matrices_reproduce_the_layers():
    """Stage 0's matrices are the layers: the attention matrix times v gives the attention's output,
    the mixer's SSD matrix times x (plus D x) the mixer's output, both through their own projections."""
    models = tiny_models()
    attn, mixer = models["teacher"].model.layers[1].self_attn, models["pure"].model.layers[1].mixer
    torch.manual_seed(4)
    u = torch.randn(2, 9, 64)
    b, l, h, g, e = 2, 9, 4, 2, 16
    pos = torch.arange(l).expand(b, l)
    rope = models["teacher"].rope(pos, u.dtype)
    with torch.no_grad():
        mixer.A_log.uniform_(-1, 1)  # decays and steps that matter over 9 tokens
        mixer.dt_bias.uniform_(-1, 1)
        v = attn.v_proj(u).view(b, l, g, e).transpose(1, 2).repeat_interleave(h // g, 1)  # (b, h, l, e)
        y = attn.o_proj((attn.matrix(u, rope) @ v).transpose(1, 2).reshape(b, l, h * e))  # (b, l, d)
        assert_close(y, attn(u, rope), atol=1e-5, rtol=1e-4, what="attention")
        z, x, _, _, _ = mixer.project(u)
        x = x.view(b, l, g, e).transpose(1, 2).repeat_interleave(h // g, 1)  # (b, h, l, p)
        y = mixer.matrix(u) @ x + mixer.D[:, None, None] * x  # (b, h, l, p)
        out = mixer.out_proj(mixer.norm(y.transpose(1, 2).reshape(b, l, h * e), gate=z))
        assert_close(out, mixer(u), atol=1e-5, rtol=1e-4, what="mixer")


def test_orientation_stage_moves_the_matrices_towards_attention():
    """A few steps of stage 0's loss, on the parameters it trains, bring the mixers' matrices closer
    to the teacher's attention matrices."""
    models = tiny_models()
    teacher, student = models["teacher"], models["pure"]
    loss_fn = md.orient_loss_fn(teacher, list(range(4)), pad_id=-1, max_len=12)
    params = [p for name, p in student.named_parameters()
              if name.split(".mixer.")[-1].split(".")[0] in md.MambaMixer.MATRIX_PARAMS]
    optimizer = torch.optim.Adam(params, lr=2e-2)
    torch.manual_seed(5)
    x = torch.randint(0, 96, (3, 16))
    losses = []
    for _ in range(15):
        s, n = loss_fn(student, x, None, None)
        assert n.item() == 3 * 12  # the first max_len tokens of each row
        losses.append(s.item() / n.item())
        optimizer.zero_grad()
        s.backward()
        optimizer.step()
    assert losses[-1] < 0.8 * losses[0], losses


@needs_cuda
def test_gpu_orientation_loss_under_bf16_autocast():
    """Stage 0 as it runs on a GPU (bf16 teacher, bf16 autocast): the loss and its gradient match the
    fp32 CPU computation within bf16 rounding."""
    models = tiny_models()
    teacher, student = models["teacher"], models["pure"]
    torch.manual_seed(6)
    x = torch.randint(0, 96, (2, 40))
    loss_fn = md.orient_loss_fn(teacher, list(range(4)), pad_id=-1, max_len=32)
    s_cpu, n = loss_fn(student, x, None, None)
    g_cpu = torch.autograd.grad(s_cpu, student.model.layers[0].mixer.in_proj.weight)[0]
    teacher_gpu, student_gpu = copy.deepcopy(teacher).cuda().to(torch.bfloat16), copy.deepcopy(student).cuda()
    with torch.autocast("cuda", torch.bfloat16):
        s_gpu, _ = md.orient_loss_fn(teacher_gpu, list(range(4)), -1, 32)(student_gpu, x.cuda(), None, None)
    g_gpu = torch.autograd.grad(s_gpu, student_gpu.model.layers[0].mixer.in_proj.weight)[0]
    assert_close(s_gpu.cpu() / n, s_cpu / n, atol=2e-3, rtol=5e-2, what="loss")
    assert_close(g_gpu.cpu(), g_cpu, atol=5e-3 * g_cpu.abs().max().item(), rtol=1e-1, what="gradient")


def test_rope_frequencies_stay_fp32():
    """A bf16 teacher (as on a GPU) must not hand its students bf16-rounded RoPE frequencies."""
    teacher = tiny_models()["teacher"].to(torch.bfloat16)
    student = md.transfer_attention_to_mamba(teacher, [0, 2])
    exact = md.rope_inv_freq(teacher.cfg)
    assert teacher.inv_freq.dtype == student.inv_freq.dtype == torch.float32
    assert torch.equal(teacher.inv_freq, exact) and torch.equal(student.inv_freq, exact)


def test_transfer_mapping_table():
    teacher = tiny_models()["teacher"]
    student = md.transfer_attention_to_mamba(teacher, [0, 3])
    t, s = teacher.model.layers[3].self_attn, student.model.layers[3].mixer
    assert torch.equal(s.in_proj.weight[s.rows("C")], t.q_proj.weight)
    assert torch.equal(s.in_proj.weight[s.rows("B")], t.k_proj.weight)
    assert torch.equal(s.in_proj.weight[s.rows("x")], t.v_proj.weight)
    assert torch.equal(s.out_proj.weight, t.o_proj.weight)
    assert torch.equal(student.model.layers[1].self_attn.q_proj.weight, teacher.model.layers[1].self_attn.q_proj.weight)
    assert torch.equal(student.model.layers[0].mlp.up_proj.weight, teacher.model.layers[0].mlp.up_proj.weight)
    rand = md.transfer_attention_to_mamba(teacher, [0, 3], init="random")
    assert not torch.equal(rand.model.layers[3].mixer.out_proj.weight, t.o_proj.weight)
    assert md.spread_layers(16, 4) == [2, 6, 10, 14]


def test_fused_qkv_equals_three_projections(tmp_path):
    """After the Sampler's fuse_qkv: the same logits and cached decode without gradients, the same
    gradients with them (they reach q_proj/k_proj/v_proj, now views of the stacked weight), HF's names
    in the state_dict, and a checkpoint that reloads to the same model."""
    plain = tiny_models()["hybrid"]
    fused = sample.fuse_qkv(tiny_models()["hybrid"])
    attn = fused.model.layers[1].self_attn
    assert "qkv" in vars(attn) and plain.state_dict().keys() == fused.state_dict().keys()
    idx = torch.randint(0, 96, (2, 9), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert_close(fused(idx), plain(idx), what="no-grad forward")
        cache = fused.allocate_cache(2, 16, torch.float32, "cpu")
        fused(idx[:, :8], cache, start=0)
        assert_close(fused(idx[:, 8:], cache, start=8)[:, -1], plain(idx)[:, -1], what="decode step")
    for m in (plain, fused):
        F.cross_entropy(m(idx).flatten(0, 1), idx.flatten()).backward()
    for name in ("q_proj", "k_proj", "v_proj"):
        g_f = getattr(attn, name).weight.grad
        assert g_f is not None, name
        assert_close(g_f, getattr(plain.model.layers[1].self_attn, name).weight.grad, what=f"{name} grad")
    md.save_model(fused, byte_tokenizer(tmp_path / "tok.model"), str(tmp_path / "m"))
    with torch.no_grad():
        assert_close(md.load_model(str(tmp_path / "m"))(idx), plain(idx), what="reloaded")


def test_bf16_load_keeps_the_mixers_decay_parameters_in_fp32(tmp_path):
    """load_model in bf16 (the sampler's) rounds the weights but keeps each mixer's A_log, dt_bias and D
    exactly as saved, and the model still decodes (the mixer reads them in fp32 either way)."""
    pure = tiny_models()["pure"]
    md.save_model(pure, byte_tokenizer(tmp_path / "tok.model"), str(tmp_path / "m"))
    loaded = md.load_model(str(tmp_path / "m"), dtype=torch.bfloat16)
    kept = {k: v for k, v in loaded.state_dict().items() if k.rsplit(".", 1)[1] in md.MambaMixer.FP32_PARAMS}
    assert len(kept) == 3 * pure.cfg.num_hidden_layers
    saved = pure.state_dict()
    for k, v in kept.items():
        assert v.dtype == torch.float32 and torch.equal(v, saved[k]), k
    assert loaded.model.layers[0].mixer.in_proj.weight.dtype == torch.bfloat16
    outs = sample.Sampler(loaded, 3, 32, temperature=0).generate(PROMPTS, 4)[0]
    assert [len(o) for o in outs] == [4, 4, 4]


def test_fused_qkv_is_never_stale():
    """Writes in place (load_state_dict) reach the stacked weight; a weight given new storage leaves it
    behind, and a Sampler built before then refuses to run."""
    fused = sample.fuse_qkv(tiny_models()["teacher"])
    other = tiny_models(seed=1)["teacher"]
    idx = torch.randint(0, 96, (2, 9), generator=torch.Generator().manual_seed(4))
    fused.load_state_dict(other.state_dict())
    with torch.no_grad():
        assert_close(fused(idx), other(idx), what="after load_state_dict")
    sampler = sample.Sampler(fused, 2, 32, temperature=0)
    fused.to(torch.float32)  # a no-op .to() keeps the storage, so the Sampler still runs
    sampler.generate(PROMPTS[:2], 4)
    attn = fused.model.layers[2].self_attn
    attn.k_proj.weight.data = attn.k_proj.weight.detach().clone() + 1.0  # new storage
    with pytest.raises(RuntimeError, match="new storage"):
        sampler.generate(PROMPTS[:2], 4)


LLAMA3_TOKENIZER = os.path.join(SHARED, "llama3", "tokenizer.model")
GSM8K_TEST = os.path.join(SHARED, "data", "gsm8k", "test.jsonl")


# -----------------------------------------------------------------------------
# tokenizer


@pytest.fixture(scope="module")
def llama3_tokenizer():
    if not os.path.exists(LLAMA3_TOKENIZER):
        pytest.skip(f"Llama 3 tokenizer file not found at {LLAMA3_TOKENIZER}")
    return Tokenizer(LLAMA3_TOKENIZER)


def test_llama3_tokenizer_ids(llama3_tokenizer):
    tok = llama3_tokenizer
    assert tok.n_words == 128256
    assert (tok.bos_id, tok.eos_id, tok.eot_id, tok.pad_id) == (128000, 128001, 128009, 128004)
    assert tok.special_tokens["<|reserved_special_token_245|>"] == 128255  # Meta's names (HF numbers them up to 247)
    assert tok.stop_ids == {128001, 128008, 128009}
    text = "This is a test sentence."
    ids = tok.encode(text, bos=True)
    assert ids == [128000, 2028, 374, 264, 1296, 11914, 13]
    assert tok.decode(ids[1:]) == text
    assert tok.encode(text, eos=True)[-1] == tok.eos_id
    # a special token typed in user text stays plain text
    assert tok.eot_id not in tok.encode("<|eot_id|>")
    assert tok.decode(tok.encode("<|eot_id|> héllo 1234\n\n")) == "<|eot_id|> héllo 1234\n\n"


def test_llama3_chat_format(llama3_tokenizer):
    tok = llama3_tokenizer
    ids = tok.encode_chat([{"role": "user", "content": "What is 2 + 3?"}])
    # <|begin_of_text|> <|start_header_id|>user<|end_header_id|>\n\n {content} <|eot_id|>
    # <|start_header_id|>assistant<|end_header_id|>\n\n
    content = tok.encode("What is 2 + 3?")
    assert ids == [128000, 128006, 882, 128007, 271] + content + [128009, 128006, 78191, 128007, 271]
    assert tok.encode_chat([{"role": "user", "content": "Hi"}], add_generation_prompt=False)[-1] == tok.eot_id


def test_llama3_tokenizer_save_reload(llama3_tokenizer, tmp_path):
    llama3_tokenizer.save(tmp_path / "tokenizer.model")
    assert load_tiktoken_bpe_file(tmp_path / "tokenizer.model") == llama3_tokenizer.mergeable_ranks


def test_bpe_file_errors(tmp_path):
    path = tmp_path / "bad.model"
    path.write_text("IQ== 0\nIg== 1\nnot-base64! 2\n")
    with pytest.raises(InputError, match=r"bad\.model:3: .*base64"):
        load_tiktoken_bpe_file(path)
    path.write_text("IQ== 0\nIg==\n")
    with pytest.raises(InputError, match=r"bad\.model:2: "):
        load_tiktoken_bpe_file(path)
    path.write_text("IQ== 0\nIg== 5\n")
    with pytest.raises(InputError, match=r"bad\.model: ranks"):
        load_tiktoken_bpe_file(path)
    with pytest.raises(InputError, match="missing.model"):
        load_tiktoken_bpe_file(tmp_path / "missing.model")


@pytest.fixture(scope="module")
def small_bpe(tmp_path_factory):
    rows = synthetic_split("train", 400, seed=1, task="short")
    texts = [prompt_text(r["question"]) + "\n" + r["answer"] for r in rows]
    path = tmp_path_factory.mktemp("bpe") / "tokenizer.model"
    return train_bpe(texts, 512, path), texts


def test_train_bpe(small_bpe):
    tok, texts = small_bpe
    assert len(tok.mergeable_ranks) == 512 and tok.n_words == 512 + 256
    assert tok.bos_id == 512 and tok.special_tokens["<|end_of_text|>"] == 513
    for text in texts[:50] + ["unseen words: Zebra qu'il 9876543 ∑ 🙂"]:
        assert tok.decode(tok.encode(text)) == text
    n_bytes = sum(len(t.encode()) for t in texts)
    n_tokens = sum(len(tok.encode(t)) for t in texts)
    assert n_tokens < 0.4 * n_bytes, f"{n_tokens} tokens for {n_bytes} bytes"
    reloaded = Tokenizer(tok.path)
    assert reloaded.mergeable_ranks == tok.mergeable_ranks
    assert reloaded.encode(texts[0], bos=True) == tok.encode(texts[0], bos=True)


def naive_bpe_ranks(texts, vocab_size, single_digits=True):
    """Textbook BPE: recount every pair after every merge (slow, obviously right)."""
    from collections import Counter
    words = Counter(w for t in texts for w in regex.findall(LLAMA3_SPLIT_PATTERN, t)
                    if not (single_digits and w.isdigit()))
    words = {tuple(bytes([c]) for c in w.encode()): f for w, f in words.items()}
    ranks = {bytes([i]): i for i in range(256)}
    while len(ranks) < vocab_size:
        pairs = Counter()
        for w, f in words.items():
            for pair in zip(w, w[1:]):
                pairs[pair] += f
        if not pairs:
            break
        best = max(pairs, key=lambda p: (pairs[p], ranks[p[0]], ranks[p[1]]))
        ranks.setdefault(best[0] + best[1], len(ranks))
        merged = {}
        for w, f in words.items():
            out, i = [], 0
            while i < len(w):
                if w[i:i + 2] == best:
                    out.append(best[0] + best[1])
                    i += 2
                else:
                    out.append(w[i])
                    i += 1
            merged[tuple(out)] = merged.get(tuple(out), 0) + f
        words = merged
    return ranks


@pytest.mark.parametrize("single_digits", [True, False])
def test_train_bpe_matches_naive(tmp_path, single_digits):
    texts = [r["answer"] for r in synthetic_split("train", 30, seed=2, task="short")] + ["aaaa abab  xyxyxy\n\n"]
    tok = train_bpe(texts, 400, tmp_path / "t.model", single_digits)
    assert tok.mergeable_ranks == naive_bpe_ranks(texts, 400, single_digits)
    digits = tok.encode("12 345 6789")
    assert (len(digits) == 9 + 2) == single_digits  # every digit its own token (the spaces are two more)


def test_train_bpe_first_merge(tmp_path):
    # "ab" is the most frequent pair, then "abc" (= "ab" + "c") with the merged token
    tok = train_bpe(["ab ab ab abc abc"], 258, tmp_path / "t.model")
    assert tok.mergeable_ranks[b"ab"] == 256 and tok.mergeable_ranks[b" ab"] == 257
    assert tok.encode(" ab") == [257]


# -----------------------------------------------------------------------------
# safetensors checkpoints


def random_tensor(dtype, shape, gen):
    if dtype.is_floating_point:
        return torch.randn(shape, generator=gen).to(dtype)
    if dtype == torch.bool:
        return torch.rand(shape, generator=gen) > 0.5
    info = torch.iinfo(dtype)
    return torch.randint(max(info.min, -1000), min(info.max, 1000), shape, generator=gen, dtype=dtype)


def all_dtype_tensors():
    gen = torch.Generator().manual_seed(0)
    tensors = {f"w.{name}": random_tensor(dt, (3, 5), gen) for name, dt in SAFETENSORS_DTYPES.items()}
    tensors["scalar"] = torch.tensor(1.5)
    tensors["empty"] = torch.zeros(0, 4)
    tensors["odd_u8"] = torch.arange(7, dtype=torch.uint8)  # 7 bytes: later tensors must stay aligned
    tensors["strided"] = torch.randn(4, 6, generator=gen).t()  # non-contiguous input
    return tensors


def assert_same(a: dict, b: dict):
    assert list(a) == list(b) or sorted(a) == sorted(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
        assert torch.equal(a[k], b[k]), k


def test_safetensors_round_trip(tmp_path):
    tensors = all_dtype_tensors()
    save_safetensors(tensors, tmp_path / "x.safetensors", metadata={"step": "7"})
    assert_same(tensors, load_safetensors(tmp_path / "x.safetensors"))
    assert os.listdir(tmp_path) == ["x.safetensors"]  # no temp file left behind


def test_safetensors_matches_hf_package(tmp_path):
    st = pytest.importorskip("safetensors.torch")
    tensors = all_dtype_tensors()
    save_safetensors(tensors, tmp_path / "ours.safetensors")
    assert_same(tensors, st.load_file(tmp_path / "ours.safetensors"))
    with st.safe_open(tmp_path / "ours.safetensors", "pt") as f:
        assert f.metadata()["format"] == "pt"
    tensors = {k: v.contiguous() for k, v in tensors.items()}
    st.save_file(tensors, tmp_path / "hf.safetensors")
    assert_same(tensors, load_safetensors(tmp_path / "hf.safetensors"))


def save_shards(sd, directory, per_shard):
    """HF's sharded layout (what save_pretrained writes for large models): shards of per_shard tensors
    and model.safetensors.index.json mapping every tensor to its shard."""
    names = list(sd)
    groups = [names[i:i + per_shard] for i in range(0, len(names), per_shard)]
    files = [f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors" for i in range(len(groups))]
    for file, group in zip(files, groups):
        save_safetensors({k: sd[k] for k in group}, os.path.join(directory, file))
    index = {"metadata": {}, "weight_map": {k: f for f, g in zip(files, groups) for k in g}}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index))
    return files


def test_state_dict_sharded_round_trip(tmp_path):
    gen = torch.Generator().manual_seed(0)
    sd = {f"layers.{i}.weight": torch.randn(16, 16, generator=gen) for i in range(5)}
    sd["embed.weight"] = torch.randn(8, 4, generator=gen).to(torch.bfloat16)
    assert len(save_shards(sd, tmp_path, 2)) == 3
    assert_same(sd, load_state_dict(tmp_path))


def test_state_dict_missing_files(tmp_path):
    with pytest.raises(InputError, match="neither model.safetensors"):
        load_state_dict(tmp_path)
    files = save_shards({"a": torch.zeros(300), "b": torch.zeros(300)}, tmp_path, 1)
    os.remove(tmp_path / files[1])
    with pytest.raises(InputError, match="model-00002-of-00002.safetensors, which is missing"):
        load_state_dict(tmp_path)


def test_safetensors_truncated_and_corrupt(tmp_path):
    path = tmp_path / "w.safetensors"
    save_safetensors({"a": torch.randn(10, 10), "b": torch.randn(3)}, path)
    data = path.read_bytes()
    path.write_bytes(data[:-5])
    with pytest.raises(InputError, match=r"w\.safetensors: .*truncated"):
        load_safetensors(path)
    path.write_bytes(data[:6])
    with pytest.raises(InputError, match=r"w\.safetensors: .*too short"):
        load_safetensors(path)
    path.write_bytes(data[:8] + b"{oops" + data[13:])
    with pytest.raises(InputError, match=r"w\.safetensors: header is not a JSON"):
        load_safetensors(path)
    path.write_bytes((2).to_bytes(8, "little") + b"[]" + data[8:])  # JSON, but not an object
    with pytest.raises(InputError, match=r"w\.safetensors: header is not a JSON object"):
        load_safetensors(path)
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + n])
    header["b"]["data_offsets"] = [0, 12]  # overlaps "a"
    hb = json.dumps(header).encode()
    path.write_bytes(len(hb).to_bytes(8, "little") + hb + data[8 + n:])
    with pytest.raises(InputError, match="overlap"):
        load_safetensors(path)


# -----------------------------------------------------------------------------
# data


def recompute(ops):
    """Redo a short synthetic problem's arithmetic from its ops, independently of the text."""
    x = None
    for op, *args in ops:
        if op == "start":
            x = args[0]
        elif op in ("pack", "add_packs"):
            x = (x or 0) + args[0] * args[1]
        elif op == "+":
            x += args[0]
        elif op == "-":
            x -= args[0]
        elif op == "*":
            x *= args[0]
        elif op == "/":
            assert x % args[0] == 0, "division must be exact"
            x //= args[0]
        elif op == "together_fewer":
            x = x + (x - args[0])
        else:
            raise AssertionError(op)
        assert x > 0
    return x


def test_short_task_answers_are_right():
    for split in ("train", "test"):
        for row in synthetic_split(split, 300, seed=3, task="short"):
            assert int(gold_answer(row["answer"])) == recompute(row["ops"]), row
            assert row["answer"].count(" = ") == sum(2 if op in ("add_packs", "together_fewer") else
                                                     0 if op == "start" else 1 for op, *_ in row["ops"])


def test_short_task_steps_and_lengths():
    rng = random.Random(0)
    for n_steps in range(2, 9):
        p = make_problem(rng, n_steps)
        assert p["answer"].count(" = ") == n_steps
    long = [make_problem(rng, 8)["answer"] for _ in range(50)]
    assert 450 < sum(map(len, long)) / len(long) < 1000


def check_relay_solution(question, answer, slips=False):
    """Redo every line of a relay solution from the text alone, independently of the generator: the
    starting counts, each turn's giver, receiver and tenth (rounded down; with slips, up by one is
    allowed and followed), every column of every subtraction and addition (its name, its digits, the
    borrow or carry it takes and passes on, its sum, the result so far), each result, the others'
    unchanged counts, each "Now" line and the final answer, which asks about the last to receive.
    Returns (lines checked (all), turns that slipped)."""
    people = regex.findall(r"(\w+) has (\d+) ", question)
    names, state = [n for n, _ in people], {n: int(a) for n, a in people}
    n_turns, asked = regex.search(r"After (\d+) turns, how many \w+(?: \w+)? does (\w+) have\?$", question).groups()
    n_turns = int(n_turns)
    assert asked == names[n_turns % len(names)], question
    lines = answer.split("\n")
    i = 0

    def counts(line, prefix, first):  # a listing must start with person `first` and go round in order
        assert line.startswith(prefix), line
        found = regex.findall(r"(\w+) has (\d+)", line)
        assert [n for n, _ in found] == [names[(first + j) % len(names)] for j in range(len(names))], line
        return {n: int(a) for n, a in found}

    def column_work(sign, a, b):  # the column lines of a - b or a + b, checked; returns the result
        nonlocal i
        result = a - b if sign == "-" else a + b
        da, db = [int(c) for c in reversed(str(a))], [int(c) for c in reversed(str(b))]
        width = max(len(da), len(db))
        cols, flow = width + (sign == "+" and len(str(result)) > width), 0
        for col in range(cols):
            x, y = (da[col] if col < len(da) else 0), (db[col] if col < len(db) else 0)
            m = regex.fullmatch(r"([\w-]+): (.*); so far (\d+)", lines[i])
            assert m and m[1] == md.COLUMNS[col] and m[3] == str(result).zfill(cols)[-col - 1:], lines[i]
            if sign == "-":
                w = regex.fullmatch(r"(\d) - (\d) - (\d)(?: is below 0, so (\d+) - \d - \d)? = (\d+), write (\d), "
                                    r"borrow (\d)", m[2])
                assert w, lines[i]
                xa, yb, c, big, r, digit, out = w.groups()
                assert (int(xa), int(yb), int(c)) == (x, y, flow), lines[i]
                r_true = x - y - flow
                assert (big is not None) == (r_true < 0) and (big is None or int(big) == x + 10), lines[i]
                assert int(r) == r_true % 10 == int(digit) and int(out) == int(r_true < 0), lines[i]
            else:
                w = regex.fullmatch(r"(\d) \+ (\d) \+ (\d) = (\d+), write (\d), carry (\d)", m[2])
                assert w, lines[i]
                xa, yb, c, s, digit, out = map(int, w.groups())
                assert (xa, yb, c) == (x, y, flow) and s == x + y + flow, lines[i]
                assert digit == s % 10 and out == s // 10, lines[i]
            flow = int(out)
            i += 1
        assert flow == 0
        return result

    assert counts(lines[i], "At the start ", 0) == state
    i += 1
    slipped = 0
    for t in range(1, n_turns + 1):
        g, r = names[(t - 1) % len(names)], names[t % len(names)]
        m = regex.fullmatch(rf"Turn {t} of {n_turns}: {g} gives {r} a tenth of (\d+), which is (\d+)\.", lines[i])
        assert m and int(m[1]) == state[g], lines[i]
        give = int(m[2])
        assert give == state[g] // 10 or (slips and give == state[g] // 10 + 1), lines[i]
        slipped += give != state[g] // 10
        i += 1
        for who, sign in ((g, "-"), (r, "+")):
            if who == r:  # the others' counts, in the order of the next listing
                for j in range(t + 1, t + len(names) - 1):
                    other = names[j % len(names)]
                    assert lines[i] == f"{other} still has {state[other]}.", lines[i]
                    i += 1
            assert lines[i] == f"{who}: {state[who]} {sign} {give}", lines[i]
            i += 1
            state[who] = column_work(sign, state[who], give)
            assert lines[i] == f"{who} has {state[who]} after turn {t} of {n_turns}.", lines[i]
            i += 1
        assert counts(lines[i], "Now ", t) == state  # the next giver first
        i += 1
    assert lines[i] == f"After {n_turns} turns {asked} has {state[asked]}.", lines[i]
    assert lines[i + 1] == f"#### {state[asked]}" and i + 2 == len(lines)
    return len(lines), slipped


def test_relay_task_redoes_every_line():
    """Every line of every solution (both splits, several difficulties) checks out when redone from
    the text; the checker itself rejects a solution with one digit changed."""
    checked = 0
    for split, kw in (("train", {}), ("test", {}), ("train", dict(min_steps=1, max_steps=3, digits=6, n_people=4)),
                      ("train", dict(cast=3))):
        for row in synthetic_split(split, 60, seed=4, **kw):
            checked += check_relay_solution(row["question"], row["answer"])[0]
            assert gold_answer(row["answer"]) == row["answer"].rsplit(" ", 1)[1]
    assert checked > 10_000
    assert md.column_lines(913, 1041, "+")[-1] == "thousands: 0 + 1 + 0 = 1, write 1, carry 0; so far 1954"
    row = synthetic_split("test", 1, seed=4)[0]
    lines = row["answer"].split("\n")
    j = next(i for i, line in enumerate(lines) if " + " in line and "write" in line)
    lines[j] = lines[j].replace("carry 0", "carry 1") if "carry 0" in lines[j] else lines[j].replace("carry 1", "carry 0")
    with pytest.raises(AssertionError):
        check_relay_solution(row["question"], "\n".join(lines))
    lines = row["answer"].split("\n")
    j = next(i for i, line in enumerate(lines) if "so far" in line and len(line.rsplit(" ", 1)[1]) == 2)
    lines[j] = lines[j][:-1] + str((int(lines[j][-1]) + 1) % 10)  # a wrong digit in "so far"
    with pytest.raises(AssertionError):
        check_relay_solution(row["question"], "\n".join(lines))


def test_relay_cast_fixes_the_names():
    """cast = 3: every problem has the same three people in the same order (so a solution's names follow
    from the turn), the questions still differ and the splits stay disjoint; cast = 5 draws from five
    names; the default draws from all of them; --cast below the number of people is refused."""
    rows = synthetic_split("train", 200, seed=4, cast=3)
    names = [n for n, *_ in md.NAMES[:3]]
    assert all(row["question"].startswith(f"{names[0]}, {names[1]} and {names[2]} keep ") for row in rows)
    assert len({row["question"] for row in rows}) == 200
    assert not {row["question"] for row in rows} & {row["question"] for row in synthetic_split("test", 50, seed=4, cast=3)}
    all_names = {n for n, *_ in md.NAMES}
    seen = lambda rows: {w.strip(",.") for row in rows for w in row["answer"].split() if w.strip(",.") in all_names}
    assert seen(rows) == set(names)
    assert seen(synthetic_split("train", 200, seed=4, cast=5)) == {n for n, *_ in md.NAMES[:5]}
    assert len(seen(synthetic_split("train", 200, seed=4))) == len(md.NAMES)
    with pytest.raises(InputError, match="--cast 2"):
        md.check_config(md.parse_config(md.DistillConfig, ["--cast", "2"]))


def test_relay_training_solutions_slip_at_the_rate_asked():
    """With slip, about that share of the training solutions' turns round the tenth up and the rest of
    the solution (its answer too) follows the slip; test solutions never slip; the questions, and so
    the splits, are those of the generator without slips."""
    turns = slipped = 0
    for row, clean in zip(synthetic_split("train", 100, seed=4, slip=0.25), synthetic_split("train", 100, seed=4)):
        assert row["question"] == clean["question"]
        _, n = check_relay_solution(row["question"], row["answer"], slips=True)
        turns, slipped = turns + row["ops"][2], slipped + n
        if n == 0:
            assert row["answer"] == clean["answer"]
    assert 0.2 < slipped / turns < 0.3, slipped / turns
    with pytest.raises(AssertionError):  # without slips allowed, the checker sees them
        for row in synthetic_split("train", 20, seed=4, slip=0.25):
            check_relay_solution(row["question"], row["answer"])
    assert synthetic_split("test", 50, seed=4, slip=0.25) == synthetic_split("test", 50, seed=4)


def test_relay_question_gives_the_starting_amounts_last():
    """The solution's first line restates the starting amounts; the question puts them in its last
    sentence but one, right before it asks, so that line copies them from a few tokens back."""
    for row in synthetic_split("test", 20, seed=4):
        *_, amounts, ask = row["question"].rsplit(". ", 2)
        start = row["answer"].split("\n")[0]  # "At the start A has 1234, B has ..."
        for _, count in regex.findall(r"(\w+) has (\d+)", start):
            assert f"has {count} " in amounts, (amounts, start)
        assert ask.startswith("After ") and ask.endswith("have?"), ask


def test_relay_lines_copy_from_close_by():
    """Every count a listing or a sum's first line writes was written in the 10 lines above it with
    three people (the others' counts are restated between the two sums), 11 with four."""
    for n_people, reach in ((3, 10), (4, 11)):
        for row in synthetic_split("test", 20, seed=4, n_people=n_people):
            lines = row["answer"].split("\n")
            for i, line in enumerate(lines[1:], 1):
                copied = regex.findall(r"(\w+) has (\d+)", line) if line.startswith("Now ") else \
                    regex.findall(r"^(\w+): (\d+) [-+] \d+$", line)
                for name, count in copied:
                    above = "\n".join(lines[max(0, i - reach):i])
                    assert regex.search(rf"\b{name}\b.*\b{count}\b", above), (line, above)


def test_relay_task_is_long_and_has_a_difficulty_knob(tmp_path):
    """Under the project's own tokenizer (a 1,024-token BPE trained on the task) the default relay
    solutions average over 1,500 tokens with a tail to about 4,000; more turns make them longer."""
    tok = train_bpe([r["question"] + "\n" + r["answer"] for r in synthetic_split("train", 300, seed=1)], 1024,
                    str(tmp_path / "tok.model"))
    lengths = sorted(len(ids) for ids in tok.encode_batch([r["answer"] for r in synthetic_split("test", 300)]))
    assert sum(lengths) / len(lengths) > 1500 and 3400 < lengths[-1] < 4100, (sum(lengths) / len(lengths), lengths[-1])
    short = [len(ids) for ids in tok.encode_batch([r["answer"] for r in synthetic_split("test", 100, max_steps=4)])]
    assert max(short) < lengths[len(lengths) // 2]


def test_synthetic_split_deterministic_and_disjoint():
    for task in ("relay", "short"):
        train = synthetic_split("train", 1000, seed=0, task=task)
        test = synthetic_split("test", 100, seed=0, task=task)
        assert train[:50] == synthetic_split("train", 50, seed=0, task=task)
        assert synthetic_split("test", 50, seed=1, task=task) != test[:50]
        lo, hi = md.TASKS[task][1:]
        assert {r["steps"] for r in train} == set(range(lo, hi + 1))  # every count the task's range allows
        if task == "relay":
            assert all(r["steps"] == r["ops"][2] for r in train)  # a relay problem's steps are its turns
        train_q = {r["question"] for r in train}
        assert len(train_q) == len(train)
        assert not train_q & {r["question"] for r in synthetic_split("test", 100, seed=5, task=task)}
        assert not train_q & {r["question"] for r in test}


def test_gold_answer_and_prompt():
    assert gold_answer("a\nb = 1,200\n#### 1,200") == "1200"
    assert gold_answer("#### 3 ####  42 \nmore text") == "42"
    assert gold_answer("no answer here") == ""
    assert prompt_text(" What? ").startswith("What?\n")


def test_read_jsonl_gsm8k():
    if not os.path.exists(GSM8K_TEST):
        pytest.skip(f"GSM8K test file not found at {GSM8K_TEST}")
    rows = read_jsonl(GSM8K_TEST)
    assert len(rows) == 1319
    assert gold_answer(rows[0]["answer"]) == "18"


def test_jsonl_round_trip_and_errors(tmp_path):
    rows = synthetic_split("test", 5, task="short")
    write_jsonl(rows, tmp_path / "data.jsonl")
    assert read_jsonl(tmp_path / "data.jsonl") == rows
    good = json.dumps({"question": "q", "answer": "#### 1"})
    cases = [
        ("{not json", r"data\.jsonl:3: not valid JSON"),
        ("[1, 2]", r"data\.jsonl:3: expected a JSON object"),
        (json.dumps({"question": "q"}), r"data\.jsonl:3: field 'answer'"),
        (json.dumps({"question": 1, "answer": "a"}), r"data\.jsonl:3: field 'question'"),
    ]
    for bad, message in cases:
        (tmp_path / "data.jsonl").write_text(f"{good}\n\n{bad}\n{good}\n")  # line 2 is blank: skipped
        with pytest.raises(InputError, match=message):
            read_jsonl(tmp_path / "data.jsonl")
    with pytest.raises(InputError, match="nope.jsonl"):
        read_jsonl(tmp_path / "nope.jsonl")


# -----------------------------------------------------------------------------
# scan_kernel.py: the Triton scan (forward, every gradient) and decode step against the references


DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
SCAN_CHUNK = 64 if DEVICE.type == "cuda" else 16  # small chunks keep the interpreter fast
# relative error norms: the kernels' fp32 dots are exact (not tf32), bf16 dots round their operands
SCAN_TOL = {torch.float32: 1e-4, torch.bfloat16: 3e-2}


def assert_rel_close(name, got, want, tol):
    """Relative error norm ||got - want|| / ||want|| <= tol; prints it and the max abs error."""
    got, want = got.float(), want.float()
    rel = ((got - want).norm() / want.norm().clamp_min(1e-12)).item()
    print(f"{name}: rel err {rel:.2e}, max abs err {(got - want).abs().max().item():.2e} (tol {tol:.0e})")
    assert rel <= tol, f"{name}: relative error {rel:.2e} > {tol:.0e}"


def scan_and_grads(fn, inputs, dy, dfinal, **kw):
    """y, final state and the gradients of <y, dy> + <final, dfinal> wrt every input that is not None."""
    leaves = [None if t is None else t.detach().clone().requires_grad_() for t in inputs]
    y, final = fn(*leaves, return_final_state=True, **kw)
    present = [t for t in leaves if t is not None]
    grads = iter(torch.autograd.grad((y.float() * dy).sum() + (final * dfinal).sum(), present))
    return y, final, [None if t is None else next(grads) for t in leaves]


SCAN_NAMES = ["x", "dt", "A", "B", "C", "D", "initial_state"]
SCAN_CASES = {  # b, l, h, p, n, g, with D, with initial state
    "l_not_multiple_g_lt_h": (2, 37, 4, 16, 16, 2, True, True),
    "tiny_p_n_padded_one_group": (1, 21, 2, 8, 8, 1, False, True),
    "g_eq_h_no_init": (1, 32, 2, 16, 32, 2, True, False),
    "more_chunks_than_a_passing_step": (1, 300, 2, 8, 8, 1, True, True),
}


@pytest.mark.parametrize("case", list(SCAN_CASES))
def test_scan_forward_and_grads_match_reference(case):
    b, l, h, p, n, g, use_d, use_init = SCAN_CASES[case]
    x, dt, A, B, C, D = random_inputs(b, l, h, p, n, g, DEVICE, torch.float32, seed=1)
    D = D if use_d else None
    s0 = torch.randn(b, h, p, n, device=DEVICE) if use_init else None
    dy, dfinal = torch.randn_like(x), torch.randn(b, h, p, n, device=DEVICE)
    y, final, grads = scan_and_grads(ssd_scan, [x, dt, A, B, C, D, s0], dy, dfinal, chunk_size=SCAN_CHUNK)
    y_r, final_r, grads_r = scan_and_grads(ssd_scan_ref, [x, dt, A, B, C, D, s0], dy, dfinal)
    tol = SCAN_TOL[torch.float32]
    assert_rel_close("y", y, y_r, tol)
    assert_rel_close("final", final, final_r, tol)
    for name, gk, gr in zip(SCAN_NAMES, grads, grads_r):
        if gr is not None:
            assert_rel_close("d" + name, gk, gr, tol)


def test_grad_through_final_state_only():
    x, dt, A, B, C, D = random_inputs(1, 20, 2, 16, 16, 1, DEVICE, torch.float32, seed=2)
    leaves = [t.clone().requires_grad_() for t in (x, dt, A, B, C)]
    leaves_r = [t.clone().requires_grad_() for t in (x, dt, A, B, C)]
    grads = torch.autograd.grad(ssd_scan(*leaves, return_final_state=True, chunk_size=SCAN_CHUNK)[1].sum(), leaves)
    grads_r = torch.autograd.grad(ssd_scan_ref(*leaves_r, return_final_state=True)[1].sum(), leaves_r[:4])
    for name, gk, gr in zip(["dx", "ddt", "dA", "dB"], grads, grads_r):
        assert_rel_close(name, gk, gr, SCAN_TOL[torch.float32])
    assert grads[4].abs().max().item() == 0.0  # the final state does not depend on C


def test_chunked_torch_path_matches_reference():
    x, dt, A, B, C, D = random_inputs(2, 37, 4, 8, 16, 2, DEVICE, torch.float32, seed=3)
    s0 = torch.randn(2, 4, 8, 16, device=DEVICE)
    y, final = ssd_scan_chunked_torch(x, dt, A, B, C, D, s0, return_final_state=True, chunk_size=16)
    y_r, final_r = ssd_scan_ref(x, dt, A, B, C, D, s0, return_final_state=True)
    assert_rel_close("y", y, y_r, 1e-5)
    assert_rel_close("final", final, final_r, 1e-5)


def test_step_matches_reference_several_steps():
    b, h, p, n, g = 3, 4, 16, 8, 2
    x, dt, A, B, C, D = random_inputs(b, 5, h, p, n, g, DEVICE, torch.float32, seed=4)
    state = torch.randn(b, h, p, n, device=DEVICE)
    state_r = state.clone()
    for t in range(5):
        y = ssd_step(state, x[:, t], dt[:, t], A, B[:, t], C[:, t], D)
        y_r = ssd_step_ref(state_r, x[:, t], dt[:, t], A, B[:, t], C[:, t], D)
        assert_rel_close(f"y step {t}", y, y_r, 1e-5)
        assert_rel_close(f"state step {t}", state, state_r, 1e-5)


@pytest.mark.parametrize("gx, gb, gc", [(2, 2, 8), (8, 2, 4), (1, 8, 1)])  # (2, 2, 8): the student's decode
def test_step_reads_groups_shared_by_heads(gx, gb, gc):
    """x, B and C given once per group step as the same tensors repeated to every head of the group."""
    b, h, p, n = 3, 8, 16, 8
    gen = torch.Generator().manual_seed(7)
    x, B, C = (torch.randn(b, g, m, generator=gen).to(DEVICE) for g, m in ((gx, p), (gb, n), (gc, n)))
    dt, A, D = torch.rand(b, h, generator=gen).to(DEVICE), -torch.rand(h, generator=gen).to(DEVICE), torch.randn(h, generator=gen).to(DEVICE)
    state = torch.randn(b, h, p, n, generator=gen).to(DEVICE)
    every_head = [torch.stack([v[:, i // (h // v.shape[1])] for i in range(h)], 1) for v in (x, B, C)]  # (b, h, .)
    s_full, s_ref = state.clone(), state.clone()
    y_full = ssd_step_ref(s_full, every_head[0], dt, A, every_head[1], every_head[2], D)  # (b, h, p)
    assert_rel_close("y, reference with groups", ssd_step_ref(s_ref, x, dt, A, B, C, D), y_full, 1e-6)
    assert_rel_close("state, reference with groups", s_ref, s_full, 1e-6)
    assert_rel_close("y, kernel with groups", ssd_step(state, x, dt, A, B, C, D), y_full, 1e-5)
    assert_rel_close("state, kernel with groups", state, s_full, 1e-5)


def test_scan_equals_stepping_token_by_token():
    b, l, h, p, n, g = 2, 19, 4, 16, 16, 2
    x, dt, A, B, C, D = random_inputs(b, l, h, p, n, g, DEVICE, torch.float32, seed=5)
    s0 = torch.randn(b, h, p, n, device=DEVICE)
    y, final = ssd_scan(x, dt, A, B, C, D, s0, return_final_state=True, chunk_size=SCAN_CHUNK)
    state = s0.clone()
    ys = torch.stack([ssd_step(state, x[:, t], dt[:, t], A, B[:, t], C[:, t], D) for t in range(l)], dim=1)  # (b, l, h, p)
    assert_rel_close("y", y, ys, SCAN_TOL[torch.float32])
    assert_rel_close("final", final, state, SCAN_TOL[torch.float32])


def test_bad_shapes_raise():
    x, dt, A, B, C, D = random_inputs(1, 8, 4, 16, 16, 2, DEVICE, torch.float32)
    with pytest.raises(ValueError, match="dt has shape"):
        ssd_scan(x, dt[:, :4], A, B, C, D)
    with pytest.raises(ValueError, match="multiple of groups"):
        ssd_scan(x, dt, A, B[:, :, :1].expand(1, 8, 3, 16), C[:, :, :1].expand(1, 8, 3, 16), D)
    with pytest.raises(ValueError, match="chunk_size"):
        ssd_scan(x, dt, A, B, C, D, chunk_size=24)
    state = torch.zeros(1, 4, 16, 16, device=DEVICE)
    with pytest.raises(ValueError, match="dt has shape"):
        ssd_step(state, x[:, 0], dt[:, 0, :2], A, B[:, 0], C[:, 0], D)
    with pytest.raises(ValueError, match="state must be fp32"):
        ssd_step(state.double(), x[:, 0], dt[:, 0], A, B[:, 0], C[:, 0], D)
    with pytest.raises(ValueError, match="multiple of groups"):
        ssd_step(state, x[:, 0, :3], dt[:, 0], A, B[:, 0], C[:, 0], D)


def test_strided_A_and_D():
    """A and D given as strided views (every other element of a longer vector) give the same result."""
    x, dt, A, B, C, D = random_inputs(1, 20, 4, 16, 16, 2, DEVICE, torch.float32)
    A2, D2 = torch.stack([A, A * 0 + 9.0], -1).flatten()[::2], torch.stack([D, D * 0 - 9.0], -1).flatten()[::2]
    assert not A2.is_contiguous()
    assert_rel_close("y, strided A and D", ssd_scan(x, dt, A2, B, C, D2, chunk_size=SCAN_CHUNK),
                     ssd_scan_ref(x, dt, A, B, C, D), SCAN_TOL[torch.float32])
    state, state_ref = torch.zeros(2, 1, 4, 16, 16, device=DEVICE)
    y = ssd_step(state, x[:, 0], dt[:, 0], A2, B[:, 0], C[:, 0], D2)
    assert_rel_close("step, strided A and D", y, ssd_step_ref(state_ref, x[:, 0], dt[:, 0], A, B[:, 0], C[:, 0], D),
                     SCAN_TOL[torch.float32])


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("g, p, n", [(2, 64, 64), (8, 64, 64), (2, 128, 128), (4, 32, 16)])  # g == h: MambaInLlama
def test_gpu_scan_and_grads_vs_fp32_reference(dtype, g, p, n):
    b, l, h = 2, 300, 8
    x, dt, A, B, C, D = random_inputs(b, l, h, p, n, g, DEVICE, dtype, seed=6)
    s0 = torch.randn(b, h, p, n, device=DEVICE)
    dy, dfinal = torch.randn(b, l, h, p, device=DEVICE), torch.randn(b, h, p, n, device=DEVICE)
    inputs = [x, dt, A, B, C, D, s0]
    y, final, grads = scan_and_grads(ssd_scan, inputs, dy, dfinal)
    y_r, final_r, grads_r = scan_and_grads(ssd_scan_ref, [t.float() for t in inputs], dy, dfinal)
    assert y.dtype == dtype and final.dtype == torch.float32
    assert_rel_close("y", y, y_r, SCAN_TOL[dtype])
    assert_rel_close("final", final, final_r, SCAN_TOL[dtype])
    for name, t, gk, gr in zip(SCAN_NAMES, inputs, grads, grads_r):
        assert gk.dtype == t.dtype
        assert_rel_close("d" + name, gk, gr, SCAN_TOL[dtype])


@needs_cuda
def test_gpu_long_sequence_bf16():
    b, l, h, p, n, g = 1, 8192, 4, 64, 64, 2
    x, dt, A, B, C, D = random_inputs(b, l, h, p, n, g, DEVICE, torch.bfloat16, seed=7)
    y, final = ssd_scan(x, dt, A, B, C, D, return_final_state=True)
    y_r, final_r = ssd_scan_ref(x.float(), dt, A, B.float(), C.float(), D, return_final_state=True)
    assert_rel_close("y", y, y_r, SCAN_TOL[torch.bfloat16])
    assert_rel_close("final", final, final_r, SCAN_TOL[torch.bfloat16])
    # gradients at this length against the chunked fp32 PyTorch path (checked against the reference above)
    dy = torch.randn(b, l, h, p, device=DEVICE)
    leaves = [t.clone().requires_grad_() for t in (x, dt, A, B, C, D)]
    leaves_r = [t.float().clone().requires_grad_() for t in (x, dt, A, B, C, D)]
    grads = torch.autograd.grad(ssd_scan(*leaves), leaves, dy.bfloat16())
    grads_r = torch.autograd.grad(ssd_scan_chunked_torch(*leaves_r), leaves_r, dy.bfloat16().float())
    for name, gk, gr in zip(["dx", "ddt", "dA", "dB", "dC", "dD"], grads, grads_r):
        assert_rel_close(name, gk, gr, SCAN_TOL[torch.bfloat16])


@needs_cuda
def test_gpu_step_many_steps_bf16():
    b, h, p, n, g, steps = 8, 8, 64, 64, 4, 300
    x, dt, A, B, C, D = random_inputs(b, steps, h, p, n, g, DEVICE, torch.bfloat16, seed=8)
    state = torch.randn(b, h, p, n, device=DEVICE)
    state_r = state.clone()
    for t in range(steps):
        y = ssd_step(state, x[:, t], dt[:, t], A, B[:, t], C[:, t], D)
        y_r = ssd_step_ref(state_r, x[:, t].float(), dt[:, t], A, B[:, t].float(), C[:, t].float(), D)
    assert_rel_close("y after many steps", y, y_r, 1e-2)  # y is rounded to bf16
    assert_rel_close("state after many steps", state, state_r, 1e-5)


@needs_cuda
def test_gpu_step_in_cuda_graph():
    b, h, p, n, g, steps = 4, 8, 64, 64, 8, 10
    x, dt, A, B, C, D = random_inputs(b, steps, h, p, n, g, DEVICE, torch.bfloat16, seed=9)
    state = torch.zeros(b, h, p, n, device=DEVICE)
    inp = [x[:, 0].clone(), dt[:, 0].clone(), B[:, 0].clone(), C[:, 0].clone()]  # static input buffers
    ssd_step(state.clone(), inp[0], inp[1], A, inp[2], inp[3], D)  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y_static = ssd_step(state, inp[0], inp[1], A, inp[2], inp[3], D)
    state.zero_()  # capturing does not run the kernel; start from zero anyway
    state_r = torch.zeros_like(state)
    for t in range(steps):
        for buf, src in zip(inp, (x[:, t], dt[:, t], B[:, t], C[:, t])):
            buf.copy_(src)
        graph.replay()
        y_r = ssd_step_ref(state_r, x[:, t].float(), dt[:, t], A, B[:, t].float(), C[:, t].float(), D)
        assert_rel_close(f"graph y step {t}", y_static, y_r, 1e-2)
    assert_rel_close("graph state", state, state_r, 1e-5)


@pytest.mark.parametrize("state_dtype", [torch.float32, torch.bfloat16])
def test_step_with_low_precision_state(state_dtype):
    """A bf16 decode state (mamba_ssm's inference default) stays within bf16 rounding of the fp32
    recurrence over many steps; on GPU the kernel matches the reference on the same stored dtype."""
    b, h, p, n, g, steps = 2, 4, 32, 16, 2, 40
    x, dt, A, B, C, D = random_inputs(b, steps, h, p, n, g, "cpu", torch.float32, seed=10)
    exact = torch.zeros(b, h, p, n)
    state_r = torch.zeros(b, h, p, n, dtype=state_dtype)
    state = state_r.clone().to(DEVICE)
    for t in range(steps):
        y_exact = ssd_step_ref(exact, x[:, t], dt[:, t], A, B[:, t], C[:, t], D)
        y_r = ssd_step_ref(state_r, x[:, t], dt[:, t], A, B[:, t], C[:, t], D)
        if state_dtype == torch.float32 or DEVICE.type == "cuda":  # the interpreter gets bf16 wrong
            y = ssd_step(state, *(v.to(DEVICE) for v in (x[:, t], dt[:, t], A, B[:, t], C[:, t], D)))
            assert_rel_close(f"kernel y step {t}", y.cpu(), y_r, 1e-5 if DEVICE.type == "cpu" else 1e-4)
    assert state_r.dtype == state_dtype
    assert_rel_close("state vs fp32 recurrence", state_r, exact, 1e-5 if state_dtype == torch.float32 else 1e-2)
    assert_rel_close("y vs fp32 recurrence", y_r, y_exact, 1e-5 if state_dtype == torch.float32 else 1e-2)


@pytest.mark.parametrize("state_dtype, left", [(torch.float32, math.exp(-0.5)), (torch.bfloat16, 1.0)])
def test_slow_decay_survives_only_an_fp32_state(state_dtype, left):
    """Why sample.py keeps the SSM state in fp32 unless told otherwise: with dt * A = -1e-3 (a memory of
    ~1,000 tokens) and no input, 500 steps leave exp(-0.5) of the state; rounded to bf16 after every
    step, state * 0.999 is the state again, and the head never forgets."""
    b, h, p, n = 1, 2, 4, 4
    state = torch.ones(b, h, p, n, dtype=state_dtype)
    x, B, C = torch.zeros(b, h, p), torch.zeros(b, h, n), torch.zeros(b, h, n)
    dt, A = torch.full((b, h), 1e-3), -torch.ones(h)
    for _ in range(500):
        ssd_step_ref(state, x, dt, A, B, C)
    want = torch.full((b, h, p, n), left)  # (b, h, p, n)
    assert_rel_close(f"state after 500 steps in {state_dtype}", state.float(), want, 1e-4)
    cfg = sample.SampleConfig()
    assert sample.decode_state_dtype(cfg, torch.bfloat16) == torch.float32, "the sampler's default state is fp32"
    cfg.state_dtype = "model"
    assert sample.decode_state_dtype(cfg, torch.bfloat16) == torch.bfloat16


def conv_dtypes():
    return [torch.float32] + ([torch.bfloat16] if DEVICE.type == "cuda" else [])  # the interpreter's bf16 is wrong


@pytest.mark.parametrize("activation", [True, False])
def test_conv_step_ref_is_the_causal_conv(activation):
    """Token by token through the ring (w = 4, so 3 remembered inputs), conv_step_ref gives the causal
    depthwise conv of the whole sequence (F.conv1d, left-padded with zeros), with or without silu."""
    b, d, w, l = 3, 10, 4, 9
    gen = torch.Generator().manual_seed(11)
    xs, weight, bias = torch.randn(b, l, d, generator=gen), torch.randn(d, w, generator=gen), torch.randn(d, generator=gen)
    full = F.conv1d(F.pad(xs.transpose(1, 2), (w - 1, 0)), weight[:, None], bias, groups=d).transpose(1, 2)  # (b, l, d)
    if activation:
        full = F.silu(full)
    state = torch.zeros(b, w - 1, d)
    for t in range(l):
        assert_close(conv_step_ref(state, xs[:, t], weight, bias, torch.tensor([t]), activation), full[:, t],
                     what=f"step {t}")


@pytest.mark.parametrize("dtype", conv_dtypes())
@pytest.mark.parametrize("activation", [True, False])
@pytest.mark.parametrize("w", [2, 3, 4])
def test_conv_step_kernel_matches_ref(dtype, activation, w):
    """The Triton conv step against conv_step_ref for 7 steps from a random ring (slots 5..11 wrap it
    more than once), on strided x as the mixer passes it (a slice of in_proj's output): output and
    ring. Widths 2 and 3 leave tap columns of the kernel's power-of-two tile empty."""
    b, d = 3, 40
    gen = torch.Generator().manual_seed(12)
    xs = torch.randn(b, 7, 2 * d, generator=gen)[..., d // 2:d // 2 + d]  # (b, 7, d), row stride 2d
    weight, bias = torch.randn(d, 2 * w, generator=gen)[:, ::2], torch.randn(d, generator=gen)
    state_r = torch.randn(b, w - 1, d, generator=gen).to(dtype)
    state = state_r.clone().to(DEVICE)
    weight_k = weight.contiguous().to(DEVICE, dtype)
    tol = {torch.float32: (1e-5, 1e-5), torch.bfloat16: (2e-2, 2e-2)}[dtype]
    for i, t in enumerate(range(5, 12)):
        x = xs[:, i].to(DEVICE, dtype)
        y = conv_step(state, x, weight_k, bias.to(DEVICE, dtype), torch.tensor([t], device=DEVICE), activation)
        y_r = conv_step_ref(state_r, x.cpu(), weight_k.cpu(), bias.to(dtype), torch.tensor([t]), activation)
        assert y.dtype == dtype
        assert_close(y.cpu(), y_r, *tol, what=f"out step {t}")
        assert torch.equal(state.cpu(), state_r), f"ring differs after step {t}"


@pytest.mark.skipif(CUDA, reason="CPU-interpreter test; on a GPU the kernel is the model's default conv step")
def test_model_decode_through_conv_kernel(monkeypatch):
    """The mixer's decode step with the Triton conv step (through the interpreter, as on a GPU) gives
    the greedy tokens of conv_step_ref, the CPU path."""
    model = tiny_models()["pure"]
    want = greedy(model, PROMPTS, batch=3)
    monkeypatch.setattr(md, "conv_step_ref", conv_step)
    assert greedy(model, PROMPTS, batch=3) == want


def test_conv_step_rejects_bad_layout():
    state = torch.zeros(2, 3, 8, device=DEVICE)
    weight, bias, slot = torch.zeros(8, 4, device=DEVICE), torch.zeros(8, device=DEVICE), torch.tensor([0], device=DEVICE)
    with pytest.raises(ValueError, match="weight has shape"):
        conv_step(state, torch.zeros(2, 8, device=DEVICE), weight[:, :3], bias, slot)
    with pytest.raises(ValueError, match="contiguous"):
        conv_step(state, torch.zeros(8, 2, device=DEVICE).t(), weight, bias, slot)


# -----------------------------------------------------------------------------
# decode attention (flash-decoding kernel) against its reference, and the reference against SDPA


def decode_inputs(b, h, g, e, s, t, device, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(b, h, e, generator=gen)
    k, v = torch.randn(2, b, g, s, e, generator=gen)
    pad = torch.randint(0, t // 2 + 1, (b,), generator=gen)
    return [x.to(device, dtype) for x in (q, k, v)] + [torch.tensor([t], device=device), pad.to(device)]


# (b, h, g, e, s, t): GQA 4:1 and 3:1, MHA, e not a power of two; t at the first and the last slot
DECODE_SHAPES = [(3, 8, 2, 64, 100, 77), (2, 6, 2, 24, 50, 49), (1, 4, 4, 16, 300, 250), (5, 12, 4, 32, 40, 0)]


@pytest.mark.parametrize("split", [None, 64])  # None: one split spans several blocks and the online
@pytest.mark.parametrize("b, h, g, e, s, t", DECODE_SHAPES)  # softmax rescales; 64: up to 8 splits, some empty
def test_decode_attention_vs_reference(b, h, g, e, s, t, split, monkeypatch):
    if split:
        monkeypatch.setattr("scan_kernel.ATTN_SPLIT", split)
    q, k, v, tt, pad = decode_inputs(b, h, g, e, s, t, DEVICE, torch.float32, seed=s)
    if t == 0:  # the first slot: each row's only key is the one just written, padding or not
        pad.copy_(torch.tensor([0, 5, 0, 2, 1]))  # rows 1, 3, 4: an empty prompt (pad > t)
    y = decode_attention(q, k, v, tt, pad)
    assert_close(y, decode_attention_ref(q, k, v, tt, pad), what="decode attention")
    assert torch.isfinite(y).all()


def test_decode_attention_row_does_not_depend_on_batch(monkeypatch):
    """A row's output is bit for bit the same alone or among other rows: its keys are split at fixed
    slots, not into a number of shares that depends on the batch (on a GPU in bf16 too)."""
    monkeypatch.setattr("scan_kernel.ATTN_SPLIT", 64)
    dtype = torch.bfloat16 if CUDA else torch.float32
    q, k, v, tt, pad = decode_inputs(5, 6, 2, 32, 300, 250, DEVICE, dtype, seed=1)
    together = decode_attention(q, k, v, tt, pad)
    for i in range(5):
        alone = decode_attention(q[i:i + 1], k[i:i + 1], v[i:i + 1], tt, pad[i:i + 1])
        assert torch.equal(alone[0], together[i]), i


def test_decode_attention_large_cache_offsets():
    """Row 2 of the cache starts at element 3.2e9, past 2^31: the kernel's offsets must be int64 (with
    int32 ones the interpreter crashes and a GPU reads the wrong rows). The 6.4 GB buffer is virtual:
    only the pages of the three rows are touched."""
    b, g, h, s, e, stride = 3, 1, 2, 64, 16, 3 << 29
    gen = torch.Generator().manual_seed(0)
    store = torch.empty(stride * (b - 1) + s * e, dtype=torch.float16, device=DEVICE)
    k = store.as_strided((b, g, s, e), (stride, s * e, e, 1))  # (b, g, s, e)
    k.copy_(torch.randn(b, g, s, e, generator=gen))
    v, q = torch.randn(b, g, s, e, generator=gen), torch.randn(b, h, e, generator=gen)
    v, q = v.to(DEVICE, torch.float16), q.to(DEVICE, torch.float16)
    t, pad = torch.tensor([40], device=DEVICE), torch.tensor([0, 3, 9], device=DEVICE)
    want = decode_attention_ref(q.float(), k.float(), v.float(), t, pad)
    assert_close(decode_attention(q, k, v, t, pad), want, atol=2e-3, rtol=2e-3, what="rows past 2^31")


def test_decode_attention_reference_vs_sdpa():
    """The reference against PyTorch's own attention with an explicit mask (an independent oracle)."""
    b, h, g, e, s, t = 3, 8, 2, 16, 20, 13
    q, k, v, tt, pad = decode_inputs(b, h, g, e, s, t, "cpu", torch.float32, seed=1)
    ok = (torch.arange(s)[None, :] >= pad[:, None]) & (torch.arange(s)[None, :] <= t)  # (b, s)
    y = F.scaled_dot_product_attention(q[:, :, None], k, v, attn_mask=ok[:, None, None], enable_gqa=True)  # (b, h, 1, e)
    assert_close(decode_attention_ref(q, k, v, tt, pad), y[:, :, 0], what="reference vs SDPA")
    with pytest.raises(ValueError, match="v_cache has shape"):
        decode_attention(q, k, v[:, :, :5], tt, pad)
    with pytest.raises(ValueError, match="pad has shape"):
        decode_attention(q, k, v, tt, pad[:1])
    with pytest.raises(ValueError, match="must share a dtype"):  # an fp32 q under bf16 autocast, say
        decode_attention(q, k.bfloat16(), v.bfloat16(), tt, pad)


@needs_cuda
@pytest.mark.parametrize("b, s", [(2, 8192), (256, 640)])  # split among many programs / one per row
def test_gpu_decode_attention_bf16_in_graph(b, s):
    """bf16 against the fp32 reference, replayed from one CUDA graph while t advances on the device."""
    q, k, v, tt, pad = decode_inputs(b, 32, 8, 64, s, s // 2, DEVICE, torch.bfloat16, seed=b)
    decode_attention(q, k, v, tt, pad)  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = decode_attention(q, k, v, tt, pad)
    for t in (s // 2, s // 2 + 1, s - 1):
        tt.fill_(t)
        graph.replay()
        assert_rel_close(f"decode attention at t={t}", y, decode_attention_ref(q.float(), k.float(), v.float(), tt, pad), 1e-2)


# -----------------------------------------------------------------------------
# scan_kernel.py: the fused KL loss against its reference, the reference against torch's kl_div


def kl_and_grad(fn, s, t, dloss, temperature, direction):
    """The KL of every row and the gradient of <KL, dloss> wrt s."""
    leaf = s.detach().clone().requires_grad_()
    kl = fn(leaf, t, temperature, direction)  # (n,)
    return kl, torch.autograd.grad(kl, leaf, dloss)[0]


@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("direction", ["forward", "reverse"])
def test_kl_matches_reference(direction, temperature):
    """5 rows, a vocabulary of 1000 (not a multiple of the kernel's block); a student row and a
    teacher row put +100 on one token (see random_logits)."""
    s, t = random_logits(5, 1000, DEVICE, torch.float32, seed=1)
    dloss = torch.randn(5, generator=torch.Generator().manual_seed(2)).to(DEVICE)
    kl, ds = kl_and_grad(fused_kl_div, s, t, dloss, temperature, direction)
    kl_r, ds_r = kl_and_grad(kl_div_ref, s, t, dloss, temperature, direction)
    assert kl.dtype == ds.dtype == torch.float32
    assert_close(kl, kl_r, what="kl")
    assert_close(ds, ds_r, what="ds")
    with torch.no_grad():  # the kernel writes no gradient then (and the reverse KL skips its third pass)
        assert_close(fused_kl_div(s, t, temperature, direction), kl_r, what="kl without grad")


def test_kl_leading_dims_and_strides():
    """(..., V) inputs: leading dims are flattened, rows may have any stride (nothing past V is
    read: it holds 1e4), and a last dim that is not contiguous is copied. ds lands in the view."""
    s, t = random_logits(6, 1000, DEVICE, torch.float32, seed=3)
    wide = torch.cat([s, torch.full_like(s, 1e4)], 1).requires_grad_()  # (6, 2000)
    s_view = wide[:, :1000].view(2, 3, 1000)  # row stride 2000
    t_view = t.t().contiguous().t().view(2, 3, 1000)  # last dim stride 6
    kl = fused_kl_div(s_view, t_view, 2.0, "reverse")  # (2, 3)
    dloss = torch.randn(2, 3, generator=torch.Generator().manual_seed(4)).to(DEVICE)
    kl.backward(dloss)
    kl_r, ds_r = kl_and_grad(kl_div_ref, s, t, dloss.flatten(), 2.0, "reverse")
    assert kl.shape == (2, 3)
    assert_close(kl.flatten(), kl_r, what="kl")
    assert_close(wide.grad[:, :1000], ds_r, what="ds")
    assert wide.grad[:, 1000:].abs().max().item() == 0.0


def test_kl_bad_args_and_second_backward_raise():
    s, t = random_logits(2, 50, DEVICE, torch.float32)
    for fn in (fused_kl_div, kl_div_ref):
        with pytest.raises(ValueError, match="same non-empty"):
            fn(s, t[:, :49])
        with pytest.raises(ValueError, match="direction"):
            fn(s, t, direction="backward")
        with pytest.raises(ValueError, match="temperature"):
            fn(s, t, temperature=0.0)
    with pytest.raises(ValueError, match="no gradient"):
        fused_kl_div(s, t.clone().requires_grad_())
    # the backward scales the saved gradient in place: a second one must fail, not scale it twice
    loss = fused_kl_div(s.clone().requires_grad_(), t).sum()
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="inplace"):
        loss.backward()


@pytest.mark.parametrize("direction", ["forward", "reverse"])
def test_kl_reference_equals_torch_kl_div(direction):
    """An independent oracle, in fp64: kl_div(input, target) = sum exp(target) (target - input) of log-probabilities."""
    s, t = random_logits(5, 1000, "cpu", torch.float32, seed=5)
    s_logp, t_logp = (torch.log_softmax(x.double() / 2.0, -1) for x in (s, t))  # (5, 1000) each
    inp, target = (s_logp, t_logp) if direction == "forward" else (t_logp, s_logp)
    oracle = torch.nn.functional.kl_div(inp, target, reduction="none", log_target=True).sum(-1)  # (5,)
    assert_close(kl_div_ref(s, t, 2.0, direction), oracle, what=direction)


@pytest.mark.parametrize("direction", ["forward", "reverse"])
def test_kl_loss_fn_is_the_distillation_loss(direction):
    """Stage 2's loss (here the reference path, on CPU): T^2 times the KL summed over the positions
    whose next token is a solution token (m = 1), written out as it was before the fused kernel, and
    the count of those positions: the prompt and the padding count for nothing."""
    models = tiny_models()
    x = torch.randint(0, 90, (2, 9), generator=torch.Generator().manual_seed(6))
    x[0, :3] = 95  # padding
    m = torch.zeros(2, 9)
    m[0, 5:], m[1, 2:] = 1, 1  # (b, l) solution targets: 4 + 7 of them
    loss, count = md.kl_loss_fn(models["teacher"], direction, 2.0)(models["pure"], x, None, m)
    with torch.no_grad():
        t_logp = torch.log_softmax(models["teacher"](x).float() / 2.0, -1)  # (b, l, v)
        s_logp = torch.log_softmax(models["pure"](x).float() / 2.0, -1)  # (b, l, v)
    p, q = (t_logp, s_logp) if direction == "forward" else (s_logp, t_logp)
    assert count.item() == 11
    assert_close(loss, 4.0 * ((p.exp() * (p - q)).sum(-1) * m).sum(), what=direction)


@needs_cuda
@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("direction", ["forward", "reverse"])
def test_gpu_kl_bf16_vs_fp32_reference(direction, temperature):
    """Llama 3's vocabulary and bf16 logits; ds is stored in bf16, so it is held to bf16's precision."""
    n, v = 64, 128256
    s, t = random_logits(n, v, DEVICE, torch.bfloat16, seed=7)
    dloss = torch.randn(n, generator=torch.Generator().manual_seed(8)).to(DEVICE)
    kl, ds = kl_and_grad(fused_kl_div, s, t, dloss, temperature, direction)
    kl_r, ds_r = kl_and_grad(kl_div_ref, s.float(), t.float(), dloss, temperature, direction)
    assert kl.dtype == torch.float32 and ds.dtype == torch.bfloat16
    assert_close(kl, kl_r, atol=1e-4, rtol=1e-4, what="kl")
    assert_rel_close("ds", ds, ds_r, 1e-2)


# -----------------------------------------------------------------------------
# sample.py: cached and graph decoding against a naive generate, answers, pass@k, resume


# ragged prompts: different lengths, so the batch is left-padded by 0, 4 and 8 tokens
PROMPTS = [[5, 17, 3, 9, 44, 2, 71, 12, 60, 8, 30], [8, 1, 60, 4, 22, 93, 7], [33, 12, 90]]
NEW = 20  # new tokens: slots 11..30 of a 32-slot cache


@torch.no_grad()
def naive_generate(model, prompt, n):
    """Greedy with no cache: the whole sequence through the parallel forward for every new token."""
    ids = list(prompt)
    for _ in range(n):
        ids.append(int(model(torch.tensor([ids], device=next(model.parameters()).device))[0, -1].argmax()))
    return ids[len(prompt):]


def greedy(model, prompts, batch, **kw):
    sampler = sample.Sampler(model, batch, 32, temperature=0, **kw)
    return sampler.generate(prompts, NEW)[0]


@pytest.mark.parametrize("kind", ["teacher", "hybrid", "pure"])
def test_greedy_equals_naive_generate(kind):
    """Cached prefill + decode steps == no cache, token for token."""
    model = tiny_models()[kind]
    outs = greedy(model, PROMPTS, batch=4)  # a ragged batch of 3 in 4 rows (one filler row)
    for prompt, out in zip(PROMPTS, outs):
        assert out == naive_generate(model, prompt, NEW), kind


@pytest.mark.parametrize("kind", ["teacher", "hybrid", "pure"])
def test_ragged_batch_equals_each_prompt_alone(kind):
    model = tiny_models()[kind]
    together = greedy(model, PROMPTS, batch=3)
    for prompt, out in zip(PROMPTS, together):
        assert out == greedy(model, [prompt], batch=1)[0], kind


@pytest.mark.parametrize("state_dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("kind", ["hybrid", "pure"])
def test_low_precision_decode_state_keeps_greedy_tokens(kind, state_dtype):
    """A bf16/fp16 SSM state through prefill (the scan's final state is rounded into it) and decode:
    the same greedy tokens as the fp32 state here (rounding could flip a near-tie in another model)."""
    model = tiny_models()[kind]
    sampler = sample.Sampler(model, 4, 32, temperature=0, state_dtype=state_dtype)
    assert sampler.cache[0][1].dtype == state_dtype
    assert sampler.generate(PROMPTS, NEW)[0] == greedy(model, PROMPTS, batch=4)


@pytest.mark.skipif(CUDA, reason="CPU-interpreter test; on a GPU this path is the default one, which the "
                    "GPU decode tests and test_pipeline_tiny run")
@pytest.mark.parametrize("kind", ["teacher", "hybrid"])
def test_decode_kernel_path_equals_sdpa_path(kind, monkeypatch):
    """The model's GPU decode path (decode_attention, no mask), forced on the CPU through the Triton
    interpreter, gives the greedy tokens of the masked-SDPA path."""
    model = tiny_models()[kind]
    want = greedy(model, PROMPTS, batch=4)
    context = md.LM._context

    def kernel_context(self, b, l, *args):
        ctx, pos = context(self, b, l, *args)
        if l == 1:
            ctx.mask = None  # what _context leaves on a GPU
        return ctx, pos
    monkeypatch.setattr(md.LM, "_context", kernel_context)
    assert greedy(model, PROMPTS, batch=4) == want
    # an fp32 model sampled under bf16 autocast (the pipeline's greedy evaluation on a GPU): q comes
    # out of RoPE in fp32, the cache is bf16; the kernel needs one dtype. (The interpreter's bf16
    # numbers are wrong, so only that it runs is checked here; the GPU tests check the values.)
    outs = sample.Sampler(model, 4, 32, temperature=0, dtype=torch.bfloat16).generate(PROMPTS, 4)[0]
    assert [len(o) for o in outs] == [4, 4, 4]


@pytest.mark.parametrize("kind", ["teacher", "hybrid", "pure"])
def test_greedy_generate_equals_naive(kind):
    """mamba_distill's greedy_generate (the pipeline's evaluation; one CUDA graph a step on a GPU) gives
    the naive continuation, and a StopRule ends each row right before its stop token."""
    model = tiny_models()[kind].to(DEVICE)
    outs = md.greedy_generate(model, PROMPTS, md.StopRule(96, device=DEVICE), NEW, torch.float32)
    full = [naive_generate(model, p, NEW) for p in PROMPTS]
    assert outs == full
    stops = {ref[4] for ref in full}
    outs = md.greedy_generate(model, PROMPTS, md.StopRule(96, stops, device=DEVICE), NEW, torch.float32)
    assert outs == [ref[:min(i for i, x in enumerate(ref) if x in stops)] for ref in full]


def test_sampling_seed_reproducible_and_top_k_1_is_greedy():
    model = tiny_models()["hybrid"]
    sampler = sample.Sampler(model, 3, 32, temperature=1.0, top_k=0, top_p=0.9)
    a = sampler.generate(PROMPTS, NEW, seed=7)[0]
    assert sampler.generate(PROMPTS, NEW, seed=7)[0] == a
    assert sampler.generate(PROMPTS, NEW, seed=8)[0] != a  # 60 tokens from a near-uniform random model
    top1 = sample.Sampler(model, 3, 32, temperature=1.0, top_k=1).generate(PROMPTS, NEW, seed=3)[0]
    assert top1 == greedy(model, PROMPTS, batch=3)


def test_a_sample_does_not_depend_on_its_batch():
    """With a seed per row (sample.py's sample_seed) and prompts padded to one length, a row draws the
    same tokens alone, in any batch and at any position in it: what lets several processes split the
    work and still draw the very samples one process would."""
    model = tiny_models()["hybrid"]
    sampler = sample.Sampler(model, 3, 32, temperature=1.0, top_k=0, top_p=0.9)
    kw = dict(prompt_len=max(map(len, PROMPTS)))
    together = sampler.generate(PROMPTS, NEW, seeds=[11, 12, 13], **kw)[0]
    assert sampler.generate(PROMPTS[::-1], NEW, seeds=[13, 12, 11], **kw)[0] == together[::-1]
    for i, prompt in enumerate(PROMPTS):
        assert sampler.generate([prompt], NEW, seeds=[11 + i], **kw)[0][0] == together[i]
    assert sampler.generate(PROMPTS, NEW, seeds=[21, 12, 13], **kw)[0][0] != together[0]  # the seed matters


def test_row_uniforms_are_uniform_and_independent():
    u = sample.row_uniforms(torch.arange(2000), torch.tensor(3), 64)  # (b, c)
    assert ((u > 0) & (u < 1)).all() and abs(u.mean().item() - 0.5) < 0.005
    assert abs(torch.corrcoef(torch.stack([u[:, 0], u[:, 1]]))[0, 1].item()) < 0.05  # ranks
    assert abs(torch.corrcoef(torch.stack([u[:-1, 0], u[1:, 0]]))[0, 1].item()) < 0.05  # neighbouring seeds
    v = sample.row_uniforms(torch.arange(2000), torch.tensor(4), 64)
    assert abs(torch.corrcoef(torch.stack([u.flatten(), v.flatten()]))[0, 1].item()) < 0.02  # steps


def test_sample_next_filters():
    """top-k and top-p keep exactly the candidates they should; temperature 0 is argmax."""
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]])).repeat(4000, 1)  # (b, v)
    torch.manual_seed(0)
    counts = torch.bincount(sample.sample_next(logits, 1.0, 0, 0.7), minlength=4)
    assert counts[2:].sum() == 0 and counts[1] > 0  # 0.5 < 0.7: token 1 is needed, 2 and 3 are not
    counts = torch.bincount(sample.sample_next(logits, 1.0, 3, 1.0), minlength=4)
    assert counts[3] == 0 and counts[2] > 0
    frac = torch.bincount(sample.sample_next(logits, 1.0, 0, 1.0), minlength=4).float() / 4000
    assert (frac - torch.tensor([0.5, 0.3, 0.15, 0.05])).abs().max() < 0.03, frac
    assert (sample.sample_next(logits, 0.0, 0, 1.0) == 0).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", ["random", "one_chunk", "ties"])
@pytest.mark.parametrize("k", [1, 50])
def test_topk_by_chunks_equals_topk(case, dtype, k):
    """The two-pass top-k gives torch.topk's values, sorted, at ids that hold them: on random logits,
    when every top value sits in one chunk, and when many values tie (bf16 rounds ~1 in 100 together)."""
    torch.manual_seed(0)
    v = 4 * 64 * sample.TOPK_CHUNK_SIZE  # just large enough for the two-pass path
    logits = torch.randn(6, v).to(dtype)  # (b, v)
    if case == "one_chunk":
        logits[:, 200::v // sample.TOPK_CHUNK_SIZE] += 10.0  # chunk 200 holds the top 32
    if case == "ties":
        logits = logits.round()  # a handful of distinct values
    vals, ids = sample.topk_by_chunks(logits, k)
    want = logits.topk(k, dim=-1).values  # (b, k)
    assert torch.equal(vals, want)
    assert torch.equal(logits.gather(-1, ids), vals)
    assert all(len(set(row)) == k for row in ids.tolist())  # k distinct ids per row
    if case != "ties" and dtype == torch.float32:  # no ties: the very same ids
        assert torch.equal(ids, logits.topk(k, dim=-1).indices)


def test_stop_tokens_end_rows():
    model = tiny_models()["teacher"]
    full = greedy(model, PROMPTS, batch=3)
    stops = {ref[3] for ref in full}  # every row meets one by its 4th token
    sampler = sample.Sampler(model, 3, 32, temperature=0)
    outs, stats = sampler.generate(PROMPTS, NEW, stop_ids=stops, check_every=3)
    for out, ref in zip(outs, full):
        first = min(i for i, t in enumerate(ref) if t in stops)
        assert out == ref[:first]  # each row ends right before its first stop token
    assert stats["steps"] < NEW  # and the batch ends once every row has stopped


class PieceTokenizer:
    """Greedy longest-match over a few pieces, "####" among them: enough to test stopping."""
    PIECES = ["####", "#", "\n", " ", ".", "$", "+", "=", "12", *"0123456789", *"abcdefghijklmnopqrstuvwxyz"]

    def __init__(self):
        self.n_words = len(self.PIECES)

    def encode(self, text):
        ids = []
        while text:
            i = max((i for i, p in enumerate(self.PIECES) if text.startswith(p)), key=lambda i: len(self.PIECES[i]))
            ids.append(i)
            text = text[len(self.PIECES[i]):]
        return ids

    def decode(self, ids):
        return "".join(self.PIECES[i] for i in ids)

    def token_bytes(self, i):
        return self.PIECES[i].encode()


def test_stop_rule_ends_rows_at_the_answer_line():
    """StopRule, fed one token a step as the sampler does, ends each row where the text-level rule
    (answer_end) does: after the newline of a "####" line with a number, before a stop token."""
    tok = PieceTokenizer()
    texts = ["so 3 + 4 = 7.\n#### 7\nmore text", "#### the answer is 12\nx", "#### \n#### 5\nq",
             "a$b #### 1\n", "no answer\n"]
    keep = ["so 3 + 4 = 7.\n#### 7\n", "#### the answer is 12\n", "#### \n#### 5\n", "a", None]
    rule = md.StopRule(tok.n_words, stop_ids={tok.PIECES.index("$")}, tokenizer=tok)
    ids = [tok.encode(t) for t in texts]
    steps = max(map(len, ids))
    toks = torch.tensor([i + [tok.PIECES.index(" ")] * (steps - len(i)) for i in ids])  # (b, steps)
    phase, done, end = torch.zeros(5, dtype=torch.long), torch.zeros(5, dtype=torch.bool), torch.zeros(5, dtype=torch.long)
    for col in range(steps):
        rule.update(toks[:, col], torch.tensor(col), phase, done, end)
    for i, want in enumerate(keep):
        assert bool(done[i]) == (want is not None), texts[i]
        if want is not None:
            assert tok.decode(ids[i][:int(end[i])]) == want
            assert want == "a" or tok.decode(ids[i][:md.answer_end(ids[i], tok)]) == want
    chars = [tok.PIECES.index(c) for c in "#### 7\nz"]  # "####" typed one '#' at a time: the rule cannot see it
    assert md.answer_end(chars, tok) == 7


@pytest.mark.parametrize("text,answer", [
    ("3 + 4 = 7\n#### 7", "7"),
    ("so it costs $1,200.\n#### $1,200", "1200"),
    ("#### 18.00 dollars\nThe end, 5", "18"),
    ("#### -3", "-3"),
    ("#### 0.50", "0.5"),
    ("The answer is \\boxed{42}.", "42"),
    ("so \\boxed{\\frac{1}{2}} and 7", "\\frac{1}{2}"),
    ("\\boxed{3} then \\boxed{1,000.0}", "1000"),
    ("first 12 then 15.", None),  # no answer line: unanswered, however many numbers the text holds
    ("no numbers here", None),
])
def test_extract_answer(text, answer):
    assert md.extract_answer(text) == answer


def test_flexible_extraction_is_opt_in_and_special_tokens_never_answer(tmp_path):
    assert md.extract_answer("first 12 then 15.", flexible=True) == "15"
    assert md.extract_answer("#### 7\nthen 9", flexible=True) == "7"  # an answer line still wins
    tok = byte_tokenizer(tmp_path / "tok.model")
    special = tok.special_tokens["<|reserved_special_token_221|>"]
    ids = tok.encode("so it is\n#### ") + [special] + tok.encode("\n")
    assert "221" in tok.decode(ids)  # the name's digits are in the raw text ...
    assert md.extract_answer(md.answer_text(ids, tok)) is None  # ... but never an answer
    assert md.extract_answer(md.answer_text(ids, tok), flexible=True) is None
    ids = tok.encode("#### ") + [special] + tok.encode(" 42\n")
    assert md.extract_answer(md.answer_text(ids, tok)) == "42"


@pytest.mark.parametrize("split", ["test", "train"])
def test_extract_answer_recovers_every_gsm8k_gold(split):
    path = os.path.join(SHARED, "data", "gsm8k", f"{split}.jsonl")
    if not os.path.exists(path):
        pytest.skip(f"{path} absent")
    rows = md.read_jsonl(path)
    wrong = [r["answer"][-40:] for r in rows
             if md.extract_answer(r["answer"]) != md.normalize_number(md.gold_answer(r["answer"]))]
    assert not wrong, f"{len(wrong)} of {len(rows)}: {wrong[:3]}"


def test_pass_at_k_and_majority():
    from itertools import combinations
    n, c = 6, 2
    for k in range(1, n + 1):  # the estimator == the share of k-subsets holding a correct sample
        subsets = list(combinations([1] * c + [0] * (n - c), k))
        assert abs(sample.pass_at_k(n, c, k) - sum(map(any, subsets)) / len(subsets)) < 1e-12
    assert sample.majority_answer(["3", None, "4", "4", "3", None, None]) == "3"  # tie: the first seen
    assert sample.majority_answer([None, None]) is None
    samples = [{"problem": p, "sample": j, "answer": a, "gold": "1", "correct": a == "1", "time_s": 0.5}
               for p, answers in enumerate([["1", "2", "2", "2"], ["2", "1", "1", "3"]]) for j, a in enumerate(answers)]
    ks, cov, maj, times = sample.summarize(samples, 2, 4)
    assert ks == [1, 2, 4] and times == [1.0, 2.0, 4.0]
    assert cov[2] == 1.0 and abs(cov[0] - 0.375) < 1e-12  # (1/4 + 2/4) / 2
    assert maj == [0.5, 0.5, 0.5]  # problem 0 is outvoted from k = 4, problem 1 wins only then


def tiny_eval_checkpoint(tmp_path):
    """A tiny random hybrid with its own BPE, saved as a checkpoint, and a 3-problem data file."""
    rows = md.synthetic_split("test", 3, seed=1, task="short")
    tok = md.train_bpe([r["question"] + r["answer"] for r in md.synthetic_split("train", 30, task="short")], 300,
                       str(tmp_path / "tok.model"))
    model = tiny_models(vocab_size=tok.n_words, max_position_embeddings=512)["hybrid"]
    md.save_model(model, tok, str(tmp_path / "ckpt"))
    md.write_jsonl(rows, str(tmp_path / "test.jsonl"))
    return ["--checkpoint", str(tmp_path / "ckpt"), "--data", str(tmp_path / "test.jsonl"), "--out_dir", str(tmp_path),
            "--max_new_tokens", "6", "--device", "cpu", "--flexible_extract"]


def test_evaluate_writes_and_resumes(tmp_path):
    """A tiny checkpoint and tokenizer end to end: samples.jsonl, summary.json, and a resumed run."""
    argv = tiny_eval_checkpoint(tmp_path)[:-1] + ["--name", "m", "--k", "4", "--batch_size", "5"]
    sample.main(argv)
    path = tmp_path / "eval" / "m" / "samples.jsonl"
    lines = path.read_text().splitlines()
    assert sorted((json.loads(x)["problem"], json.loads(x)["sample"]) for x in lines) == \
        [(p, j) for p in range(3) for j in range(4)]
    summary = json.loads((tmp_path / "eval" / "m" / "summary.json").read_text())
    assert summary["k"] == [1, 2, 4] and summary["n_problems"] == 3 and len(summary["time_s"]) == 3
    assert summary["time_s"] == sorted(summary["time_s"])
    path.write_text("\n".join(lines[:7]) + "\n" + lines[7][:10])  # interrupted mid-line
    sample.main(argv)
    resumed = path.read_text().splitlines()
    assert resumed[:7] == lines[:7]  # kept, not regenerated
    assert sorted((json.loads(x)["problem"], json.loads(x)["sample"]) for x in resumed) == \
        [(p, j) for p in range(3) for j in range(4)]
    path.write_text(lines[0][:10])  # interrupted in the very first line
    sample.main(argv)
    assert len(path.read_text().splitlines()) == 12
    with pytest.raises(md.InputError, match="meta.json: earlier samples were drawn with other temperature"):
        sample.main(argv + ["--temperature", "0.5"])  # never mixed into one summary
    meta_path = tmp_path / "eval" / "m" / "meta.json"
    meta = json.loads(meta_path.read_text())
    assert meta["state_dtype"] == "torch.float32"  # "model" on a CPU: fp32
    meta_path.write_text(json.dumps({**meta, "state_dtype": "torch.bfloat16"}))
    with pytest.raises(md.InputError, match="other state_dtype"):
        sample.main(argv)
    meta.pop("state_dtype")  # written before the flag existed: those samples had an fp32 state
    meta_path.write_text(json.dumps(meta))
    sample.main(argv)


def run_sample(argv, procs=1):
    """sample.py as its own process(es): plain python, or torchrun with `procs` CPU processes (gloo)."""
    import subprocess
    import sys
    launch = [sys.executable] + (["-m", "torch.distributed.run", f"--nproc_per_node={procs}"] if procs > 1 else [])
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(launch + ["sample.py", *argv], cwd=HERE, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]


def eval_files(tmp_path, name):
    d = tmp_path / "eval" / name
    samples = {(s["problem"], s["sample"]): s for s in map(json.loads, (d / "samples.jsonl").read_text().splitlines())}
    return samples, json.loads((d / "summary.json").read_text())


def test_torchrun_sampling_matches_one_process(tmp_path):
    """torchrun with 2 CPU processes (gloo) draws every (problem, sample) once, and the merged samples
    and metrics are those of one process: a sample's seed and numbers do not depend on the layout.
    A run resumed with another number of processes keeps what was drawn and ends the same."""
    argv = tiny_eval_checkpoint(tmp_path) + ["--k", "8", "--temperature", "1.0", "--top_k", "0", "--top_p", "1.0"]
    run_sample(argv + ["--name", "one"])
    run_sample(argv + ["--name", "two"], procs=2)
    one, s1 = eval_files(tmp_path, "one")
    two, s2 = eval_files(tmp_path, "two")
    assert sorted(two) == [(p, j) for p in range(3) for j in range(8)]
    assert {key: s["text"] for key, s in two.items()} == {key: s["text"] for key, s in one.items()}
    assert {s["rank"] for s in two.values()} == {0, 1} and (s1["gpus"], s2["gpus"]) == (1, 2)
    assert (s2["coverage"], s2["majority"]) == (s1["coverage"], s1["majority"])
    assert not list((tmp_path / "eval" / "two").glob("samples.rank*"))  # merged, then removed
    # two processes draw k <= 4 and "crash" leaving a per-process file; one process finishes k = 8
    run_sample(argv[:-6] + ["--k", "4", "--temperature", "1.0", "--top_k", "0", "--top_p", "1.0", "--name", "mix"],
               procs=2)
    d = tmp_path / "eval" / "mix"
    lines = (d / "samples.jsonl").read_text().splitlines()
    (d / "samples.jsonl").write_text("\n".join(lines[:6]) + "\n")
    (d / "samples.rank1.jsonl").write_text("\n".join(lines[6:]) + "\n")
    run_sample(argv + ["--name", "mix"])
    mix, _ = eval_files(tmp_path, "mix")
    assert {key: s["text"] for key, s in mix.items()} == {key: s["text"] for key, s in one.items()}
    assert {s["run"] for s in mix.values() if s["sample"] < 4} != {s["run"] for s in mix.values() if s["sample"] >= 4}
    assert not (d / "samples.rank1.jsonl").exists()


def test_time_at_k_is_the_slowest_process_per_round():
    """Rounds start together on every process, so a round takes its slowest process's time; a round
    resumed in a later run adds that run's time."""
    def s(j, t, rank=0, run=0):
        return {"problem": 0, "sample": j, "answer": "1", "gold": "1", "correct": True, "time_s": t, "rank": rank,
                "run": run}
    samples = [s(0, 1.0), s(1, 2.0), s(2, 1.5, rank=0), s(3, 1.0, rank=1)]  # samples 2 and 3: round 4
    ks, _, _, time_s = sample.summarize(samples, 1, 4)
    assert ks == [1, 2, 4] and time_s == [1.0, 3.0, 4.5]  # round 4: max(1.5, 1.0)
    samples[3]["run"] = 1  # sample 3 drawn by a later run: its time adds to round 4
    assert sample.summarize(samples, 1, 4)[3] == [1.0, 3.0, 5.5]


@needs_cuda
@pytest.mark.parametrize("compile", [False, True])
@pytest.mark.parametrize("kind", ["teacher", "hybrid", "pure"])
def test_cuda_graph_decode_equals_naive(kind, compile):
    """On GPU, in fp32: the captured (and compiled) decode step gives the naive greedy continuation."""
    model = tiny_models()[kind].cuda()
    outs = greedy(model, PROMPTS, batch=4, cuda_graph=True, compile=compile)
    for prompt, out in zip(PROMPTS, outs):
        assert out == naive_generate(model, prompt, NEW), kind
    sampler = sample.Sampler(model, 3, 32, temperature=1.0, top_p=0.9, compile=compile)
    assert sampler.generate(PROMPTS, NEW, seed=5)[0] == sampler.generate(PROMPTS, NEW, seed=5)[0]
    assert list(sampler.graphs) == [3]  # one graph for the one row count, captured once


# -----------------------------------------------------------------------------
# teacher files: our Llama against HF transformers' on the same weights, both ways


def byte_tokenizer(path):
    """A valid tokenizer file holding just the 256 single bytes (n_words = 512)."""
    import base64
    with open(path, "w") as fh:
        fh.writelines(f"{base64.b64encode(bytes([i])).decode()} {i}\n" for i in range(256))
    return Tokenizer(str(path))


def hf_llama(tied, seed=0):
    transformers = pytest.importorskip("transformers", reason="HF transformers is the test oracle")
    cfg = transformers.LlamaConfig(
        vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, max_position_embeddings=256, rope_theta=500000.0,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 32},
        tie_word_embeddings=tied, initializer_range=0.1, rms_norm_eps=1e-5)
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(cfg).eval()


@pytest.mark.parametrize("tied", [True, False])
def test_load_teacher_matches_hf(tmp_path, tied):
    hf = hf_llama(tied)
    hf.save_pretrained(tmp_path, max_shard_size="100KB")  # sharded, with an index file
    assert os.path.isfile(tmp_path / "model.safetensors.index.json")
    byte_tokenizer(tmp_path / "tokenizer.model")
    model, tok = md.load_teacher(str(tmp_path))
    assert tok.n_words == 512 and model.cfg.tie_word_embeddings == tied
    idx = torch.randint(0, 512, (2, 48))  # past original_max_position_embeddings: llama3 scaling matters
    with torch.no_grad():
        expected = hf(idx).logits
        assert_close(model(idx), expected, atol=1e-4, rtol=0, what="load_teacher vs HF")
    md.save_teacher(model, tok, str(tmp_path / "ours"))
    from transformers import LlamaForCausalLM
    again = LlamaForCausalLM.from_pretrained(str(tmp_path / "ours")).eval()
    with torch.no_grad():
        assert_close(again(idx).logits, expected, atol=1e-4, rtol=0, what="HF loading save_teacher")


def test_checkpoint_errors_name_the_file(tmp_path):
    model = tiny_models()["hybrid"]
    tok = byte_tokenizer(tmp_path / "tok.model")
    path = str(tmp_path / "ckpt")
    md.save_model(model, tok, path)
    assert md.load_model(path).cfg.ssm_layers == [0, 2]
    with pytest.raises(InputError, match="no such checkpoint directory"):
        md.load_teacher(str(tmp_path / "nowhere"))
    cfg = json.load(open(os.path.join(path, "config.json")))
    json.dump({**cfg, "ssm_layers": [1]}, open(os.path.join(path, "config.json"), "w"))
    with pytest.raises(InputError, match="config.json does not match the weights"):
        md.load_model(path)
    json.dump(cfg, open(os.path.join(path, "config.json"), "w"))
    weights = os.path.join(path, "model.safetensors")
    data = open(weights, "rb").read()
    open(weights, "wb").write(data[:len(data) // 2])
    with pytest.raises(InputError, match="model.safetensors"):
        md.load_model(path)
    open(os.path.join(path, "config.json"), "w").write("{not json")
    with pytest.raises(InputError, match="config.json:1: not valid JSON"):
        md.load_model(path)


def test_cli_flags(capsys):
    with pytest.raises(SystemExit) as e:
        md.parse_config(md.DistillConfig, ["--help"])
    assert e.value.code == 0
    help_text = capsys.readouterr().out
    assert all(f"--{f.name}" in help_text for f in md.fields(md.DistillConfig))
    with pytest.raises(SystemExit) as e:
        md.parse_config(md.DistillConfig, ["--no_such_flag", "1"])
    assert e.value.code == 2
    cfg = md.parse_config(md.DistillConfig, ["--kl_steps", "7", "--resume", "--init=random"])
    assert (cfg.kl_steps, cfg.resume, cfg.init) == (7, True, "random")
    with pytest.raises(InputError, match="--preset"):
        md.main(["--preset", "huge"])
    with pytest.raises(InputError, match="--state_dtype"):
        sample.main(["--state_dtype", "float16", "--data", "/nonexistent.jsonl"])  # before the data is read


# -----------------------------------------------------------------------------
# the whole pipeline at a tiny size: artifacts, resume after a NaN


def test_held_out_loss_is_the_stage_loss_on_test_problems(tmp_path):
    """Every --held_out_every steps and at a stage's end the log holds the stage's loss on the last test
    problems; the teacher's last one is its final weights' cross-entropy there, recomputed here."""
    out = str(tmp_path / "out")
    argv = ["--preset", "tiny", "--students", "", "--random_baseline", "", "--teacher_steps", "5",
            "--held_out_every", "2", "--eval_n", "0", "--device", "cpu", "--out_dir", out]
    md.main(argv)
    recs = md.read_jsonl(os.path.join(out, "logs", "teacher.jsonl"), {"step": int})
    assert [r["step"] for r in recs if "held_out_loss" in r] == [0, 2, 4, 5]  # 0: before training
    cfg = md.apply_preset(md.parse_config(md.DistillConfig, argv), argv)
    teacher, tok = md.load_teacher(os.path.join(out, "teacher"))
    rows = md.read_jsonl(os.path.join(out, "data", "test.jsonl"))
    x, y, m = md.held_out_batch(tok, rows, cfg, md.setup_env("cpu"))
    assert x.shape[0] == cfg.batch_size // cfg.grad_accum  # one micro-batch of test problems
    with torch.no_grad():
        s, n = md.ce_loss(teacher, x, y, m)
    assert_close(torch.tensor(recs[-1]["held_out_loss"]), s / n, atol=2e-6, what="held-out loss")


def test_hybrid_keeps_the_attention_layers_asked_for(tmp_path):
    """--attn_layers picks the hybrid's attention layers (the provenance holds them), the pure students
    stay pure, and the summary gives each mixer's held-out error against the attention it replaced."""
    assert md.student_layers("hybrid", 8, 0.25) == [0, 1, 3, 4, 5, 7]  # spread over depth
    assert md.student_layers("hybrid", 8, 0.25, [0, 5]) == [1, 2, 3, 4, 6, 7]
    assert md.student_layers("pure", 8, 0.25, [0, 5]) == list(range(8))
    out = str(tmp_path / "out")
    summary = md.main(["--preset", "tiny", "--attn_layers", "3,0", "--kl_steps", "1", "--sft_steps", "0",
                       "--random_baseline", "pure", "--eval_n", "0", "--out_dir", out])
    assert md.load_model(os.path.join(out, "hybrid")).cfg.ssm_layers == [1, 2]
    assert md.read_provenance(out)["hybrid"]["settings"]["ssm_layers"] == [1, 2]
    errors = {name: summary["models"][name].get("mixer_error_by_layer") for name in summary["models"]}
    assert errors["teacher"] is None and list(errors["hybrid"]) == [1, 2]
    assert list(errors["pure"]) == list(errors["pure_random"]) == [0, 1, 2, 3]
    assert all(0 < e < float("inf") for e in errors["pure"].values())


@pytest.mark.parametrize("kl_trains", ["all", "mixers"])
def test_stage_2_trains_what_kl_trains_says(tmp_path, kl_trains):
    """--kl_trains mixers: after stage 2 every parameter outside the mixers is still the teacher's (as
    in MambaInLlama's distillation); all: stage 2 moves them too. The mixers train either way."""
    out = str(tmp_path / "out")
    md.main(["--preset", "tiny", "--students", "pure", "--random_baseline", "", "--align_steps", "0", "--sft_steps", "0",
             "--kl_trains", kl_trains, "--eval_n", "0", "--out_dir", out])
    teacher = md.load_state_dict(os.path.join(out, "teacher"))
    student = md.load_state_dict(os.path.join(out, "pure"))
    kept = [k for k in student if ".mixer." not in k and torch.equal(student[k], teacher[k])]
    shared = [k for k in student if ".mixer." not in k]
    assert (kept == shared) == (kl_trains == "mixers"), (len(kept), len(shared))
    fresh = md.transfer_attention_to_mamba(md.load_teacher(os.path.join(out, "teacher"))[0], range(4)).state_dict()
    assert not torch.equal(student["model.layers.0.mixer.in_proj.weight"], fresh["model.layers.0.mixer.in_proj.weight"])
    assert md.read_provenance(out)["pure"]["settings"]["kl_trains"] == kl_trains


def test_mixer_errors_by_layer_average_to_the_stage_1_loss():
    """The per-layer errors the summary reports are stage 1's loss taken apart: their mean is it."""
    models = tiny_models()
    teacher, student = models["teacher"], models["hybrid"]  # mixers in layers 0 and 2
    x = torch.randint(0, teacher.cfg.vocab_size - 1, (2, 12))
    x[0, :3] = teacher.cfg.vocab_size - 1  # left padding
    by_layer = md.mixer_error_by_layer(teacher, student, x, teacher.cfg.vocab_size - 1, md.setup_env("cpu"))
    with torch.no_grad():
        s, n = md.align_loss_fn(teacher, [0, 2], teacher.cfg.vocab_size - 1)(student, x, None, None)
    assert list(by_layer) == [0, 2]
    assert_close(torch.tensor(sum(by_layer.values()) / 2), s / n, atol=2e-4, what="mean of the per-layer errors")


def test_kl_by_line_takes_the_stage_2_loss_apart(tmp_path):
    """The per-line KLs a finished run writes add up to stage 2's held-out loss (here at temperature 2,
    reverse KL), and the lines are the gold solutions' lines, then the end-of-turn token."""
    out = str(tmp_path / "out")
    argv = ["--preset", "tiny", "--students", "pure", "--random_baseline", "", "--kl_steps", "2", "--sft_steps", "0",
            "--temperature", "2", "--kl", "reverse", "--seq_len", "1024", "--eval_n", "0", "--device", "cpu",
            "--pure_kl_factor", "1.5", "--out_dir", out]  # sequences long enough for whole solutions
    md.main(argv)
    kl_log = [r for r in map(json.loads, open(os.path.join(out, "logs", "pure.jsonl"))) if r["stage"] == "kl"]
    assert kl_log[-1]["step"] == 3, "a pure student's stage 2 runs --pure_kl_factor times --kl_steps"
    assert md.read_provenance(out)["pure"]["settings"]["kl_steps"] == 3
    cfg = md.apply_preset(md.parse_config(md.DistillConfig, argv), argv)
    teacher, tok = md.load_teacher(os.path.join(out, "teacher"))
    student = md.load_model(os.path.join(out, "pure"))
    rows = md.read_jsonl(os.path.join(out, "data", "test.jsonl"))
    x, y, m = md.held_out_batch(tok, rows, cfg, md.setup_env("cpu"))
    with torch.no_grad():
        s, n = md.kl_loss_fn(teacher, "reverse", 2.0)(student, x, y, m)
    written = [json.loads(line) for line in open(os.path.join(out, "kl_by_line", "pure.jsonl"))]
    assert len(written) == x.shape[0]
    total, count = sum(sum(r["kl"]) for r in written), sum(sum(r["tokens"]) for r in written)
    assert count == int(n)
    assert_close(torch.tensor(total / count), s / n, atol=1e-5, rtol=1e-4, what="per-line KL, summed")
    answers = [r["answer"] for r in rows]
    for r in written:
        assert r["lines"][-1] == "<|eot_id|>" and "\n".join(r["lines"][:-1]) in answers, r["lines"]
        assert r["prompt"].startswith("<|begin_of_text|>") and r["prompt"].endswith("<|end_header_id|>\n\n")


def test_a_stage_logs_its_held_out_loss_before_training(tmp_path):
    """A stage opens its log with step 0: the held-out loss of the model it starts from, here the KL of
    the freshly transferred pure student (no stage 1) to its teacher, recomputed here."""
    out = str(tmp_path / "out")
    argv = ["--preset", "tiny", "--students", "pure", "--random_baseline", "", "--align_steps", "0",
            "--sft_steps", "0", "--kl_steps", "2", "--eval_n", "0", "--device", "cpu", "--out_dir", out]
    md.main(argv)
    start = md.read_jsonl(os.path.join(out, "logs", "pure.jsonl"), {"step": int})[0]
    assert (start["stage"], start["step"]) == ("kl", 0) and "loss" not in start, start
    cfg = md.apply_preset(md.parse_config(md.DistillConfig, argv), argv)
    teacher, tok = md.load_teacher(os.path.join(out, "teacher"))
    torch.manual_seed(cfg.seed + md.zlib.crc32(b"pure"))  # as distill_student seeds the transfer
    student = md.transfer_attention_to_mamba(teacher, list(range(cfg.n_layers)), "attention").float()
    rows = md.read_jsonl(os.path.join(out, "data", "test.jsonl"))
    x, y, m = md.held_out_batch(tok, rows, cfg, md.setup_env("cpu"))
    with torch.no_grad():
        s, n = md.kl_loss_fn(teacher, cfg.kl, cfg.temperature)(student, x, y, m)
    assert_close(torch.tensor(start["held_out_loss"]), s / n, atol=2e-6, what="held-out KL before stage 2")
    assert start["held_out_loss"] > 1e-3  # the transfer alone does not make the student the teacher


def test_a_changed_generator_makes_its_data_and_models_stale(tmp_path, monkeypatch):
    """Data made by another version of the synthetic generator, with the same settings, is not reused:
    the run stops naming the generator, and the teacher and students trained on it are stale too."""
    argv = ["--preset", "tiny", "--out_dir", str(tmp_path)]
    cfg = md.apply_preset(md.parse_config(md.DistillConfig, argv), argv)
    runs = [("pure", list(range(cfg.n_layers)), "attention")]
    old = md.wanted_artifacts(cfg, runs, cfg.n_layers)
    md.record_artifact(str(tmp_path), "data", old["data"])
    md.write_jsonl(md.synthetic_rows(cfg, "train", 3), tmp_path / "data" / "train.jsonl")
    md.check_artifacts(cfg, None, old)  # the same generator: nothing to say
    make, lo, hi = md.TASKS[cfg.task]

    def reworded(rng, n, **knobs):  # the same problems, the solutions ending in one more full stop
        p = make(rng, n, **knobs)
        return {**p, "answer": p["answer"] + "."}

    monkeypatch.setitem(md.TASKS, cfg.task, (reworded, lo, hi))
    new = md.wanted_artifacts(cfg, runs, cfg.n_layers)
    assert all(new[name] != old[name] for name in ("data", "tokenizer.model", "teacher", "pure"))
    with pytest.raises(InputError, match=r"train.jsonl was made with other settings \(generator "):
        md.check_artifacts(cfg, None, new)


def test_pipeline_tiny(tmp_path):
    out = str(tmp_path / "out")
    summary = md.main(["--preset", "tiny", "--out_dir", out])
    for rel in ("data/train.jsonl", "data/test.jsonl", "tokenizer.model", "teacher/config.json",
                "logs/teacher.jsonl", "logs/hybrid.jsonl", "logs/pure_random.jsonl", "distill_summary.json"):
        assert os.path.isfile(os.path.join(out, rel)), rel
    teacher, tok = md.load_teacher(os.path.join(out, "teacher"))
    assert teacher.cfg.ssm_layers == [] and tok.n_words == teacher.cfg.vocab_size
    for name, n_ssm in (("hybrid", 2), ("pure", 4), ("pure_random", 4)):
        assert len(md.load_model(os.path.join(out, name)).cfg.ssm_layers) == n_ssm
        acc = summary["models"][name]["greedy_acc"]
        assert acc * 2 in (0, 1, 2)  # a share of the preset's 2 test problems
        solutions = [json.loads(line) for line in open(os.path.join(out, "greedy", f"{name}.jsonl"))]
        assert [s["problem"] for s in solutions] == [0, 1] and acc == sum(s["correct"] for s in solutions) / 2
    stages = {json.loads(line)["stage"] for line in open(os.path.join(out, "logs", "pure.jsonl"))}
    assert stages == {"align", "kl", "sft"}
    kept = json.load(open(os.path.join(out, "pure", "provenance.json")))  # travels with the directory
    # the preset's 3 stage-2 steps, times --pure_kl_factor for this pure student
    assert kept["settings"]["kl_steps"] == round(3 * md.DistillConfig.pure_kl_factor)
    assert kept["settings"]["teacher"]["teacher_steps"] == 4
    assert kept == md.read_provenance(out)["pure"] and set(kept["times"]) == {"align", "kl", "sft"}
    with open(os.path.join(out, "distill_summary.json")) as fh:
        assert set(json.load(fh)["models"]) == {"teacher", "hybrid", "pure", "pure_random"}


def test_run_names_the_students_that_did_not_learn_the_task():
    models = {"teacher": {"greedy_acc": 0.935}, "hybrid": {"greedy_acc": 0.005}, "pure": {"greedy_acc": 0.5},
              "hybrid_random": {}, "pure_random": {"greedy_acc": 0.0}}  # hybrid_random: not evaluated (--eval_n 0)
    lines = md.unlearnt(models, "out")
    assert lines == [f"hybrid: has not learnt the task (greedy accuracy 0.5 % against the teacher's 93.5 %); "
                     f"{os.path.join('out', 'kl_by_line', 'hybrid.jsonl')} shows the lines it gets wrong "
                     f"(plot_scaling.py sums them by kind)",
                     f"pure_random (random mixers, the baseline): has not learnt the task (greedy accuracy 0.0 % "
                     f"against the teacher's 93.5 %); {os.path.join('out', 'kl_by_line', 'pure_random.jsonl')} shows "
                     f"the lines it gets wrong (plot_scaling.py sums them by kind)"]
    assert md.unlearnt({"hybrid": {"greedy_acc": 0.0}}, "out") == []  # no teacher to compare with


@pytest.mark.parametrize("nan_step", [1, 3])  # 1: the last checkpoint ends stage 1; 3: it is inside stage 2
def test_resume_after_nan_matches_uninterrupted(tmp_path, monkeypatch, nan_step):
    """A NaN stops the run and keeps the last checkpoint; --resume then ends exactly where an
    uninterrupted run ends (same batches, same schedule, same optimizer moments), and the log reads as
    one run: no step twice, time going forward."""
    base = ["--preset", "tiny", "--students", "pure", "--random_baseline", "", "--align_steps", "2",
            "--sft_steps", "0", "--kl_steps", "4", "--pure_kl_factor", "1", "--ckpt_every", "2", "--eval_n", "0"]
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    md.main(base + ["--out_dir", a])  # uninterrupted
    for rel in ("teacher", "tokenizer.model", "data", "provenance.json"):  # b reuses a's teacher
        src, dst = os.path.join(a, rel), os.path.join(b, rel)
        (md.shutil.copytree if os.path.isdir(src) else md.shutil.copy)(src, dst)
    real_kl, calls = md.kl_loss_fn, []

    def kl_with_nan(*args):
        fn = real_kl(*args)

        def loss_fn(student, x, y, m):
            if not torch.is_grad_enabled():  # a held-out loss, not a training step
                return fn(student, x, y, m)
            calls.append(1)
            s, n = fn(student, x, y, m)
            return (s * float("nan") if len(calls) > 2 * (nan_step - 1) else s), n  # 2 micro-batches a step
        return loss_fn
    monkeypatch.setattr(md, "kl_loss_fn", kl_with_nan)
    with pytest.raises(md.TrainingError, match=f"kl step {nan_step}: loss is nan"):
        md.main(base + ["--out_dir", b])
    state = json.load(open(os.path.join(b, "ckpt", "pure", "state.json")))
    assert (state["stage"], state["step"]) == (("align", 2) if nan_step == 1 else ("kl", 2))
    monkeypatch.setattr(md, "kl_loss_fn", real_kl)
    md.main(base + ["--out_dir", b, "--resume"])
    wa, wb = md.load_state_dict(os.path.join(a, "pure")), md.load_state_dict(os.path.join(b, "pure"))
    for k in wa:
        assert_close(wb[k], wa[k], atol=1e-6, rtol=1e-6, what=k)
    log = [json.loads(line) for line in open(os.path.join(b, "logs", "pure.jsonl"))]
    assert [(r["stage"], r["step"]) for r in log] == [("align", s) for s in range(3)] + [("kl", s) for s in range(5)]
    assert [r["time_s"] for r in log] == sorted(r["time_s"] for r in log)
    assert [r["tokens"] for r in log if r["stage"] == "kl"] == [r["tokens"] for r in
                                                                 map(json.loads, open(os.path.join(a, "logs", "pure.jsonl")))
                                                                 if r["stage"] == "kl"]


def test_flags_beat_presets():
    cfg = md.apply_preset(md.parse_config(md.DistillConfig, ["--preset", "tiny", "--kl_steps", "50"]),
                          ["--preset", "tiny", "--kl_steps", "50"])
    assert (cfg.kl_steps, cfg.align_steps) == (50, md.PRESETS["tiny"]["align_steps"])
    with pytest.raises(SystemExit):  # an abbreviation would slip past the preset: refused
        md.parse_config(md.DistillConfig, ["--kl_step", "50"])
    with pytest.raises(InputError, match="--random_baseline"):
        md.main(["--random_baseline", "hybird"])


def test_bench_preset_scales_with_gpus(monkeypatch):
    """--bench gives every GPU the same 16 x 2048 tokens a step (weak scaling) and compiles, unless told."""
    def preset(argv):
        return md.apply_preset(md.parse_config(md.DistillConfig, argv), argv)
    monkeypatch.setenv("WORLD_SIZE", "2")
    cfg = preset(["--bench"])
    assert (cfg.batch_size, cfg.seq_len, cfg.grad_accum, cfg.compile) == (32, 2048, 4, True)
    assert preset(["--bench", "--compile", "false", "--batch_size", "8"]).compile is False
    assert preset(["--bench", "--batch_size", "8"]).batch_size == 8


def test_ddp_matches_one_process(tmp_path):
    """torchrun with 2 CPU processes (gloo) trains to the same weights as one process: the global
    batch, its order and the token-exact loss normalisation do not depend on how work is split."""
    import subprocess
    import sys
    flags = ["--preset", "tiny", "--device", "cpu", "--students", "pure", "--random_baseline", "",
             "--sft_steps", "0", "--eval_n", "0", "--orient_steps", "2"]  # every stage a student goes through
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    one, two = str(tmp_path / "one"), str(tmp_path / "two")
    subprocess.run([sys.executable, "mamba_distill.py", *flags, "--out_dir", one], cwd=HERE, env=env,
                   check=True, capture_output=True)
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "mamba_distill.py",
                    *flags, "--out_dir", two], cwd=HERE, env=env, check=True, capture_output=True)
    for name in ("teacher", "pure"):
        wa, wb = md.load_state_dict(os.path.join(one, name)), md.load_state_dict(os.path.join(two, name))
        for k in wa:
            assert_close(wb[k], wa[k], atol=2e-4, rtol=1e-3, what=f"{name} {k}")


def test_deterministic_flag_turns_on_deterministic_kernels_and_repeats_the_run(tmp_path, monkeypatch):
    """--deterministic switches PyTorch's deterministic algorithms on (strict, as flash attention's
    backward needs) before any work, and two runs with it log the same losses. (A CPU adds in a fixed
    order anyway: whether a GPU rerun repeats is a measurement, kept in results/README.md.)"""
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # restored after the test
    assert not torch.are_deterministic_algorithms_enabled()
    try:
        losses = []
        for run in ("a", "b"):
            md.main(["--preset", "tiny", "--students", "pure", "--random_baseline", "", "--eval_n", "0",
                     "--deterministic", "true", "--out_dir", str(tmp_path / run)])
            assert torch.are_deterministic_algorithms_enabled()
            assert not torch.is_deterministic_algorithms_warn_only_enabled()
            rows = md.read_jsonl(str(tmp_path / run / "logs" / "pure.jsonl"), required={})
            losses.append([(r["stage"], r["step"], r.get("loss"), r.get("held_out_loss")) for r in rows])
        assert any(loss is not None for *_, loss, _ in losses[0]) and losses[0] == losses[1]
    finally:
        torch.use_deterministic_algorithms(False)


# -----------------------------------------------------------------------------
# bad inputs: one line naming the culprit, exit status 2, nothing written; runs killed at any point


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A finished tiny run (teacher and a pure student) with a finished 2-sample evaluation of the
    student: what the bad-input cases run against (each on a copy)."""
    root = tmp_path_factory.mktemp("finished")
    out = str(root / "out")
    md.main(["--preset", "tiny", "--students", "pure", "--random_baseline", "", "--eval_n", "0", "--out_dir", out])
    # no --data: the test split the run wrote under --out_dir
    sample.main(["--checkpoint", f"{out}/pure", "--out_dir", out, "--k", "2",
                 "--n_problems", "2", "--max_new_tokens", "4", "--device", "cpu"])
    assert md.read_json(f"{out}/eval/pure/meta.json")["data"] == os.path.abspath(f"{out}/data/test.jsonl")
    return out


def tree_state(root):
    """{relative path: content hash} of every file under root."""
    import hashlib
    return {os.path.relpath(os.path.join(d, f), root): hashlib.sha256(open(os.path.join(d, f), "rb").read()).hexdigest()
            for d, _, files in os.walk(root) for f in files}


def edit_json(path, **changes):
    cfg = json.loads(open(path).read())
    cfg.update(changes)
    open(path, "w").write(json.dumps(cfg))


def prepare(w, what):
    """Set up a broken input inside the copy w of the finished run."""
    if what == "bad_line":
        open(f"{w}/bad.jsonl", "w").write(json.dumps({"question": "q", "answer": "#### 1"}) + "\n{oops\n")
    elif what == "no_answer":
        open(f"{w}/bad.jsonl", "w").write(json.dumps({"question": "q"}) + "\n")
    elif what == "empty":
        open(f"{w}/bad.jsonl", "w").write("\n\n")
    elif what.startswith("config:"):  # a model directory whose config.json has one bad field
        key, value = what[7:].split("=", 1)
        md.shutil.copytree(f"{w}/teacher", f"{w}/bad")
        edit_json(f"{w}/bad/config.json", **{key: json.loads(value)})
    elif what == "nan_weights":
        md.shutil.copytree(f"{w}/pure", f"{w}/bad")
        sd = md.load_safetensors(f"{w}/bad/model.safetensors")
        sd = {k: v.clone() for k, v in sd.items()}
        sd["model.norm.weight"][0] = float("nan")
        md.save_safetensors(sd, f"{w}/bad/model.safetensors")
    elif what == "big_tokenizer":  # a tokenizer with more ids than the model's vocabulary
        md.shutil.copytree(f"{w}/teacher", f"{w}/bad")
        edit_json(f"{w}/bad/config.json", vocab_size=10)
    elif what == "unfinished":  # a student that a crash left as a checkpoint only
        md.shutil.rmtree(f"{w}/pure")
    elif what == "no_record":
        os.remove(f"{w}/provenance.json")
    elif what == "new_weights":  # the sampled checkpoint replaced since
        sd = {k: v + 1 for k, v in md.load_safetensors(f"{w}/pure/model.safetensors").items()}
        md.save_safetensors(sd, f"{w}/pure/model.safetensors")
    elif what == "plot_bad_summary":
        edit_json(f"{w}/eval/pure/summary.json", coverage=[2.0, 0.5])
    elif what == "plot_bad_gpus":
        edit_json(f"{w}/eval/pure/summary.json", gpus=-1)
    elif what == "plot_bad_log":
        open(f"{w}/logs/pure.jsonl", "a").write(json.dumps({"model": "pure", "init": "x", "stage": "kl"}) + "\n")
    elif what == "plot_torn_json":
        open(f"{w}/eval/pure/summary.json", "w").write('{"model": "pure", "k": [1')


D = ["--preset", "tiny", "--out_dir", "{w}/new"]  # a distillation into a fresh directory
S = ["--checkpoint", "{w}/pure", "--data", "{w}/data/test.jsonl", "--out_dir", "{w}", "--device", "cpu", "--k", "2",
     "--n_problems", "2", "--max_new_tokens", "4"]
# (script, flags, what prepare() sets up, the message expected): each case a bad input a user may give
BAD_INPUTS = [
    *[("distill", D + [f, v], None, rf"--{f[2:]}: expected at least") for f, v in [
        ("--n_train", "0"), ("--n_test", "0"), ("--batch_size", "0"), ("--batch_size", "-4"), ("--seq_len", "0"),
        ("--grad_accum", "0"), ("--n_layers", "0"), ("--teacher_steps", "0"), ("--d_model", "0"), ("--n_heads", "0"),
        ("--n_kv_heads", "0"), ("--d_ff", "-1"), ("--vocab_size", "100"), ("--digits", "1"), ("--min_steps", "-1"),
        ("--max_steps", "-2"), ("--align_steps", "-1"), ("--kl_steps", "-5"), ("--sft_steps", "-1"),
        ("--log_every", "0"), ("--ckpt_every", "-1"), ("--eval_n", "-1"), ("--max_new_tokens", "-1"), ("--seed", "-1"),
        ("--attn_fraction", "-0.1"), ("--warmup", "-0.1"), ("--weight_decay", "-0.1")]],
    *[("distill", D + [f, v], None, rf"--{f[2:]}: expected (more than|a finite|at most)") for f, v in [
        ("--teacher_lr", "0"), ("--teacher_lr", "nan"), ("--teacher_lr", "inf"), ("--kl_lr", "-1"), ("--align_lr", "0"),
        ("--sft_lr", "nan"), ("--temperature", "0"), ("--temperature", "-1"), ("--temperature", "inf"),
        ("--grad_clip", "0"), ("--attn_fraction", "1.5"), ("--warmup", "1.5"), ("--digits", "9")]],
    *[("distill", D + [f, v], None, rf"--{f[2:]}: expected one of") for f, v in [
        ("--random_baseline", "hybird"), ("--init", "nope"), ("--kl", "sideways"), ("--kl_trains", "mlp"), ("--task", "nope"),
        ("--preset", "huge"), ("--device", "tpu")]],
    ("distill", D + ["--students", "nope"], None, r"--students: unknown"),
    ("distill", D + ["--attn_layers", "2,x"], None, r"--attn_layers '2,x': expected comma-separated layer numbers"),
    ("distill", D + ["--attn_layers", "4"], None, r"--attn_layers '4': layers are numbered 0 to 3"),
    ("distill", D + ["--attn_layers", "-1"], None, r"--attn_layers '-1': layers are numbered 0 to 3"),
    ("distill", D + ["--min_steps", "5", "--max_steps", "3"], None, r"--min_steps 5 is more than --max_steps 3"),
    ("distill", D + ["--d_model", "100", "--n_heads", "3"], None, r"--d_model 100 must split into --n_heads 3"),
    ("distill", D + ["--n_heads", "6", "--d_model", "384", "--n_kv_heads", "4"], None, r"--n_heads be a multiple"),
    ("distill", D + ["--d_model", "30", "--n_heads", "2"], None, r"heads of an even size"),
    ("distill", D + ["--batch_size", "6", "--grad_accum", "4"], None, r"--batch_size 6 must be a multiple"),
    ("distill", D + ["--no_such_flag", "1"], None, r"unrecognized arguments: --no_such_flag"),
    ("distill", D + ["--n_train", "abc"], None, r"argument --n_train: invalid int value"),
    ("distill", D + ["--resume", "maybe"], None, r"argument --resume: expected true or false"),
    ("distill", D + ["--kl_st", "5"], None, r"unrecognized arguments: --kl_st"),  # no abbreviations
    ("distill", ["--preset", "tiny", "--out_dir", "{w}/data/train.jsonl"], None, r"--out_dir .*not a writable directory"),
    ("distill", ["--preset", "tiny", "--out_dir", "{w}/data/train.jsonl/sub"], None, r"is not a writable directory"),
    ("distill", D + ["--data", "{w}/nope.jsonl"], None, r"--data .*nope.jsonl: no such file"),
    ("distill", D + ["--test_data", "{w}/nope.jsonl"], None, r"--test_data .*nope.jsonl: no such file"),
    ("distill", D + ["--data", "{w}/bad.jsonl"], "bad_line", r"bad.jsonl:2: not valid JSON"),
    ("distill", D + ["--data", "{w}/bad.jsonl"], "no_answer", r"bad.jsonl:1: field 'answer' is missing"),
    ("distill", D + ["--test_data", "{w}/bad.jsonl"], "empty", r"bad.jsonl: no rows"),
    ("distill", D + ["--teacher", "{w}/nope"], None, r"nope: no such checkpoint directory"),
    ("distill", D + ["--teacher", "{w}/pure"], None, r"--teacher .*pure: a student \(Mamba layers"),
    ("distill", D + ["--teacher", "{w}/data"], None, r"data/config.json: no such file"),
    ("distill", D + ["--teacher", "{w}/bad"], "config:hidden_size=\"abc\"", r"hidden_size must be a positive whole number"),
    ("distill", D + ["--teacher", "{w}/bad"], "config:num_attention_heads=0", r"num_attention_heads must be a positive"),
    ("distill", D + ["--teacher", "{w}/bad"], "config:num_key_value_heads=3", r"must be a multiple of num_key_value_heads"),
    ("distill", D + ["--teacher", "{w}/bad"], "config:rope_theta=-1", r"rope_theta must be a positive number"),
    ("distill", D + ["--teacher", "{w}/bad"], "config:tie_word_embeddings=\"yes\"", r"tie_word_embeddings must be"),
    ("distill", D + ["--teacher", "{w}/bad"], "config:vocab_size=0", r"vocab_size must be a positive"),
    ("distill", D + ["--teacher", "{w}/bad"], "big_tokenizer", r"token ids, more than the vocab_size 10"),
    ("distill", ["--preset", "smoke", "--out_dir", "{w}"], None, r"train.jsonl was made with other settings"),
    ("distill", ["--preset", "tiny", "--students", "pure", "--random_baseline", "", "--out_dir", "{w}",
                 "--kl_lr", "0.002"], None, r"pure/config.json was made with other settings \(kl_lr 0.001 -> 0.002\)"),
    ("distill", ["--preset", "tiny", "--students", "pure", "--random_baseline", "", "--out_dir", "{w}",
                 "--teacher_steps", "5"], None, r"teacher/config.json was made with other settings \(teacher_steps 4 -> 5\)"),
    ("distill", ["--preset", "tiny", "--students", "pure", "--random_baseline", "", "--out_dir", "{w}"], "unfinished",
     r"ckpt/pure: an unfinished run of pure \(sft step 2\); add --resume"),
    ("distill", ["--preset", "tiny", "--students", "pure", "--random_baseline", "", "--out_dir", "{w}", "--resume",
                 "--kl_lr", "0.002"], "unfinished", r"ckpt/pure: an unfinished run of pure with other settings \(kl_lr"),
    ("distill", ["--preset", "tiny", "--students", "pure", "--random_baseline", "", "--out_dir", "{w}"], "no_record",
     r"provenance.json does not say what made it"),
    ("distill", ["--bench", "--out_dir", "{w}/b", "--device", "cpu"], None, r"--bench needs a CUDA GPU"),
    *[("sample", S + [f, v], None, rf"--{f[2:]}: expected at least") for f, v in [
        ("--k", "0"), ("--n_problems", "-1"), ("--temperature", "-0.5"), ("--top_k", "-1"), ("--max_new_tokens", "-1"),
        ("--batch_size", "-1"), ("--prefill_tokens", "0"), ("--seed", "-1"), ("--max_batch", "0")]],
    *[("sample", S + [f, v], None, rf"--{f[2:]}: expected (more than|at most|a finite|one of)") for f, v in [
        ("--top_p", "0"), ("--top_p", "1.5"), ("--temperature", "nan"), ("--attn_fraction", "2"),
        ("--state_dtype", "float16"), ("--device", "tpu")]],
    ("sample", S + ["--k", "3"], None, r"--k: expected a power of two"),
    ("sample", S + ["--name", "../escape"], None, r"--name '../escape': expected a plain name"),
    ("sample", S + ["--name", "a/b"], None, r"--name 'a/b': expected a plain name"),
    ("sample", S + ["--name", ".."], None, r"--name '..': expected a plain name"),
    ("sample", S + ["--checkpoint", "{w}/nope"], None, r"nope: no such checkpoint directory"),
    ("sample", S + ["--checkpoint", "{w}/data"], None, r"data/config.json: no such file"),
    ("sample", S + ["--checkpoint", "{w}/bad"], "nan_weights", r"weight model.norm.weight holds NaN"),
    ("sample", S + ["--checkpoint", "{w}/bad"], "config:ssm_layers=[99]", r"ssm_layers must list layer indices"),
    ("sample", S + ["--checkpoint", "{w}/bad"], "config:rope_scaling={\"rope_type\": \"llama3\"}", r"rope_scaling needs"),
    ("sample", S + ["--checkpoint", "{w}/bad"], "config:intermediate_size=1.5", r"intermediate_size must be a positive"),
    ("sample", S + ["--checkpoint", "{w}/bad"], "big_tokenizer", r"config.json does not match the weights: shape"),
    ("sample", S + ["--data", "{w}/nope.jsonl"], None, r"--data .*nope.jsonl: no such file"),
    ("sample", S + ["--data", "{w}/bad.jsonl"], "bad_line", r"bad.jsonl:2: not valid JSON"),
    ("sample", S + ["--data", "{w}/bad.jsonl"], "empty", r"bad.jsonl: no rows"),
    ("sample", S + ["--out_dir", "{w}/data/train.jsonl"], None, r"not a writable directory"),
    ("sample", S + ["--temperature", "0.5"], None, r"meta.json: earlier samples were drawn with other temperature"),
    ("sample", S + ["--top_k", "5"], None, r"meta.json: earlier samples were drawn with other top_k"),
    ("sample", S, "new_weights", r"other weights \(the checkpoint changed since\)"),
    ("sample", S + ["--no_such_flag", "1"], None, r"unrecognized arguments: --no_such_flag"),
    ("sample", S + ["--k", "abc"], None, r"argument --k: invalid int value"),
    ("sample", S + ["--cuda_graph", "maybe"], None, r"argument --cuda_graph: expected true or false"),
    ("sample", S + ["--bench", "--bench_shapes", "nope"], None, r"unknown model shape 'nope'"),
    ("sample", S + ["--bench", "--bench_models", "tiny"], None, r"unknown model kind 'tiny'"),
    ("sample", S + ["--bench", "--bench_gen_lens", "0,12"], None, r"--bench_gen_lens: expected positive whole numbers"),
    ("sample", S + ["--bench", "--bench_batches", "a"], None, r"--bench_batches: expected positive whole numbers"),
    ("plot", ["--out_dir", "{w}", "--dpi", "0"], None, r"--dpi must be > 0"),
    ("plot", ["--out_dir", "{w}", "--smooth", "0"], None, r"--smooth >= 1"),
    ("plot", ["--out_dir", "{w}", "--label_k", "maybe"], None, r"argument --label_k: expected true or false"),
    ("plot", ["--out_dir", "{w}", "--no_such_flag", "1"], None, r"unrecognized arguments"),
    ("plot", ["--out_dir", "{w}", "--plots_dir", "{w}/data/train.jsonl"], None, r"--plots_dir .*not a directory"),
    ("plot", ["--out_dir", "{w}"], "plot_bad_summary", r"summary.json: 'coverage' must hold fractions"),
    ("plot", ["--out_dir", "{w}"], "plot_bad_gpus", r"summary.json: 'gpus' must be a positive whole number"),
    ("plot", ["--out_dir", "{w}"], "plot_bad_log", r"pure.jsonl:\d+: missing key 'time_s'"),
    ("plot", ["--out_dir", "{w}"], "plot_torn_json", r"summary.json:1: invalid JSON"),
]
if not CUDA:  # on a CPU machine these flags name a GPU that is not there
    BAD_INPUTS += [("sample", S[:-6] + ["--device", "cuda"], None, r"--device cuda: no CUDA GPU is visible"),
                   ("sample", S + ["--bench"], None, r"--bench needs a CUDA GPU"),
                   ("distill", D + ["--device", "cuda"], None, r"--device cuda: no CUDA GPU is visible")]


def run_script(script, argv, capsys):
    """A script's main() in this process as its command line runs it: (exit status, stderr)."""
    main = {"distill": md.main, "sample": sample.main, "plot": ps.main}[script]
    try:
        rc = main(argv)
        rc = rc if isinstance(rc, int) else 0
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        rc = 2
    except SystemExit as e:
        rc = e.code
    return rc, capsys.readouterr().err


@pytest.mark.parametrize("script, flags, what, message", BAD_INPUTS,
                         ids=[f"{c[0]}:{' '.join(c[1][-2:])}:{c[2]}" for c in BAD_INPUTS])
def test_bad_input_fails_in_one_line_and_writes_nothing(finished_run, tmp_path, capsys, script, flags, what, message):
    w = str(tmp_path / "w")
    md.shutil.copytree(finished_run, w)
    if what:
        prepare(w, what)
    before = tree_state(w)
    rc, err = run_script(script, [f.replace("{w}", w) for f in flags], capsys)
    lines = err.strip().splitlines()
    assert rc == 2 and len(lines) == 1 and regex.search(message, lines[0]), (rc, err)
    assert tree_state(w) == before, "a bad input changed files"


def test_bad_input_table_covers_at_least_100_inputs():
    assert len(BAD_INPUTS) >= 100


def test_finished_run_is_reused_not_redone(finished_run, tmp_path, capsys):
    """The same settings again reuse every artifact (nothing retrained, nothing changed but the summary)."""
    w = str(tmp_path / "w")
    md.shutil.copytree(finished_run, w)
    before = tree_state(w)
    md.main(["--preset", "tiny", "--students", "pure", "--random_baseline", "", "--eval_n", "0", "--out_dir", w,
             "--log_every", "5"])  # log_every changes nothing
    after = tree_state(w)
    assert {k: v for k, v in after.items() if k != "distill_summary.json"} == \
        {k: v for k, v in before.items() if k != "distill_summary.json"}
    assert "already distilled" in capsys.readouterr().out


CRASH_DRIVER = """
import os, signal, sys
import mamba_distill as md
point, n = sys.argv[1], int(sys.argv[2])
calls = []
def kill_on(name, fn, when=lambda *a, **k: True):
    def wrapped(*a, **k):
        if when(*a, **k):
            calls.append(1)
            if len(calls) == n:
                os.kill(os.getpid(), signal.SIGKILL)
        return fn(*a, **k)
    return wrapped
if point == "log":  # right after a step's loss was computed, before its log line
    md.ModelRun.log = kill_on("log", md.ModelRun.log)
elif point == "ckpt_swap":  # inside a checkpoint's swap: the old one moved aside, the new one not yet in place
    md.os.replace = kill_on("replace", os.replace, lambda src, dst: src.endswith(".tmp") and "ckpt" in src)
elif point == "model_dir":  # while a finished model's directory is written
    md.save_safetensors = kill_on("save", md.save_safetensors, lambda sd, path, *a: ".tmp" in str(path) and "ckpt" not in str(path))
md.main(sys.argv[3:])
"""


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("whole") / "out")
    subprocess_main(CRASH_FLAGS + ["--out_dir", out])
    return out


CRASH_FLAGS = ["--preset", "tiny", "--students", "pure", "--random_baseline", "", "--align_steps", "2",
               "--kl_steps", "4", "--sft_steps", "0", "--ckpt_every", "2", "--eval_n", "0", "--device", "cpu"]


def subprocess_main(argv, crash=None):
    import subprocess
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-c", CRASH_DRIVER, *crash, *argv] if crash else [sys.executable, "mamba_distill.py", *argv]
    return subprocess.run(cmd, cwd=HERE, env=env, capture_output=True, text=True)


@pytest.mark.parametrize("point, n, resumes", [
    ("log", 1, "no checkpoint"),  # before any checkpoint: a rerun without --resume simply starts over
    ("log", 3, "teacher: resuming teacher after step 2"),  # mid-stage, after the teacher's first checkpoint
    ("log", 7, None),  # the student's first kl step: its checkpoint ends stage 1
    ("ckpt_swap", 2, None),  # while the teacher's first checkpoint is moved into place
    ("ckpt_swap", 4, "teacher: resuming teacher after step 2"),  # the second: the first is kept as .old
    ("ckpt_swap", 9, "pure: resuming kl after step 2"),  # the student's kl checkpoint at step 4
    ("model_dir", 1, None),  # while the teacher's directory is written
    ("model_dir", 2, None)])  # while the student's is
def test_killed_run_resumes_to_the_uninterrupted_weights(uninterrupted, tmp_path, point, n, resumes):
    """kill -9 at several points, then --resume: the uninterrupted run's weights, each step logged
    once, every artifact recorded; where a checkpoint was complete, the run continued from it."""
    out = str(tmp_path / "out")
    killed = subprocess_main(CRASH_FLAGS + ["--out_dir", out], crash=(point, str(n)))
    assert killed.returncode == -9, killed.stderr[-500:]
    again = subprocess_main(CRASH_FLAGS + ["--out_dir", out] + ([] if resumes == "no checkpoint" else ["--resume"]))
    assert again.returncode == 0, again.stderr[-1500:]
    assert resumes in (None, "no checkpoint") or resumes in again.stdout, again.stdout[-1500:]
    for name in ("teacher", "pure"):
        wa, wb = md.load_state_dict(os.path.join(uninterrupted, name)), md.load_state_dict(os.path.join(out, name))
        for k in wa:
            assert_close(wb[k], wa[k], atol=1e-6, rtol=1e-6, what=f"{name} {k}")
        log = [json.loads(line) for line in open(os.path.join(out, "logs", f"{name}.jsonl"))]
        want = [json.loads(line) for line in open(os.path.join(uninterrupted, "logs", f"{name}.jsonl"))]
        assert [(r["stage"], r["step"], r["tokens"]) for r in log] == [(r["stage"], r["step"], r["tokens"]) for r in want]
    record = md.read_provenance(out)
    assert set(record) == {"data", "tokenizer.model", "teacher", "pure"}
    assert set(record["teacher"]["times"]) == {"teacher"} and set(record["pure"]["times"]) == {"align", "kl"}


# -----------------------------------------------------------------------------
# the files as a learner reads them: layers without cycles, a reading path that points at the code


LAYERS = {"scan_kernel": set(), "mamba_distill": {"scan_kernel"}, "sample": {"scan_kernel", "mamba_distill"},
          "plot_scaling": set()}  # what each file may import of the project


def imports_of(module):
    import ast
    tree = ast.parse(open(os.path.join(HERE, module + ".py")).read())
    return ({a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
            | {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module})


def test_modules_import_in_layers_without_cycles():
    """scan_kernel <- mamba_distill <- sample <- plot_scaling: a file imports only files below it, so
    none imports one that imports it back; plot_scaling imports neither the others nor torch."""
    for module, allowed in LAYERS.items():
        assert imports_of(module) & set(LAYERS) - {module} <= allowed, module
    assert "torch" not in imports_of("plot_scaling") and "triton" not in imports_of("plot_scaling")


def test_plot_scaling_draws_without_torch(tmp_path):
    import subprocess
    plot_fake_out(tmp_path)
    code = "import sys; sys.modules['torch'] = None; import plot_scaling; sys.exit(plot_scaling.main(sys.argv[1:]))"
    done = subprocess.run([sys.executable, "-c", code, "--out_dir", str(tmp_path), "--dpi", "30"], cwd=HERE,
                          capture_output=True, text=True)
    assert done.returncode == 0 and "wrote" in done.stdout, done.stderr[-800:]


def test_readme_reading_path_points_at_the_code():
    """Every `name` (file.py#Lnnn) link in README.md lands on the line that defines name."""
    readme = open(os.path.join(HERE, "README.md")).read()
    links = regex.findall(r"\[`([\w.]+)`\]\((\w+\.py)#L(\d+)\)", readme)
    assert len(links) >= 12, "README.md should link the reading path into the code"
    for name, file, line in links:
        text = open(os.path.join(HERE, file)).read().splitlines()[int(line) - 1]
        assert regex.match(rf"\s*(def|class) {name.split('.')[-1]}\b", text), (name, file, line, text)


# -----------------------------------------------------------------------------
# plot_scaling.py on fake inputs in the formats mamba_distill.py and sample.py write


PLOT_MODELS = {"teacher": 1.0, "hybrid": 0.45, "pure": 0.3, "pure_random": 0.3}  # relative time per sample
PLOT_KS = [1, 2, 4, 8, 16, 32, 64]
PLOT_PNGS = ("accuracy_vs_time.png", "accuracy_vs_k.png", "accuracy_vs_time_gpus.png", "decode_throughput.png",
             "distill_loss.png")


def plot_write_json(path, obj):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as fh:
        json.dump(obj, fh, indent=1)


def plot_write_jsonl(path, records):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as fh:
        fh.writelines(json.dumps(r) + "\n" for r in records)


def plot_fake_out(root, eval_=True, bench=True, logs=True):
    """A fake out/ directory: eval summaries of four models, a decode bench, three distillation logs."""
    if eval_:
        for i, (name, speed) in enumerate(PLOT_MODELS.items()):
            base = 0.62 - 0.08 * i
            coverage = [round(min(0.99, base + 0.055 * j), 4) for j in range(len(PLOT_KS))]
            majority = [round(base + 0.012 * j, 4) for j in range(len(PLOT_KS))]
            plot_write_json(os.path.join(root, "eval", name, "summary.json"), {
                "model": name, "checkpoint": f"out/{name}", "device": "FakeGPU 80GB", "n_problems": 200,
                "k": PLOT_KS, "coverage": coverage, "majority": majority,
                "time_s": [round(9.5 * speed * k, 2) for k in PLOT_KS], "temperature": 0.8, "top_p": 0.95,
                "max_new_tokens": 512, "batch_size": 256})
        summary = json.loads(open(os.path.join(root, "eval", "teacher", "summary.json")).read())
        plot_write_json(os.path.join(root, "eval", "teacher_2gpu", "summary.json"),  # the same draw on 2 GPUs
                        dict(summary, model="teacher_2gpu", gpus=2, time_s=[t / 1.9 for t in summary["time_s"]]))
    if bench:
        rows = []
        for model, per_seq, biggest in (("teacher", 60.0, 256), ("hybrid", 110.0, 512), ("pure", 190.0, 1024)):
            # a batch sweep at gen_len 512, then longer generations at the largest batch that "fits"
            sweep = [(b, 512) for b in (16, 32, 64, 128, 256, 512, 1024) if b <= biggest]
            sweep += [(biggest * 512 // g if model == "teacher" else biggest, g) for g in (1024, 2048, 4096, 8192)]
            for batch, gen_len in sweep:
                tps = per_seq * batch / (1 + batch / 2048) / (1 + gen_len / 16384)
                rows.append({"shape": "llama-3.2-1b", "model": model, "batch": batch, "prompt_len": 128,
                             "gen_len": gen_len, "tokens_per_s": round(tps, 1),
                             "roofline_tokens_per_s": round(2.5 * tps + 2000, 1), "roofline_frac": 0.4,
                             "peak_mem_GB": 12.3})
        plot_write_json(os.path.join(root, "bench", "decode.json"), {
            "device": "FakeGPU 80GB", "copy_GBps": 3000.0, "date": "2026-11-27", "results": rows,
            "hf": [{"cache": "static", "batch": 256, "prompt_len": 128, "gen_len": 512, "tokens_per_s": 9380.0},
                   {"cache": "dynamic", "batch": 256, "prompt_len": 128, "gen_len": 512, "tokens_per_s": 7420.0}]})
        small = [{"shape": "default", "model": m, "batch": 4096, "prompt_len": 128, "gen_len": g,
                  "tokens_per_s": tps * (1 + 0.3 * (m != "teacher") * i), "roofline_tokens_per_s": 3 * tps,
                  "method": "step times at 8 slots"}
                 for m, tps in (("teacher", 1.2e6), ("hybrid", 1.0e6), ("pure", 1.1e6))
                 for i, g in enumerate((512, 1024, 2048, 4096))]
        plot_write_json(os.path.join(root, "bench", "decode_default.json"),
                        {"device": "FakeGPU 80GB", "copy_GBps": 3000.0, "results": small, "hf": []})
    if logs:
        for name, model, init, offset in (("teacher", "teacher", "random", 0.0),
                                          ("hybrid", "hybrid", "attention", 0.3),
                                          ("pure", "pure", "attention", 0.6),
                                          ("pure_random", "pure", "random", 2.0)):
            stages = ["teacher"] if model == "teacher" else ["align", "kl", "sft"]
            records, t = [], 0.0
            for stage in stages:
                # as mamba_distill.py logs a stage: the held-out loss before training, then every 10th step
                records.append({"model": model, "init": init, "stage": stage, "step": 0, "tokens": 0,
                                "time_s": round(t + 0.5, 2), "held_out_loss": round(3.3 + offset, 4)})
                for step in range(10, 200, 10):
                    t += 1.5
                    records.append({"model": model, "init": init, "stage": stage, "step": step,
                                    "loss": round((3.0 + offset) / (1 + step / 40) + 0.05 * (step % 20 == 0), 4),
                                    "lr": 3e-4, "tokens": step * 4096, "time_s": round(t, 2)})
            plot_write_jsonl(os.path.join(root, "logs", f"{name}.jsonl"), records)


def test_plot_headline_speaks_of_a_transferred_student_not_the_random_baseline():
    ks, teacher_times = [1, 2, 4], [10.0, 20.0, 40.0]
    run = lambda name, speed, acc: {"name": name, "k": ks, "time_s": [t / speed for t in teacher_times],
                                    "coverage": [acc] * 3, "majority": [acc] * 3}
    runs = [run("teacher", 1, 0.5), run("hybrid", 1.5, 0.4), run("hybrid_random", 2, 0.6)]
    assert "the hybrid student does not beat" in ps.headline(runs)
    assert "the hybrid_random student beats" in ps.headline([runs[0], runs[2]])  # alone, it is the student
    assert ps.headline(runs[1:]) is None  # no teacher
    failed = [run("teacher", 1, 0.5), run("hybrid", 1.7, 0.002)]  # fast, but it has not learnt the task
    assert ps.headline(failed) == ("The hybrid student has not learnt the task: 0.2% of its samples are right "
                                   "against the teacher's 50.0% (it draws them 1.7x faster)")


def test_plot_length_panel_keeps_the_method_that_measured_most_lengths():
    # as sample.py --bench writes them: a batch sweep of whole generate calls at 512 new tokens (more
    # rows), and the length sweep timed step by step (more lengths)
    rows = [{"model": m, "batch": b, "gen_len": 512, "method": "generate"}
            for m in ("teacher", "hybrid", "pure") for b in (64, 256, 4096)]
    rows += [{"model": m, "batch": 4096, "gen_len": g, "method": "step times at 8 slots"}
             for m in ("teacher", "pure") for g in (2048, 4096, 8192)]
    assert ps.length_method(rows) == "step times at 8 slots"
    assert ps.length_method([r for r in rows if r["gen_len"] == 512]) == "generate"


@pytest.mark.parametrize("spread", [0.0, 0.004, 0.01, 0.03])
def test_plot_k_labels_never_overlap(spread, monkeypatch):
    # six models whose first and last points crowd together (spread: the gap between their accuracies)
    runs = [{"name": f"model{i}", "device": "FakeGPU", "n_problems": 200, "gpus": 1, "k": PLOT_KS,
             "coverage": [0.02 + spread * i + 0.1 * j for j in range(7)],
             "majority": [0.02 + spread * (5 - i) + 0.01 * j for j in range(7)],
             "time_s": [(1 + 0.03 * i) * 2 ** j for j in range(7)]} for i in range(6)]
    boxes = []

    def keep(fig, path, dpi):
        fig.canvas.draw()
        for ax in fig.axes:
            boxes.append([t.get_window_extent() for t in ax.texts if t.get_text().startswith("k=")])
        ps.plt.close(fig)

    monkeypatch.setattr(ps, "save_png", keep)
    ps.plot_accuracy(runs, "time_s", "unused.png", ps.PlotConfig())
    assert [len(b) for b in boxes] == [12, 12], "a k label per model at each end of each panel"
    for panel in boxes:
        for i, a in enumerate(panel):
            assert not any(a.overlaps(b) for b in panel[:i]), f"k labels overlap: {a.bounds}"


def test_plot_decode_batch_panel_holds_one_length_and_one_method(monkeypatch):
    # the teacher swept batches with whole generate calls at 512 new tokens; the students were measured
    # only at 4,096 new tokens, step by step: they belong in the length panel, not the batch panel
    row = dict(shape="llama-3.2-1b", prompt_len=128, roofline_tokens_per_s=1e6)
    rows = [dict(row, model="teacher", batch=b, gen_len=512, tokens_per_s=1e3 * b, method="generate")
            for b in (64, 256, 1024)]
    rows += [dict(row, model=m, batch=b, gen_len=4096, tokens_per_s=9e4, method="step times at 8 slots")
             for m, b in (("teacher", 432), ("hybrid", 1592), ("pure", 4096))]
    drawn = []

    def keep(fig, path, dpi):
        drawn.extend([sorted({x for line in ax.get_lines() for x in line.get_xdata()}) for ax in fig.axes[:2]])
        ps.plt.close(fig)

    monkeypatch.setattr(ps, "save_png", keep)
    ps.plot_decode([{"device": "FakeGPU", "results": rows, "hf_rows": []}], "unused.png", ps.PlotConfig())
    assert drawn == [[4096], [64, 256, 1024]], drawn  # x values: generation lengths, then batch sizes


def plot_run(out_dir, capsys, *flags):
    rc = ps.main(["--out_dir", str(out_dir), "--dpi", "40", *flags])
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def test_plot_every_figure_and_table(tmp_path, capsys):
    plot_fake_out(tmp_path)
    rc, out, err = plot_run(tmp_path, capsys, "--smooth", "3")
    assert rc == 0, err
    assert err == ""
    plots = tmp_path / "plots"
    assert sorted(os.listdir(plots)) == sorted(PLOT_PNGS), "stray temp files or missing PNGs"
    for name in PLOT_PNGS:
        data = (plots / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000, name
        img = matplotlib.image.imread(plots / name)
        assert img.ndim == 3 and img.shape[0] > 100 and img.shape[1] > 200, (name, img.shape)
        assert img[..., :3].std() > 0.05, f"{name} looks blank"
    summary = json.loads((tmp_path / "eval" / "hybrid" / "summary.json").read_text())
    bench = json.loads((tmp_path / "bench" / "decode.json").read_text())
    last_pure_random = json.loads((tmp_path / "logs" / "pure_random.jsonl").read_text().splitlines()[-1])
    for expected in ("FakeGPU 80GB", f"{100 * summary['coverage'][-1]:.1f}", f"{100 * summary['majority'][3]:.1f}",
                     f"{summary['time_s'][-1]:.1f}", f"{bench['results'][5]['tokens_per_s']:.0f}",
                     "9380", "HF static", f"{last_pure_random['loss']:.4g}"):
        assert expected in out, f"{expected!r} missing from the printed tables"
    assert out.count("wrote ") == len(PLOT_PNGS)
    # the loss table: 19 training losses per stage, the held-out loss before training, then the first loss
    assert regex.search(r"\npure\s+random\s+kl\s+19\s+190\s+778240\s+5.3\s+4\s+0.8696\s+-\s", out), out
    assert regex.search(r"\nteacher\s+2\s+1.90x", out)  # the 1-GPU vs 2-GPU table
    speed = summary["time_s"]  # the fake hybrid is 0.45x the teacher's time per sample
    assert f"{json.loads((tmp_path / 'eval' / 'teacher' / 'summary.json').read_text())['time_s'][-1] / speed[-1]:.2f}" in out
    assert "pure: faster than the teacher" not in out  # (notes go into the figure, not the tables)


def test_plot_reports_where_wrong_samples_leave_the_gold_solution(tmp_path, capsys):
    """Samples that go wrong at a known line of a relay solution are counted at that line's tenth and
    kind (names as X, numbers as #), with what the sample wrote there when it is another kind of line
    (a name the question does not hold is a name too); a name slip with the numbers right is not where a
    chain breaks; right samples and a run without samples.jsonl are left out."""
    plot_fake_out(tmp_path, bench=False, logs=False)
    rows = synthetic_split("test", 2, seed=3)
    write_jsonl(rows, tmp_path / "test.jsonl")
    summary_path = tmp_path / "eval" / "pure" / "summary.json"
    summary = json.loads(summary_path.read_text())
    summary_path.write_text(json.dumps({**summary, "data": str(tmp_path / "test.jsonl")}))
    gold = [r["answer"].split("\n") for r in rows]
    turn2 = next(i for i, line in enumerate(gold[0]) if line.startswith("Turn 2 of"))
    last = len(gold[1]) - 2  # "After N turns X has Y."
    slip = [gold[0][0].replace(sorted(ps.question_names(rows[0]["question"]))[1], "Nobody")] + gold[0][1:turn2]  # names only
    assert slip[0] != gold[0][0]
    samples = [(0, slip + ["Turn 2 of 99: nonsense"], False), (1, gold[1][:last] + ["After 1 turn"], False),
               (1, gold[1][:last] + ["After 2 turns"], False), (0, gold[0], True),
               (0, gold[0][:turn2] + ["After 1 turns Nobody has 5."], False)]  # stops a turn early
    (tmp_path / "eval" / "pure" / "samples.jsonl").write_text("".join(
        json.dumps({"problem": p, "sample": j, "text": "\n".join(text), "correct": ok}) + "\n"
        for j, (p, text, ok) in enumerate(samples)))
    rc, out, err = plot_run(tmp_path, capsys)
    assert rc == 0, err
    table = out.split("== where the wrong samples first leave the gold solution ==")[1].split("\n\n")[0]
    pure = next(line for line in table.splitlines() if line.startswith("pure "))
    tenths = [0] * 10
    tenths[10 * turn2 // len(gold[0])] += 2
    tenths[9] += 2
    assert regex.search(r"pure\s+4\s+" + " ".join(str(round(100 * t / 4)) for t in tenths), pure), pure
    assert "'After # turns X' 50%, 'Turn # of #' 25%, 'Turn # of #' wrote 'After # turns X' 25%" in pure, pure
    assert "teacher" not in table  # its eval directory has no samples.jsonl


def test_plot_reports_where_greedy_solutions_leave_the_gold_solution(tmp_path, capsys):
    """The greedy solutions mamba_distill.py wrote (greedy/<model>.jsonl, on the test split under the
    output directory) get the same table, under their own heading, before any sampling."""
    plot_fake_out(tmp_path, eval_=False, bench=False, logs=False)
    rows = synthetic_split("test", 2, seed=3)
    write_jsonl(rows, tmp_path / "data" / "test.jsonl")
    plot_write_json(str(tmp_path / "distill_summary.json"), {"config": {"test_data": ""},
                                                             "models": {"teacher": {}, "hybrid": {}}})
    gold = [r["answer"].split("\n") for r in rows]
    solutions = [{"problem": 0, "sample": 0, "text": "\n".join(["At the start nobody has anything."] + gold[0][1:]),
                  "correct": False}, {"problem": 1, "sample": 0, "text": rows[1]["answer"], "correct": True}]
    write_jsonl(solutions, tmp_path / "greedy" / "hybrid.jsonl")
    rc, out, err = plot_run(tmp_path, capsys)
    assert rc == 1, err  # no figure: nothing but the summary and the greedy solutions
    table = out.split("== where the wrong greedy solutions of mamba_distill.py first leave the gold solution ==")[1]
    hybrid = next(line for line in table.splitlines() if line.startswith("hybrid "))
    assert regex.search(r"hybrid\s+1\s+100 0 0 0 0 0 0 0 0 0\s+'At the start X' 100%", hybrid), hybrid
    assert "teacher " not in table.split("\n\n")[0]  # no greedy file: left out


def test_plot_reports_accuracy_by_number_of_steps(tmp_path, capsys):
    """Sampled and greedy solutions of problems whose rows say their steps: per step count, the % of
    samples right and (sampled runs) the % of problems any sample solved; data without steps: no table."""
    plot_fake_out(tmp_path, bench=False, logs=False)
    rows = [{**r, "steps": n} for r, n in zip(synthetic_split("test", 3, seed=3), (2, 5, 5))]
    write_jsonl(rows, tmp_path / "data" / "test.jsonl")
    summary_path = tmp_path / "eval" / "pure" / "summary.json"
    summary_path.write_text(json.dumps({**json.loads(summary_path.read_text()),
                                        "data": str(tmp_path / "data" / "test.jsonl")}))
    right = {0: [True, True, False, True], 1: [False, False, False, False], 2: [False, True, False, False]}
    write_jsonl([{"problem": p, "sample": j, "text": "x", "correct": ok} for p, oks in right.items()
                 for j, ok in enumerate(oks)], tmp_path / "eval" / "pure" / "samples.jsonl")
    plot_write_json(str(tmp_path / "distill_summary.json"), {"config": {"test_data": ""}, "models": {"hybrid": {}}})
    write_jsonl([{"problem": p, "sample": 0, "text": "x", "correct": p == 1} for p in range(3)],
                tmp_path / "greedy" / "hybrid.jsonl")
    rc, out, err = plot_run(tmp_path, capsys)
    assert rc == 0, err
    sampled = out.split("% of problems solved by any sample, by the number of steps a problem takes ==")[1]
    assert regex.search(r"model\s+2 steps\s+5 steps", sampled), sampled
    assert regex.search(r"pure\s+75 / 100\s+12 / 50", sampled.split("\n\n")[0]), sampled  # 1 of 8; 1 of 2 problems
    greedy = out.split("== % of greedy solutions right, by the number of steps a problem takes ==")[1]
    assert regex.search(r"hybrid\s+0\s+50\n", greedy), greedy
    write_jsonl([{k: v for k, v in r.items() if k != "steps"} for r in rows], tmp_path / "data" / "test.jsonl")
    rc, out, err = plot_run(tmp_path, capsys)
    assert rc == 0 and "by the number of steps" not in out, out


def test_plot_reports_where_the_students_kl_lies(tmp_path, capsys):
    """kl_by_line/<model>.jsonl: the KL per token and the line kinds (names as X) holding most of it."""
    plot_fake_out(tmp_path, eval_=False, bench=False, logs=False)
    prompt = "user: Ava and Noah keep cards. Ava has 12 cards and Noah has 30 cards. Who gives?"
    plot_write_jsonl(str(tmp_path / "kl_by_line" / "pure.jsonl"), [
        {"prompt": prompt, "lines": ["At the start Ava has 12 and Noah has 30.", "Ava: 12 - 1", "<|eot_id|>"],
         "kl": [3.0, 0.5, 0.5], "tokens": [10, 5, 1]},
        {"prompt": prompt, "lines": ["Ava: 11 - 1"], "kl": [0.0], "tokens": [4]}])
    rc, out, err = plot_run(tmp_path, capsys)
    table = out.split("== where each student's held-out KL to the teacher lies, by kind of solution line ==")[1]
    pure = next(line for line in table.splitlines() if line.startswith("pure "))
    assert regex.search(r"pure\s+0.2000\s+'At the start X' 75% \(0.300\), 'X # - #' 12% \(0.056\), "
                        r"'<\|eot_id\|>' 12% \(0.500\)", pure), pure
    plot_write_jsonl(str(tmp_path / "kl_by_line" / "pure.jsonl"), [{"prompt": prompt, "lines": ["a"], "kl": [1.0, 2.0],
                                                                     "tokens": [1]}])
    rc, out, err = plot_run(tmp_path, capsys)
    assert rc == 2 and regex.search(r"pure.jsonl:1: 'lines', 'kl' and 'tokens' must be lists of one length", err), err


def test_plot_missing_inputs(tmp_path, capsys):
    rc, out, err = plot_run(tmp_path / "nothing", capsys)
    assert rc == 1
    assert err.strip().splitlines()[-1].startswith("plot_scaling.py: error: nothing to plot")
    for missing in ("summary.json", "decode*.json", "*.jsonl"):
        assert missing in err, f"no note naming {missing}: {err}"

    plot_fake_out(tmp_path / "partial", eval_=False, logs=False)
    rc, out, err = plot_run(tmp_path / "partial", capsys)
    assert rc == 0
    assert os.listdir(tmp_path / "partial" / "plots") == ["decode_throughput.png"]
    assert len(err.strip().splitlines()) == 2 and "summary.json" in err and "logs" in err


@pytest.mark.parametrize("target,line", [("logs/pure.jsonl", 3), ("eval/hybrid/summary.json", 2),
                                         ("bench/decode.json", 1)])
def test_plot_malformed_input_names_file_and_line(tmp_path, capsys, target, line):
    plot_fake_out(tmp_path)
    path = tmp_path / target
    lines = path.read_text().splitlines()
    lines[line - 1] = lines[line - 1][:-3] + "{oops"
    path.write_text("\n".join(lines) + "\n")
    rc, out, err = plot_run(tmp_path, capsys)
    assert rc == 2
    assert len(err.strip().splitlines()) == 1
    assert f"{path}:{line}: invalid JSON" in err, err


def test_plot_bad_values_are_reported(tmp_path, capsys):
    plot_fake_out(tmp_path, bench=False, logs=False)
    path = tmp_path / "eval" / "pure" / "summary.json"
    summary = json.loads(path.read_text())
    summary["coverage"] = [100 * c for c in summary["coverage"]]  # percentages instead of fractions
    path.write_text(json.dumps(summary))
    rc, out, err = plot_run(tmp_path, capsys)
    assert rc == 2 and f"{path}: 'coverage' must hold fractions" in err
    plot_write_jsonl(str(tmp_path / "logs" / "x.jsonl"), [{"model": "pure", "init": "random", "stage": "kl"}])
    path.write_text(json.dumps({**summary, "coverage": [c / 100 for c in summary["coverage"]]}))
    rc, out, err = plot_run(tmp_path, capsys)
    assert rc == 2 and "x.jsonl:1: missing key 'time_s'" in err, err


def test_plot_failed_hf_run_does_not_block_the_figures(tmp_path, capsys):
    plot_fake_out(tmp_path)
    path = tmp_path / "bench" / "decode.json"
    bench = json.loads(path.read_text())
    bench["hf"].append({"cache": "static", "error": "CUDA out of memory"})  # as sample.py records it
    path.write_text(json.dumps(bench))
    rc, out, err = plot_run(tmp_path, capsys)
    assert rc == 0 and "HF transformers' run failed (CUDA out of memory)" in err
    assert all(os.path.isfile(tmp_path / "plots" / png) for png in PLOT_PNGS)


def test_plot_flags(capsys):
    with pytest.raises(SystemExit) as e:
        ps.parse_config(ps.PlotConfig, ["--help"])
    assert e.value.code == 0
    help_text = capsys.readouterr().out
    for name in ("out_dir", "plots_dir", "dpi", "smooth", "label_k"):
        assert f"--{name}" in help_text
    with pytest.raises(SystemExit) as e:
        ps.parse_config(ps.PlotConfig, ["--no_such_flag", "1"])
    assert e.value.code == 2 and "unrecognized arguments: --no_such_flag" in capsys.readouterr().err
    cfg = ps.parse_config(ps.PlotConfig, ["--dpi", "72", "--label_k", "false", "--plots_dir", "p"])
    assert (cfg.dpi, cfg.label_k, cfg.plots_dir, cfg.out_dir) == (72, False, "p", "out")
