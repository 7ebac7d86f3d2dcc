"""
Thinking Slow, Fast (Paliotta et al. 2025), the distillation half: a Llama 3 teacher becomes hybrid and
pure Mamba students whose mixers start from the teacher's attention weights, then learn to imitate it.

The paper's loop: teacher -> students (attention weights transferred into Mamba-2 mixers, as in
MambaInLlama / MOHAWK, then distilled on the teacher's logits) -> many chain-of-thought samples from
the fast students (sample.py) -> accuracy against wall-clock time (plot_scaling.py).

Reading path, in the paper's order (the appendices after `main` hold everything that is not the paper):
  LM, MambaMixer                 the model: a Llama decoder whose layers in cfg.ssm_layers hold a mixer
  transfer_attention_to_mamba    attention -> SSM weight transfer, an explicit table with shape asserts
  align_loss_fn, kl_loss_fn      the stage losses: 1 (optional) layer alignment, 2 KL to the teacher (3
                                 is ce_loss; orient_loss_fn, an optional stage 0, matches mixing matrices)
  distill_student                the stage plan
  main                           data -> teacher -> students -> greedy accuracy
  Appendix A training loop, checkpoints, resume, provenance; B tokenizer; C files (safetensors, HF
  directories); D data (the relay task, GSM8K files, answers); E command line; F throughput bench.

Run:
  python mamba_distill.py               # default: makes data, trains a small teacher, distils students
  python mamba_distill.py --preset tiny --out_dir out_cpu   # seconds on a CPU: every stage, toy sizes
  python mamba_distill.py --help        # every option
  python mamba_distill.py --teacher /path/to/Llama-3.2-1B-Instruct --data gsm8k/train.jsonl
  torchrun --nproc_per_node=2 mamba_distill.py   # the same run over 2 GPUs (DDP)
  python mamba_distill.py --bench       # distillation throughput at the Llama-3.2-1B shape

Outputs, under --out_dir (read by sample.py and plot_scaling.py):
  data/train.jsonl, data/test.jsonl     the synthetic problems (GSM8K format)
  tokenizer.model                       the project's own BPE (tiktoken format), default run only
  teacher/, hybrid/, pure/, pure_random/ HF-style model directories: config.json, model.safetensors,
                                        tokenizer.model, provenance.json (the settings that made it)
  provenance.json                       the settings each of the above was made with; a run that finds
                                        one made with other settings stops and says which differ
  logs/<model>.jsonl                    one line per logged step: model, init, stage, step, loss, lr,
                                        tokens, time_s (wall seconds since that model's run began), and
                                        every --held_out_every steps held_out_loss (the stage's loss
                                        on test problems it never trains on); each stage opens with a
                                        step-0 line holding only held_out_loss, before any training
  ckpt/<model>/                         the latest checkpoint (+ optimizer.safetensors, state.json)
  distill_summary.json                  per model: greedy accuracy, parameters, stage wall times and, for a
                                        student, each mixer's held-out error against the attention it replaced
  greedy/<model>.jsonl                  each evaluated test problem's greedy solution (problem, sample,
                                        text, answer, gold, correct), as in sample.py's samples.jsonl
  kl_by_line/<student>.jsonl            per held-out problem: prompt, and for each line of its solution
                                        the line, its summed KL to the teacher and its token count
  bench/distill.json                    --bench: tokens/s, MFU, peak memory per student

Glossary (letters in shape comments):
  b  batch                          l  sequence length (tokens)
  d  model width (hidden_size)      f  MLP width (intermediate_size)
  h  query heads = SSM heads        g  key/value heads (GQA groups); r = h // g heads per group
  e  head dim (Llama) = p = n       p  SSM head dim (size of x per head)
  n  SSM state dim (size of B, C)   w  conv kernel width (d_conv)
  s  cache slots                    v  vocabulary size

Attention -> Mamba (a mixer replaces self_attn in layer i; everything else is copied):
  teacher tensor                      student tensor                    why
  self_attn.q_proj.weight  (h*e, d) -> mixer.in_proj.weight[C rows]     queries read the state: C_t
  self_attn.k_proj.weight  (g*e, d) -> mixer.in_proj.weight[B rows]     keys write the state:   B_t
  self_attn.v_proj.weight  (g*e, d) -> mixer.in_proj.weight[x rows]     values are what is written: x_t
  self_attn.o_proj.weight  (d, h*e) -> mixer.out_proj.weight            same output projection
With no decay (A = 0), dt = 1, identity conv, no gate and D = 0 the mixer computes exactly causal
*linear* attention y_t = sum_{s<=t} (C_t . B_s) x_s: softmax attention without softmax and RoPE. The conv
starts as the identity (--conv_init; Mamba-2's random conv would scramble the transferred scores); the
rest of the mixer (dt, A, D, the gate) keeps Mamba-2's init and is learnt in distillation.
"""
import base64
import binascii
import hashlib
import json
import math
import os
import random
import re
import shutil
import sys
import time
import zlib
from collections import Counter, defaultdict
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field, fields, replace

import regex  # installed with tiktoken, which splits text with it too
import tiktoken
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

from scan_kernel import (InputError, check_bounds, conv_step, conv_step_ref, decode_attention, flag, fused_kl_div,
                         kl_div_ref, parse_config, ring_rows, run_cli, ssd_scan, ssd_scan_chunked_torch, ssd_step,
                         ssd_step_ref)


# -----------------------------------------------------------------------------
# 1. The model: a Llama 3 decoder; the layers in cfg.ssm_layers hold a Mamba-2 mixer instead of attention


@dataclass
class ModelConfig:
    """Field names follow HF's LlamaConfig so that config.json files are interchangeable."""
    vocab_size: int = 768
    hidden_size: int = 256
    intermediate_size: int = 768
    num_hidden_layers: int = 8
    num_attention_heads: int = 8
    num_key_value_heads: int = 2
    head_dim: int = 32
    rms_norm_eps: float = 1e-5
    rope_theta: float = 500000.0
    rope_scaling: dict | None = None  # Llama 3.1+: {"rope_type": "llama3", "factor": 32.0, ...}
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = True
    bos_token_id: int | None = None
    eos_token_id: int | list | None = None
    # student only: the layers whose attention became a Mamba-2 mixer (empty = the teacher)
    ssm_layers: list = field(default_factory=list)
    d_conv: int = 4

    @classmethod
    def from_dict(cls, d: dict, path="config.json"):
        """A checked config; anything invalid is an InputError naming the file and the field."""
        if not isinstance(d, dict):
            raise InputError(f"{path}: expected a JSON object")
        cfg = cls(**{k: v for k, v in d.items() if k in {f.name for f in fields(cls)}})
        sizes = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                 "num_key_value_heads", "max_position_embeddings", "d_conv", "head_dim")
        for name in sizes:
            if name == "head_dim" and d.get("head_dim") is None:  # older Llama configs leave it implicit
                cfg.head_dim = cfg.hidden_size // cfg.num_attention_heads
            v = getattr(cfg, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise InputError(f"{path}: {name} must be a positive whole number, got {v!r}")
        for name in ("rms_norm_eps", "rope_theta"):
            v = getattr(cfg, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v < math.inf:
                raise InputError(f"{path}: {name} must be a positive number, got {v!r}")
        if cfg.num_attention_heads % cfg.num_key_value_heads or cfg.head_dim % 2:
            raise InputError(f"{path}: num_attention_heads={cfg.num_attention_heads} must be a multiple of "
                             f"num_key_value_heads={cfg.num_key_value_heads}, and head_dim={cfg.head_dim} even")
        if not isinstance(cfg.tie_word_embeddings, bool) or not (cfg.rope_scaling is None or isinstance(cfg.rope_scaling, dict)):
            raise InputError(f"{path}: tie_word_embeddings must be true or false, rope_scaling an object or null")
        if not isinstance(cfg.ssm_layers, list) or not all(
                isinstance(i, int) and not isinstance(i, bool) and 0 <= i < cfg.num_hidden_layers for i in cfg.ssm_layers):
            raise InputError(f"{path}: ssm_layers must list layer indices in 0..{cfg.num_hidden_layers - 1}, "
                             f"got {cfg.ssm_layers!r}")
        return cfg

    def to_dict(self) -> dict:
        d = asdict(self)
        if self.ssm_layers:  # our own architecture: HF has no class for it
            d.update(architectures=["MambaInLlamaForCausalLM"], model_type="mamba_in_llama")
        else:  # a plain Llama that HF's LlamaForCausalLM.from_pretrained loads
            del d["ssm_layers"], d["d_conv"]
            d.update(architectures=["LlamaForCausalLM"], model_type="llama", hidden_act="silu",
                     attention_bias=False, mlp_bias=False, attention_dropout=0.0, pretraining_tp=1)
        return d


class RMSNorm(nn.Module):
    """x / rms(x) * weight, the rms taken over each of `groups` equal slices of the last dim. With a
    gate, x * silu(gate) is normalised: Mamba-2's gated RMSNorm, one group per head."""

    def __init__(self, dim, eps, groups=1):
        super().__init__()
        self.eps, self.groups = eps, groups
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x, gate=None):
        if gate is not None:
            x = x * F.silu(gate.to(x.dtype))
        x32 = x.float().unflatten(-1, (self.groups, -1))  # (..., groups, dim / groups): fp32, as Llama does
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.flatten(-2).to(x.dtype)  # cast back before the weight, as Llama does


def rope_inv_freq(cfg: ModelConfig) -> torch.Tensor:
    """Rotary frequencies (e/2,) in fp32 on the CPU, with Llama 3's rescaling when rope_scaling asks."""
    e = cfg.head_dim
    inv_freq = 1.0 / cfg.rope_theta ** (torch.arange(0, e, 2, dtype=torch.float32, device="cpu") / e)  # (e/2,)
    rs = cfg.rope_scaling
    if not rs or rs.get("rope_type", rs.get("type")) in (None, "default"):
        return inv_freq
    if rs.get("rope_type", rs.get("type")) != "llama3":
        raise InputError(f"config.json: rope_scaling type {rs.get('rope_type')!r} is not supported (llama3 only)")
    # Llama 3.1: slow frequencies are divided by `factor`, fast ones kept, the band between interpolated
    keys = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
    if not all(isinstance(rs.get(k), (int, float)) and rs[k] > 0 for k in keys):
        raise InputError(f"config.json: rope_scaling needs positive numbers {', '.join(keys)}, got {rs}")
    factor, lo, hi, old = (rs[k] for k in keys)
    wavelen = 2 * math.pi / inv_freq  # (e/2,) tokens per turn
    scaled = torch.where(wavelen > old / lo, inv_freq / factor, inv_freq)  # (e/2,)
    smooth = (old / wavelen - lo) / (hi - lo)  # (e/2,) 0 at the slow end of the band, 1 at the fast end
    mid = (wavelen >= old / hi) & (wavelen <= old / lo)  # (e/2,) the band that is interpolated
    return torch.where(mid, (1 - smooth) * scaled / factor + smooth * scaled, scaled)


def apply_rope(x, cos, sin):
    """x (b, heads, l, e); cos, sin (b, 1, l, e). HF's "rotate half" layout, which its weights assume."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


class Attention(nn.Module):
    """Grouped-query attention (Llama 3): h query heads share g key/value heads, r = h/g each."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.h, self.g, self.e = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        d = cfg.hidden_size
        self.q_proj = nn.Linear(d, self.h * self.e, bias=False)
        self.k_proj = nn.Linear(d, self.g * self.e, bias=False)
        self.v_proj = nn.Linear(d, self.g * self.e, bias=False)
        self.o_proj = nn.Linear(self.h * self.e, d, bias=False)

    def qkv(self, x):
        """(b, l, h*e), (b, l, g*e), (b, l, g*e); sample.py's Sampler makes this one stacked GEMM."""
        return self.q_proj(x), self.k_proj(x), self.v_proj(x)

    def forward(self, x, rope, cache=None, ctx=None):
        b, l, _ = x.shape
        q, k, v = self.qkv(x)
        q = apply_rope(q.view(b, l, self.h, self.e).transpose(1, 2), *rope)  # (b, h, l, e)
        k = apply_rope(k.view(b, l, self.g, self.e).transpose(1, 2), *rope)  # (b, g, l, e)
        v = v.view(b, l, self.g, self.e).transpose(1, 2)  # (b, g, l, e)
        if cache is None:  # training / plain forward: causal over this sequence only
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)  # (b, h, l, e)
        else:
            k_cache, v_cache = cache  # (b, g, s, e) each: the new tokens go to slots ctx.slots
            k_cache.index_copy_(2, ctx.slots, k.to(k_cache.dtype))
            v_cache.index_copy_(2, ctx.slots, v.to(v_cache.dtype))
            if ctx.mask is None:  # one token on a GPU: the flash-decoding kernel reads slots pad..t alone
                # q in the cache's dtype, as autocast would give SDPA (RoPE may have promoted it to fp32)
                y = decode_attention(q.view(b, self.h, self.e).to(k_cache.dtype), k_cache, v_cache, ctx.slots, ctx.pad)
                y = y.view(b, self.h, 1, self.e)  # (b, h, 1, e)
            else:
                y = F.scaled_dot_product_attention(q, k_cache[:, :, :ctx.kv_len], v_cache[:, :, :ctx.kv_len],
                                                   attn_mask=ctx.mask, enable_gqa=True)  # (b, h, l, e)
        return self.o_proj(y.transpose(1, 2).reshape(b, l, self.h * self.e))  # (b, l, d)

    def matrix(self, x, rope):
        """The causal attention matrix softmax(q k^T / sqrt(e)) (b, h, l, l) in fp32: y = M v per head."""
        b, l, _ = x.shape
        q, k, _ = self.qkv(x)
        q = apply_rope(q.view(b, l, self.h, self.e).transpose(1, 2), *rope)  # (b, h, l, e)
        k = apply_rope(k.view(b, l, self.g, self.e).transpose(1, 2), *rope)  # (b, g, l, e)
        k = k.repeat_interleave(self.h // self.g, dim=1)  # (b, h, l, e) shared in a group
        scores = q.float() @ k.float().transpose(-1, -2) / math.sqrt(self.e)  # (b, h, l, l)
        causal = torch.ones(l, l, dtype=torch.bool, device=x.device).tril()  # (l, l)
        return scores.masked_fill(~causal, float("-inf")).softmax(-1)


class MambaMixer(nn.Module):
    """Mamba-2 mixer in MambaInLlama's layout, shaped so that the teacher's attention weights fit:
    h SSM heads (= query heads), head dim p = state dim n = e; x and B come from the g key/value heads
    and are shared by the r heads of their group (as keys and values are in GQA), C is per head.

    in_proj rows: [z (h*p) | x (g*p) | B (g*n) | C (h*n) | dt (h)]
    """
    MATRIX_PARAMS = ("in_proj", "conv1d", "dt_bias", "A_log")  # what makes B, C and dt: matrix() depends on these
    # kept fp32 when the model is loaded in bf16 (as in mamba_ssm): rounded, a slow head's decay rate would
    # move by a few percent, which thousands of decode steps compound
    FP32_PARAMS = ("A_log", "dt_bias", "D")

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.h, self.g, self.p = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.n, self.w = cfg.head_dim, cfg.d_conv
        d, hp, gp = cfg.hidden_size, self.h * self.p, self.g * self.p
        self.sizes = {"z": hp, "x": gp, "B": gp, "C": hp, "dt": self.h}  # in_proj row blocks, in order
        self.conv_dim = gp + gp + hp  # the conv runs over [x | B | C], as in Mamba-2
        self.in_proj = nn.Linear(d, sum(self.sizes.values()), bias=False)
        self.conv1d = nn.Conv1d(self.conv_dim, self.conv_dim, self.w, groups=self.conv_dim,
                                padding=self.w - 1)  # depthwise, causal once we trim the right side
        self.dt_bias = nn.Parameter(torch.zeros(self.h))
        self.A_log = nn.Parameter(torch.zeros(self.h))
        self.D = nn.Parameter(torch.ones(self.h))
        self.norm = RMSNorm(hp, cfg.rms_norm_eps, groups=self.h)  # gated RMSNorm, one group per head
        self.out_proj = nn.Linear(hp, d, bias=False)
        self.reset_ssm_parameters()

    @torch.no_grad()
    def reset_ssm_parameters(self, dt_min=1e-3, dt_max=0.1, a_min=1.0, a_max=16.0):
        """Mamba-2's initialisation (also MambaInLlama's): dt log-uniform in [dt_min, dt_max], decay
        rates A in [a_min, a_max], D = 1, a unit norm; conv and z keep PyTorch's default init."""
        dt = torch.exp(torch.rand(self.h) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
        self.dt_bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # softplus(dt_bias) == dt
        self.A_log.copy_(torch.log(torch.empty(self.h).uniform_(a_min, a_max)))
        self.D.fill_(1.0)
        self.norm.weight.fill_(1.0)

    def rows(self, name) -> slice:
        """The rows of in_proj.weight that produce z, x, B, C or dt."""
        names = list(self.sizes)
        start = sum(self.sizes[k] for k in names[:names.index(name)])
        return slice(start, start + self.sizes[name])

    def project(self, u, cache=None, ctx=None):
        """The mixer's inputs from u (b, l, d): z (b, l, h*p), then after the conv x (b, l, g*p), B (b, l, g*n),
        C (b, l, h*n), and dt (b, l, h) fp32 > 0."""
        z, xBC, dt = self.in_proj(u).split([self.sizes["z"], self.conv_dim, self.h], dim=-1)  # (b, l, h*p), (b, l, conv_dim), (b, l, h)
        valid = None if ctx is None else ctx.valid  # (b, l) 0 at left padding
        if valid is not None:
            # left padding leaves no trace: a zero conv input is "before the start"; dt = 0 leaves the state as is
            xBC = xBC * valid[..., None].to(xBC.dtype)
        x, B, C = self.conv(xBC, cache, ctx).split([self.g * self.p, self.g * self.n, self.h * self.n], dim=-1)
        dt = F.softplus(dt.float() + self.dt_bias.float())  # (b, l, h) > 0
        if valid is not None:
            dt = dt * valid[..., None]
        return z, x, B, C, dt

    def forward(self, u, cache=None, ctx=None):
        """u (b, l, d) -> (b, l, d): the whole sequence, or with a cache (LM.allocate_cache) l new tokens
        at slots ctx.slots continuing its conv ring and SSM state (a prefill, or one decode step)."""
        b, l, _ = u.shape
        z, x, B, C, dt = self.project(u, cache, ctx)
        A = -torch.exp(self.A_log.float())  # (h,) < 0: a decay per head
        if cache is not None and l == 1:  # decode: one step, x and B read per group in place
            step = ssd_step if u.is_cuda else ssd_step_ref  # the Triton kernel (scan_kernel.py) on a GPU
            y = step(cache[1], x.view(b, self.g, self.p).to(z.dtype), dt[:, 0], A, B.view(b, self.g, self.n).to(z.dtype),
                     C.view(b, self.h, self.n).to(z.dtype), self.D.float())  # (b, h, p)
        else:
            r = self.h // self.g
            x = x.view(b, l, self.g, self.p).repeat_interleave(r, dim=2)  # (b, l, h, p) shared in a group
            B = B.view(b, l, self.g, self.n).repeat_interleave(r, dim=2)  # (b, l, h, n)
            C = C.reshape(b, l, self.h, self.n)  # (b, l, h, n)
            # the Triton kernels on a GPU; on a CPU the same chunked algorithm in plain PyTorch
            scan = ssd_scan if u.is_cuda else ssd_scan_chunked_torch
            y, final = scan(x, dt, A, B, C, self.D.float(), None if cache is None else cache[1], return_final_state=True)
            if cache is not None:  # y (b, l, h, p), final (b, h, p, n)
                cache[1].copy_(final)
        return self.out_proj(self.norm(y.reshape(b, l, -1), gate=z).to(self.out_proj.weight.dtype))  # (b, l, d)

    def matrix(self, u):
        """The mixer as a matrix (b, h, l, l) in fp32, Mamba-2's SSD form: y = M x + D x per head (before the
        gated norm), M_ij = (C_i . B_j) exp(s_i - s_j) dt_j for j <= i, s the running sum of dt A."""
        b, l, _ = u.shape
        _, _, B, C, dt = self.project(u)
        dt = dt.transpose(1, 2)  # (b, h, l)
        s = torch.cumsum(dt * -torch.exp(self.A_log.float())[:, None], dim=-1)  # (b, h, l)
        B = B.view(b, l, self.g, self.n).repeat_interleave(self.h // self.g, 2).transpose(1, 2).float()  # (b, h, l, n)
        C = C.reshape(b, l, self.h, self.n).transpose(1, 2).float()  # (b, h, l, n)
        causal = torch.ones(l, l, dtype=torch.bool, device=u.device).tril()  # (l, l)
        decay = (s[..., :, None] - s[..., None, :]).masked_fill(~causal, float("-inf")).exp()  # (b, h, l, l), 0 above
        return (C @ B.transpose(-1, -2)) * decay * dt[:, :, None, :]

    def conv(self, xBC, cache=None, ctx=None):
        """The causal depthwise conv of (b, l, conv_dim), then silu. A cache holds a ring of the last w-1
        inputs, slot s in row s % (w-1): a decode token overwrites one row instead of shifting them all."""
        b, l, _ = xBC.shape
        if cache is None:
            return F.silu(self.conv1d(xBC.transpose(1, 2))[..., :l].transpose(1, 2))  # (b, l, conv_dim)
        ring, r = cache[0], self.w - 1  # (b, w-1, conv_dim)
        if l == 1:  # one kernel on a GPU, in place on the ring
            step = conv_step if xBC.is_cuda else conv_step_ref
            return step(ring, xBC[:, 0], self.conv1d.weight[:, 0], self.conv1d.bias, ctx.slots)[:, None]  # (b, 1, conv_dim)
        past = ring.index_select(1, ring_rows(ctx.slots[:1], r)).to(xBC.dtype)  # (b, w-1, conv_dim) oldest first
        seq = torch.cat([past, xBC], 1)  # (b, w-1+l, conv_dim)
        ring.index_copy_(1, ring_rows(ctx.slots[-1:] + 1, r), seq[:, -r:].to(ring.dtype))  # where the next token looks
        out = F.conv1d(seq.transpose(1, 2), self.conv1d.weight, self.conv1d.bias, groups=self.conv_dim)  # (b, conv_dim, l)
        return F.silu(out.transpose(1, 2))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))  # SwiGLU, (b, l, d)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, ssm: bool):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        if ssm:
            self.mixer = MambaMixer(cfg)
        else:
            self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, rope, cache=None, ctx=None, collect=None):
        h = self.input_layernorm(x)  # (b, l, d)
        # the token mixer: the SSM (converted layers) or attention (teacher layers)
        m = self.mixer(h, cache, ctx) if hasattr(self, "mixer") else self.self_attn(h, rope, cache, ctx)  # (b, l, d)
        if collect is not None:  # stage-1 alignment needs each mixer's input and output
            collect.append((h, m))
        x = x + m
        return x + self.mlp(self.post_attention_layernorm(x))


@dataclass
class StepContext:
    """What every layer needs to read/write a cache at the current positions (built by LM.forward)."""
    slots: torch.Tensor  # (l,) cache slots written by this call
    kv_len: int          # attention reads cache slots [0, kv_len)
    mask: torch.Tensor | None  # (b, 1, l, kv_len) bool, True = may attend; None: GPU decode masks itself
    valid: torch.Tensor | None  # (b, l) float, 0 at left padding (None when there is none)
    pad: torch.Tensor    # (b,) long, left padding per row: row i's first real slot


class LM(nn.Module):
    """Llama 3 decoder; layers listed in cfg.ssm_layers use a Mamba-2 mixer instead of attention.
    Parameter names are HF's (model.layers.3.self_attn.q_proj.weight, ...) so files load as they are."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.model = nn.Module()  # a container, for HF's names: model.embed_tokens, model.layers, model.norm
        self.model.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.model.layers = nn.ModuleList(Block(cfg, i in cfg.ssm_layers) for i in range(cfg.num_hidden_layers))
        self.model.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        # (e/2,) fp32; not a buffer, so that model.to(torch.bfloat16) does not round the frequencies
        self.inv_freq = rope_inv_freq(cfg)

    def rope(self, pos, dtype):
        """cos, sin (b, 1, l, e) for integer positions pos (b, l), computed in fp32."""
        if self.inv_freq.device != pos.device:  # moved once, on the first call on a new device
            self.inv_freq = self.inv_freq.to(pos.device)
        ang = pos[..., None].float() * self.inv_freq  # (b, l, e/2)
        ang = torch.cat([ang, ang], dim=-1)[:, None]  # (b, 1, l, e)
        return ang.cos().to(dtype), ang.sin().to(dtype)

    def allocate_cache(self, batch, max_len, dtype, device, state_dtype=torch.float32):
        """Per layer: (k, v) (b, g, s, e) for attention; for a mixer (conv ring (b, w-1, conv_dim),
        SSM state (b, h, p, n) in state_dtype)."""
        c = self.cfg
        if torch.device(device).type != "meta":  # (a meta cache only counts bytes)
            self.inv_freq = self.inv_freq.to(device)  # now, not inside a CUDA graph capture that may follow
        cache = []
        for blk in self.model.layers:
            if hasattr(blk, "mixer"):
                m = blk.mixer
                cache.append((torch.zeros(batch, m.w - 1, m.conv_dim, dtype=dtype, device=device),
                              torch.zeros(batch, m.h, m.p, m.n, dtype=state_dtype, device=device)))
            else:
                shape = (batch, c.num_key_value_heads, max_len, c.head_dim)
                cache.append(tuple(torch.zeros(shape, dtype=dtype, device=device) for _ in range(2)))  # k, v
        return cache

    def forward(self, idx, cache=None, start=0, pad=None, collect=None, return_hidden=False):
        """idx (b, l) -> logits (b, l, v). With a cache the tokens go to slots start..start+l-1 (start a
        0-d tensor for a CUDA-graph decode step); pad (b,): row i's left padding, which nothing sees."""
        b, l = idx.shape
        x = self.model.embed_tokens(idx)  # (b, l, d)
        ctx = None
        if cache is None:
            pos = torch.arange(l, device=idx.device).expand(b, l)  # (b, l)
        else:
            ctx, pos = self._context(b, l, start, pad, cache, idx.device)
        rope = self.rope(pos, x.dtype)
        for i, blk in enumerate(self.model.layers):
            x = blk(x, rope, None if cache is None else cache[i], ctx, collect)
        x = self.model.norm(x)  # (b, l, d)
        return x if return_hidden else self.lm_head(x)  # (b, l, v)

    def _context(self, b, l, start, pad, cache, device):
        s = max([kv[0].shape[2] for kv, blk in zip(cache, self.model.layers) if not hasattr(blk, "mixer")] or [0])
        if torch.is_tensor(start):  # decode step (graph-safe: start lives on the device)
            assert l == 1, "a tensor start is for one-token decode steps"
            slots, kv_len = start.view(1), s  # (1,)
        else:
            slots, kv_len = torch.arange(start, start + l, device=device), start + l  # (l,)
        pad = torch.zeros(b, dtype=torch.long, device=device) if pad is None else pad
        pos = (slots[None, :] - pad[:, None]).clamp(min=0)  # (b, l) positions from each row's start
        mask = None
        if l > 1 or device.type != "cuda":
            key = torch.arange(max(kv_len, 1), device=device)[:kv_len]  # (kv_len,)
            mask = (key[None, None, :] <= slots[None, :, None]) & (key[None, None, :] >= pad[:, None, None])
            # a padding query sees itself: an empty row gives NaN, which poisons real queries via 0 * NaN
            mask = (mask | (key[None, None, :] == slots[None, :, None]))[:, None]  # (b, 1, l, kv_len)
        valid = (slots[None, :] >= pad[:, None]).float() if l > 1 and bool(pad.any()) else None  # (b, l) prefill
        return StepContext(slots, kv_len, mask, valid, pad), pos

    def num_params(self):
        return sum(p.numel() for p in self.parameters())


# -----------------------------------------------------------------------------
# 2. Attention -> Mamba weight transfer (MambaInLlama, Wang et al. 2024; MOHAWK, Bick et al. 2024)

ATTENTION_TO_SSM = [
    ("self_attn.q_proj.weight", "mixer.in_proj.weight", "C"),  # (h*e, d): the query reads the state
    ("self_attn.k_proj.weight", "mixer.in_proj.weight", "B"),  # (g*e, d): the key writes it
    ("self_attn.v_proj.weight", "mixer.in_proj.weight", "x"),  # (g*e, d): the value is written
    ("self_attn.o_proj.weight", "mixer.out_proj.weight", None)]  # (d, h*e)


@torch.no_grad()
def transfer_attention_to_mamba(teacher: LM, ssm_layers, init="attention", conv_init="identity") -> LM:
    """A student in which `ssm_layers` hold a Mamba-2 mixer and everything else is the teacher's.
    init="attention": each mixer takes Q, K, V, O of the attention it replaces (table above); the rest
    of the mixer keeps Mamba-2's init, as in MambaInLlama, except the conv with conv_init="identity":
    then B, C and x start as silu(K), silu(Q), silu(V), where Mamba-2's random depthwise conv would mix
    each channel with its 3 predecessors with random signs and scramble the q . k scores the transfer
    carries over. init="random": the baseline, no transfer (the conv keeps Mamba-2's init)."""
    if init not in ("attention", "random") or conv_init not in ("mamba2", "identity"):
        raise InputError(f"--init / --conv_init: expected attention|random and mamba2|identity, got {init!r}, {conv_init!r}")
    p = next(teacher.parameters())
    cfg = replace(teacher.cfg, ssm_layers=sorted(set(ssm_layers)))
    student = LM(cfg).to(device=p.device, dtype=p.dtype)
    sd, tsd = student.state_dict(), teacher.state_dict()
    for name in sd:  # everything that exists in both models is the teacher's
        if name in tsd:
            assert sd[name].shape == tsd[name].shape, name
            sd[name] = tsd[name].clone()
    if init == "attention":
        for i in cfg.ssm_layers:
            mixer = student.model.layers[i].mixer
            for t_name, s_name, block in ATTENTION_TO_SSM:
                src, dst = tsd[f"model.layers.{i}.{t_name}"], sd[f"model.layers.{i}.{s_name}"]
                rows = mixer.rows(block) if block else slice(None)
                assert dst[rows].shape == src.shape, f"layer {i}: {t_name} {tuple(src.shape)} -> {s_name}[{block}] {tuple(dst[rows].shape)}"
                dst[rows] = src
            if conv_init == "identity":
                w = sd[f"model.layers.{i}.mixer.conv1d.weight"]  # (conv_dim, 1, w); the last tap reads token t
                w.zero_()[..., -1] = 1.0
                sd[f"model.layers.{i}.mixer.conv1d.bias"].zero_()
    student.load_state_dict(sd, strict=True)
    return student


# A hybrid keeps attention in every other layer by default: the relay task's copies need attention in
# many layers, not in one or two.
HYBRID_ATTN_FRACTION = 0.5


def spread_layers(n_layers, n_keep) -> list:
    """n_keep layer indices spread evenly over depth (the attention layers a hybrid keeps)."""
    if n_keep <= 0:
        return []
    step = n_layers / n_keep
    return sorted({int(step * j + step / 2) for j in range(n_keep)})


def student_layers(kind, n_layers, attn_fraction, attn_layers=None):
    """The layers that become mixers: all of them in a pure student; in a hybrid, all but the attention
    layers it keeps: attn_layers if given, else a share attn_fraction spread evenly over depth."""
    if kind != "hybrid":
        return list(range(n_layers))
    keep = spread_layers(n_layers, round(attn_fraction * n_layers)) if attn_layers is None else attn_layers
    return [i for i in range(n_layers) if i not in keep]


# -----------------------------------------------------------------------------
# 3. The stage losses; each returns (the loss summed over a micro-batch's tokens, their count)

def orient_loss_fn(teacher, ssm_layers, pad_id, max_len):
    """Stage 0 (MOHAWK's matrix orientation): each mixer's matrix, on the teacher's input to that layer,
    must match the attention matrix of the layer it replaces (squared distance per query row, summed over
    heads), on the first max_len tokens: the matrices grow as l^2."""
    def loss_fn(student, x, y, m):
        x = x[:, :max_len]  # (b, l)
        collect = []
        with torch.no_grad():
            teacher(x, collect=collect, return_hidden=True)  # the layers' inputs; no logits needed
            pos = torch.arange(x.shape[1], device=x.device).expand_as(x)  # (b, l)
            rope = teacher.rope(pos, collect[0][0].dtype)
            # (b, h, l, l) per layer
            target = {i: teacher.model.layers[i].self_attn.matrix(collect[i][0], rope) for i in ssm_layers}
        real = (x != pad_id).float()  # (b, l)
        loss = 0.0
        for i in ssm_layers:
            err = (student.model.layers[i].mixer.matrix(collect[i][0]) - target[i]).pow(2).sum((1, 3))  # (b, l)
            loss = loss + (err * real).sum()
        return loss / len(ssm_layers), real.sum()
    return loss_fn


def mixer_errors(teacher, student, ssm_layers, x):
    """{i: (b, l)} for each mixer i: its output, fed the teacher's input to layer i, against the output of
    the teacher's attention there, as a relative squared error (so that every layer counts alike)."""
    collect = []
    with torch.no_grad():
        teacher(x, collect=collect, return_hidden=True)  # the layers' inputs; no logits needed
    errors = {}
    for i in ssm_layers:
        h_in, target = collect[i]  # (b, l, d) each
        out = student.model.layers[i].mixer(h_in)  # (b, l, d)
        errors[i] = (out.float() - target.float()).pow(2).sum(-1) / target.float().pow(2).sum(-1).clamp(min=1e-6)  # (b, l)
    return errors


def align_loss_fn(teacher, ssm_layers, pad_id):
    """Stage 1 (MOHAWK's hidden-state alignment): each mixer, fed the teacher's input to that layer's
    attention, must reproduce its output."""
    def loss_fn(student, x, y, m):
        real = (x != pad_id).float()  # (b, l)
        errors = mixer_errors(teacher, student, ssm_layers, x)  # {i: (b, l)}
        return sum((err * real).sum() for err in errors.values()) / len(ssm_layers), real.sum()
    return loss_fn


def token_kl(teacher, student, x, direction, temperature):
    """Stage 2's loss at every position (b, l) fp32: forward KL(p_T || p_S) or reverse KL(p_S || p_T) of the
    next-token distributions at the temperature, times T^2. On a GPU, the fused Triton KL."""
    with torch.no_grad():
        t_logits = teacher(x)  # (b, l, v)
    s_logits = student(x)  # (b, l, v)
    kl_div = fused_kl_div if s_logits.is_cuda else kl_div_ref
    # soft targets' gradients scale as 1 / T^2 (Hinton et al. 2015): T^2 makes them independent of T
    return temperature ** 2 * kl_div(s_logits, t_logits, temperature, direction)  # (b, l)


def kl_loss_fn(teacher, direction, temperature):
    """Stage 2: token_kl on the solution tokens only (m = 1): the teacher was never trained to predict the
    question."""
    def loss_fn(student, x, y, m):
        return (token_kl(teacher, student, x, direction, temperature) * m).sum(), m.sum()
    return loss_fn


def ce_loss(model, x, y, m):
    """Cross-entropy on the solution tokens (m = 1), not on the prompt."""
    logits = model(x)  # (b, l, v)
    ce = F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), reduction="none")  # (b*l,)
    return (ce * m.flatten()).sum(), m.sum()


# -----------------------------------------------------------------------------
# 4. The stage plan, and the pipeline: data -> teacher -> students -> greedy accuracy

STAGES = ("teacher", "orient", "align", "kl", "sft")  # in the order a model's run goes through them


def distill_student(name, teacher, tok, ssm_layers, init, cfg, env, batches, held_out, want):
    """Transfer, then the stages: 0 (optional) orient the mixers' matrices, 1 (optional) align the mixers'
    outputs, 2 KL to the teacher, 3 (optional) fine-tune on the solutions; each checkpoints, so a run
    resumes where it stopped. Returns (student, stage times)."""
    torch.manual_seed(cfg.seed + zlib.crc32(name.encode()))  # the same init whatever ran before
    student = transfer_attention_to_mamba(teacher, ssm_layers, init, cfg.conv_init).float().to(env.device)
    if env.main:
        print(f"{name}: {len(ssm_layers)}/{teacher.cfg.num_hidden_layers} layers are Mamba, init={init}, "
              f"{student.num_params() / 1e6:.1f}M parameters")
    plan = [("orient", cfg.orient_steps if ssm_layers else 0, cfg.orient_lr,
             orient_loss_fn(teacher, ssm_layers, tok.pad_id, cfg.orient_len)),
            ("align", cfg.align_steps if ssm_layers else 0, cfg.align_lr, align_loss_fn(teacher, ssm_layers, tok.pad_id)),
            ("kl", kl_steps_of(cfg, ssm_layers, teacher.cfg.num_hidden_layers), cfg.kl_lr,
             kl_loss_fn(compiled(teacher, cfg, env), cfg.kl, cfg.temperature)),
            ("sft", cfg.sft_steps, cfg.sft_lr, ce_loss)]
    # stage 0 trains what makes a mixer's matrix (DDP wants no trainable parameter without a gradient),
    # stage 1 the mixers alone (the rest is the teacher's); stage 2 everything, so that the MLPs and a
    # hybrid's attention layers can take up what the mixers cannot do, or with --kl_trains mixers the
    # mixers alone (MambaInLlama's distillation: the teacher's MLPs, norms and embeddings stay); stage 3
    # everything
    in_matrix = lambda pname: ".mixer." in pname and pname.split(".mixer.")[1].split(".")[0] in MambaMixer.MATRIX_PARAMS
    in_mixer = lambda pname: ".mixer." in pname
    trains = {"orient": in_matrix, "align": in_mixer, "kl": in_mixer if cfg.kl_trains == "mixers" else lambda pname: True,
              "sft": lambda pname: True}
    run = ModelRun(name, init, cfg, env, want, [(stage, steps) for stage, steps, _, _ in plan], held_out)
    for stage, steps, lr, loss_fn in plan:
        if run.stage_done(stage, student):
            continue
        for pname, p in student.named_parameters():
            p.requires_grad_(trains[stage](pname))
        student.train()
        run_stage(stage, student, loss_fn, steps, lr, cfg, env, batches, tok, run)
    student.eval().requires_grad_(False)
    return student, run.times


def get_tokenizer(cfg, env, train_rows, want):
    """The project's own BPE: its teacher's, the one an earlier run with these settings trained, or one
    trained here."""
    teacher_dir, path = os.path.join(cfg.out_dir, "teacher"), os.path.join(cfg.out_dir, "tokenizer.model")
    if os.path.isfile(os.path.join(teacher_dir, "config.json")):
        return Tokenizer(find_tokenizer(teacher_dir))
    if env.main and not os.path.isfile(path):
        record_artifact(cfg.out_dir, "tokenizer.model", want["tokenizer.model"])
        # a few thousand problems hold every word the tokenizer will see; all of them only take longer
        train_bpe([r["question"] + "\n" + r["answer"] for r in train_rows[:4000]], cfg.vocab_size, path)
    barrier(env)
    return Tokenizer(path)


def get_teacher(cfg, env, tok, batches, held_out, want):
    """(model, tokenizer): the teacher an earlier run with these settings trained, or one trained here on
    `batches`, saved, and loaded back the way a real Llama checkpoint (--teacher) is."""
    dtype = torch.bfloat16 if env.device.type == "cuda" else torch.float32  # frozen: bf16 is enough
    path = os.path.join(cfg.out_dir, "teacher")
    if not os.path.isfile(os.path.join(path, "config.json")):
        mcfg = ModelConfig(vocab_size=tok.n_words, hidden_size=cfg.d_model, intermediate_size=cfg.d_ff,
                           num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads,
                           num_key_value_heads=cfg.n_kv_heads, head_dim=cfg.d_model // cfg.n_heads, rope_theta=10000.0,
                           max_position_embeddings=cfg.seq_len * 4, tie_word_embeddings=True,
                           bos_token_id=tok.bos_id, eos_token_id=[tok.eos_id, tok.eot_id])
        torch.manual_seed(cfg.seed)
        model = LM(mcfg)
        for name, p in model.named_parameters():  # GPT-2 style small init keeps the first steps stable
            if p.dim() == 2:
                nn.init.normal_(p, std=0.02 / (math.sqrt(2 * cfg.n_layers) if name.endswith(("o_proj.weight", "down_proj.weight")) else 1))
        model.to(env.device)
        if env.main:
            print(f"teacher: {model.num_params() / 1e6:.1f}M parameters, vocab {tok.n_words}, {len(batches.ids)} "
                  f"problems of {batches.mean_len:.0f} tokens on average ({batches.cut} cut to --seq_len)")
        run = ModelRun("teacher", "random", cfg, env, want["teacher"], [("teacher", cfg.teacher_steps)], held_out)
        if not run.stage_done("teacher", model):
            model.train()
            run_stage("teacher", model, ce_loss, cfg.teacher_steps, cfg.teacher_lr, cfg, env, batches, tok, run)
        finish_model(model.eval(), tok, cfg, env, "teacher", want["teacher"], run.times)
    return load_teacher(path, env.device, dtype)


@torch.no_grad()
def mixer_error_by_layer(teacher, student, x, pad_id, env):
    """{layer: mean relative error} of each of the student's mixers against the attention it replaced, on
    the teacher's inputs to it (the held-out problems x). Measured on the finished student: after a stage 2
    that trains everything (--kl_trains all) the layers around a mixer have changed too, so this says how far
    each mixer has moved from the attention's output, not how well stage 1 imitated it."""
    real = (x != pad_id).float()  # (b, l)
    with env.autocast():
        errors = mixer_errors(teacher, student, student.cfg.ssm_layers, x)  # {i: (b, l)}
    return {i: round(((err * real).sum() / real.sum()).item(), 4) for i, err in errors.items()}


@torch.no_grad()
def kl_by_line(teacher, student, held_out, tok, cfg, env):
    """Stage 2's loss on the held-out problems taken apart by solution line: per problem, its prompt and
    each line of its solution with the KL summed over the tokens that start on that line and their count
    (plot_scaling.py groups the lines by kind: which kind of line a student has not learnt yet)."""
    x, y, m = held_out  # (b, l) each; one problem per row, its solution where m = 1
    with env.autocast():
        kl = (token_kl(teacher, student, x, cfg.kl, cfg.temperature) * m).tolist()  # (b, l)
    rows = []
    for b, (ids, targets, mask) in enumerate(zip(x.tolist(), y.tolist(), m.tolist())):
        solution = [t for t, on in enumerate(mask) if on]
        if not solution:
            continue
        prompt = tok.decode([i for i in ids[:solution[0] + 1] if i != tok.pad_id])
        lines = [[b"", 0.0, 0]]  # per line: its bytes, the KL summed over its tokens, their count
        for t in solution:
            piece = tok.token_bytes(targets[t])
            if targets[t] == tok.eot_id and lines[-1][2]:  # the end of the turn: a line of its own
                lines.append([b"", 0.0, 0])
            lines[-1][0] += piece
            lines[-1][1] += kl[b][t]
            lines[-1][2] += 1
            lines += [[b"", 0.0, 0] for _ in range(piece.count(b"\n"))]  # a line ends: the next starts empty
        lines = [line for line in lines if line[2]]
        rows.append({"prompt": prompt, "lines": [text.decode("utf-8", "replace").strip("\n") for text, _, _ in lines],
                     "kl": [round(v, 5) for _, v, _ in lines], "tokens": [n for _, _, n in lines]})
    return rows


def unlearnt(models, out_dir):
    """A warning line for each student whose greedy accuracy is under half its teacher's: distillation did
    not carry the task over, so sampling it cannot show the paper's result. For the random-init baseline
    that is the expected outcome, the gap the transfer closes; the line says which it is (models: the
    summary's)."""
    teacher = models.get("teacher", {}).get("greedy_acc")
    label = lambda name: name + (" (random mixers, the baseline)" if name.endswith("_random") else "")
    return [f"{label(name)}: has not learnt the task (greedy accuracy {100 * e['greedy_acc']:.1f} % against the "
            f"teacher's {100 * teacher:.1f} %); {os.path.join(out_dir, 'kl_by_line', name + '.jsonl')} shows the "
            f"lines it gets wrong (plot_scaling.py sums them by kind)"
            for name, e in models.items() if name != "teacher" and teacher and e.get("greedy_acc", 1) < 0.5 * teacher]


@torch.no_grad()
def greedy_solutions(model, tok, rows, cfg, env):
    """Each test problem's greedy solution, in the form of sample.py's samples.jsonl (one sample per
    problem), so that plot_scaling.py can show where the wrong ones leave the gold solution."""
    prompts = [encode_prompt(tok, r["question"]) for r in rows]
    stop = StopRule(model.cfg.vocab_size, tok.stop_ids, tok, env.device)
    outs = greedy_generate(model, prompts, stop, cfg.max_new_tokens or auto_max_new_tokens(tok, rows),
                           env.amp or torch.float32)
    solutions = []
    for i, (ids, r) in enumerate(zip(outs, rows)):
        answer, gold = extract_answer(answer_text(ids, tok)), normalize_number(gold_answer(r["answer"]))
        solutions.append({"problem": i, "sample": 0, "text": tok.decode(ids), "answer": answer, "gold": gold,
                          "correct": answer == gold})
    return solutions


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    cfg = apply_preset(parse_config(DistillConfig, argv, __doc__.strip().splitlines()[0]), argv)
    check_config(cfg)  # every flag, and every file a flag names, before any work
    env = setup_env(cfg.device, cfg.deterministic)
    if cfg.bench:
        return bench(cfg, env)
    n_layers = read_config(cfg.teacher).num_hidden_layers if cfg.teacher else cfg.n_layers
    keep = parse_layers(cfg.attn_layers, n_layers)
    kinds = [(s, s, cfg.init) for s in filter(None, cfg.students.split(","))]  # (name, hybrid or pure, init)
    kinds += [(f"{cfg.random_baseline}_random", cfg.random_baseline, "random")] if cfg.random_baseline else []
    runs = [(name, student_layers(kind, n_layers, cfg.attn_fraction, keep), init) for name, kind, init in kinds]
    want = wanted_artifacts(cfg, runs, n_layers)  # the settings each artifact of this run is made with
    if cfg.fresh and env.main:
        start_over(cfg.out_dir, [name for name, _, _ in runs])
    barrier(env)
    check_artifacts(cfg, env, want)  # anything made with other settings stops the run here, in one line
    t_start = time.time()
    given = load_teacher(cfg.teacher, env.device, env.amp or torch.float32) if cfg.teacher else None  # checked first
    train_rows, test_rows = load_data(cfg, env, want)
    tok = given[1] if given else get_tokenizer(cfg, env, train_rows, want)
    batches = Batches(tok, train_rows, cfg.seq_len, cfg.seed)  # tokenised once, for every model
    held_out = held_out_batch(tok, test_rows, cfg, env)
    teacher, tok = given or get_teacher(cfg, env, tok, batches, held_out, want)
    teacher.eval().requires_grad_(False)
    batches.seed = cfg.seed + 1  # the same examples in the students' own batch order
    models = {"teacher": teacher}
    for name, ssm_layers, init in runs:
        path = os.path.join(cfg.out_dir, name)
        if os.path.isfile(os.path.join(path, "config.json")):  # made by an earlier run with these settings
            if env.main:
                print(f"{name}: already distilled in {path} with these settings")
            models[name] = load_model(path, env.device)
            continue
        models[name], stage_times = distill_student(name, teacher, tok, ssm_layers, init, cfg, env, batches, held_out,
                                                          want[name])
        finish_model(models[name], tok, cfg, env, name, want[name], stage_times)
    record = read_provenance(cfg.out_dir)
    summary = {"device": device_name(env.device), "preset": cfg.preset, "config": asdict(cfg), "models": {}}
    if env.main:
        t_eval, rows = time.time(), test_rows[:cfg.eval_n]
        for name, model in models.items():
            entry = {"params": model.num_params(), "ssm_layers": model.cfg.ssm_layers,
                     "path": cfg.teacher if name == "teacher" and cfg.teacher else os.path.join(cfg.out_dir, name),
                     "stage_times_s": record.get(name, {}).get("times", {})}
            if model.cfg.ssm_layers and held_out is not None:
                write_jsonl(kl_by_line(teacher, model, held_out, tok, cfg, env),
                            os.path.join(cfg.out_dir, "kl_by_line", f"{name}.jsonl"))
                entry["mixer_error_by_layer"] = mixer_error_by_layer(teacher, model, held_out[0], tok.pad_id, env)
                print(f"{name:>12}: each mixer's held-out error against the attention it replaced: "
                      + ", ".join(f"layer {i} {e:.3f}" for i, e in entry["mixer_error_by_layer"].items()))
            if rows:
                solutions = greedy_solutions(model, tok, rows, cfg, env)
                entry["greedy_acc"] = sum(s["correct"] for s in solutions) / len(solutions)
                write_jsonl(solutions, os.path.join(cfg.out_dir, "greedy", f"{name}.jsonl"))
                print(f"{name:>12}: greedy accuracy {entry['greedy_acc']:.3f} on {len(rows)} test problems")
            summary["models"][name] = entry
        times = {"eval": time.time() - t_eval, "total": time.time() - t_start}
        summary["run_times_s"] = {k: round(v, 1) for k, v in times.items()}
        write_json(os.path.join(cfg.out_dir, "distill_summary.json"), summary)
        print("stage wall times (s): " + ", ".join(f"{m}/{s} {t:.0f}" for m, e in summary["models"].items()
                                                    for s, t in e["stage_times_s"].items())
              + f"; evaluation {times['eval']:.0f}, this run {times['total']:.0f}")
        for line in unlearnt(summary["models"], cfg.out_dir):
            print(line)
    if env.world > 1:
        dist.destroy_process_group()
    return summary


# -----------------------------------------------------------------------------
# Appendix A. Training: where things run, batches, the loop every stage shares, checkpoints, logs,
# and provenance (which settings made which file)


@dataclass
class Env:
    """Where things run, decided once: device, autocast dtype, and the DDP rank (if any)."""
    device: torch.device
    amp: torch.dtype | None  # bf16 autocast on GPU, none on CPU
    rank: int = 0
    world: int = 1

    @property
    def main(self):
        return self.rank == 0

    def autocast(self):
        return torch.autocast(self.device.type, dtype=self.amp, enabled=self.amp is not None)


def setup_env(device: str, deterministic: bool = False) -> Env:
    """device is auto, cuda or cpu (check_config has seen to that). deterministic: kernels that add in a
    fixed order (before any CUDA work, as cuBLAS reads its workspace setting when it starts)."""
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # cuBLAS's documented deterministic setting
        # strict mode: with warn_only, flash attention's backward keeps its non-deterministic dq sum
        torch.use_deterministic_algorithms(True)
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise InputError("--device cuda: no CUDA GPU is visible")
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    dev = torch.device(device)
    if world > 1:  # started by torchrun: one process per GPU
        if device == "cuda":
            dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
            torch.cuda.set_device(dev)
        dist.init_process_group("nccl" if device == "cuda" else "gloo")
    if device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    return Env(dev, torch.bfloat16 if device == "cuda" else None, rank, world)


def device_name(device):
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def barrier(env):
    if env.world > 1:
        dist.barrier()


class Batches:
    """Tokenised examples, and batches that depend only on (seed, stage, step), so a resumed run sees
    the same ones. A batch is a random window of neighbours in length order, padded only to its longest
    (like HF's group_by_length), so little compute goes to padding."""

    def __init__(self, tok, rows, seq_len, seed):
        answers = tok.encode_batch([r["answer"] for r in rows])
        prompts = [encode_prompt(tok, r["question"]) for r in rows]
        enc = [(p + a + [tok.eot_id], [0] * len(p) + [1] * (len(a) + 1)) for p, a in zip(prompts, answers)]
        enc.sort(key=lambda e: len(e[0]))  # stable: ties keep row order
        self.cut = sum(len(ids) > seq_len + 1 for ids, _ in enc)  # examples longer than a sequence
        self.mean_len = sum(len(ids) for ids, _ in enc) / max(len(enc), 1)
        enc = [(ids[:seq_len + 1], mask[:seq_len + 1]) for ids, mask in enc]  # inputs + shifted targets
        self.lengths = [len(ids) for ids, _ in enc]
        self.ids = [torch.tensor(ids, dtype=torch.int32) for ids, _ in enc]  # ragged, int32: small in memory
        self.mask = [torch.tensor(mask, dtype=torch.bool) for _, mask in enc]
        self.pad_id, self.seq_len, self.seed = tok.pad_id, seq_len, seed

    def get(self, stage, step, batch, rank=0, world=1, micro=0, n_micro=1):
        """This rank's share of micro-batch `micro` of step `step`: inputs, targets, loss mask (b, l), real tokens."""
        # a stable hash: Python's hash() of a str changes from one process to the next
        g = torch.Generator().manual_seed(zlib.crc32(f"{self.seed}/{stage}/{step}".encode()))
        n = len(self.ids)
        if n >= batch:  # a window of neighbours in length order, its members in random order
            first = int(torch.randint(0, n - batch + 1, (1,), generator=g))
            order = first + torch.randperm(batch, generator=g)  # (batch,) global batch
        else:  # fewer examples than a batch: draw with replacement
            order = torch.randint(0, n, (batch,), generator=g)
        per = batch // (world * n_micro)
        take = order[(micro * world + rank) * per:(micro * world + rank + 1) * per].tolist()
        l = min(self.seq_len + 1, -(-max(self.lengths[i] for i in take) // 64) * 64 + 1)  # tokens + 1
        ids = torch.full((per, l), self.pad_id, dtype=torch.long)  # (b, l+1)
        mask = torch.zeros(per, l)  # (b, l+1)
        for row, i in enumerate(take):
            ids[row, :self.lengths[i]] = self.ids[i]
            mask[row, :self.lengths[i]] = self.mask[i].float()
        real = sum(self.lengths[i] - 1 for i in take)
        return ids[:, :-1], ids[:, 1:], mask[:, 1:], real


def held_out_batch(tok, rows, cfg, env):
    """The fixed (x, y, m) micro-batch of the last test problems on which every stage's held-out loss
    is measured (a training loss that keeps falling while this one rises means memorised problems);
    None when --held_out_every is 0."""
    n = min(len(rows), cfg.batch_size // (cfg.grad_accum * env.world))
    if not cfg.held_out_every or n == 0:
        return None
    x, y, m, _ = Batches(tok, rows[-n:], cfg.seq_len, cfg.seed).get("held_out", 0, n)
    return x.to(env.device), y.to(env.device), m.to(env.device)


def lr_at(step, steps, peak, warmup):
    """Linear warmup, then cosine decay to 10% of the peak."""
    w = max(1, int(warmup * steps))
    if step < w:
        return peak * (step + 1) / w
    t = (step - w) / max(1, steps - w)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t)))


class TrainingError(Exception):
    """A run that cannot go on (a NaN loss); the last good checkpoint is kept."""


class StageLoss(nn.Module):
    """student + loss function as one module, so DDP sees one forward per micro-batch (the teacher
    stays outside the module tree: never synchronised)."""

    def __init__(self, student, loss_fn):
        super().__init__()
        self.student, self.loss_fn = student, loss_fn

    def forward(self, x, y, m):
        return self.loss_fn(self.student, x, y, m)  # (loss summed over tokens, token count)


def compiled(model, cfg, env):
    """torch.compile(model) (sharing its parameters) with --compile on a GPU, else the model itself."""
    return torch.compile(model) if cfg.compile and env.device.type == "cuda" else model


@torch.no_grad()
def held_out_loss(stage_loss, held_out, env):
    """The stage's mean loss on the held-out micro-batch (every rank alike, outside DDP: no collective)."""
    with env.autocast():
        s, n = stage_loss(*held_out)
    return (s / n.clamp(min=1)).item()


def run_stage(stage, model, loss_fn, steps, peak_lr, cfg, env, batches, tok, run=None):
    """The loop every stage shares: accumulate, clip, step, log, checkpoint. loss_fn(model, x, y, m) ->
    (loss summed over tokens, token count). run: the ModelRun that resumes, logs, checkpoints (None: bench)."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in trainable if p.dim() >= 2], "weight_decay": cfg.weight_decay},  # matrices
              {"params": [p for p in trainable if p.dim() < 2], "weight_decay": 0.0}]  # norms, biases, dt, A, D
    optimizer = torch.optim.AdamW(groups, lr=peak_lr, betas=(0.9, 0.95), fused=env.device.type == "cuda")
    step0, tokens = run.start(stage, model, optimizer) if run else (0, 0)
    module = stage_loss = StageLoss(compiled(model, cfg, env), loss_fn)
    if env.world > 1:
        module = DDP(module, device_ids=[env.device.index] if env.device.type == "cuda" else None)
    # the held-out loss before the first step: how close the transfer and the stages before it bring the student
    if run and run.held_out is not None and step0 == 0:
        run.log_start(stage, steps, held_out_loss(stage_loss, run.held_out, env), tokens)
    t_last, tok_last = time.time(), tokens
    for step in range(step0, steps):
        lr = lr_at(step, steps, peak_lr, cfg.warmup)
        for group in optimizer.param_groups:
            group["lr"] = lr
        loss_sum, count = torch.zeros((), device=env.device), torch.zeros((), device=env.device)
        real = 0  # input tokens that are not padding, this rank
        for micro in range(cfg.grad_accum):
            *xym, n_real = batches.get(stage, step, cfg.batch_size, env.rank, env.world, micro, cfg.grad_accum)
            x, y, m = (t.to(env.device) for t in xym)
            real += n_real
            # gradients are averaged across GPUs only once, on the last micro-batch
            with (module.no_sync() if env.world > 1 and micro < cfg.grad_accum - 1 else nullcontext()), env.autocast():
                s, n = module(x, y, m)
            s.backward()
            loss_sum += s.detach()
            count += n
        # summed losses / the step's token count = the mean over its tokens, however they fall in
        # micro-batches and GPUs (DDP averaged the sums over GPUs: divide by the mean count per GPU)
        if env.world > 1:
            stats = torch.stack([loss_sum, count, torch.tensor(float(real), device=env.device)])
            dist.all_reduce(stats)
            loss_sum, count, real = stats[0], stats[1] / env.world, int(stats[2].item())
        for p in trainable:
            if p.grad is not None:
                p.grad.div_(count.clamp(min=1))
        loss_value = (loss_sum / (count * env.world).clamp(min=1)).item()  # the step's one host sync
        if not math.isfinite(loss_value):
            raise TrainingError(f"{run.name if run else 'bench'} {stage} step {step + 1}: loss is {loss_value}; "
                                f"the last good checkpoint is in {run.ckpt if run else '-'}")
        torch.nn.utils.clip_grad_norm_(trainable, cfg.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        tokens += real
        last = step + 1 == steps
        held_out = None
        if run and run.held_out is not None and ((step + 1) % cfg.held_out_every == 0 or last):
            held_out = held_out_loss(stage_loss, run.held_out, env)
        if run and ((step + 1) % cfg.log_every == 0 or last or held_out is not None):
            now = time.time()
            run.log(stage, step, steps, loss_value, lr, tokens, (tokens - tok_last) / max(now - t_last, 1e-9), held_out)
            t_last, tok_last = now, tokens
        if run and (step + 1 == steps or (cfg.ckpt_every and (step + 1) % cfg.ckpt_every == 0)):
            run.checkpoint(stage, step + 1, tokens, model, optimizer, tok)
    if run:
        run.times[stage] = round(time.time() - run.stage_t0, 1)


class ModelRun:
    """One model's run through its stages: resume point, log, checkpoints, stage wall times. Its log is
    cut back to the checkpoint it resumes from (emptied without --resume), so no step is logged twice."""

    def __init__(self, name, init, cfg, env, settings, plan, held_out=None):
        self.name, self.init, self.cfg, self.env, self.settings = name, init, cfg, env, settings
        self.held_out = held_out  # (x, y, m) on the device, or None
        self.steps = dict(plan)  # stage -> steps
        self.ckpt = os.path.join(cfg.out_dir, "ckpt", name)
        self.log_path = os.path.join(cfg.out_dir, "logs", f"{name}.jsonl")
        self.state = read_state(self.ckpt) if cfg.resume else None
        self.times = dict(self.state["times"]) if self.state else {}  # stage -> wall seconds
        self.t0 = time.time() - (self.state["time_s"] if self.state else 0.0)
        if env.main:
            at = (STAGES.index(self.state["stage"]), self.state["step"]) if self.state else (-1, 0)
            kept = [line for line, r in read_jsonl(self.log_path, {"stage": str, "step": int}, lenient=True, raw=True)
                    if (STAGES.index(r["stage"]), r["step"]) <= at]
            write_text(self.log_path, "".join(kept))

    def stage_done(self, stage, model):
        """Whether `stage` has nothing left to run (a checkpoint that ends it is loaded here)."""
        s = self.state
        if self.steps[stage] == 0 or s is not None and STAGES.index(stage) < STAGES.index(s["stage"]):
            return True
        if s is None or stage != s["stage"] or s["step"] < self.steps[stage]:
            return False
        self.restore(model)  # the checkpoint that ends this stage
        return True

    def start(self, stage, model, optimizer):
        """(first step, tokens so far); weights and optimizer restored when resuming inside the stage."""
        s = self.state
        if s is not None and s["stage"] == stage:
            self.restore(model, optimizer)
            self.stage_t0 = time.time() - self.times.get(stage, 0.0)
            if self.env.main:
                print(f"{self.name}: resuming {stage} after step {s['step']}")
            return s["step"], s["tokens"]
        self.stage_t0 = time.time()
        return 0, 0

    def log(self, stage, step, steps, loss, lr, tokens, tok_s, held_out=None):
        if not self.env.main:
            return
        eta = (steps - step - 1) * (tokens / max(step + 1, 1)) / max(tok_s, 1e-9)
        shown = "" if held_out is None else f" held-out {held_out:.4f}"
        print(f"{self.name:>12} {stage:>7} step {step + 1:5d}/{steps} loss {loss:.4f}{shown} lr {lr:.2e} "
              f"{tok_s / 1e3:7.1f}k tok/s  eta {eta / 60:5.1f} min", flush=True)
        self._append({"model": self.name, "init": self.init, "stage": stage, "step": step + 1, "loss": round(loss, 6),
                      "lr": lr, "tokens": tokens, "time_s": round(time.time() - self.t0, 3),
                      **({} if held_out is None else {"held_out_loss": round(held_out, 6)})})

    def log_start(self, stage, steps, held_out, tokens):
        """The held-out loss before a stage's first step, logged as step 0 (a row without a training loss)."""
        if not self.env.main:
            return
        print(f"{self.name:>12} {stage:>7} step {0:5d}/{steps} held-out {held_out:.4f} (before the first step)", flush=True)
        self._append({"model": self.name, "init": self.init, "stage": stage, "step": 0, "tokens": tokens,
                      "time_s": round(time.time() - self.t0, 3), "held_out_loss": round(held_out, 6)})

    def _append(self, rec):
        with open(self.log_path, "a") as fh:
            fh.write(json.dumps(rec) + "\n")

    def checkpoint(self, stage, step, tokens, model, optimizer, tok):
        """Model directory + optimizer moments + state.json, written into a temp dir and swapped in whole."""
        if self.env.main:
            tmp = self.ckpt + ".tmp"
            shutil.rmtree(tmp, ignore_errors=True)
            save_model(model, tok, tmp)
            flat = {f"{i}.{k}": v.detach().float().cpu().reshape(-1)  # i: the parameter's index in param_groups
                    for i, s in optimizer.state_dict()["state"].items() for k, v in s.items()}
            save_safetensors(flat, os.path.join(tmp, "optimizer.safetensors"))
            write_json(os.path.join(tmp, "state.json"), {
                "stage": stage, "step": step, "tokens": tokens, "time_s": round(time.time() - self.t0, 3),
                "times": {**self.times, stage: round(time.time() - self.stage_t0, 1)},
                "settings": self.settings, **run_conditions(self.cfg, self.env)})
            replace_dir(tmp, self.ckpt)
        barrier(self.env)  # nobody reads a checkpoint that is still being written

    def restore(self, model, optimizer=None):
        """Load the checkpoint's weights, and its optimizer moments when an optimizer is given."""
        path = checkpoint_dir(self.ckpt)
        model.load_state_dict(load_model(path, dtype=next(model.parameters()).dtype).state_dict(), strict=True)
        if optimizer is None:
            return
        flat = load_safetensors(os.path.join(path, "optimizer.safetensors"))
        sd = optimizer.state_dict()
        for i, p in enumerate(p for group in optimizer.param_groups for p in group["params"]):
            if f"{i}.step" in flat:
                sd["state"][i] = {"step": flat[f"{i}.step"].reshape(()),
                                  **{k: flat[f"{i}.{k}"].view_as(p).to(p) for k in ("exp_avg", "exp_avg_sq")}}
        optimizer.load_state_dict(sd)


def run_conditions(cfg, env):
    """What a resumed run must share with the one it continues besides the settings."""
    return {"device": env.device.type, "compile": cfg.compile}


def replace_dir(tmp, path):
    """Swap directory tmp in as path (path.old survives a crash between the two renames)."""
    old = path + ".old"
    if os.path.isdir(path):
        os.replace(path, old)
    os.replace(tmp, path)
    shutil.rmtree(old, ignore_errors=True)


def checkpoint_dir(ckpt):
    """The complete checkpoint under this name, if any (.old survives a crash between two renames)."""
    for p in (ckpt, ckpt + ".old"):
        if os.path.isfile(os.path.join(p, "state.json")):
            return p
    return None


def read_state(ckpt):
    """state.json of the checkpoint (stage, step, tokens, time_s, times, settings, device, compile), or None."""
    path = checkpoint_dir(ckpt)
    return None if path is None else read_json(os.path.join(path, "state.json"))


# The settings that decide each artifact; the others (paths, logging, evaluation) may differ between runs.
DATA_SETTINGS = ("task", "min_steps", "max_steps", "digits", "n_train", "seed")
TEACHER_SETTINGS = ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "d_ff", "teacher_steps", "teacher_lr")
STUDENT_SETTINGS = ("conv_init", "orient_steps", "orient_lr", "orient_len", "align_steps", "align_lr", "kl_steps",
                    "kl_lr", "kl", "temperature", "kl_trains", "sft_steps", "sft_lr")
OPTIM_SETTINGS = ("batch_size", "grad_accum", "seq_len", "warmup", "weight_decay", "grad_clip", "seed")


def kl_steps_of(cfg, ssm_layers, n_layers):
    """Stage 2's steps for a student: --kl_steps, times --pure_kl_factor for a pure one."""
    return round(cfg.kl_steps * cfg.pure_kl_factor) if len(ssm_layers) == n_layers else cfg.kl_steps


def wanted_artifacts(cfg, runs, n_layers):
    """{artifact: the settings that make it} for data, tokenizer, teacher and each student (runs: (name,
    ssm_layers, init)). A student's settings hold its teacher's: a new teacher makes every student stale."""
    pick = lambda names: {k: getattr(cfg, k) for k in names if k != "digits" or cfg.task == "relay"}
    synthetic = {**pick(DATA_SETTINGS), "generator": generator_fingerprint(cfg)}
    train = {"data": file_fingerprint(cfg.data)} if cfg.data else synthetic
    want = {}
    if not (cfg.data and cfg.test_data):
        want["data"] = {**synthetic, "n_test": cfg.n_test}
    if cfg.teacher:
        teacher = {"teacher": weights_fingerprint(cfg.teacher)}
    else:
        want["tokenizer.model"] = {**train, "vocab_size": cfg.vocab_size}
        want["teacher"] = teacher = {**train, **pick(TEACHER_SETTINGS + OPTIM_SETTINGS)}
    for name, layers, init in runs:
        want[name] = {**train, **pick(STUDENT_SETTINGS + OPTIM_SETTINGS), "kl_steps": kl_steps_of(cfg, layers, n_layers),
                      "teacher": teacher, "ssm_layers": layers, "init": init}
    return want


def read_provenance(out_dir):
    path = os.path.join(out_dir, "provenance.json")
    return read_json(path) if os.path.exists(path) else {}


def record_artifact(out_dir, name, settings, times=None):
    """Record in provenance.json the settings of artifact `name` before it is written, never after."""
    record = read_provenance(out_dir)
    record[name] = {"settings": settings, **({"times": times} if times else {})}
    write_json(os.path.join(out_dir, "provenance.json"), record)


def differences(old, new):
    """'field old -> new' for each setting that differs (a nested teacher's: 'teacher')."""
    keys = sorted(set(old) | set(new))
    return [k if isinstance(old.get(k), dict) or isinstance(new.get(k), dict) else f"{k} {old.get(k)!r} -> {new.get(k)!r}"
            for k in keys if old.get(k) != new.get(k)]


def check_artifacts(cfg, env, want):
    """Before any work: stop on an artifact made with other settings (or with no record), or on an
    unfinished model's checkpoint that this run would silently restart or continue differently."""
    record = read_provenance(cfg.out_dir)
    remedy = "use another --out_dir, or --fresh to start over"
    files = {"data": "data/train.jsonl", "tokenizer.model": "tokenizer.model"}  # a model's: its config.json
    for name, settings in want.items():
        path = os.path.join(cfg.out_dir, files.get(name, os.path.join(name, "config.json")))
        have = record.get(name, {}).get("settings")
        if os.path.exists(path) and have != settings:
            if have is None:
                raise InputError(f"{path}: found, but {cfg.out_dir}/provenance.json does not say what made it; {remedy}")
            raise InputError(f"{path} was made with other settings ({', '.join(differences(have, settings)[:4])}); {remedy}")
        ckpt = os.path.join(cfg.out_dir, "ckpt", name)
        state = read_state(ckpt)
        if state is None or name in ("data", "tokenizer.model") or os.path.exists(path):
            continue  # nothing unfinished
        now = {"settings": settings, **run_conditions(cfg, env)}
        then = {k: state.get(k) for k in now}
        if then != now:
            raise InputError(f"{ckpt}: an unfinished run of {name} with other settings "
                             f"({', '.join(differences(then['settings'] or {}, settings)[:4] or differences(then, now))}); {remedy}")
        if not cfg.resume:
            raise InputError(f"{ckpt}: an unfinished run of {name} ({state['stage']} step {state['step']}); "
                             "add --resume to continue it, or --fresh to start over")


def start_over(out_dir, students):
    """--fresh: remove what this run would make, nothing else under out_dir."""
    names = ["data", "tokenizer.model", "teacher", *students, "ckpt", "provenance.json", "distill_summary.json"]
    names += [os.path.join(d, f"{m}.jsonl") for d in ("logs", "greedy", "kl_by_line") for m in ["teacher", *students]]
    gone = [n for n in names if os.path.exists(os.path.join(out_dir, n))]
    for n in gone:
        path = os.path.join(out_dir, n)
        shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
    if gone:
        print(f"--fresh: removed {', '.join(gone)} from {out_dir}")


def load_data(cfg, env, want):
    """Training and test rows: the given jsonl files, or the synthetic splits (written to out_dir/data)."""
    rows = {split: read_jsonl(path) for split, path in (("train", cfg.data), ("test", cfg.test_data)) if path}
    for split, n in (("train", cfg.n_train), ("test", cfg.n_test)):
        if split in rows:
            continue
        rows[split] = synthetic_rows(cfg, split, n)
        target = os.path.join(cfg.out_dir, "data", f"{split}.jsonl")
        if env.main and not os.path.exists(target):
            record_artifact(cfg.out_dir, "data", want["data"])
            write_jsonl(rows[split], target)
    return rows["train"], rows["test"]


def finish_model(model, tok, cfg, env, name, settings, times):
    """Write a finished model's directory (its record first), and let every process wait for it."""
    if env.main:
        record_artifact(cfg.out_dir, name, settings, times)
        save_model(model, tok, os.path.join(cfg.out_dir, name), {"settings": settings, "times": times})
    barrier(env)


# -----------------------------------------------------------------------------
# Appendix B. The tokenizer: tiktoken BPE with Llama 3's split pattern and special tokens

LLAMA3_SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")

LLAMA3_SPECIAL_TOKENS = [  # <|eom_id|>: end of message (tool calls); <|eot_id|>: end of turn
    "<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>", "<|reserved_special_token_1|>",
    "<|finetune_right_pad_id|>", "<|step_id|>", "<|start_header_id|>", "<|end_header_id|>", "<|eom_id|>",
    "<|eot_id|>", "<|python_tag|>", "<|image|>"]
LLAMA3_SPECIAL_TOKENS += [f"<|reserved_special_token_{i}|>" for i in range(2, 2 + 256 - len(LLAMA3_SPECIAL_TOKENS))]


def load_tiktoken_bpe_file(path) -> dict[bytes, int]:
    """tiktoken's BPE file: `<base64 token bytes> <rank>` a line; ranks 0..n-1, so specials follow at n."""
    try:
        with open(path, "rb") as f:
            lines = f.read().splitlines()
    except OSError as e:
        raise InputError(f"{path}: cannot read tokenizer file ({e.strerror})") from None
    ranks = {}
    for i, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        parts = line.split()
        if len(parts) != 2 or not parts[1].isdigit():
            raise InputError(f"{path}:{i}: expected '<base64 token> <rank>', got {line[:60]!r}")
        try:
            token = base64.b64decode(parts[0], validate=True)
        except binascii.Error:
            raise InputError(f"{path}:{i}: token is not valid base64: {parts[0][:60]!r}") from None
        if token in ranks:
            raise InputError(f"{path}:{i}: token {token!r} appears twice")
        ranks[token] = int(parts[1])
    if not ranks:
        raise InputError(f"{path}: tokenizer file has no tokens")
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise InputError(f"{path}: ranks must be exactly 0..{len(ranks) - 1}, each once")
    return ranks


class Tokenizer:
    """Llama 3's tokenizer: byte-level BPE run by tiktoken, plus 256 special tokens after the base vocab
    (Meta's 128k-token file, or the project's own from train_bpe)."""

    def __init__(self, path):
        self.path = str(path)
        self.mergeable_ranks = load_tiktoken_bpe_file(path)
        n_base = len(self.mergeable_ranks)
        self.special_tokens = {tok: n_base + i for i, tok in enumerate(LLAMA3_SPECIAL_TOKENS)}
        self.model = tiktoken.Encoding(name=os.path.basename(self.path), pat_str=LLAMA3_SPLIT_PATTERN,
                                       mergeable_ranks=self.mergeable_ranks, special_tokens=self.special_tokens)
        self.n_words = n_base + len(self.special_tokens)
        self.bos_id = self.special_tokens["<|begin_of_text|>"]
        self.eos_id = self.special_tokens["<|end_of_text|>"]
        self.eot_id = self.special_tokens["<|eot_id|>"]
        self.eom_id = self.special_tokens["<|eom_id|>"]
        self.pad_id = self.special_tokens["<|finetune_right_pad_id|>"]
        self.start_header_id = self.special_tokens["<|start_header_id|>"]
        self.end_header_id = self.special_tokens["<|end_header_id|>"]
        # generation stops at any of these (Llama 3 instruct models end a turn with <|eot_id|>)
        self.stop_ids = {self.eos_id, self.eot_id, self.eom_id}

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        # encode_ordinary: a "<|eot_id|>" typed in user text is plain text, never the control token
        return [self.bos_id] * bos + self.model.encode_ordinary(text) + [self.eos_id] * eos

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """encode() of many texts at once (tiktoken spreads them over threads)."""
        return self.model.encode_ordinary_batch(texts)

    def decode(self, ids) -> str:
        return self.model.decode(list(ids))

    def token_bytes(self, i: int) -> bytes:
        """The bytes token i stands for (a special token's name for a special token)."""
        return self.model.decode_single_token_bytes(i)

    def encode_chat(self, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
        """Llama 3 instruct format: <|begin_of_text|>, per message <|start_header_id|>{role}<|end_header_id|>
        \\n\\n{content}<|eot_id|>, then an open assistant header for the reply."""
        ids = [self.bos_id]
        for m in messages:
            ids += self._header(m["role"]) + self.encode(m["content"].strip()) + [self.eot_id]
        if add_generation_prompt:
            ids += self._header("assistant")
        return ids

    def _header(self, role: str) -> list[int]:
        return [self.start_header_id] + self.encode(role) + [self.end_header_id] + self.encode("\n\n")

    def save(self, path):
        """Write the BPE file in tiktoken's format (specials are implied by the base vocab size)."""
        write_bpe(path, sorted(self.mergeable_ranks, key=self.mergeable_ranks.get))


def write_bpe(path, tokens):
    """tokens (bytes), in rank order, as a tiktoken BPE file."""
    write_text(path, "".join(f"{base64.b64encode(tok).decode()} {rank}\n" for rank, tok in enumerate(tokens)))


def train_bpe(texts: list[str], vocab_size: int, path, single_digits: bool = True) -> Tokenizer:
    """Train byte-level BPE (Sennrich et al. 2016) of `vocab_size` base tokens (256 bytes + merges),
    write it to `path` in tiktoken's format (rank = merge order) and load it back. Pair counts are
    kept over unique words and updated only in the words a merge touches. single_digits: one token a
    digit (as in Llama 1 and 2), so column arithmetic reads one digit per token."""
    assert vocab_size >= 256, "the base vocabulary starts with all 256 single bytes"
    word_freq = Counter(w for text in texts for w in regex.findall(LLAMA3_SPLIT_PATTERN, text))  # tiktoken's own splitter module
    if single_digits:  # the pattern puts digits in words of their own: such words get no pairs to merge
        word_freq = Counter({w: f for w, f in word_freq.items() if not w.isdigit()})
    words = [list(w.encode("utf-8")) for w in word_freq]  # each word as token ids, initially its bytes
    freqs = list(word_freq.values())
    vocab = [bytes([i]) for i in range(256)]  # id -> token bytes
    ids_of = {tok: i for i, tok in enumerate(vocab)}  # token bytes -> id (= rank)

    pair_count = Counter()  # (id, id) -> frequency in the corpus
    words_with = defaultdict(set)  # (id, id) -> indices of words that (may) contain it
    for wi, (w, f) in enumerate(zip(words, freqs)):
        for pair in zip(w, w[1:]):
            pair_count[pair] += f
            words_with[pair].add(wi)

    while len(vocab) < vocab_size and pair_count:
        # most frequent pair; ties go to the larger ids so the result does not depend on dict order
        best = max(pair_count, key=lambda p: (pair_count[p], p))
        merged = vocab[best[0]] + vocab[best[1]]
        # the same bytes can (rarely) be reached by two different pairs: reuse the id, ranks stay unique
        new_id = ids_of.get(merged, len(vocab))
        if new_id == len(vocab):
            vocab.append(merged)
            ids_of[merged] = new_id
        for wi in words_with.pop(best):
            w, f = words[wi], freqs[wi]
            for pair in zip(w, w[1:]):  # take the word's old pairs out of the counts ...
                pair_count[pair] -= f
            out, i = [], 0
            while i < len(w):
                if i + 1 < len(w) and (w[i], w[i + 1]) == best:
                    out.append(new_id)
                    i += 2
                else:
                    out.append(w[i])
                    i += 1
            words[wi] = out
            for pair in zip(out, out[1:]):  # ... and its new pairs back in
                pair_count[pair] += f
                words_with[pair].add(wi)
        for pair in [p for p, c in pair_count.items() if c <= 0]:
            del pair_count[pair]
    write_bpe(path, vocab)
    return Tokenizer(path)


# -----------------------------------------------------------------------------
# Appendix C. Files: atomic writes, json, safetensors (our own reader and writer: nothing is ever
# unpickled), HF-style model directories


def atomic_write(path, data):
    """Write bytes (or an iterable of chunks) through a temp file and os.replace: never a half-written file."""
    path = str(path)
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            f.writelines([data] if isinstance(data, (bytes, bytearray)) else data)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_text(path, text):
    atomic_write(path, text.encode())


def write_json(path, obj):
    write_text(path, json.dumps(obj, indent=2))


def read_json(path):
    """A JSON file, or an InputError naming it and what is wrong."""
    try:
        with open(path, encoding="utf-8") as fh:
            return json.load(fh)
    except json.JSONDecodeError as e:
        raise InputError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(f"{path}: cannot read ({getattr(e, 'strerror', None) or e})") from None


def read_jsonl(path, required=None, lenient=False, raw=False):
    """The rows of a jsonl file. required: {key: type} each row must hold (default: GSM8K's question and
    answer); anything else is an InputError naming file and line. lenient: a missing file has no rows and
    a torn last line is dropped. raw: (line, row) pairs."""
    required = {"question": str, "answer": str} if required is None else required
    if lenient and not os.path.exists(path):
        return []
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.readlines()
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(f"{path}: cannot read ({getattr(e, 'strerror', None) or e})") from None
    rows = []
    for i, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError:
            if lenient and i == len(lines):
                break
            raise InputError(f"{path}:{i}: not valid JSON") from None
        if not isinstance(row, dict):
            raise InputError(f"{path}:{i}: expected a JSON object")
        for key, kind in required.items():
            if not isinstance(row.get(key), kind) or isinstance(row.get(key), bool) != (kind is bool):
                raise InputError(f"{path}:{i}: field {key!r} is missing or not a {kind.__name__}")
        rows.append((line, row) if raw else row)
    if not rows and not lenient:
        raise InputError(f"{path}: no rows")
    return rows


def write_jsonl(rows: list[dict], path):
    atomic_write(path, [json.dumps(row).encode() + b"\n" for row in rows])


def file_fingerprint(path, blocks=256, block=4096):
    """A short hash of a file's size and content: all of it, or of a large file `blocks` evenly spaced
    blocks (retrained weights change everywhere; reading gigabytes would take seconds)."""
    h = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            h.update(str(size).encode())
            if size <= blocks * block:
                h.update(f.read())
            else:
                for i in range(blocks):
                    f.seek(i * (size - block) // (blocks - 1))
                    h.update(f.read(block))
    except OSError as e:
        raise InputError(f"{path}: cannot read ({e.strerror})") from None
    return h.hexdigest()[:16]


def weights_fingerprint(path):
    """The fingerprint of a model directory: its config.json, weight files and tokenizer file."""
    names = sorted(f for f in os.listdir(path) if f == "config.json" or f.startswith("model") and
                   f.endswith((".safetensors", ".json")))
    files = [os.path.join(path, f) for f in names] + [find_tokenizer(path)]
    return hashlib.sha256("".join(file_fingerprint(f) for f in files).encode()).hexdigest()[:16]


SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                      "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
                      "U8": torch.uint8, "BOOL": torch.bool}
_DTYPE_NAMES = {dt: name for name, dt in SAFETENSORS_DTYPES.items()}
_MAX_HEADER_BYTES = 100_000_000  # the safetensors spec's own limit


def save_safetensors(tensors: dict[str, torch.Tensor], path, metadata: dict[str, str] | None = None):
    """Write tensors as one safetensors file, atomically. Tensors are written largest item size first
    (as HF does) and the header is padded to 8 bytes, so every tensor starts aligned to its dtype."""
    names = sorted(tensors, key=lambda k: -tensors[k].element_size())  # stable: keeps order otherwise
    # transformers refuses files whose metadata lacks format=pt, so always say it
    header = {"__metadata__": {"format": "pt", **(metadata or {})}}
    offset = 0
    for name in names:
        t = tensors[name]
        header[name] = {"dtype": _DTYPE_NAMES[t.dtype], "shape": list(t.shape),
                        "data_offsets": [offset, offset + t.nbytes]}
        offset += t.nbytes
    header_bytes = json.dumps(header, separators=(",", ":")).encode()
    header_bytes += b" " * (-len(header_bytes) % 8)

    def chunks():  # one tensor at a time, so a GPU model is never copied to CPU all at once
        yield len(header_bytes).to_bytes(8, "little")
        yield header_bytes
        for name in names:
            t = tensors[name].detach().to("cpu").contiguous().reshape(-1)  # (numel,)
            yield t.view(torch.uint8).numpy()  # raw bytes; torch is little-endian on every host we run

    atomic_write(path, chunks())


def load_safetensors(path) -> dict[str, torch.Tensor]:
    """Read a safetensors file into CPU tensors. The header is checked before any data is trusted, so a
    truncated or corrupt file gives one InputError naming it instead of garbage weights."""
    try:
        with open(path, "rb") as f:
            buf = bytearray(os.fstat(f.fileno()).st_size)
            f.readinto(buf)
    except OSError as e:
        raise InputError(f"{path}: cannot read safetensors file ({e.strerror})") from None
    if len(buf) < 8:
        raise InputError(f"{path}: {len(buf)} bytes is too short for a safetensors file (truncated?)")
    n = int.from_bytes(buf[:8], "little")
    if n > min(len(buf) - 8, _MAX_HEADER_BYTES):
        raise InputError(f"{path}: header size {n} does not fit in a {len(buf)}-byte file "
                         "(truncated or not safetensors)")
    try:
        header = json.loads(buf[8:8 + n])
    except ValueError:
        header = None
    if not isinstance(header, dict):  # an if, not an assert: python -O drops asserts
        raise InputError(f"{path}: header is not a JSON object (corrupt or not safetensors)")
    header.pop("__metadata__", None)
    data_start, data_len = 8 + n, len(buf) - 8 - n
    tensors, spans = {}, []
    for name, info in header.items():
        try:
            dtype = SAFETENSORS_DTYPES[info["dtype"]]
            shape = [int(s) for s in info["shape"]]
            begin, end = (int(o) for o in info["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise InputError(f"{path}: tensor {name!r} has a bad header entry {info!r:.100}") from None
        numel = math.prod(shape)
        if min(shape, default=0) < 0 or not 0 <= begin <= end:
            raise InputError(f"{path}: tensor {name!r} has a negative shape or offsets {shape} {[begin, end]}")
        if end > data_len:
            raise InputError(f"{path}: tensor {name!r} ends at byte {end} but the data is {data_len} bytes (truncated)")
        if end - begin != numel * dtype.itemsize:
            raise InputError(f"{path}: tensor {name!r} has {end - begin} bytes, "
                             f"its shape {shape} needs {numel * dtype.itemsize}")
        spans.append((begin, end, name))
        if numel == 0:
            tensors[name] = torch.empty(shape, dtype=dtype)
        else:  # a view into buf (which the tensor keeps alive): no copy of the weights
            tensors[name] = torch.frombuffer(buf, dtype=dtype, count=numel, offset=data_start + begin).view(shape)
    spans.sort()
    for (_, end0, a), (begin1, _, b) in zip(spans, spans[1:]):
        if begin1 < end0:
            raise InputError(f"{path}: tensors {a!r} and {b!r} overlap")
    return tensors


def load_state_dict(directory) -> dict[str, torch.Tensor]:
    """HF-layout weights: model.safetensors.index.json and its shards, else model.safetensors."""
    index_path = os.path.join(directory, "model.safetensors.index.json")
    single_path = os.path.join(directory, "model.safetensors")
    if not os.path.exists(index_path):
        if not os.path.exists(single_path):
            raise InputError(f"{directory}: has neither model.safetensors nor model.safetensors.index.json")
        return load_safetensors(single_path)
    index = read_json(index_path)
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict):
        raise InputError(f"{index_path}: not a JSON object with a 'weight_map'")
    state_dict = {}
    for file in dict.fromkeys(weight_map.values()):  # unique shard names, in order
        shard_path = os.path.join(directory, file)
        if not os.path.exists(shard_path):
            raise InputError(f"{index_path}: names shard {file}, which is missing")
        state_dict.update(load_safetensors(shard_path))
    for name, file in weight_map.items():
        if name not in state_dict:
            raise InputError(f"{index_path}: tensor {name!r} is not in {file}")
    return state_dict


TOKENIZER_FILES = ("tokenizer.model", "original/tokenizer.model")  # ours, Meta's HF repos


def read_config(path) -> ModelConfig:
    cfg_path = os.path.join(path, "config.json")
    if not os.path.isdir(path):
        raise InputError(f"{path}: no such checkpoint directory")
    if not os.path.isfile(cfg_path):
        raise InputError(f"{cfg_path}: no such file (is {path} a checkpoint directory?)")
    d = read_json(cfg_path)
    if isinstance(d, dict) and isinstance(d.get("rope_parameters"), dict):  # newer HF writes rope settings in one dict
        rp = d["rope_parameters"]
        d.setdefault("rope_theta", rp.get("rope_theta", ModelConfig.rope_theta))
        if rp.get("rope_type", "default") != "default":
            d.setdefault("rope_scaling", rp)
    return ModelConfig.from_dict(d, cfg_path)


def load_model(path, device="cpu", dtype=torch.float32) -> LM:
    """The model config.json describes, its weights loaded strictly and without unpickling anything."""
    cfg = read_config(path)
    sd = load_state_dict(path)
    with torch.device("meta"):  # no time wasted on a random init that is overwritten next
        model = LM(cfg)
    if cfg.tie_word_embeddings and "lm_head.weight" not in sd and "model.embed_tokens.weight" in sd:
        sd["lm_head.weight"] = sd["model.embed_tokens.weight"]  # HF omits the tied copy
    want = model.state_dict()
    problems = {"missing": sorted(set(want) - set(sd)), "unexpected": sorted(set(sd) - set(want)),
                "shape": [f"{k} {tuple(sd[k].shape)} != {tuple(v.shape)}" for k, v in want.items()
                          if k in sd and sd[k].shape != v.shape]}
    what = "; ".join(f"{kind} {names[:3]}" for kind, names in problems.items() if names)
    if what:
        raise InputError(f"{path}/config.json does not match the weights: {what}")
    for k, v in sd.items():
        if v.is_floating_point() and not torch.isfinite(v).all():
            raise InputError(f"{path}: weight {k} holds NaN or infinite values")
    keep = lambda k: ".mixer." in k and k.rsplit(".", 1)[1] in MambaMixer.FP32_PARAMS  # stays fp32
    sd = {k: (v.to(dtype) if v.is_floating_point() and not keep(k) else v) for k, v in sd.items()}
    model.load_state_dict(sd, strict=True, assign=True)
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    return model.to(device)


def find_tokenizer(path) -> str:
    if not os.path.isdir(path):
        raise InputError(f"{path}: no such checkpoint directory")
    for name in TOKENIZER_FILES:
        if os.path.isfile(os.path.join(path, name)):
            return os.path.join(path, name)
    raise InputError(f"{path}: no tokenizer file (looked for {', '.join(TOKENIZER_FILES)})")


def check_tokenizer_fits(tok, cfg: ModelConfig, path):
    """A tokenizer whose ids the model's embedding cannot hold would index past it."""
    if tok.n_words > cfg.vocab_size:
        raise InputError(f"{tok.path}: {tok.n_words} token ids, more than the vocab_size {cfg.vocab_size} of "
                         f"{path}/config.json")


def load_teacher(path, device="cpu", dtype=torch.float32):
    """A local HF-format Llama directory -> (LM, Tokenizer), checked to be a teacher that fits its tokenizer."""
    model = load_model(path, device, dtype)
    if model.cfg.ssm_layers:
        raise InputError(f"{path}: a student (Mamba layers {model.cfg.ssm_layers}), not a Llama teacher")
    tok = Tokenizer(find_tokenizer(path))
    check_tokenizer_fits(tok, model.cfg, path)
    return model, tok


def save_model(model: LM, tokenizer, path, provenance=None):
    """Write an HF-style directory (a teacher loads in HF's LlamaForCausalLM too), whole, via a temp
    directory. provenance: the settings that made the model, kept beside it in provenance.json."""
    tmp = path + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    sd = {k: v.detach() for k, v in model.state_dict().items()}
    if model.cfg.tie_word_embeddings:
        sd.pop("lm_head.weight")  # HF leaves the tied copy out
    save_safetensors(sd, os.path.join(tmp, "model.safetensors"))
    tokenizer.save(os.path.join(tmp, "tokenizer.model"))
    dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
    write_json(os.path.join(tmp, "config.json"), {**model.cfg.to_dict(), "torch_dtype": dtype})
    if provenance is not None:
        write_json(os.path.join(tmp, "provenance.json"), provenance)
    replace_dir(tmp, path)


save_teacher = save_model  # the public name for teachers: a teacher is an LM with no ssm_layers


# -----------------------------------------------------------------------------
# Appendix D. Data: the synthetic tasks (GSM8K's format), GSM8K files, prompts, answers, stopping

NAMES = [  # (name, subject pronoun, possessive)
    ("Mia", "she", "her"), ("Liam", "he", "his"), ("Ava", "she", "her"), ("Noah", "he", "his"),
    ("Sofia", "she", "her"), ("Omar", "he", "his"), ("Priya", "she", "her"), ("Mateo", "he", "his"),
    ("Hana", "she", "her"), ("Kofi", "he", "his"), ("Elena", "she", "her"), ("Ravi", "he", "his"),
    ("Chloe", "she", "her"), ("Jamal", "he", "his"), ("Yuki", "she", "her"), ("Lucas", "he", "his"),
    ("Amara", "she", "her"), ("Ethan", "he", "his"), ("Zoe", "she", "her"), ("Diego", "he", "his"),
    ("Leila", "she", "her"), ("Felix", "he", "his"), ("Nadia", "she", "her"), ("Owen", "he", "his"),
    ("Grace", "she", "her"), ("Tariq", "he", "his"), ("Ines", "she", "her"), ("Samuel", "he", "his")]
OBJECTS = [("apples", "bags", "market", "a pie"), ("marbles", "jars", "toy store", "a game"),
           ("stickers", "sheets", "book fair", "a poster"), ("cookies", "boxes", "bakery", "a party"),
           ("pencils", "packs", "school shop", "an art class"), ("stamps", "albums", "post office", "letters"),
           ("seashells", "buckets", "beach", "a necklace"), ("coins", "purses", "bank", "the bus"),
           ("cards", "decks", "game shop", "a card trick"), ("beads", "tubes", "craft store", "a bracelet"),
           ("eggs", "cartons", "farm", "a cake"), ("crayons", "tins", "art shop", "a mural"),
           ("books", "crates", "library sale", "a book club"), ("oranges", "nets", "fruit stand", "juice"),
           ("toy cars", "cases", "flea market", "a race track"), ("flowers", "bunches", "garden center", "a vase")]


# the short task's one-step events: op -> (question sentence, solution sentence) pairs, one picked at random
SHORT_EVENTS = {
    "+": [("Then {he} finds {b} more {obj}.",
           "{He} had {x} {obj} and finds {b} more, so now {he} has {x} + {b} = {y} {obj}."),
          ("{friend} gives {name} {b} {obj}.",
           "{friend} gives {name} {b} {obj}, so {name} now has {x} + {b} = {y} {obj}."),
          ("The next day {he} gets {b} more {obj} at the {place}.",
           "After getting {b} more at the {place}, {he} has {x} + {b} = {y} {obj}."),
          ("{He} wins {b} {obj} in a contest.",
           "Winning {b} {obj} in the contest brings {his} total to {x} + {b} = {y} {obj}.")],
    "-": [("{He} gives {b} {obj} to {friend}.",
           "{He} gives {b} of {his} {x} {obj} to {friend}, so {he} has {x} - {b} = {y} {obj} left."),
          ("{He} loses {b} {obj} on the way home.",
           "Losing {b} of the {x} {obj} on the way home leaves {x} - {b} = {y} {obj}."),
          ("{He} uses {b} {obj} for {use}.",
           "{He} uses {b} {obj} for {use}, so {x} - {b} = {y} {obj} are left.")],
    "*": [("By the end of the month {he} has {times} as many {obj} as before.",
           "At the end of the month {he} has {times} as many as the {x} {obj} {he} had, "
           "which is {x} * {b} = {y} {obj}."),
          ("{friend} gives {name} enough {obj} to make {his} collection {times} as big.",
           "A collection {times} as big as {x} {obj} holds {x} * {b} = {y} {obj}.")],
    "/": [("{He} splits the {obj} into {b} equal groups and keeps one group.",
           "{He} splits {his} {x} {obj} into {b} equal groups of {x} / {b} = {y} {obj} and keeps one group."),
          ("{He} shares the {obj} equally with {others} friends and keeps {his} share.",
           "With {b} people sharing, each one gets {x} / {b} = {y} {obj}, and that is what {he} keeps.")]}
TIMES = {2: "twice", 3: "three times", 4: "four times"}


def make_problem(rng: random.Random, n_steps: int) -> dict:
    """A word problem of n_steps GSM8K-style arithmetic steps: {"question", "answer", "ops"}, ops the steps
    as [op, *numbers] for a test to redo: ["start", a] or ["pack", a, b] (a * b), then "+", "-", "*", "/"
    (one step each), ["add_packs", a, b] (x + a * b, two) and last ["together_fewer", b] (x + (x - b), two)."""
    assert n_steps >= 1
    name, he, his = rng.choice(NAMES)
    friend = rng.choice([n for n in NAMES if n[0] != name])[0]
    obj, box, place, use = rng.choice(OBJECTS)
    words = dict(name=name, he=he, He=he.capitalize(), his=his, friend=friend, obj=obj, place=place, use=use)
    q, s, ops = [], [], []  # question sentences, solution lines, steps taken
    # the final question sometimes brings in the friend: two more steps at the end
    ending_with_friend = n_steps >= 3 and rng.random() < 0.3
    steps_left = n_steps - 2 * ending_with_friend

    if steps_left >= 2 and rng.random() < 0.5:
        a, b = rng.randint(2, 9), rng.randint(3, 12)
        x = a * b
        q.append(f"{name} buys {a} {box} of {obj} with {b} {obj} in each.")
        s.append(f"{name} buys {a} {box} and each of them has {b} {obj}, so {he} starts with {a} * {b} = {x} {obj}.")
        ops.append(["pack", a, b])
        steps_left -= 1
    else:
        x = rng.randint(5, 60)
        q.append(f"{name} has {x} {obj}.")
        ops.append(["start", x])

    while steps_left > 0:
        op = rng.choice(["+", "-", "*", "/"] + ["add_packs"] * (steps_left >= 2))
        divisors = [d for d in range(2, 10) if x % d == 0 and x // d >= 2]
        if op == "-" and x < 4 or op == "*" and x > 200 or op == "/" and not divisors:
            op = "+"  # keep every intermediate a moderate positive integer
        if op == "add_packs":  # two steps in one sentence
            a, b = rng.randint(2, 6), rng.randint(2, 12)
            y = x + a * b
            q.append(f"Later {he} buys {a} {box} with {b} {obj} in each.")
            s.append(f"Each of the {a} {box} has {b} {obj}, so the {box} hold {a} * {b} = {a * b} {obj} in total.")
            s.append(f"Adding them to the {x} {obj} {he} already had gives {x} + {a * b} = {y} {obj}.")
            ops.append([op, a, b])
            steps_left -= 2
        else:
            # the second number, drawn from its op's choices
            b = rng.choice({"+": range(2, 41), "-": range(1, min(x - 2, 40) + 1), "*": range(2, 5), "/": divisors}[op])
            y = {"+": x + b, "-": x - b, "*": x * b, "/": x // b}[op]
            numbers = dict(x=x, b=b, y=y, times=TIMES.get(b), others=b - 1)
            for out, text in zip((q, s), rng.choice(SHORT_EVENTS[op])):
                out.append(text.format(**words, **numbers))
            ops.append([op, b])
            steps_left -= 1
        x = y

    if ending_with_friend:
        b = rng.randint(1, x - 1)
        q.append(f"{friend} has {b} fewer {obj} than {name}. How many {obj} do they have together?")
        s.append(f"{friend} has {b} fewer {obj} than {name}, so {friend} has {x} - {b} = {x - b} {obj}.")
        s.append(f"Together they have {x} + {x - b} = {2 * x - b} {obj}.")
        ops.append(["together_fewer", b])
        x = 2 * x - b
    else:
        q.append(rng.choice([f"How many {obj} does {name} have now?", f"How many {obj} does {name} end up with?"]))
        s.append(f"So in the end {name} has {x} {obj}.")
    s.append(f"#### {x}")
    return {"question": " ".join(q), "answer": "\n".join(s), "ops": ops}


COLUMNS = ["ones", "tens", "hundreds", "thousands", "ten-thousands", "hundred-thousands", "millions"]
RELAY_PEOPLE = 3  # people in a relay problem (no flag sets another number)


def column_lines(a: int, b: int, sign: str) -> list[str]:
    """a + b or a - b (then a >= b) worked column by column, as at school: a line per column with its digits,
    carry or borrow and the result so far, so that each line needs only the one above it."""
    da, db = [int(c) for c in reversed(str(a))], [int(c) for c in reversed(str(b))]
    lines, flow, so_far, width = [], 0, "", max(len(da), len(db))  # b can be the longer in an addition
    for i in range(width + 1):
        x, y = (da[i] if i < len(da) else 0), (db[i] if i < len(db) else 0)
        if i == width and not (sign == "+" and flow):
            break  # one more column only for the carry out of an addition
        if sign == "+":
            s = x + y + flow
            digit, work, flow = s % 10, f"{x} + {y} + {flow} = {s}, write {s % 10}, carry {s // 10}", s // 10
        else:
            r = x - y - flow
            digit = r % 10
            work = (f"{x} - {y} - {flow} is below 0, so {x + 10} - {y} - {flow} = {digit}, write {digit}, borrow 1"
                    if r < 0 else f"{x} - {y} - {flow} = {r}, write {r}, borrow 0")
            flow = int(r < 0)
        so_far = f"{digit}{so_far}"
        lines.append(f"{COLUMNS[i]}: {work}; so far {so_far}")
    return lines


def make_relay_problem(rng: random.Random, n_turns: int, n_people: int = RELAY_PEOPLE, digits: int = 4,
                       slip: float = 0.0, cast: int = 0) -> dict:
    """A long-reasoning problem: n_people pass a tenth (rounded down) of what they hold round a circle for
    n_turns turns; what does the last one to receive hold at the end? The solution does every sum column
    by column, so it is long because the reasoning is, and one wrong digit gives a wrong answer. Every
    line needs only what the ten lines above it say, and finds it by its place in a line, never by a name
    (associative recall, which a fixed-size state does worst, is not the reasoning): the starting amounts
    come last in the question, each listing starts with the next turn's giver and receiver, the others'
    counts are restated between a turn's two sums ("X still has N"), the result lines repeat the turn
    count, and the answer repeats the first place of the last listing.
    slip: the chance that a turn's tenth is rounded up instead of down, the rest of the solution following
    the slip (its answer too). Chains of thought written by a model carry such mistakes; a teacher trained
    on them makes them at that rate when sampled, at any turn, so that a longer chain fails more often,
    one draw fails where another does not, and the wrong answers differ: the regime where more samples
    help. The draws are made whatever slip is, so the questions do not depend on it.
    cast: the people are drawn from the first `cast` names (0 = all of them). With cast = n_people they
    are always the same, in the same order: each name in a solution then follows from the turn alone,
    where otherwise it is copied from the question, a recall a model may learn late or not at all (the
    answer never needs a name).
    Returns {"question", "answer", "ops"}; ops = ["relay", [start amounts], n_turns, asked index]."""
    pool = NAMES[:cast] if cast else NAMES
    assert n_turns >= 1 and 2 <= n_people <= len(pool) and 2 <= digits <= len(COLUMNS) - 1
    people = list(pool) if len(pool) == n_people else rng.sample(pool, n_people)
    names = [p[0] for p in people]
    hers = {name: "hers" if his == "her" else "his" for name, _, his in people}
    obj, box, _, _ = rng.choice(OBJECTS)
    start = [rng.randint(10 ** (digits - 1), 10 ** digits - 1) for _ in names]
    asked = n_turns % n_people  # the last to receive

    def listing(amounts, first=0, unit=""):  # the counts, starting with person `first`
        parts = [f"{names[j % n_people]} has {amounts[j % n_people]}{unit}" for j in range(first, first + n_people)]
        return ", ".join(parts[:-1]) + f" and {parts[-1]}"

    order = ", then ".join(f"{names[i]} gives {names[(i + 1) % n_people]} a tenth of {hers[names[i]]}"
                           for i in range(n_people))
    q = (f"{', '.join(names[:-1])} and {names[-1]} keep {obj} in {box}. They take turns passing {obj} on: "
         f"{order}, and so on in that order. A tenth is rounded down to a whole number. "
         f"{listing(start, unit=f' {obj}')}. After {n_turns} turns, how many {obj} does {names[asked]} have?")
    x = list(start)
    s = [f"At the start {listing(x)}."]
    for t in range(n_turns):
        g, r = t % n_people, (t + 1) % n_people
        give = x[g] // 10 + (rng.random() < slip)
        s.append(f"Turn {t + 1} of {n_turns}: {names[g]} gives {names[r]} a tenth of {x[g]}, which is {give}.")
        others = [(r + j) % n_people for j in range(1, n_people - 1)]  # in the order of the next listing
        for who, sign in ((g, "-"), (r, "+")):
            if who == r:  # between the two sums, so that the next listing finds every count within 10 lines
                s += [f"{names[o]} still has {x[o]}." for o in others]
            s.append(f"{names[who]}: {x[who]} {sign} {give}")
            s += column_lines(x[who], give, sign)
            x[who] = x[who] - give if sign == "-" else x[who] + give
            s.append(f"{names[who]} has {x[who]} after turn {t + 1} of {n_turns}.")
        s.append(f"Now {listing(x, first=r)}.")  # the next turn's giver first
    s.append(f"After {n_turns} turns {names[asked]} has {x[asked]}.")
    s.append(f"#### {x[asked]}")
    return {"question": q, "answer": "\n".join(s), "ops": ["relay", start, n_turns, asked]}


TASKS = {"relay": (make_relay_problem, 2, 10), "short": (make_problem, 2, 8)}


def split_of(question: str) -> str:
    """'test' for ~10% of questions, by a stable hash of the text: the splits never share a question."""
    return "test" if int(hashlib.sha256(question.encode()).hexdigest()[:8], 16) % 10 == 0 else "train"


def synthetic_split(split: str, n: int, seed: int = 0, task: str = "relay", min_steps: int = 0,
                    max_steps: int = 0, **knobs) -> list[dict]:
    """n distinct problems of `split` of a task in TASKS, steps uniform in [min_steps, max_steps] (0 = the
    task's default), the same for the same arguments. knobs go to the generator (relay: n_people, digits,
    slip, cast); the test split's solutions never slip. Each row also says its number of steps ("steps"), by
    which plot_scaling.py splits accuracy."""
    assert split in ("train", "test"), split
    if split == "test":
        knobs.pop("slip", None)
    make, lo, hi = TASKS[task]
    lo, hi = min_steps or lo, max_steps or hi
    rng = random.Random(seed)
    rows, seen = [], set()
    while len(rows) < n:
        steps = rng.randint(lo, hi)
        p = make(rng, steps, **knobs)
        if split_of(p["question"]) == split and p["question"] not in seen:
            seen.add(p["question"])
            rows.append({**p, "steps": steps})
    return rows


def synthetic_rows(cfg, split: str, n: int) -> list[dict]:
    """n problems of a split of the synthetic task the settings name."""
    knobs = {"digits": cfg.digits, "slip": cfg.slip, "cast": cfg.cast} if cfg.task == "relay" else {}
    return synthetic_split(split, n, cfg.seed, cfg.task, cfg.min_steps, cfg.max_steps, **knobs)


def generator_fingerprint(cfg) -> str:
    """A hash of the first few problems the generator makes with these settings: when its code changes,
    so does the hash, and data (with the models trained on it) made by an older generator is not reused."""
    return hashlib.sha256(json.dumps(synthetic_rows(cfg, "train", 4)).encode()).hexdigest()[:16]


def gold_answer(answer_text: str) -> str:
    """The rest of the line after the last '####', without commas ("#### 1,200" -> "1200"); "" if none."""
    tail = answer_text.rsplit("####", 1)[1] if "####" in answer_text else ""
    return tail.split("\n", 1)[0].strip().replace(",", "")


def prompt_text(question: str) -> str:
    """The user message for training and sampling (the model's reply is the GSM8K-style answer)."""
    return f"{question.strip()}\nSolve it step by step and end with '#### <answer>'."


def encode_prompt(tok, question):
    """The chat prompt the model answers (Llama 3's instruct format, open assistant turn)."""
    return tok.encode_chat([{"role": "user", "content": prompt_text(question)}])


def auto_max_new_tokens(tok, rows) -> int:
    """A generation limit: the longest solution of `rows` + 25%, rounded up to a multiple of 64."""
    longest = max(len(ids) for ids in tok.encode_batch([r["answer"] for r in rows])) + 1  # + <|eot_id|>
    return -(-int(1.25 * longest) // 64) * 64


def normalize_number(s: str) -> str:
    """'$1,200.00' -> '1200', '0.50' -> '0.5', ' 42. ' -> '42': the form answers are compared in."""
    s = s.strip().replace(",", "").replace("$", "").replace(" ", "").rstrip(".")
    if re.fullmatch(r"-?\d+\.\d+", s):
        s = s.rstrip("0").rstrip(".")
    return s


NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def boxed_contents(text: str) -> str | None:
    """The contents of the last \\boxed{...}, matching nested braces; None if there is none."""
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    depth, i = 0, start + len("\\boxed")
    for j in range(i, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[i + 1:j]
    return None  # unbalanced: the sample was cut off inside the box


def extract_answer(text: str, flexible: bool = False) -> str | None:
    """The normalised final answer: the first number on the last "####" line (else that line's text),
    else the last \\boxed{...}; None if neither. flexible: else the last number anywhere (GSM8K
    harnesses' flexible extraction; off by default: it credits numbers never given as the answer)."""
    if "####" in text:
        line = text.rsplit("####", 1)[1].split("\n", 1)[0]
        nums = NUMBER.findall(line)
        if nums:
            return normalize_number(nums[0])
        if line.strip():
            return normalize_number(line)
    boxed = boxed_contents(text)
    if boxed is not None and boxed.strip():
        nums = NUMBER.findall(boxed)
        # a plain number inside the box is normalised; anything else (\frac{1}{2}, x+1) kept as written
        if len(nums) == 1 and NUMBER.fullmatch(boxed.strip().replace("$", "").replace(" ", "").rstrip(".")):
            return normalize_number(nums[0])
        return boxed.strip()
    nums = NUMBER.findall(text) if flexible else []
    return normalize_number(nums[-1]) if nums else None


def answer_text(ids, tokenizer) -> str:
    """The sample with every special token (names like <|reserved_special_token_221|>) as a space."""
    plain = tokenizer.n_words - len(getattr(tokenizer, "special_tokens", ()))
    return tokenizer.decode([i if i < plain else tokenizer.encode(" ")[0] for i in ids])


class StopRule:
    """When a generated row is finished, decided on the device each step: at a stop token (not kept) or
    the newline ending a "#### <number>" line (kept). phase: 0 outside an answer line, 1 after "####",
    2 once a digit followed. A "####" split over two tokens is left to answer_end() on the host."""

    def __init__(self, vocab_size, stop_ids=(), tokenizer=None, device="cpu"):
        flags = torch.zeros(4, vocab_size, dtype=torch.bool)  # is_stop, has_hash, has_digit, has_newline
        flags[0, [i for i in stop_ids if i < vocab_size]] = True
        if tokenizer is not None:
            for i in range(min(vocab_size, tokenizer.n_words)):
                b = tokenizer.token_bytes(i)
                flags[1:, i] = torch.tensor([b"####" in b, any(48 <= c <= 57 for c in b), b"\n" in b])
        self.is_stop, self.has_hash, self.has_digit, self.has_newline = flags.to(device)
        self.active = bool(flags.any())

    def update(self, tok, col, phase, done, end):
        """Fold tokens tok (b,) at index col into phase, done and end (b,) (tokens a row keeps), in place."""
        stop, hsh, dig, nl = self.is_stop[tok], self.has_hash[tok], self.has_digit[tok], self.has_newline[tok]
        finish = ~done & (stop | ((phase == 2) & nl))  # (b,)
        end.copy_(torch.where(finish, col + (~stop).long(), end))
        done.logical_or_(finish)
        # "####" opens a line (its own newline, as in "####\n", closes it at once); a digit after it arms it
        phase.copy_(torch.where(hsh & ~nl, 1, torch.where(nl, 0, torch.where((phase == 1) & dig, 2, phase))))


ANSWER_LINE = re.compile(r"####[^\n]*\d[^\n]*\n")  # "#### <number>" and the newline that ends it


def answer_end(ids, tokenizer):
    """How many of `ids` end with the first "#### <number>" line's newline (StopRule on text), else all."""
    text = tokenizer.decode(ids)
    m = ANSWER_LINE.search(text)
    if m is None:
        return len(ids)
    want, have = len(text[:m.end()].encode()), 0  # bytes up to the end of the line
    for j, i in enumerate(ids):
        have += len(tokenizer.token_bytes(i))
        if have >= want:
            return j + 1
    return len(ids)


@torch.no_grad()
def greedy_generate(model, prompts, stop, max_new_tokens, dtype, check_every=16):
    """Greedy continuations of prompts (lists of ids) in one left-padded batch, a token a step (a CUDA
    graph on a GPU) until `stop` (a StopRule) ends every row: the plain form of sample.py's Sampler."""
    p = next(model.parameters())
    dev, b, l = p.device, len(prompts), max(map(len, prompts))
    pad = torch.tensor([l - len(x) for x in prompts], device=dev)  # (b,)
    idx = torch.tensor([[0] * (l - len(x)) + list(x) for x in prompts], device=dev)  # (b, l)
    cache = model.allocate_cache(b, l + max_new_tokens, dtype, dev)
    amp = torch.autocast(dev.type, dtype=dtype, enabled=dtype != p.dtype, cache_enabled=False)
    tok = torch.zeros(b, 1, dtype=torch.long, device=dev)  # (b, 1) the token a step feeds in
    t = torch.zeros((), dtype=torch.long, device=dev)  # and its cache slot, on the device

    def step():  # every row's next token: the forward at slot t, then the greedy choice
        with amp:
            return model(tok, cache, start=t, pad=pad)[:, -1].argmax(-1)  # (b,)

    graph = None
    if dev.type == "cuda":  # one replay per step instead of hundreds of kernel launches
        t.fill_(l + max_new_tokens - 1)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            step()  # a warm-up outside the capture
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            nxt = step()
        for x in (x for layer in cache for x in layer):  # the warm-up wrote to the cache: start clean
            x.zero_()
    phase, end = torch.zeros(b, dtype=torch.long, device=dev), torch.zeros(b, dtype=torch.long, device=dev)
    done = torch.zeros(b, dtype=torch.bool, device=dev)
    with amp:
        out = [model.lm_head(model(idx, cache, start=0, pad=pad, return_hidden=True)[:, -1]).argmax(-1)]  # [(b,)]
    for i in range(max_new_tokens):
        stop.update(out[-1], torch.tensor(i, device=dev), phase, done, end)
        if i + 1 == max_new_tokens or (stop.active and i % check_every == 0 and bool(done.all())):
            break
        tok[:, 0] = out[-1]
        t.fill_(l + i)
        if graph is None:
            out.append(step())
        else:
            graph.replay()
            out.append(nxt.clone())
    rows = torch.stack(out, 1).tolist()  # (b, steps)
    return [r[:k] for r, k in zip(rows, torch.where(done, end, len(out)).tolist())]


# -----------------------------------------------------------------------------
# Appendix E. The command line: one dataclass, a flag per field, presets


@dataclass
class DistillConfig:
    out_dir: str = flag("out", "where data, models, checkpoints, logs and the summary go")
    preset: str = flag("default", "default (minutes on one GPU), smoke (a quick GPU check) or tiny (seconds, CPU)",
                       choices=("default", "smoke", "tiny"))
    fresh: bool = flag(False, "start over: first remove what an earlier run left in out_dir (data, models, logs, ...)")
    resume: bool = flag(False, "continue each unfinished model from its checkpoint, made with the same settings "
                               "(log_every, held_out_every, ckpt_every, eval_n, max_new_tokens, students and "
                               "random_baseline may differ: they change no model)")
    teacher: str = flag("", "a local HF Llama directory; empty = train a small teacher on the data first")
    data: str = flag("", "a GSM8K-format jsonl to train on; empty = the synthetic task, written to out_dir/data")
    test_data: str = flag("", "a GSM8K-format jsonl for the greedy accuracy; empty = the synthetic test split")
    device: str = flag("auto", "auto, cuda or cpu", choices=("auto", "cuda", "cpu"))
    seed: int = flag(0, "seed of the data, the initialisation and the batch order", at_least=0)
    deterministic: bool = flag(False, "kernels that add in a fixed order (PyTorch's deterministic algorithms, strict: "
                                      "an op without one stops the run; a fixed cuBLAS workspace), for GPU reruns "
                                      "that repeat a run bit for bit; by default the order of the GPU's additions "
                                      "varies between runs. May be slower")
    # synthetic data and the default teacher
    task: str = flag("relay", "synthetic task: relay (long chains of thought, about 2,000 solution tokens) or "
                              "short (GSM8K-sized, 60-200 tokens)", choices=tuple(TASKS))
    min_steps: int = flag(0, "difficulty: fewest turns (relay) or arithmetic steps (short) per problem; 0 = the "
                             "task's default (2)", at_least=0)
    max_steps: int = flag(0, "difficulty: most turns (relay) or steps (short) per problem; 0 = the task's default "
                             "(relay 10, short 8)", at_least=0)
    digits: int = flag(4, "relay: digits of the starting amounts", at_least=2, at_most=len(COLUMNS) - 1)
    slip: float = flag(0.25, "relay: chance that a training solution rounds a turn's tenth up (a mistake the rest of "
                             "the solution follows); a teacher learns to slip at that rate when sampled, so single "
                             "samples fail and more samples help. Test solutions never slip", at_least=0, at_most=1)
    cast: int = flag(3, "relay: the people are drawn from this many names (0 = all 28); 3 = always the same three in "
                        "the same order, so that a solution's names follow from the turn instead of being copied "
                        "from the question (a recall the answer never needs, which a teacher may learn late)",
                     at_least=0, at_most=len(NAMES))
    n_train: int = flag(20000, "synthetic training problems", at_least=1)
    n_test: int = flag(500, "synthetic test problems", at_least=1)
    vocab_size: int = flag(1024, "base BPE vocabulary of the project's tokenizer (+ 256 specials)", at_least=256)
    d_model: int = flag(384, "default teacher: hidden size", at_least=2)
    n_layers: int = flag(8, "default teacher: layers", at_least=1)
    n_heads: int = flag(6, "default teacher: query heads (head dim = d_model / n_heads)", at_least=1)
    n_kv_heads: int = flag(2, "default teacher: key/value heads (GQA, as in Llama 3.2)", at_least=1)
    d_ff: int = flag(1024, "default teacher: MLP width", at_least=1)
    teacher_steps: int = flag(3000, "default teacher: training steps", at_least=1)
    teacher_lr: float = flag(2e-3, "default teacher: peak learning rate", above=0)
    # students
    students: str = flag("hybrid,pure", "students to distil: hybrid and/or pure (comma-separated; empty = none)")
    attn_fraction: float = flag(HYBRID_ATTN_FRACTION, "share of attention layers a hybrid keeps, spread over depth",
                                at_least=0, at_most=1)
    attn_layers: str = flag("", "the layers a hybrid keeps as attention, comma-separated (as MambaInLlama's "
                                "attn_layers); empty = a share --attn_fraction spread over depth")
    init: str = flag("attention", "attention (MambaInLlama transfer) or random mixers", choices=("attention", "random"))
    conv_init: str = flag("identity", "transferred mixers' conv: identity (B, C, x start as silu of the teacher's "
                                      "K, Q, V) or mamba2 (random, as in MambaInLlama)", choices=("identity", "mamba2"))
    random_baseline: str = flag("pure", "also distil this student from random mixers, the baseline that shows what "
                                        "the transfer is worth (empty = no baseline); a hybrid's attention layers can "
                                        "do its random mixers' work", choices=("", "hybrid", "pure"))
    orient_steps: int = flag(0, "stage 0: steps matching each mixer's matrix to its attention matrix (MOHAWK's "
                                "matrix orientation; 0 = skip)", at_least=0)
    orient_lr: float = flag(1e-3, "stage 0: peak learning rate", above=0)
    orient_len: int = flag(512, "stage 0: the (l, l) matrices cover this many first tokens of a sequence", at_least=1)
    align_steps: int = flag(0, "stage 1: layer-wise mixer alignment steps (MOHAWK's hidden-state alignment; 0 = "
                               "skip). Off by default, as in MambaInLlama: transferred mixers learn as well "
                               "without it, and it teaches random mixers what the transfer would have given "
                               "them", at_least=0)
    align_lr: float = flag(2e-3, "stage 1: peak learning rate", above=0)
    kl_steps: int = flag(1400, "stage 2: end-to-end distillation steps on the teacher's logits (0 = skip)", at_least=0)
    pure_kl_factor: float = flag(1.5, "stage 2 of a pure student runs this many times --kl_steps: with no attention "
                                      "left to copy with, it learns the task's copies, and when to stop, later than "
                                      "a hybrid", above=0)
    kl_lr: float = flag(1e-3, "stage 2: peak learning rate", above=0)
    kl: str = flag("forward", "stage 2: forward KL(teacher || student) or reverse KL(student || teacher)",
                   choices=("forward", "reverse"))
    temperature: float = flag(1.0, "stage 2: softmax temperature of both models (loss scaled by T^2)", above=0)
    kl_trains: str = flag("all", "stage 2 trains all parameters, or the mixers alone (the rest stays the "
                                 "teacher's, as in MambaInLlama's distillation)", choices=("all", "mixers"))
    sft_steps: int = flag(0, "stage 3: supervised fine-tuning steps on the solutions (0 = skip)", at_least=0)
    sft_lr: float = flag(3e-4, "stage 3: peak learning rate", above=0)
    # optimisation (shared by every stage)
    batch_size: int = flag(16, "sequences per optimizer step (over all GPUs and accumulation steps)", at_least=1)
    grad_accum: int = flag(1, "micro-batches per optimizer step", at_least=1)
    seq_len: int = flag(4096, "most tokens of a training sequence (longer examples are cut); a batch holds examples "
                              "of similar length and is padded only to its longest", at_least=16)
    warmup: float = flag(0.05, "share of each stage spent warming up the learning rate", at_least=0, at_most=1)
    weight_decay: float = flag(0.1, "AdamW weight decay (matrices only)", at_least=0)
    grad_clip: float = flag(1.0, "clip the gradient norm to this", above=0)
    log_every: int = flag(25, "steps between progress lines", at_least=1)
    held_out_every: int = flag(250, "steps between held-out losses: each stage's loss on the last test problems "
                                    "(one micro-batch of them), which no stage trains on (0 = none)", at_least=0)
    ckpt_every: int = flag(500, "steps between checkpoints (0 = only at the end of a stage)", at_least=0)
    eval_n: int = flag(200, "test problems for the greedy accuracy of each model (0 = skip)", at_least=0)
    max_new_tokens: int = flag(0, "generation limit when evaluating; 0 = the longest test solution + 25%", at_least=0)
    bench: bool = flag(False, "measure distillation throughput at the Llama-3.2-1B shape and exit")
    compile: bool = flag(False, "torch.compile (GPU only) the student's forward in stages 2 and 3 (stage 1 calls the "
                                "mixers directly) and the teacher's in stage 2; about a minute per model to compile")


PRESETS = {  # fields that a preset changes, unless the command line set them
    "default": {},
    "smoke": dict(n_train=4000, n_test=200, teacher_steps=300, kl_steps=120,
                  eval_n=100, d_model=256, n_layers=6, n_heads=4, d_ff=768, ckpt_every=0, max_steps=6),
    "tiny": dict(task="short", n_train=64, n_test=8, vocab_size=300, d_model=32, n_layers=4, n_heads=2, n_kv_heads=1,
                 d_ff=64, teacher_steps=4, align_steps=2, kl_steps=3, sft_steps=2, batch_size=4, grad_accum=2,
                 seq_len=320, eval_n=2, max_new_tokens=8, log_every=1, ckpt_every=2)}


# --bench: 16 x 2048 tokens a step per GPU in 4 micro-batches (weak scaling), compiled
BENCH = dict(batch_size=16, seq_len=2048, grad_accum=4, compile=True)


def apply_preset(cfg: DistillConfig, argv) -> DistillConfig:
    """The preset's values for the fields the command line did not set; the task's default steps for 0."""
    bench = dict(BENCH, batch_size=BENCH["batch_size"] * int(os.environ.get("WORLD_SIZE", 1)))
    preset = dict(PRESETS[cfg.preset], **(bench if cfg.bench else {}))
    given = {a[2:].split("=")[0] for a in argv if a.startswith("--")}  # parse_config allows no abbreviations
    cfg = replace(cfg, **{k: v for k, v in preset.items() if k not in given})
    _, lo, hi = TASKS[cfg.task]
    return replace(cfg, min_steps=cfg.min_steps or lo, max_steps=cfg.max_steps or hi)


def check_out_dir(path):
    """--out_dir must be, or be creatable inside, a writable directory."""
    parent = path
    while not os.path.exists(parent):
        parent = os.path.dirname(os.path.abspath(parent))
    if not os.path.isdir(parent) or not os.access(parent, os.W_OK | os.X_OK):
        raise InputError(f"--out_dir {path}: {parent} is not a writable directory")


def parse_layers(text, n_layers):
    """--attn_layers: '2,6' -> [2, 6], each a layer of an n_layers model; '' -> None."""
    if not text.strip():
        return None
    try:
        layers = sorted({int(v) for v in text.split(",")})
    except ValueError:
        raise InputError(f"--attn_layers {text!r}: expected comma-separated layer numbers, e.g. 2,6") from None
    if layers[0] < 0 or layers[-1] >= n_layers:
        raise InputError(f"--attn_layers {text!r}: layers are numbered 0 to {n_layers - 1}")
    return layers


def check_config(cfg: DistillConfig):
    """Bad flags, sizes that do not fit together, missing files: one line each, before any work."""
    check_bounds(cfg)
    unknown = set(filter(None, cfg.students.split(","))) - {"hybrid", "pure"}
    if unknown:
        raise InputError(f"--students: unknown {sorted(unknown)} (expected hybrid and/or pure)")
    world = int(os.environ.get("WORLD_SIZE", 1))
    if cfg.batch_size % (world * cfg.grad_accum):
        raise InputError(f"--batch_size {cfg.batch_size} must be a multiple of --grad_accum ({cfg.grad_accum}) "
                         f"x the number of processes ({world})")
    if cfg.min_steps > cfg.max_steps:
        raise InputError(f"--min_steps {cfg.min_steps} is more than --max_steps {cfg.max_steps}")
    if cfg.task == "relay" and 0 < cfg.cast < RELAY_PEOPLE:
        raise InputError(f"--cast {cfg.cast}: a relay problem has {RELAY_PEOPLE} people (0 = all names, or at least "
                         f"{RELAY_PEOPLE})")
    if not cfg.teacher and (cfg.d_model % cfg.n_heads or (cfg.d_model // cfg.n_heads) % 2 or cfg.n_heads % cfg.n_kv_heads):
        raise InputError(f"--d_model {cfg.d_model} must split into --n_heads {cfg.n_heads} heads of an even size, and "
                         f"--n_heads be a multiple of --n_kv_heads {cfg.n_kv_heads}")
    check_out_dir(cfg.out_dir)
    for name in ("data", "test_data"):
        path = getattr(cfg, name)
        if path and not os.path.isfile(path):
            raise InputError(f"--{name} {path}: no such file")
    if cfg.teacher:
        mcfg = read_config(cfg.teacher)
        if mcfg.ssm_layers:
            raise InputError(f"--teacher {cfg.teacher}: a student (Mamba layers {mcfg.ssm_layers}), not a Llama teacher")
        check_tokenizer_fits(Tokenizer(find_tokenizer(cfg.teacher)), mcfg, cfg.teacher)
    parse_layers(cfg.attn_layers, mcfg.num_hidden_layers if cfg.teacher else cfg.n_layers)


# -----------------------------------------------------------------------------
# Appendix F. Benchmark: distillation throughput at the Llama-3.2-1B shape (random weights)

LLAMA3_ROPE = {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192}
SHAPES = {  # Meta's config.json values of Llama 3.2 1B and 3B, and the default run's small teacher
    "llama-3.2-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                         num_key_value_heads=8, head_dim=64),
    "llama-3.2-3b": dict(hidden_size=3072, intermediate_size=8192, num_hidden_layers=28, num_attention_heads=24,
                         num_key_value_heads=8, head_dim=128),
    "default": dict(hidden_size=384, intermediate_size=1024, num_hidden_layers=8, num_attention_heads=6,
                    num_key_value_heads=2, head_dim=64, vocab_size=1280, rope_theta=10000.0, rope_scaling=None,
                    max_position_embeddings=16384)}


def shape_config(shape, kind="teacher", attn_fraction=HYBRID_ATTN_FRACTION) -> ModelConfig:
    """The config of a SHAPES entry as a teacher, hybrid or pure student."""
    if shape not in SHAPES:
        raise InputError(f"unknown model shape {shape!r} (known: {', '.join(SHAPES)})")
    llama = dict(vocab_size=128256, rope_theta=500000.0, rope_scaling=LLAMA3_ROPE, max_position_embeddings=131072)
    cfg = ModelConfig(tie_word_embeddings=True, **{**llama, **SHAPES[shape]})
    if kind not in ("teacher", "hybrid", "pure"):
        raise InputError(f"unknown model kind {kind!r} (teacher, hybrid, pure)")
    return replace(cfg, ssm_layers=[] if kind == "teacher" else student_layers(kind, cfg.num_hidden_layers, attn_fraction))


BF16_PEAK = {"H100": 989e12, "H200": 989e12, "A100": 312e12}  # dense bf16 FLOP/s, vendor datasheets


class RandomBatches:
    """Batches.get's interface over random tokens (the benchmark needs no data)."""

    def __init__(self, vocab, seq_len):
        self.vocab, self.seq_len = vocab, seq_len

    def get(self, stage, step, batch, rank=0, world=1, micro=0, n_micro=1):
        per = batch // (world * n_micro)
        ids = torch.randint(0, self.vocab, (per, self.seq_len + 1))  # (b, l+1)
        return ids[:, :-1], ids[:, 1:], torch.ones(per, self.seq_len), per * self.seq_len


def bench(cfg, env, warmup=2, steps=8):
    if env.device.type != "cuda":
        raise InputError("--bench needs a CUDA GPU")
    path = os.path.join(cfg.out_dir, "bench", "distill.json")
    if env.main and os.path.exists(path):
        raise InputError(f"{path} exists (an earlier benchmark): use another --out_dir, or delete it")
    mcfg = shape_config("llama-3.2-1b")
    torch.manual_seed(0)
    teacher = LM(mcfg).to(env.device, torch.bfloat16).eval().requires_grad_(False)
    name = device_name(env.device)
    peak = next((v for k, v in BF16_PEAK.items() if k in name), None)
    batches = RandomBatches(mcfg.vocab_size, cfg.seq_len)
    results = []
    for kind in filter(None, cfg.students.split(",")):
        ssm = student_layers(kind, mcfg.num_hidden_layers, cfg.attn_fraction)
        student = transfer_attention_to_mamba(teacher, ssm).float().to(env.device).train()
        loss_fn = kl_loss_fn(compiled(teacher, cfg, env), "forward", 1.0)
        torch.cuda.reset_peak_memory_stats(env.device)
        for n in (warmup, steps):  # the warm-up (compiling, autotuning), then the timed steps
            torch.cuda.synchronize(env.device)
            t0 = time.time()
            run_stage("kl", student, loss_fn, n, 1e-5, cfg, env, batches, None)
        torch.cuda.synchronize(env.device)
        tok_s = steps * cfg.batch_size * cfg.seq_len / (time.time() - t0)  # all GPUs together
        # FLOPs per token; the embeddings are tied, so every parameter is in one matmul (lm_head's included)
        flops = 6 * student.num_params() + 2 * teacher.num_params()
        mfu = flops * tok_s / env.world / peak if peak else float("nan")
        mem = torch.cuda.max_memory_allocated(env.device) / 2**30
        results.append({"student": kind, "tokens_per_s": tok_s, "mfu": mfu, "peak_mem_GiB": mem, "compile": cfg.compile,
                        "gpus": env.world, "batch": cfg.batch_size, "seq_len": cfg.seq_len, "ssm_layers": ssm})
        if env.main:
            print(f"{name} x{env.world}: {kind:>6} student ({'compiled' if cfg.compile else 'eager'}), "
                  f"batch {cfg.batch_size}x{cfg.seq_len} in {cfg.grad_accum} micro-batches: "
                  f"{tok_s:,.0f} tok/s, MFU {mfu:.1%} (6N_s+2N_t), peak memory {mem:.1f} GiB/GPU")
        del student
        torch.cuda.empty_cache()
    if env.main:  # next to sample.py's decode.json, for the record
        write_json(path, {"device": name, "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"),
                          "shape": "llama-3.2-1b", "flops_per_token": "6 N_student + 2 N_teacher", "peak_flops": peak,
                          "results": results})
    if env.world > 1:
        dist.destroy_process_group()
    return results


if __name__ == "__main__":
    run_cli(main, TrainingError)
