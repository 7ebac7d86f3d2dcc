"""The test suite: `python -m pytest -q test_all.py` (CPU: a few minutes; GPU tests skip without CUDA).

Tiny shapes throughout. Triton kernels run under TRITON_INTERPRET=1 when there is no GPU, in fp32.
"""
import os

import pytest
import torch

if not torch.cuda.is_available():  # must be set before triton is imported anywhere
    os.environ.setdefault("TRITON_INTERPRET", "1")

import mamba_distill as md  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
SHARED = os.environ.get("SHARED_DIR", os.path.join(HERE, "..", "shared"))
CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
TOL = {torch.float32: 1e-4, torch.bfloat16: 3e-2}


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


def tiny_models(seed=0):
    """A random tiny teacher, and its hybrid (layers 0, 2 -> SSM) and pure students."""
    torch.manual_seed(seed)
    teacher = md.LM(tiny_config()).eval()
    hybrid = md.transfer_attention_to_mamba(teacher, [0, 2]).eval()
    pure = md.transfer_attention_to_mamba(teacher, range(4)).eval()
    return {"teacher": teacher, "hybrid": hybrid, "pure": pure}


# -----------------------------------------------------------------------------
# model: recurrent step == parallel forward, ragged batches, the linear-attention identity


@pytest.mark.parametrize("kind", ["teacher", "hybrid", "pure"])
def test_step_equals_forward(kind):
    model = tiny_models()[kind]
    torch.manual_seed(1)
    idx = torch.randint(0, 96, (2, 11))
    with torch.no_grad():
        full = model(idx)  # (b, l, v)
        cache = model.allocate_cache(2, 16, torch.float32, "cpu")
        outs = [model(idx[:, :5], cache, start=0)]  # prefill 5 tokens, then step one at a time
        for t in range(5, 11):
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
        mixer.conv1d.weight.zero_()
        mixer.conv1d.weight[:, 0, -1] = 1  # the current token only
        mixer.conv1d.bias.zero_()
        mixer.D.zero_()
    mixer.conv_act = mixer.gate = False
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
