"""
Distil a Llama 3 teacher into hybrid and pure Mamba students ("Thinking Slow, Fast", Paliotta et al. 2025).

What is in this file, top to bottom:
  1. the model: one `LM` class that is a Llama 3 decoder when every layer keeps attention (the
     teacher) and a Mamba / hybrid student when some layers' attention became a Mamba-2 mixer;
  2. checkpoint files: HF-format directories (config.json + safetensors + a tiktoken BPE file);
  3. attention -> SSM weight transfer (MambaInLlama / MOHAWK): an explicit mapping table;
  4. files: the tokenizer (tiktoken BPE with Llama 3's specials), safetensors, the synthetic
     GSM8K-style reasoning set and GSM8K jsonl reading;
  5. the command line: one config dataclass, flags generated from it;
  6. the training loop every stage shares (accumulation, DDP, checkpoints, resume, NaN stop);
  7. the pipeline: data -> teacher -> students (1 align, 2 KL, 3 SFT) -> greedy accuracy;
  8. the distillation-throughput benchmark.

Run:
  python mamba_distill.py               # default: makes data, trains a small teacher, distils students
  python mamba_distill.py --help        # every option of the config below
  python mamba_distill.py --teacher /path/to/Llama-3.2-1B-Instruct --data gsm8k/train.jsonl
  torchrun --nproc_per_node=2 mamba_distill.py   # the same run over 2 GPUs (DDP)
  python mamba_distill.py --bench       # distillation throughput at the Llama-3.2-1B shape (compiled)
  torchrun --nproc_per_node=2 mamba_distill.py --bench   # the same per GPU, on 2 GPUs: the scaling

Outputs, under --out_dir (default out/), read by sample.py and plot_scaling.py:
  data/train.jsonl, data/test.jsonl     the synthetic problems (GSM8K format)
  tokenizer.model                       the project's own BPE (tiktoken format), default run only
  teacher/, hybrid/, pure/, pure_random/   HF-style model directories: config.json,
                                        model.safetensors, tokenizer.model
  logs/<model>.jsonl                    one line per logged step: model, init, stage, step, loss, lr,
                                        tokens, time_s (wall seconds since that model's run began)
  ckpt/<model>/                         the latest checkpoint (+ optimizer.safetensors, state.json)
  distill_summary.json                  greedy accuracy, parameters and stage wall times per model
  bench/distill.json                    --bench: tokens/s, MFU, peak memory, compile, gpus, batch per student

Glossary (letters in shape comments):
  b  batch                          l  sequence length (tokens)
  d  model width (hidden_size)      f  MLP width (intermediate_size)
  h  query heads = SSM heads        k  key/value heads (GQA groups); r = h // k heads per group
  e  head dim (Llama) = p = n       p  SSM head dim (size of x per head)
  n  SSM state dim (size of B, C)   w  conv kernel width (d_conv)
  s  cache slots (max sequence length of a KV cache)   v  vocabulary size

Attention -> Mamba (a mixer replaces self_attn in layer i; everything else is copied):
  teacher tensor                      student tensor                    why
  self_attn.q_proj.weight  (h*e, d) -> mixer.in_proj.weight[C rows]     queries read the state: C_t
  self_attn.k_proj.weight  (k*e, d) -> mixer.in_proj.weight[B rows]     keys write the state:   B_t
  self_attn.v_proj.weight  (k*e, d) -> mixer.in_proj.weight[x rows]     values are what is written: x_t
  self_attn.o_proj.weight  (d, h*e) -> mixer.out_proj.weight            same output projection
With no decay (A = 0), dt = 1, identity conv, no gate and D = 0 the mixer computes exactly causal
*linear* attention y_t = sum_{s<=t} (C_t . B_s) x_s: softmax attention without softmax and RoPE.
"""
import argparse
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
from dataclasses import MISSING, asdict, dataclass, field, fields, replace

import regex  # installed with tiktoken, which splits text with it too
import tiktoken
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

from scan_kernel import (conv_step, conv_step_ref, decode_attention, fused_kl_div, kl_div_ref, ring_rows,
                         ssd_scan, ssd_scan_chunked_torch, ssd_step, ssd_step_ref)


class InputError(Exception):
    """Bad user input (a file, a flag, a config). The message is one line naming what is wrong."""


# -----------------------------------------------------------------------------
# 1. The model


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
        known = {f.name for f in fields(cls)}
        cfg = cls(**{k: v for k, v in d.items() if k in known})
        if "head_dim" not in d or d["head_dim"] is None:  # older Llama configs leave it implicit
            cfg.head_dim = cfg.hidden_size // cfg.num_attention_heads
        if cfg.num_attention_heads % cfg.num_key_value_heads:
            raise InputError(f"{path}: num_attention_heads={cfg.num_attention_heads} is not a multiple "
                             f"of num_key_value_heads={cfg.num_key_value_heads}")
        bad = [i for i in cfg.ssm_layers if not 0 <= i < cfg.num_hidden_layers]
        if bad:
            raise InputError(f"{path}: ssm_layers {bad} outside 0..{cfg.num_hidden_layers - 1}")
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
    def __init__(self, dim, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        x32 = x.float()  # normalise in fp32, as Llama does, then cast back before the weight
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


def rope_inv_freq(cfg: ModelConfig) -> torch.Tensor:
    """Rotary frequencies (e/2,) in fp32 on the CPU, with Llama 3's long-context rescaling when
    rope_scaling asks for it."""
    e = cfg.head_dim
    inv_freq = 1.0 / cfg.rope_theta ** (torch.arange(0, e, 2, dtype=torch.float32, device="cpu") / e)  # (e/2,)
    rs = cfg.rope_scaling
    if not rs or rs.get("rope_type", rs.get("type")) in (None, "default"):
        return inv_freq
    if rs.get("rope_type", rs.get("type")) != "llama3":
        raise InputError(f"config.json: rope_scaling type {rs.get('rope_type')!r} is not supported (llama3 only)")
    # Llama 3.1: slow (long-wavelength) frequencies are divided by `factor`, fast ones kept, and the
    # band in between interpolated smoothly, so the model sees longer contexts as it saw 8k.
    factor, lo, hi, old = rs["factor"], rs["low_freq_factor"], rs["high_freq_factor"], rs["original_max_position_embeddings"]
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
    """Grouped-query attention with an optional preallocated KV cache."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.h, self.k, self.e = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        d = cfg.hidden_size
        self.q_proj = nn.Linear(d, self.h * self.e, bias=False)
        self.k_proj = nn.Linear(d, self.k * self.e, bias=False)
        self.v_proj = nn.Linear(d, self.k * self.e, bias=False)
        self.o_proj = nn.Linear(self.h * self.e, d, bias=False)
        self.qkv_sizes = [self.h * self.e, self.k * self.e, self.k * self.e]  # rows of q, k, v
        self.qkv = None  # (h*e + 2*k*e, d) once fuse_qkv() has run: q, k, v weights in one tensor

    def fuse_qkv(self):
        """For decoding: keep q_proj, k_proj and v_proj's weights in one (h*e + 2*k*e, d) tensor and make
        the three parameters views of it, so that a forward without gradients runs one GEMM, not three
        (the 1B teacher's decode step at batch 256 on an H100: 1.32 ms of GEMMs, 1.48 ms unfused, in
        profiles of two calls; three narrow products get small tiles that leave SMs idle). Names and
        state_dict stay HF's. The storage is shared, so in-place writes (load_state_dict
        without assign, an optimizer step) reach the fused weight; model.to() fuses again (_apply); a
        parameter given new storage some other way sends forward back to three GEMMs (_fused_qkv)."""
        w = torch.cat([self.q_proj.weight, self.k_proj.weight, self.v_proj.weight]).detach()  # (h*e + 2*k*e, d)
        for proj, part in zip((self.q_proj, self.k_proj, self.v_proj), w.split(self.qkv_sizes)):
            proj.weight.data = part
        self.qkv = w

    def _qkv_intact(self):
        """Whether q_proj, k_proj and v_proj still live in self.qkv, at their rows."""
        row, start = self.qkv.stride(0) * self.qkv.element_size(), self.qkv.data_ptr()
        for proj, rows in zip((self.q_proj, self.k_proj, self.v_proj), self.qkv_sizes):
            if proj.weight.data_ptr() != start:
                return False
            start += rows * row
        return True

    def _apply(self, fn, *args, **kwargs):
        super()._apply(fn, *args, **kwargs)
        if self.qkv is not None and not self._qkv_intact():  # .to() gave the parameters new storage
            self.fuse_qkv()
        return self

    def _fused_qkv(self):
        """self.qkv while q_proj, k_proj and v_proj still live in it and no gradient is needed (the
        parameters, not the fused tensor, are what autograd trains), else None."""
        if self.qkv is None or torch.is_grad_enabled():
            return None
        if torch.compiler.is_compiling():  # data_ptr() would break the graph; the Sampler checks instead
            return self.qkv
        if not self._qkv_intact():  # re-bound (e.g. load_state_dict(..., assign=True)): the copy is stale
            self.qkv = None
        return self.qkv

    def forward(self, x, rope, cache=None, ctx=None):
        b, l, _ = x.shape
        w = self._fused_qkv()
        if w is None:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)  # (b, l, h*e), (b, l, k*e), (b, l, k*e)
        else:
            q, k, v = F.linear(x, w).split(self.qkv_sizes, dim=-1)  # the same, from one GEMM
        q = q.view(b, l, self.h, self.e).transpose(1, 2)  # (b, h, l, e)
        k = k.view(b, l, self.k, self.e).transpose(1, 2)  # (b, k, l, e)
        v = v.view(b, l, self.k, self.e).transpose(1, 2)  # (b, k, l, e)
        q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        if cache is None:  # training / plain forward: causal over this sequence only
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)  # (b, h, l, e)
        else:
            k_cache, v_cache = cache  # (b, k, s, e) each, written in place at slots ctx.slots
            k_cache.index_copy_(2, ctx.slots, k.to(k_cache.dtype))
            v_cache.index_copy_(2, ctx.slots, v.to(v_cache.dtype))
            kv = ctx.kv_len
            if ctx.mask is None:  # GPU decode: flash-decoding kernel, reads only slots pad..t of each row
                # in the cache's dtype, as autocast would give SDPA (an fp32 model under bf16 autocast
                # has an fp32 q here: RoPE's product with the fp32 embedding stream promotes it)
                q = q.view(b, self.h, self.e).to(k_cache.dtype)  # (b, h, e)
                y = decode_attention(q, k_cache, v_cache, ctx.slots, ctx.pad)  # (b, h, e)
                y = y.view(b, self.h, 1, self.e)  # (b, h, 1, e)
            elif l == 1:
                # Decode on a CPU: fold the r query heads of a group into the "query length" so that every
                # backend reads each cached key once, with no repeat of the cache (r, e per group).
                qg = q.view(b, self.k, self.h // self.k, self.e)  # (b, k, r, e)
                y = F.scaled_dot_product_attention(qg, k_cache[:, :, :kv], v_cache[:, :, :kv],
                                                   attn_mask=ctx.mask)  # (b, k, r, e)
                y = y.reshape(b, self.h, 1, self.e)  # (b, h, 1, e)
            else:
                y = F.scaled_dot_product_attention(q, k_cache[:, :, :kv], v_cache[:, :, :kv],
                                                   attn_mask=ctx.mask, enable_gqa=True)  # (b, h, l, e)
        return self.o_proj(y.transpose(1, 2).reshape(b, l, self.h * self.e))  # (b, l, d)


class MambaMixer(nn.Module):
    """Mamba-2 mixer in MambaInLlama's layout, shaped so the teacher's attention weights fit:
    h SSM heads (= query heads), head dim p = state dim n = e; x and B come from the k key/value
    heads and are shared by the r query heads of their group (GQA), C is per head.

    in_proj rows: [z (h*p) | x (k*p) | B (k*n) | C (h*n) | dt (h)]
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.h, self.k, self.p = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.n, self.w = cfg.head_dim, cfg.d_conv
        d, hp, kp = cfg.hidden_size, self.h * self.p, self.k * self.p
        self.sizes = {"z": hp, "x": kp, "B": kp, "C": hp, "dt": self.h}  # in_proj row blocks, in order
        self.conv_dim = kp + kp + hp  # the conv runs over [x | B | C], as in Mamba-2
        self.in_proj = nn.Linear(d, sum(self.sizes.values()), bias=False)
        self.conv1d = nn.Conv1d(self.conv_dim, self.conv_dim, self.w, groups=self.conv_dim,
                                padding=self.w - 1)  # depthwise, causal once we trim the right side
        self.dt_bias = nn.Parameter(torch.zeros(self.h))
        self.A_log = nn.Parameter(torch.zeros(self.h))
        self.D = nn.Parameter(torch.ones(self.h))
        self.norm = RMSNorm(hp, cfg.rms_norm_eps)  # gated RMSNorm, one group per head
        self.out_proj = nn.Linear(hp, d, bias=False)
        # switches for the linear-attention identity test; always on in real use
        self.conv_act = True
        self.gate = True
        self.reset_ssm_parameters()

    @torch.no_grad()
    def reset_ssm_parameters(self, dt_min=1e-3, dt_max=0.1, a_min=1.0, a_max=16.0):
        """Mamba-2's initialisation for what attention does not have (also MambaInLlama's):
        dt log-uniform in [dt_min, dt_max] (stored through softplus^-1), decay rates A in [1, 16]
        (stored as log), D = 1 and a unit norm; conv and z keep PyTorch's default uniform init."""
        dt = torch.exp(torch.rand(self.h) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
        self.dt_bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # softplus(dt_bias) == dt
        self.A_log.copy_(torch.log(torch.empty(self.h).uniform_(a_min, a_max)))
        self.D.fill_(1.0)
        self.norm.weight.fill_(1.0)

    def rows(self, name) -> slice:
        """The rows of in_proj.weight that produce z, x, B, C or dt."""
        start = 0
        for key, size in self.sizes.items():
            if key == name:
                return slice(start, start + size)
            start += size
        raise KeyError(name)

    def forward(self, u, cache=None, ctx=None):
        b, l, _ = u.shape
        z, xBC, dt = torch.split(self.in_proj(u), [self.sizes["z"], self.conv_dim, self.h], dim=-1)  # (b, l, h*p), (b, l, conv_dim), (b, l, h)
        if ctx is not None and ctx.valid is not None:
            # left padding must leave no trace: a zero conv input looks like "before the start",
            # and dt = 0 means the state neither decays nor receives anything (exp(0) = 1).
            xBC = xBC * ctx.valid[..., None].to(xBC.dtype)  # (b, l, conv_dim)
        if cache is not None and l == 1:
            return self._step(z, xBC, dt, cache, ctx.slots)
        xBC_t = xBC.transpose(1, 2)  # (b, conv_dim, l)
        if cache is not None:  # continue from the previous chunk's last w-1 inputs (see _step's ring)
            conv_state, r = cache[0], self.w - 1  # (b, w-1, conv_dim)
            past = conv_state.index_select(1, ring_rows(ctx.slots[:1], r))  # (b, w-1, conv_dim) oldest first
            xBC_t = torch.cat([past.transpose(1, 2).to(xBC_t.dtype), xBC_t], dim=-1)  # (b, conv_dim, w-1+l)
            last = xBC_t[:, :, -r:].transpose(1, 2).to(conv_state.dtype)  # (b, w-1, conv_dim) the last w-1 inputs
            conv_state.index_copy_(1, ring_rows(ctx.slots[-1:] + 1, r), last)  # where the next step looks
            xBC = F.conv1d(xBC_t, self.conv1d.weight, self.conv1d.bias, groups=self.conv_dim)  # (b, conv_dim, l)
        else:
            xBC = self.conv1d(xBC_t)[..., :l]  # (b, conv_dim, l): keep the causal outputs
        xBC = xBC.transpose(1, 2)  # (b, l, conv_dim)
        if self.conv_act:
            xBC = F.silu(xBC)
        x, B, C = torch.split(xBC, [self.k * self.p, self.k * self.n, self.h * self.n], dim=-1)  # (b, l, k*p), (b, l, k*n), (b, l, h*n)
        r = self.h // self.k
        x = x.view(b, l, self.k, self.p).repeat_interleave(r, dim=2)  # (b, l, h, p) shared in a group
        B = B.view(b, l, self.k, self.n).repeat_interleave(r, dim=2)  # (b, l, h, n)
        C = C.reshape(b, l, self.h, self.n)  # (b, l, h, n)
        dt = F.softplus(dt.float() + self.dt_bias.float())  # (b, l, h) > 0
        if ctx is not None and ctx.valid is not None:
            dt = dt * ctx.valid[..., None]
        A = -torch.exp(self.A_log.float())  # (h,) < 0: a decay per head
        state = None if cache is None else cache[1]  # (b, h, p, n)
        if x.is_cuda:  # the Triton kernels (scan_kernel.py)
            y, final = ssd_scan(x, dt, A, B, C, self.D.float(), initial_state=state, return_final_state=True)
        else:  # the same chunked algorithm in plain PyTorch: ~15x faster on a CPU than the sequential spec
            y, final = ssd_scan_chunked_torch(x, dt, A, B, C, self.D.float(), initial_state=state)
        if cache is not None:  # y (b, l, h, p), final (b, h, p, n)
            cache[1].copy_(final)
        return self._out(y.reshape(b, l, -1), z)

    def _step(self, z, xBC, dt, cache, slot):
        """One decode token at cache slot `slot` ((1,) long): the conv, then one SSM recurrence step,
        both updating the cache in place.

        The conv state is a ring of the last w-1 inputs: slot s's input sits in row s % (w-1), so a
        step writes one row (over the oldest input) instead of shifting the window, and reads rows
        ring_rows(t) = (t + j) % (w-1), j = 0..w-2, to get slots t-w+1..t-1 in order (the
        causal-conv1d package's causal_conv1d_update offers the same circular layout). Channels
        last: contiguous rows."""
        conv_state, ssm_state = cache  # (b, w-1, conv_dim), (b, h, p, n)
        b = z.shape[0]
        conv = conv_step if z.is_cuda else conv_step_ref  # the Triton kernel (scan_kernel.py) on GPU
        xBC = conv(conv_state, xBC[:, 0], self.conv1d.weight[:, 0], self.conv1d.bias, slot, self.conv_act)  # (b, conv_dim)
        x, B, C = torch.split(xBC, [self.k * self.p, self.k * self.n, self.h * self.n], dim=-1)  # (b, k*p), (b, k*n), (b, h*n)
        # x and B stay per kv head: the step reads a group's x and B for each of its r heads
        x = x.view(b, self.k, self.p).to(z.dtype)  # (b, k, p)
        B = B.view(b, self.k, self.n).to(z.dtype)  # (b, k, n)
        C = C.view(b, self.h, self.n).to(z.dtype)  # (b, h, n)
        dt = F.softplus(dt[:, 0].float() + self.dt_bias.float())  # (b, h)
        A = -torch.exp(self.A_log.float())  # (h,)
        step = ssd_step if x.is_cuda else ssd_step_ref
        y = step(ssm_state, x, dt, A, B, C, self.D.float())  # (b, h, p)
        return self._out(y.reshape(b, 1, -1), z)

    def _out(self, y, z):
        if self.gate:  # Mamba-2's gated RMSNorm: normalise y * silu(z) (per head group)
            y = y * F.silu(z.to(y.dtype))
            yg = y.float().view(*y.shape[:-1], self.h, self.p)  # (b, l, h, p)
            yg = yg * torch.rsqrt(yg.pow(2).mean(-1, keepdim=True) + self.norm.eps)
            y = self.norm.weight * yg.reshape(y.shape).to(y.dtype)
        return self.out_proj(y.to(self.out_proj.weight.dtype))  # (b, l, d)


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

    def mix(self, h, rope, cache, ctx):
        """The token mixer: attention (teacher layers) or the SSM (converted layers)."""
        if hasattr(self, "mixer"):
            return self.mixer(h, cache, ctx)
        return self.self_attn(h, rope, cache, ctx)

    def forward(self, x, rope, cache=None, ctx=None, collect=None):
        h = self.input_layernorm(x)  # (b, l, d)
        m = self.mix(h, rope, cache, ctx)  # (b, l, d)
        if collect is not None:  # stage-1 alignment needs each mixer's input and output
            collect.append((h, m))
        x = x + m
        return x + self.mlp(self.post_attention_layernorm(x))


class Decoder(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        ssm = set(cfg.ssm_layers)
        self.layers = nn.ModuleList(Block(cfg, i in ssm) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


@dataclass
class StepContext:
    """What every layer needs to read/write a cache at the current positions (built by LM.forward)."""
    slots: torch.Tensor  # (l,) cache slots written by this call
    kv_len: int          # attention reads cache slots [0, kv_len)
    mask: torch.Tensor | None  # (b, 1, l, kv_len) bool, True = may attend; None for a one-token step
                               # on a GPU, where decode_attention masks by pad and slots itself
    valid: torch.Tensor | None  # (b, l) float, 0 at left padding (None when there is none)
    pad: torch.Tensor    # (b,) long, left padding per row: row i's first real slot


class LM(nn.Module):
    """Llama 3 decoder; layers listed in cfg.ssm_layers use a Mamba-2 mixer instead of attention.
    Parameter names are HF's (model.layers.3.self_attn.q_proj.weight, ...) so files load as they are."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.model = Decoder(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        # (e/2,) fp32. A plain attribute, not a buffer: model.to(torch.bfloat16) must not round the
        # frequencies (at position 2047 bf16 rounding moves the angle by radians)
        self.inv_freq = rope_inv_freq(cfg)

    def rope(self, pos, dtype):
        """cos, sin (b, 1, l, e) for integer positions pos (b, l), computed in fp32."""
        if self.inv_freq.device != pos.device:  # moved once, on the first call on a new device
            self.inv_freq = self.inv_freq.to(pos.device)
        ang = pos[..., None].float() * self.inv_freq  # (b, l, e/2)
        ang = torch.cat([ang, ang], dim=-1)[:, None]  # (b, 1, l, e)
        return ang.cos().to(dtype), ang.sin().to(dtype)

    def fuse_qkv(self):
        """Every attention layer's q, k, v projections as one GEMM in forwards without gradients (the
        Sampler calls this; see Attention.fuse_qkv). Returns self."""
        for blk in self.model.layers:
            if hasattr(blk, "self_attn"):
                blk.self_attn.fuse_qkv()
        return self

    def allocate_cache(self, batch, max_len, dtype, device, state_dtype=torch.float32):
        """Per layer: (k, v) (b, k, s, e) for attention, (conv (b, w-1, conv_dim), state (b, h, p, n))
        for a mixer: the last w-1 conv inputs (a ring, see MambaMixer._step) and the SSM state, which is
        fp32 unless state_dtype says otherwise (bf16 halves a pure student's decode traffic)."""
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
                cache.append((torch.zeros(shape, dtype=dtype, device=device),
                              torch.zeros(shape, dtype=dtype, device=device)))
        return cache

    def forward(self, idx, cache=None, start=0, pad=None, collect=None, return_hidden=False):
        """idx (b, l) -> logits (b, l, v).

        Without a cache: positions 0..l-1 and plain causal attention (training).
        With a cache (from allocate_cache): the l tokens go to cache slots start..start+l-1; `start` is
        an int, or a 0-d long tensor for the decode step (l == 1) so that a CUDA graph can replay it.
        pad (b,) long: row i is left-padded with pad[i] tokens; they get no attention and no SSM state,
        and row i's positions count from its first real token.
        """
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
        x = self.model.norm(x)
        if return_hidden:
            return x
        return self.lm_head(x)  # (b, l, v)

    def _context(self, b, l, start, pad, cache, device):
        s = max([kv[0].shape[2] for kv, blk in zip(cache, self.model.layers) if not hasattr(blk, "mixer")] or [0])
        if torch.is_tensor(start):  # decode step (graph-safe: start lives on the device); the CPU mask
            # covers all s slots, the GPU kernel reads pad..t itself
            assert l == 1, "a tensor start is for one-token decode steps"
            slots = start.view(1)  # (1,)
            kv_len = s
        else:
            slots = torch.arange(start, start + l, device=device)  # (l,)
            kv_len = start + l
        pad = torch.zeros(b, dtype=torch.long, device=device) if pad is None else pad
        pos = (slots[None, :] - pad[:, None]).clamp(min=0)  # (b, l) positions from each row's start
        mask = None
        if l > 1 or device.type != "cuda":
            key = torch.arange(max(kv_len, 1), device=device)[:kv_len]  # (kv_len,)
            mask = (key[None, None, :] <= slots[None, :, None]) & (key[None, None, :] >= pad[:, None, None])
            # a padding query sees only itself: a row with nothing to attend to would give NaN, and a
            # NaN value, even masked out later, poisons every real query through 0 * NaN
            mask = (mask | (key[None, None, :] == slots[None, :, None]))[:, None]  # (b, 1, l, kv_len)
        valid = None
        if l > 1 and bool(pad.any()):  # only a prefill can contain padding
            valid = (slots[None, :] >= pad[:, None]).float()  # (b, l)
        return StepContext(slots, kv_len, mask, valid, pad), pos

    def num_params(self):
        return sum(p.numel() for p in self.parameters())


# -----------------------------------------------------------------------------
# 2. Checkpoint directories (HF layout: config.json, model*.safetensors, tokenizer.model)

TOKENIZER_FILES = ("tokenizer.model", "original/tokenizer.model")  # ours, Meta's HF repos


def write_text(path, text):
    atomic_write(path, [text.encode()])  # readers see the old file or the new one, never half of one


def read_config(path) -> ModelConfig:
    cfg_path = os.path.join(path, "config.json")
    if not os.path.isdir(path):
        raise InputError(f"{path}: no such checkpoint directory")
    if not os.path.isfile(cfg_path):
        raise InputError(f"{cfg_path}: no such file (is {path} a checkpoint directory?)")
    try:
        with open(cfg_path) as fh:
            d = json.load(fh)
    except json.JSONDecodeError as e:
        raise InputError(f"{cfg_path}: not valid JSON ({e})") from None
    if isinstance(d.get("rope_parameters"), dict):  # newer HF writes rope settings in one dict
        rp = d["rope_parameters"]
        d.setdefault("rope_theta", rp.get("rope_theta", ModelConfig.rope_theta))
        if rp.get("rope_type", "default") != "default":
            d.setdefault("rope_scaling", rp)
    return ModelConfig.from_dict(d, cfg_path)


def load_model(path, device="cpu", dtype=torch.float32) -> LM:
    """Build the model that config.json describes and load its weights, strictly (every tensor
    present, none extra, every shape right), without ever unpickling anything."""
    cfg = read_config(path)
    sd = load_state_dict(path)
    with torch.device("meta"):  # no time wasted on a random init that is overwritten next
        model = LM(cfg)
    if cfg.tie_word_embeddings and "lm_head.weight" not in sd and "model.embed_tokens.weight" in sd:
        sd["lm_head.weight"] = sd["model.embed_tokens.weight"]  # HF omits the tied copy
    want = model.state_dict()
    missing, extra = sorted(set(want) - set(sd)), sorted(set(sd) - set(want))
    bad = [f"{k} {tuple(sd[k].shape)} != {tuple(v.shape)}" for k, v in want.items()
           if k in sd and sd[k].shape != v.shape]
    if missing or extra or bad:
        what = "; ".join(s for s in (f"missing {missing[:3]}" if missing else "",
                                      f"unexpected {extra[:3]}" if extra else "",
                                      f"shape {bad[:3]}" if bad else "") if s)
        raise InputError(f"{path}/config.json does not match the weights: {what}")
    sd = {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in sd.items()}
    model.load_state_dict(sd, strict=True, assign=True)
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    return model.to(device)


def find_tokenizer(path) -> str:
    for name in TOKENIZER_FILES:
        if os.path.isfile(os.path.join(path, name)):
            return os.path.join(path, name)
    raise InputError(f"{path}: no tokenizer file (looked for {', '.join(TOKENIZER_FILES)})")


def load_teacher(path, device="cpu", dtype=torch.float32):
    """A local HF-format Llama directory -> (LM, Tokenizer)."""
    model = load_model(path, device, dtype)
    return model, Tokenizer(find_tokenizer(path))


def save_model(model: LM, tokenizer, path):
    """Write an HF-style directory; a teacher written here loads in HF's LlamaForCausalLM too."""
    os.makedirs(path, exist_ok=True)
    sd = {k: v.detach() for k, v in model.state_dict().items()}
    if model.cfg.tie_word_embeddings:
        sd.pop("lm_head.weight")
    dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
    save_state_dict(sd, path)
    tokenizer.save(os.path.join(path, "tokenizer.model"))
    write_text(os.path.join(path, "config.json"),
               json.dumps({**model.cfg.to_dict(), "torch_dtype": dtype}, indent=2))


save_teacher = save_model  # the public name for teachers: a teacher is an LM with no ssm_layers


# -----------------------------------------------------------------------------
# 3. Attention -> Mamba weight transfer (MambaInLlama, Wang et al. 2024; MOHAWK, Bick et al. 2024)

# (teacher tensor in layer i, student tensor in layer i, block of in_proj rows or None for all)
ATTENTION_TO_SSM = [
    ("self_attn.q_proj.weight", "mixer.in_proj.weight", "C"),  # (h*e, d): the query reads the state
    ("self_attn.k_proj.weight", "mixer.in_proj.weight", "B"),  # (k*e, d): the key writes it
    ("self_attn.v_proj.weight", "mixer.in_proj.weight", "x"),  # (k*e, d): the value is written
    ("self_attn.o_proj.weight", "mixer.out_proj.weight", None),  # (d, h*e)
]


@torch.no_grad()
def transfer_attention_to_mamba(teacher: LM, ssm_layers, init="attention") -> LM:
    """A student in which `ssm_layers` hold a Mamba-2 mixer and every other layer is the teacher's.

    Embeddings, norms, MLPs and the kept attention layers are copied. With init="attention" each
    mixer takes Q, K, V, O from the attention it replaces (table above); with init="random" the
    mixer keeps its fresh initialisation, which is the baseline that shows what the transfer is worth.
    Tensors attention has no counterpart for (z's rows, dt, A, D, conv, the gated norm) keep Mamba-2's
    initialisation (MambaMixer.reset_ssm_parameters), as in MambaInLlama, which found the attention
    weights to be what matters. Stage 1 then trains every mixer tensor, but from a mixer that already
    reads and writes its state with the teacher's own projections: in the H100 default run
    (results/h100/logs) the pure student's stage-1 loss was 0.85 at step 25 against 1.27 from random
    mixers, and ended at 0.27 against 0.32.
    """
    if init not in ("attention", "random"):
        raise InputError(f"--init: expected 'attention' or 'random', got {init!r}")
    p = next(teacher.parameters())
    cfg = replace(teacher.cfg, ssm_layers=sorted(set(ssm_layers)))
    student = LM(cfg).to(device=p.device, dtype=p.dtype)
    sd = student.state_dict()
    tsd = teacher.state_dict()
    for name in sd:  # everything that exists in both models is the teacher's
        if name in tsd:
            assert sd[name].shape == tsd[name].shape, name
            sd[name] = tsd[name].clone()
    if init == "attention":
        for i in cfg.ssm_layers:
            mixer = student.model.layers[i].mixer
            for t_name, s_name, block in ATTENTION_TO_SSM:
                src = tsd[f"model.layers.{i}.{t_name}"]
                dst = sd[f"model.layers.{i}.{s_name}"]
                rows = mixer.rows(block) if block else slice(None)
                assert dst[rows].shape == src.shape, f"layer {i}: {t_name} {tuple(src.shape)} -> {s_name}[{block}] {tuple(dst[rows].shape)}"
                dst[rows] = src
    student.load_state_dict(sd, strict=True)
    return student


def spread_layers(n_layers, n_keep) -> list:
    """n_keep layer indices spread evenly over depth (the attention layers a hybrid keeps)."""
    if n_keep <= 0:
        return []
    step = n_layers / n_keep
    return sorted({int(step * j + step / 2) for j in range(n_keep)})


# -----------------------------------------------------------------------------
# 4. Files, tokenizer and data


def atomic_write(path, chunks):
    """Write an iterable of bytes-like chunks to `path` through a temp file in the same directory
    and os.replace, so a crash mid-write never leaves a half-written file under the real name."""
    path = str(path)
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            for chunk in chunks:
                f.write(chunk)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


# -----------------------------------------------------------------------------
# 4a. Tokenizer: tiktoken BPE with Llama 3's split pattern and special tokens

# Llama 3's pre-tokenizer (Meta's llama3 tokenizer.py): text is first cut into "words" (contractions,
# letter runs with one leading non-letter, numbers of 1-3 digits, punctuation runs, whitespace) and BPE
# merges never cross a word boundary. tiktoken runs it with the `regex` module (\p{L} letters, \p{N} numbers).
LLAMA3_SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# Llama 3's 256 special tokens, in id order right after the base vocabulary (Meta's llama-models).
LLAMA3_SPECIAL_TOKENS = [
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|reserved_special_token_0|>",
    "<|reserved_special_token_1|>",
    "<|finetune_right_pad_id|>",
    "<|step_id|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eom_id|>",  # end of message (tool calls)
    "<|eot_id|>",  # end of turn
    "<|python_tag|>",
    "<|image|>",
]
LLAMA3_SPECIAL_TOKENS += [f"<|reserved_special_token_{i}|>" for i in range(2, 2 + 256 - len(LLAMA3_SPECIAL_TOKENS))]


def load_tiktoken_bpe_file(path) -> dict[bytes, int]:
    """Read tiktoken's BPE file format: one `<base64 token bytes> <rank>` per line, rank = merge priority
    (lower merges first). Ranks must be 0..n-1 so that the special tokens can follow at id n."""
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
    """Llama 3's tokenizer: byte-level BPE run by tiktoken, plus 256 special tokens after the base vocab.
    Works the same for Meta's 128k-token file and for the project's own small file (train_bpe)."""

    def __init__(self, path):
        self.path = str(path)
        self.mergeable_ranks = load_tiktoken_bpe_file(path)
        n_base = len(self.mergeable_ranks)
        self.special_tokens = {tok: n_base + i for i, tok in enumerate(LLAMA3_SPECIAL_TOKENS)}
        self.model = tiktoken.Encoding(
            name=os.path.basename(self.path),
            pat_str=LLAMA3_SPLIT_PATTERN,
            mergeable_ranks=self.mergeable_ranks,
            special_tokens=self.special_tokens,
        )
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
        ids = self.model.encode_ordinary(text)
        return [self.bos_id] * bos + ids + [self.eos_id] * eos

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """encode() of many texts at once (tiktoken spreads them over threads)."""
        return self.model.encode_ordinary_batch(texts)

    def decode(self, ids) -> str:
        return self.model.decode(list(ids))

    def token_bytes(self, i: int) -> bytes:
        """The bytes token i stands for (a special token's name for a special token)."""
        return self.model.decode_single_token_bytes(i)

    def encode_chat(self, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
        """Llama 3 instruct format (Meta's chat_format.py; no default system message):
        <|begin_of_text|> then per message <|start_header_id|>{role}<|end_header_id|>\\n\\n{content}<|eot_id|>,
        then an open assistant header so that the model writes the reply."""
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
        by_rank = sorted(self.mergeable_ranks.items(), key=lambda kv: kv[1])
        text = "".join(f"{base64.b64encode(tok).decode()} {rank}\n" for tok, rank in by_rank)
        atomic_write(path, [text.encode()])


def train_bpe(texts: list[str], vocab_size: int, path, single_digits: bool = True) -> Tokenizer:
    """Train a byte-level BPE vocabulary of `vocab_size` base tokens (256 bytes + merges; the 256 special
    tokens come on top), write it to `path` in tiktoken's format and load it back.

    Classic BPE (Sennrich et al. 2016, byte-level as in GPT-2): split text into words with the Llama 3
    pattern, then repeatedly merge the most frequent adjacent pair of tokens. Rank = merge order, which is
    what tiktoken's encoder expects (it merges the lowest-rank pair first). Pairs are counted over unique
    words weighted by frequency and updated only in the words that contain the merged pair.
    single_digits: never merge digits, so every digit is its own token (as Llama 1 and 2 split numbers;
    Llama 3's pattern allows up to three per token): column arithmetic then reads one digit per token
    instead of digits hidden inside tokens like "509"."""
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
    text = "".join(f"{base64.b64encode(tok).decode()} {rank}\n" for rank, tok in enumerate(vocab))
    atomic_write(path, [text.encode()])
    return Tokenizer(path)


# -----------------------------------------------------------------------------
# 4b. Checkpoint files: safetensors (our own reader/writer; never pickle)
#
# Layout: 8-byte little-endian header size N, N bytes of JSON
#   {"name": {"dtype": "F32", "shape": [2, 3], "data_offsets": [begin, end]}, ..., "__metadata__": {...}}
# then the raw little-endian tensor bytes back to back; offsets count from the end of the header.

SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool,
}
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
        nbytes = t.numel() * t.element_size()
        header[name] = {"dtype": _DTYPE_NAMES[t.dtype], "shape": list(t.shape),
                        "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
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
        assert isinstance(header, dict)
    except (ValueError, AssertionError):
        raise InputError(f"{path}: header is not a JSON object (corrupt or not safetensors)") from None
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
        numel = 1
        for s in shape:
            numel *= s
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


def save_state_dict(state_dict: dict[str, torch.Tensor], directory, max_shard_bytes: int | None = None):
    """Write weights the way HF's save_pretrained does: `model.safetensors`, or when the total exceeds
    max_shard_bytes, shards `model-00001-of-0000N.safetensors` plus `model.safetensors.index.json`
    mapping every tensor name to its shard. Files of the other layout left by an earlier save are removed
    (transformers would otherwise pick a stale `model.safetensors` before the index)."""
    os.makedirs(directory, exist_ok=True)
    shards, size = [{}], 0  # greedy: start a new shard when the next tensor would overflow this one
    for name, t in state_dict.items():
        nbytes = t.numel() * t.element_size()
        if max_shard_bytes is not None and shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += nbytes
    if len(shards) == 1:
        files = ["model.safetensors"]
    else:
        files = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    for file, shard in zip(files, shards):
        save_safetensors(shard, os.path.join(directory, file))
    index_path = os.path.join(directory, "model.safetensors.index.json")
    if len(shards) > 1:
        index = {
            "metadata": {"total_size": sum(t.numel() * t.element_size() for t in state_dict.values())},
            "weight_map": {name: file for file, shard in zip(files, shards) for name in shard},
        }
        atomic_write(index_path, [json.dumps(index, indent=2).encode()])
    stale = [f for f in os.listdir(directory) if re.fullmatch(r"model(-\d{5}-of-\d{5})?\.safetensors", f)]
    stale += ["model.safetensors.index.json"] if len(shards) == 1 and os.path.exists(index_path) else []
    for f in stale:
        if f not in files:
            os.remove(os.path.join(directory, f))


def load_state_dict(directory) -> dict[str, torch.Tensor]:
    """Read HF-layout weights: `model.safetensors.index.json` + its shards if the index exists, else
    `model.safetensors`."""
    index_path = os.path.join(directory, "model.safetensors.index.json")
    single_path = os.path.join(directory, "model.safetensors")
    if not os.path.exists(index_path):
        if not os.path.exists(single_path):
            raise InputError(f"{directory}: has neither model.safetensors nor model.safetensors.index.json")
        return load_safetensors(single_path)
    try:
        with open(index_path) as f:
            weight_map = json.load(f)["weight_map"]
        assert isinstance(weight_map, dict)
    except (ValueError, KeyError, TypeError, AssertionError):
        raise InputError(f"{index_path}: not a JSON object with a 'weight_map'") from None
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


# -----------------------------------------------------------------------------
# 4c. Data: synthetic GSM8K-style problems, GSM8K jsonl files, prompts

NAMES = [  # (name, subject pronoun, possessive)
    ("Mia", "she", "her"), ("Liam", "he", "his"), ("Ava", "she", "her"), ("Noah", "he", "his"),
    ("Sofia", "she", "her"), ("Omar", "he", "his"), ("Priya", "she", "her"), ("Mateo", "he", "his"),
    ("Hana", "she", "her"), ("Kofi", "he", "his"), ("Elena", "she", "her"), ("Ravi", "he", "his"),
    ("Chloe", "she", "her"), ("Jamal", "he", "his"), ("Yuki", "she", "her"), ("Lucas", "he", "his"),
    ("Amara", "she", "her"), ("Ethan", "he", "his"), ("Zoe", "she", "her"), ("Diego", "he", "his"),
    ("Leila", "she", "her"), ("Felix", "he", "his"), ("Nadia", "she", "her"), ("Owen", "he", "his"),
    ("Grace", "she", "her"), ("Tariq", "he", "his"), ("Ines", "she", "her"), ("Samuel", "he", "his"),
]
# (plural object, container of several, a place to get more, what a few of them can be used for)
OBJECTS = [
    ("apples", "bags", "market", "a pie"), ("marbles", "jars", "toy store", "a game"),
    ("stickers", "sheets", "book fair", "a poster"), ("cookies", "boxes", "bakery", "a party"),
    ("pencils", "packs", "school shop", "an art class"), ("stamps", "albums", "post office", "letters"),
    ("seashells", "buckets", "beach", "a necklace"), ("coins", "purses", "bank", "the bus"),
    ("cards", "decks", "game shop", "a card trick"), ("beads", "tubes", "craft store", "a bracelet"),
    ("eggs", "cartons", "farm", "a cake"), ("crayons", "tins", "art shop", "a mural"),
    ("books", "crates", "library sale", "a book club"), ("oranges", "nets", "fruit stand", "juice"),
    ("toy cars", "cases", "flea market", "a race track"), ("flowers", "bunches", "garden center", "a vase"),
]


def make_problem(rng: random.Random, n_steps: int) -> dict:
    """One word problem whose solution takes n_steps arithmetic steps, each a GSM8K-style sentence that
    restates what happens and shows its result. Returns {"question", "answer", "ops"}; "ops" lists the
    steps as [op, *numbers] so a test can redo the arithmetic: first ["start", a] (no step) or
    ["pack", a, b] (a * b), then ["+", b], ["-", b], ["*", b], ["/", b] (one step each),
    ["add_packs", a, b] (x + a * b, two steps) and, only last, ["together_fewer", b] (x + (x - b), two)."""
    assert n_steps >= 1
    name, he, his = rng.choice(NAMES)
    friend = rng.choice([n for n in NAMES if n[0] != name])[0]
    obj, box, place, use = rng.choice(OBJECTS)
    He = he.capitalize()
    q, s, ops = [], [], []  # question sentences, solution lines, steps taken
    steps_left = n_steps

    # the final question sometimes brings in the friend: two more steps at the end
    ending_with_friend = n_steps >= 3 and rng.random() < 0.3
    if ending_with_friend:
        steps_left -= 2

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
            x = y
            continue
        # each event: (question sentence, solution sentence), picked at random for variety
        if op == "+":
            b = rng.randint(2, 40)
            y = x + b
            events = [
                (f"Then {he} finds {b} more {obj}.",
                 f"{He} had {x} {obj} and finds {b} more, so now {he} has {x} + {b} = {y} {obj}."),
                (f"{friend} gives {name} {b} {obj}.",
                 f"{friend} gives {name} {b} {obj}, so {name} now has {x} + {b} = {y} {obj}."),
                (f"The next day {he} gets {b} more {obj} at the {place}.",
                 f"After getting {b} more at the {place}, {he} has {x} + {b} = {y} {obj}."),
                (f"{He} wins {b} {obj} in a contest.",
                 f"Winning {b} {obj} in the contest brings {his} total to {x} + {b} = {y} {obj}."),
            ]
        elif op == "-":
            b = rng.randint(1, min(x - 2, 40))
            y = x - b
            events = [
                (f"{He} gives {b} {obj} to {friend}.",
                 f"{He} gives {b} of {his} {x} {obj} to {friend}, so {he} has {x} - {b} = {y} {obj} left."),
                (f"{He} loses {b} {obj} on the way home.",
                 f"Losing {b} of the {x} {obj} on the way home leaves {x} - {b} = {y} {obj}."),
                (f"{He} uses {b} {obj} for {use}.",
                 f"{He} uses {b} {obj} for {use}, so {x} - {b} = {y} {obj} are left."),
            ]
        elif op == "*":
            b = rng.randint(2, 4)
            y = x * b
            times = {2: "twice", 3: "three times", 4: "four times"}[b]
            events = [
                (f"By the end of the month {he} has {times} as many {obj} as before.",
                 f"At the end of the month {he} has {times} as many as the {x} {obj} {he} had, "
                 f"which is {x} * {b} = {y} {obj}."),
                (f"{friend} gives {name} enough {obj} to make {his} collection {times} as big.",
                 f"A collection {times} as big as {x} {obj} holds {x} * {b} = {y} {obj}."),
            ]
        else:  # "/"
            b = rng.choice(divisors)
            y = x // b
            events = [
                (f"{He} splits the {obj} into {b} equal groups and keeps one group.",
                 f"{He} splits {his} {x} {obj} into {b} equal groups of {x} / {b} = {y} {obj} and keeps one group."),
                (f"{He} shares the {obj} equally with {b - 1} friends and keeps {his} share.",
                 f"With {b} people sharing, each one gets {x} / {b} = {y} {obj}, and that is what {he} keeps."),
            ]
        question, solution = rng.choice(events)
        q.append(question)
        s.append(solution)
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


def column_lines(a: int, b: int, sign: str) -> list[str]:
    """a + b or a - b (a >= b) worked column by column from the ones, as taught at school: one line per
    column naming it, its two digits, the carry or borrow it takes and passes on, and the digits of the
    result found so far. Every line reads only the line above it and the operands, and the last one
    holds the whole result: nothing is assembled from far back."""
    da, db = [int(c) for c in reversed(str(a))], [int(c) for c in reversed(str(b))]
    lines, flow, so_far = [], 0, ""
    for i in range(len(da) + 1):
        x, y = (da[i] if i < len(da) else 0), (db[i] if i < len(db) else 0)
        if i == len(da) and not (sign == "+" and flow):
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


def make_relay_problem(rng: random.Random, n_turns: int, n_people: int = 3, digits: int = 4) -> dict:
    """A long-reasoning problem: n_people pass objects round a circle for n_turns turns, each giver
    handing the next person a tenth of what they hold (rounded down), and the question asks what one
    of them holds at the end. The worked solution restates everyone's count after each turn and does
    every subtraction and addition column by column, so it is long because the reasoning is long
    (about 250 tokens a turn under the default tokenizer), every line can be checked, each line needs
    only what the last few lines say, and one wrong digit anywhere carries through to a wrong answer.
    Returns {"question", "answer", "ops"}; ops = ["relay", [start amounts], n_turns, asked index]."""
    assert n_turns >= 1 and 2 <= n_people <= len(NAMES) and 2 <= digits <= len(COLUMNS) - 1
    people = rng.sample(NAMES, n_people)
    names = [p[0] for p in people]
    hers = {name: "hers" if his == "her" else "his" for name, _, his in people}
    obj, box, _, _ = rng.choice(OBJECTS)
    start = [rng.randint(10 ** (digits - 1), 10 ** digits - 1) for _ in names]
    asked = names[rng.randrange(n_people)]

    def listing(amounts, unit=""):
        parts = [f"{n} has {a}{unit}" for n, a in zip(names, amounts)]
        return ", ".join(parts[:-1]) + f" and {parts[-1]}"

    order = ", then ".join(f"{names[i]} gives {names[(i + 1) % n_people]} a tenth of {hers[names[i]]}"
                           for i in range(n_people))
    q = (f"{', '.join(names[:-1])} and {names[-1]} keep {obj} in {box}. {listing(start, f' {obj}')}. "
         f"They take turns passing {obj} on: {order}, and so on in that order. A tenth is rounded down to a "
         f"whole number. After {n_turns} turns, how many {obj} does {asked} have?")
    x = list(start)
    s = [f"At the start {listing(x)}."]
    for t in range(n_turns):
        g, r = t % n_people, (t + 1) % n_people
        give = x[g] // 10
        s.append(f"Turn {t + 1} of {n_turns}, for {asked}: {names[g]} gives {names[r]} a tenth of {x[g]}, "
                 f"which is {give}.")
        for who, sign in ((g, "-"), (r, "+")):
            s.append(f"{names[who]}: {x[who]} {sign} {give}")
            s += column_lines(x[who], give, sign)
            x[who] = x[who] - give if sign == "-" else x[who] + give
            s.append(f"{names[who]} has {x[who]}.")
        s.append(f"Now {listing(x)}.")
    s.append(f"After {n_turns} turns {asked} has {x[names.index(asked)]}.")
    s.append(f"#### {x[names.index(asked)]}")
    return {"question": q, "answer": "\n".join(s), "ops": ["relay", start, n_turns, names.index(asked)]}


# task name -> (generator(rng, steps, **knobs), default min steps, default max steps): "relay" (the
# default) has long chains of thought, "short" the GSM8K-sized ones of 2-8 arithmetic steps
TASKS = {"relay": (make_relay_problem, 2, 10), "short": (make_problem, 2, 8)}


def split_of(question: str) -> str:
    """'test' for ~10% of questions, 'train' for the rest, by a stable hash of the text: the two splits
    can never share a question, whatever seeds or sizes are asked for."""
    return "test" if int(hashlib.sha256(question.encode()).hexdigest()[:8], 16) % 10 == 0 else "train"


def synthetic_split(split: str, n: int, seed: int = 0, task: str = "relay", min_steps: int = 0,
                    max_steps: int = 0, **knobs) -> list[dict]:
    """n distinct problems of `split` ("train" or "test") of a task in TASKS, steps (turns for relay,
    arithmetic steps for short) uniform in [min_steps, max_steps] (0 = the task's default), the same
    for the same arguments. knobs go to the generator (relay: n_people, digits)."""
    assert split in ("train", "test"), split
    make, lo, hi = TASKS[task]
    lo, hi = min_steps or lo, max_steps or hi
    rng = random.Random(seed)
    rows, seen = [], set()
    while len(rows) < n:
        p = make(rng, rng.randint(lo, hi), **knobs)
        if split_of(p["question"]) == split and p["question"] not in seen:
            seen.add(p["question"])
            rows.append(p)
    return rows


def read_jsonl(path) -> list[dict]:
    """Read a GSM8K-format jsonl file: one {"question": str, "answer": str, ...} per line; blank lines
    are skipped. Anything else is an InputError naming the file and line."""
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.readlines()
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(f"{path}: cannot read data file ({getattr(e, 'strerror', None) or e})") from None
    rows = []
    for i, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError:
            raise InputError(f"{path}:{i}: not valid JSON") from None
        if not isinstance(row, dict):
            raise InputError(f"{path}:{i}: expected a JSON object with 'question' and 'answer'")
        for key in ("question", "answer"):
            if not isinstance(row.get(key), str):
                raise InputError(f"{path}:{i}: field {key!r} is missing or not a string")
        rows.append(row)
    if not rows:
        raise InputError(f"{path}: no rows")
    return rows


def write_jsonl(rows: list[dict], path):
    atomic_write(path, [json.dumps(row).encode() + b"\n" for row in rows])


def gold_answer(answer_text: str) -> str:
    """The final answer of a GSM8K-style solution: the rest of the line after the last '####', without
    commas ("#### 1,200" -> "1200"); "" if there is none. Used for gold answers and model samples alike."""
    if "####" not in answer_text:
        return ""
    return answer_text.rsplit("####", 1)[1].split("\n", 1)[0].strip().replace(",", "")


def auto_max_new_tokens(tok, rows) -> int:
    """A generation limit that fits every worked solution of `rows` with a quarter to spare, in
    multiples of 64 (a sampled solution may run longer than the written one and still end well)."""
    longest = max(len(ids) for ids in tok.encode_batch([r["answer"] for r in rows])) + 1  # + <|eot_id|>
    return -(-int(1.25 * longest) // 64) * 64


def prompt_text(question: str) -> str:
    """The user message for training and sampling (the model's reply is the GSM8K-style answer)."""
    return f"{question.strip()}\nSolve it step by step and end with '#### <answer>'."


# -----------------------------------------------------------------------------
# 5. Command line: one dataclass, flags generated from it


def parse_config(cls, argv=None, description=None):
    """--field value flags for every field of a dataclass; unknown flags are an error (exit 2)."""
    parser = argparse.ArgumentParser(description=description, allow_abbrev=False,  # presets need exact names
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    for f in fields(cls):
        default = f.default if f.default is not MISSING else f.default_factory()
        kind = type(default) if default is not None else str
        text = f.metadata.get("help", " ").replace("%", "%%")  # argparse formats help with %
        if kind is bool:
            parser.add_argument(f"--{f.name}", type=_parse_bool, default=default, metavar="{true,false}",
                                nargs="?", const=True, help=text)
        else:
            parser.add_argument(f"--{f.name}", type=kind, default=default, help=text)
    return cls(**vars(parser.parse_args(argv)))


def _parse_bool(s):
    if s.lower() in ("1", "true", "yes", "on"):
        return True
    if s.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {s!r}")


def opt(default, help):
    return field(default=default, metadata={"help": help})


@dataclass
class DistillConfig:
    out_dir: str = opt("out", "where data, checkpoints, logs and the summary go")
    preset: str = opt("default", "default (about 5 min on one H200), smoke (about 1 min) or tiny (CPU tests)")
    teacher: str = opt("", "a local HF Llama directory; empty = train a small teacher on the data first")
    data: str = opt("", "a GSM8K-format jsonl for training; empty = the synthetic set written to out_dir/data")
    test_data: str = opt("", "a GSM8K-format jsonl to evaluate greedy accuracy; empty = the synthetic test split")
    device: str = opt("auto", "auto, cuda or cpu")
    seed: int = opt(0, "seed of the data, the initialisation and the batch order")
    # synthetic data and the default teacher
    task: str = opt("relay", "synthetic task: relay (long chains of thought, ~2,000 solution tokens) or short "
                             "(GSM8K-sized, 60-200 tokens)")
    min_steps: int = opt(0, "difficulty: fewest turns (relay) or arithmetic steps (short) per problem; 0 = the "
                            "task's default (2)")
    max_steps: int = opt(0, "difficulty: most turns (relay) or steps (short) per problem; 0 = the task's default "
                            "(relay 10, short 8)")
    digits: int = opt(4, "relay: digits of the starting amounts")
    n_train: int = opt(20000, "synthetic training problems")
    n_test: int = opt(500, "synthetic test problems")
    vocab_size: int = opt(1024, "base BPE vocabulary of the project's own tokenizer (256 specials come on top)")
    d_model: int = opt(384, "default teacher: hidden size")
    n_layers: int = opt(8, "default teacher: layers")
    n_heads: int = opt(6, "default teacher: query heads (head dim = d_model / n_heads)")
    n_kv_heads: int = opt(2, "default teacher: key/value heads (GQA, as in Llama 3.2)")
    d_ff: int = opt(1024, "default teacher: MLP width")
    teacher_steps: int = opt(3000, "default teacher: training steps")
    teacher_lr: float = opt(2e-3, "default teacher: peak learning rate")
    # students
    students: str = opt("hybrid,pure", "students to distil: hybrid and/or pure")
    attn_fraction: float = opt(0.25, "share of attention layers a hybrid keeps, spread over depth")
    init: str = opt("attention", "attention (MambaInLlama transfer) or random mixers")
    random_baseline: str = opt("pure", "also distil this student from random mixers (empty = no baseline)")
    align_steps: int = opt(150, "stage 1: layer-wise mixer alignment steps (0 = skip)")
    align_lr: float = opt(2e-3, "stage 1: peak learning rate")
    kl_steps: int = opt(600, "stage 2: end-to-end distillation steps on the teacher's logits (0 = skip)")
    kl_lr: float = opt(6e-4, "stage 2: peak learning rate")
    kl: str = opt("forward", "stage 2: forward KL(teacher || student) or reverse KL(student || teacher)")
    temperature: float = opt(1.0, "stage 2: softmax temperature of both models (loss scaled by T^2)")
    sft_steps: int = opt(0, "stage 3: supervised fine-tuning steps on the solutions (0 = skip)")
    sft_lr: float = opt(3e-4, "stage 3: peak learning rate")
    # optimisation (shared by every stage)
    batch_size: int = opt(16, "sequences per optimizer step (over all GPUs and accumulation steps)")
    grad_accum: int = opt(1, "micro-batches per optimizer step")
    seq_len: int = opt(4096, "most tokens of a training sequence (longer examples are cut); a batch holds "
                             "examples of similar length and is padded only to its longest")
    warmup: float = opt(0.05, "share of each stage spent warming up the learning rate")
    weight_decay: float = opt(0.1, "AdamW weight decay (matrices only)")
    grad_clip: float = opt(1.0, "clip the gradient norm to this")
    log_every: int = opt(25, "steps between progress lines")
    ckpt_every: int = opt(500, "steps between checkpoints (0 = only at the end of a stage)")
    resume: bool = opt(False, "continue each model from its last checkpoint in out_dir")
    eval_n: int = opt(200, "test problems for the greedy accuracy of each model (0 = skip)")
    max_new_tokens: int = opt(0, "generation limit when evaluating; 0 = the longest test solution + 25%")
    bench: bool = opt(False, "measure distillation throughput at the Llama-3.2-1B shape and exit")
    compile: bool = opt(False, "torch.compile the student's forward (stages 2 and 3; stage 1 calls the mixers "
                               "directly) and the teacher's in stage 2 (GPU only): fuses the norms and "
                               "activations; costs about a minute per model to compile")


PRESETS = {  # fields that a preset changes, unless the command line set them
    "default": {},
    "smoke": dict(n_train=4000, n_test=200, teacher_steps=300, align_steps=40, kl_steps=120,
                  eval_n=100, d_model=256, n_layers=6, n_heads=4, d_ff=768, ckpt_every=0, max_steps=6),
    "tiny": dict(n_train=64, n_test=8, vocab_size=300, d_model=32, n_layers=4, n_heads=2, n_kv_heads=1,
                 d_ff=64, teacher_steps=4, align_steps=2, kl_steps=3, sft_steps=2, batch_size=4,
                 grad_accum=2, seq_len=320, eval_n=2, max_new_tokens=8, log_every=1, ckpt_every=2,
                 task="short"),
}


# --bench: 16 x 2048 tokens a step per GPU in 4 micro-batches (so that N GPUs each do one GPU's work:
# weak scaling, as data parallelism is used), compiled
BENCH = dict(batch_size=16, seq_len=2048, grad_accum=4, compile=True)


def apply_preset(cfg: DistillConfig, argv) -> DistillConfig:
    """The preset's values for every field the command line did not set."""
    if cfg.preset not in PRESETS:
        raise InputError(f"--preset: expected one of {sorted(PRESETS)}, got {cfg.preset!r}")
    bench = dict(BENCH, batch_size=BENCH["batch_size"] * int(os.environ.get("WORLD_SIZE", 1)))
    preset = dict(PRESETS[cfg.preset], **(bench if cfg.bench else {}))
    given = {a[2:].split("=")[0] for a in argv if a.startswith("--")}  # parse_config allows no abbreviations
    return replace(cfg, **{k: v for k, v in preset.items() if k not in given})


def check_config(cfg: DistillConfig):
    """Bad flags fail here, in one line, before any data or teacher work."""
    choices = {"kl": ("forward", "reverse"), "init": ("attention", "random"), "task": tuple(TASKS),
               "random_baseline": ("", "hybrid", "pure"), "device": ("auto", "cuda", "cpu")}
    for name, allowed in choices.items():
        if getattr(cfg, name) not in allowed:
            raise InputError(f"--{name}: expected one of {allowed}, got {getattr(cfg, name)!r}")
    unknown = set(filter(None, cfg.students.split(","))) - {"hybrid", "pure"}
    if unknown:
        raise InputError(f"--students: unknown {sorted(unknown)} (expected hybrid and/or pure)")
    if cfg.batch_size % (int(os.environ.get("WORLD_SIZE", 1)) * cfg.grad_accum):
        raise InputError(f"--batch_size {cfg.batch_size} must be a multiple of grad_accum ({cfg.grad_accum}) "
                         f"x the number of processes ({os.environ.get('WORLD_SIZE', 1)})")


# -----------------------------------------------------------------------------
# 6. Training machinery shared by the teacher and every distillation stage


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


def setup_env(device: str) -> Env:
    """device is auto, cuda or cpu (check_config has seen to that)."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise InputError("--device cuda: no CUDA GPU is visible")
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    dev = torch.device(device)
    if world > 1:  # started by torchrun: one process per GPU
        local = int(os.environ.get("LOCAL_RANK", 0))
        if device == "cuda":
            dev = torch.device("cuda", local)
            torch.cuda.set_device(dev)
        dist.init_process_group("nccl" if device == "cuda" else "gloo")
    if device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    return Env(dev, torch.bfloat16 if device == "cuda" else None, rank, world)


def encode_examples(tok, rows):
    """Chat prompt + solution + <|eot_id|> of every row -> [(ids, mask)], mask 1 on the solution's
    tokens."""
    answers = tok.encode_batch([r["answer"] for r in rows])
    out = []
    for row, answer in zip(rows, answers):
        prompt = tok.encode_chat([{"role": "user", "content": prompt_text(row["question"])}])
        out.append((prompt + answer + [tok.eot_id], [0] * len(prompt) + [1] * (len(answer) + 1)))
    return out


class Batches:
    """Tokenised examples and a batch order that depends only on (seed, stage, step), so that a
    resumed run sees exactly the batches it would have seen.

    Examples are kept sorted by length, and a step's batch is a random window of `batch` neighbours
    in that order: its sequences have about the same length, and it is padded only to the longest of
    them (rounded up to a multiple of 64), so that little compute goes to padding when lengths vary
    from a few hundred to a few thousand tokens (HF's group_by_length does the same)."""

    def __init__(self, tok, rows, seq_len, seed):
        enc = sorted(encode_examples(tok, rows), key=lambda e: len(e[0]))  # stable: ties keep row order
        self.cut = sum(len(ids) > seq_len + 1 for ids, _ in enc)  # examples longer than a sequence
        self.mean_len = sum(len(ids) for ids, _ in enc) / max(len(enc), 1)
        enc = [(ids[:seq_len + 1], mask[:seq_len + 1]) for ids, mask in enc]  # inputs + shifted targets
        self.lengths = [len(ids) for ids, _ in enc]
        self.ids = [torch.tensor(ids, dtype=torch.int32) for ids, _ in enc]  # ragged, int32: small in memory
        self.mask = [torch.tensor(mask, dtype=torch.bool) for _, mask in enc]
        self.pad_id, self.seq_len, self.seed = tok.pad_id, seq_len, seed

    def get(self, stage, step, batch, rank=0, world=1, micro=0, n_micro=1):
        """This rank's share of micro-batch `micro` of the global batch of `step`:
        inputs, targets, loss mask (b, l) and how many input tokens are real (not padding)."""
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


def lr_at(step, steps, peak, warmup):
    """Linear warmup, then cosine decay to 10% of the peak."""
    w = max(1, int(warmup * steps))
    if step < w:
        return peak * (step + 1) / w
    t = (step - w) / max(1, steps - w)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t)))


def make_optimizer(params, lr, weight_decay, device):
    named = [(n, p) for n, p in params if p.requires_grad]
    decay = [p for n, p in named if p.dim() >= 2]  # matrices; no decay on norms, biases, dt, A, D
    other = [p for n, p in named if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": other, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95), fused=device.type == "cuda")


class TrainingError(Exception):
    """A run that cannot go on (a NaN loss); the last good checkpoint is kept."""


def save_checkpoint(model, opt, tok, path, state):
    """model dir + optimizer + state.json, written into a temp dir and swapped in whole."""
    tmp, old = path + ".tmp", path + ".old"
    shutil.rmtree(tmp, ignore_errors=True)
    save_model(model, tok, tmp)
    flat = {}
    for i, s in opt.state_dict()["state"].items():  # i: the parameter's index in opt.param_groups
        for k, v in s.items():
            flat[f"{i}.{k}"] = v.detach().float().cpu().reshape(-1) if torch.is_tensor(v) else torch.tensor([float(v)])
    save_safetensors(flat, os.path.join(tmp, "optimizer.safetensors"))
    write_text(os.path.join(tmp, "state.json"), json.dumps(state))
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
    """state.json of the checkpoint (stage, step, tokens, time_s), or None."""
    path = checkpoint_dir(ckpt)
    if path is None:
        return None
    with open(os.path.join(path, "state.json")) as fh:
        return json.load(fh)


def load_checkpoint(model, opt, ckpt):
    """Restore the weights, and the optimizer's moments when opt is given, of save_checkpoint's files."""
    path = checkpoint_dir(ckpt)
    loaded = load_model(path, dtype=next(model.parameters()).dtype)
    model.load_state_dict(loaded.state_dict(), strict=True)
    if opt is None:
        return
    flat = load_safetensors(os.path.join(path, "optimizer.safetensors"))
    sd = opt.state_dict()
    params = [p for g in opt.param_groups for p in g["params"]]
    for i, p in enumerate(params):
        if f"{i}.step" in flat:
            sd["state"][i] = {"step": flat[f"{i}.step"].reshape(()),
                              "exp_avg": flat[f"{i}.exp_avg"].view_as(p).to(p),
                              "exp_avg_sq": flat[f"{i}.exp_avg_sq"].view_as(p).to(p)}
    opt.load_state_dict(sd)


class Logger:
    """Progress lines on stdout and one jsonl line per logged step (rank 0 only)."""

    def __init__(self, path, env, model_name, init):
        self.path, self.env, self.model, self.init = path, env, model_name, init
        self.t0 = time.time()

    def elapsed(self):
        return time.time() - self.t0

    def resume(self, stage, step, elapsed):
        """Continue the clock of a checkpoint and drop the lines logged after it (they are redone)."""
        self.t0 = time.time() - elapsed
        if not self.env.main or not os.path.exists(self.path):
            return
        with open(self.path) as fh:
            lines = [ln for ln in fh if ln.strip()]
        records = [json.loads(ln) for ln in lines]
        keep = [ln for ln, r in zip(lines, records) if not (r["stage"] == stage and r["step"] > step)]
        write_text(self.path, "".join(keep))

    def log(self, stage, step, steps, loss, lr, tokens, tok_s):
        if not self.env.main:
            return
        t = self.elapsed()
        eta = (steps - step - 1) * (tokens / max(step + 1, 1)) / max(tok_s, 1e-9)
        print(f"{self.model:>12} {stage:>7} step {step + 1:5d}/{steps} loss {loss:.4f} lr {lr:.2e} "
              f"{tok_s / 1e3:7.1f}k tok/s  eta {eta / 60:5.1f} min", flush=True)
        with open(self.path, "a") as fh:
            fh.write(json.dumps({"model": self.model, "init": self.init, "stage": stage, "step": step + 1,
                                 "loss": round(loss, 6), "lr": lr, "tokens": tokens,
                                 "time_s": round(t, 3)}) + "\n")


class StageLoss(nn.Module):
    """student + loss function as one module, so DDP sees one forward per micro-batch (the teacher is
    kept outside the module tree: frozen, replicated, never synchronised)."""

    def __init__(self, student, loss_fn):
        super().__init__()
        self.student, self.loss_fn = student, loss_fn

    def forward(self, x, y, m):
        return self.loss_fn(self.student, x, y, m)  # (loss summed over tokens, token count)


def compiled(model, cfg, env):
    """torch.compile(model) when --compile is on and the device is a GPU, else the model itself. The
    compiled module shares the model's parameters; only calls of its forward go through it."""
    return torch.compile(model) if cfg.compile and env.device.type == "cuda" else model


def run_stage(stage, student, loss_fn, steps, peak_lr, cfg, env, batches, tok, ckpt, logger, resume=None):
    """The training loop every stage shares: accumulate, clip, step, log, checkpoint.

    loss_fn(student, inputs, targets, mask) -> (sum of the loss over a micro-batch's tokens, how many
    tokens that is); the parameters that require grad are trained.
    resume: state.json of a checkpoint of this stage to continue from (same batches, same schedule).
    """
    params = [(n, p) for n, p in student.named_parameters() if p.requires_grad]
    opt = make_optimizer(params, peak_lr, cfg.weight_decay, env.device)
    step0, tokens = 0, 0
    if resume is not None and resume.get("stage") == stage:
        load_checkpoint(student, opt, ckpt)
        step0, tokens = resume["step"], resume.get("tokens", 0)
        logger.resume(stage, step0, resume.get("time_s", 0.0))
        if env.main:
            print(f"{logger.model}: resuming {stage} after step {step0}")
    module = StageLoss(compiled(student, cfg, env), loss_fn)
    if env.world > 1:
        module = DDP(module, device_ids=[env.device.index] if env.device.type == "cuda" else None)
    trainable = [p for _, p in params]
    t_last, tok_last = time.time(), tokens
    for step in range(step0, steps):
        lr = lr_at(step, steps, peak_lr, cfg.warmup)
        for g in opt.param_groups:
            g["lr"] = lr
        loss_sum = torch.zeros((), device=env.device)
        count = torch.zeros((), device=env.device)
        real = 0  # input tokens that are not padding, this rank
        for micro in range(cfg.grad_accum):
            *xym, n_real = batches.get(stage, step, cfg.batch_size, env.rank, env.world, micro, cfg.grad_accum)
            x, y, m = (t.to(env.device) for t in xym)
            real += n_real
            last_micro = micro == cfg.grad_accum - 1
            # gradients are averaged across GPUs only once, on the last micro-batch
            with (module.no_sync() if env.world > 1 and not last_micro else nullcontext()), env.autocast():
                s, n = module(x, y, m)
            s.backward()
            loss_sum += s.detach()
            count += n
        # The losses are sums over tokens; dividing the summed gradient by the step's token count
        # afterwards gives the mean over every token of the step, however they fall in micro-batches
        # and GPUs (DDP has averaged the sums over GPUs, so divide by the mean count per GPU).
        if env.world > 1:
            stats = torch.stack([loss_sum, count, torch.tensor(float(real), device=env.device)])
            dist.all_reduce(stats)
            loss_sum, count, real = stats[0], stats[1] / env.world, int(stats[2].item())
        for p in trainable:
            if p.grad is not None:
                p.grad.div_(count.clamp(min=1))
        loss_value = (loss_sum / (count * env.world).clamp(min=1)).item()  # the step's one host sync
        if not math.isfinite(loss_value):
            raise TrainingError(f"{logger.model} {stage} step {step + 1}: loss is {loss_value}; "
                                f"the last good checkpoint is {ckpt}")
        torch.nn.utils.clip_grad_norm_(trainable, cfg.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        tokens += real
        if (step + 1) % cfg.log_every == 0 or step + 1 == steps:
            now = time.time()
            logger.log(stage, step, steps, loss_value, lr, tokens, (tokens - tok_last) / max(now - t_last, 1e-9))
            t_last, tok_last = now, tokens
        save = ckpt and (step + 1 == steps or (cfg.ckpt_every and (step + 1) % cfg.ckpt_every == 0))
        if save and env.main:
            save_checkpoint(student, opt, tok, ckpt, {"stage": stage, "step": step + 1, "tokens": tokens,
                                                      "time_s": round(logger.elapsed(), 3)})
        if save and env.world > 1:
            dist.barrier()  # nobody reads a checkpoint that is still being written


def ce_loss(model, x, y, m):
    """Cross-entropy on the solution tokens (m = 1), not on the prompt."""
    logits = model(x)  # (b, l, v)
    ce = F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), reduction="none")  # (b*l,)
    return (ce * m.flatten()).sum(), m.sum()


def kl_loss_fn(teacher, direction, temperature, pad_id):
    """Stage 2: distil the teacher's next-token distribution at every real token: forward
    KL(p_T || p_S) (mass-covering) or reverse KL(p_S || p_T) (mode-seeking), both softmaxes at the
    temperature. On a GPU the KL is scan_kernel.py's fused Triton kernel, which never materialises
    an fp32 (b*l, v) tensor; elsewhere its PyTorch definition."""
    def loss_fn(student, x, y, m):
        with torch.no_grad():
            t_logits = teacher(x)  # (b, l, v)
        s_logits = student(x)  # (b, l, v)
        kl_div = fused_kl_div if s_logits.is_cuda else kl_div_ref
        kl = kl_div(s_logits, t_logits, temperature, direction)  # (b, l) fp32
        real = (x != pad_id).float()  # (b, l) every real token, the prompt's included
        # soft targets' gradients scale as 1 / T^2 (Hinton et al. 2015): T^2 makes them independent of T
        return temperature ** 2 * (kl * real).sum(), real.sum()
    return loss_fn


def align_loss_fn(teacher, ssm_layers, pad_id):
    """Stage 1 (MOHAWK's hidden-state alignment): each student mixer gets the teacher's own input to
    that layer's attention and must reproduce the attention's output. Layers train independently.
    The error of each token is relative to the size of its target, so that every layer counts alike."""
    def loss_fn(student, x, y, m):
        collect = []
        with torch.no_grad():
            teacher(x, collect=collect)
        real = (x != pad_id).float()  # (b, l)
        loss = 0.0
        for i in ssm_layers:
            h_in, target = collect[i]  # (b, l, d) each
            out = student.model.layers[i].mixer(h_in)  # (b, l, d)
            err = (out.float() - target.float()).pow(2).sum(-1) / target.float().pow(2).sum(-1).clamp(min=1e-6)  # (b, l)
            loss = loss + (err * real).sum()
        return loss / len(ssm_layers), real.sum()
    return loss_fn


# -----------------------------------------------------------------------------
# 7. The pipeline: data -> teacher -> students (align -> kl -> sft) -> greedy accuracy

STAGES = ("align", "kl", "sft")


def load_data(cfg, env):
    """Training and test rows: the given jsonl files, or the synthetic splits (written to out_dir/data)."""
    rows = {}
    for split, path, n in (("train", cfg.data, cfg.n_train), ("test", cfg.test_data, cfg.n_test)):
        if path:
            rows[split] = read_jsonl(path)
        else:
            knobs = {"digits": cfg.digits} if cfg.task == "relay" else {}
            rows[split] = synthetic_split(split, n, cfg.seed, cfg.task, cfg.min_steps, cfg.max_steps, **knobs)
            if env.main:
                write_jsonl(rows[split], os.path.join(cfg.out_dir, "data", f"{split}.jsonl"))
    return rows["train"], rows["test"]


def barrier(env):
    if env.world > 1:
        dist.barrier()


def get_teacher(cfg, env, train_rows, times):
    """A local Llama (--teacher), the one a previous run trained, or a new one trained here."""
    dtype = torch.bfloat16 if env.device.type == "cuda" else torch.float32  # frozen: bf16 is enough
    if cfg.teacher:
        return load_teacher(cfg.teacher, env.device, dtype)
    path = os.path.join(cfg.out_dir, "teacher")
    if os.path.isfile(os.path.join(path, "config.json")):
        if env.main:
            print(f"teacher: using the one already trained in {path}")
        return load_teacher(path, env.device, dtype)
    t0 = time.time()
    tok_path = os.path.join(cfg.out_dir, "tokenizer.model")
    if env.main and not os.path.isfile(tok_path):
        texts = [r["question"] + "\n" + r["answer"] for r in train_rows]
        train_bpe(texts, cfg.vocab_size, tok_path)
    barrier(env)
    tok = Tokenizer(tok_path)
    head_dim = cfg.d_model // cfg.n_heads
    mcfg = ModelConfig(vocab_size=tok.n_words, hidden_size=cfg.d_model, intermediate_size=cfg.d_ff,
                       num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads,
                       num_key_value_heads=cfg.n_kv_heads, head_dim=head_dim, rope_theta=10000.0,
                       max_position_embeddings=cfg.seq_len * 4, tie_word_embeddings=True,
                       bos_token_id=tok.bos_id, eos_token_id=[tok.eos_id, tok.eot_id])
    torch.manual_seed(cfg.seed)
    model = LM(mcfg)
    for name, p in model.named_parameters():  # GPT-2 style small init keeps the first steps stable
        if p.dim() == 2:
            nn.init.normal_(p, std=0.02 / (math.sqrt(2 * cfg.n_layers) if name.endswith(("o_proj.weight", "down_proj.weight")) else 1))
    model.to(env.device)
    batches = Batches(tok, train_rows, cfg.seq_len, cfg.seed)
    if env.main:
        print(f"teacher: {model.num_params() / 1e6:.1f}M parameters, vocab {tok.n_words}, "
              f"{len(train_rows)} problems of {batches.mean_len:.0f} tokens on average ({batches.cut} cut)")
    ckpt = os.path.join(cfg.out_dir, "ckpt", "teacher")
    logger = Logger(os.path.join(cfg.out_dir, "logs", "teacher.jsonl"), env, "teacher", "random")
    model.train()
    run_stage("teacher", model, ce_loss, cfg.teacher_steps, cfg.teacher_lr, cfg, env, batches, tok, ckpt,
              logger, read_state(ckpt) if cfg.resume else None)
    if env.main:
        save_teacher(model, tok, path)
    barrier(env)
    times["teacher"] = time.time() - t0
    # reload through the same path a real Llama checkpoint takes
    return load_teacher(path, env.device, dtype)


def distill_student(name, teacher, tok, ssm_layers, init, cfg, env, batches, times):
    """Transfer, then the three stages; each stage trains what it needs and checkpoints."""
    path = os.path.join(cfg.out_dir, name)
    if os.path.isfile(os.path.join(path, "config.json")):
        if env.main:
            print(f"{name}: already distilled in {path} (delete it to distil again)")
        return load_model(path, env.device)
    torch.manual_seed(cfg.seed + zlib.crc32(name.encode()))  # the same init whatever ran before
    student = transfer_attention_to_mamba(teacher, ssm_layers, init).float().to(env.device)
    if env.main:
        n_ssm = len(ssm_layers)
        print(f"{name}: {n_ssm}/{teacher.cfg.num_hidden_layers} layers are Mamba, init={init}, "
              f"{student.num_params() / 1e6:.1f}M parameters")
    ckpt = os.path.join(cfg.out_dir, "ckpt", name)
    logger = Logger(os.path.join(cfg.out_dir, "logs", f"{name}.jsonl"), env, name, init)
    state = read_state(ckpt) if cfg.resume else None
    plan = [("align", cfg.align_steps, cfg.align_lr, align_loss_fn(teacher, ssm_layers, tok.pad_id)),
            ("kl", cfg.kl_steps, cfg.kl_lr, kl_loss_fn(compiled(teacher, cfg, env), cfg.kl, cfg.temperature, tok.pad_id)),
            ("sft", cfg.sft_steps, cfg.sft_lr, ce_loss)]
    for stage, steps, lr, loss_fn in plan:
        if steps == 0 or (stage == "align" and not ssm_layers):
            continue
        if state and STAGES.index(stage) < STAGES.index(state["stage"]):
            continue  # finished before the checkpoint
        if state and stage == state["stage"] and state["step"] >= steps:
            load_checkpoint(student, None, ckpt)  # this stage finished: take its weights, go on
            logger.resume(stage, state["step"], state.get("time_s", 0.0))
            continue
        t0 = time.time()
        for pname, p in student.named_parameters():
            # stage 1 trains only the mixers (MOHAWK / MambaInLlama); later stages train everything
            p.requires_grad_(stage != "align" or ".mixer." in pname)
        student.train()
        run_stage(stage, student, loss_fn, steps, lr, cfg, env, batches, tok, ckpt, logger,
                  state if state and state["stage"] == stage else None)
        times[f"{name}/{stage}"] = time.time() - t0
    student.eval().requires_grad_(False)
    if env.main:
        save_model(student, tok, path)
    barrier(env)
    return student


def greedy_accuracy(model, tok, rows, cfg, env):
    """Share of test problems whose greedy solution ends with the right "#### answer"."""
    from sample import answer_text, extract_answer, generate, normalize_number  # sample.py imports this file

    prompts = [tok.encode_chat([{"role": "user", "content": prompt_text(r["question"])}]) for r in rows]
    with torch.random.fork_rng(devices=[env.device] if env.device.type == "cuda" else []):
        outs = generate(model, prompts, tok, max_new_tokens=cfg.max_new_tokens or auto_max_new_tokens(tok, rows),
                        temperature=0.0,
                        dtype=env.amp or torch.float32)
    right = [extract_answer(answer_text(o, tok)) == normalize_number(gold_answer(r["answer"]))
             for o, r in zip(outs, rows)]
    return sum(right) / max(len(right), 1)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    cfg = apply_preset(parse_config(DistillConfig, argv, __doc__.strip().splitlines()[0]), argv)
    check_config(cfg)
    env = setup_env(cfg.device)
    if cfg.bench:
        return bench(cfg, env)
    os.makedirs(os.path.join(cfg.out_dir, "logs"), exist_ok=True)
    t_start, times = time.time(), {}
    train_rows, test_rows = load_data(cfg, env)
    teacher, tok = get_teacher(cfg, env, train_rows, times)
    teacher.eval().requires_grad_(False)
    batches = Batches(tok, train_rows, cfg.seq_len, cfg.seed + 1)
    n = teacher.cfg.num_hidden_layers
    keep = spread_layers(n, round(cfg.attn_fraction * n))
    layers = {"hybrid": [i for i in range(n) if i not in keep], "pure": list(range(n))}
    runs = [(s, layers[s], cfg.init) for s in filter(None, cfg.students.split(","))]
    if cfg.random_baseline:
        runs.append((f"{cfg.random_baseline}_random", layers[cfg.random_baseline], "random"))
    models = {"teacher": teacher}
    for name, ssm_layers, init in runs:
        models[name] = distill_student(name, teacher, tok, ssm_layers, init, cfg, env, batches, times)
    summary = {"device": torch.cuda.get_device_name(env.device) if env.device.type == "cuda" else "cpu",
               "preset": cfg.preset, "config": asdict(cfg), "models": {}}
    if env.main:
        t0 = time.time()
        rows = test_rows[:cfg.eval_n]
        for name, model in models.items():
            entry = {"params": model.num_params(), "ssm_layers": model.cfg.ssm_layers,
                     "path": cfg.teacher if name == "teacher" and cfg.teacher else os.path.join(cfg.out_dir, name)}
            if rows:
                entry["greedy_acc"] = greedy_accuracy(model, tok, rows, cfg, env)
                print(f"{name:>12}: greedy accuracy {entry['greedy_acc']:.3f} on {len(rows)} test problems")
            summary["models"][name] = entry
        times["eval"] = time.time() - t0
        times["total"] = time.time() - t_start
        summary["stage_times_s"] = {k: round(v, 1) for k, v in times.items()}
        write_text(os.path.join(cfg.out_dir, "distill_summary.json"), json.dumps(summary, indent=2))
        print("stage wall times (s): " + ", ".join(f"{k} {v:.0f}" for k, v in times.items()))
    if env.world > 1:
        dist.destroy_process_group()
    return summary


# -----------------------------------------------------------------------------
# 8. Benchmark: distillation throughput at the Llama-3.2-1B shape (random weights)

LLAMA_3_2_1B = dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                    num_attention_heads=32, num_key_value_heads=8, head_dim=64, rope_theta=500000.0,
                    rope_scaling={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                                  "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
                    max_position_embeddings=131072, tie_word_embeddings=True)
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
    mcfg = ModelConfig(**LLAMA_3_2_1B)
    torch.manual_seed(0)
    teacher = LM(mcfg).to(env.device, torch.bfloat16).eval().requires_grad_(False)
    name = torch.cuda.get_device_name(env.device)
    peak = next((v for k, v in BF16_PEAK.items() if k in name), None)
    batches = RandomBatches(mcfg.vocab_size, cfg.seq_len)
    logger = Logger(os.devnull, replace(env, rank=1), "bench", "attention")  # silent
    results = []
    students = {"hybrid": [i for i in range(16) if i not in spread_layers(16, 4)], "pure": list(range(16))}
    for kind in filter(None, cfg.students.split(",")):
        ssm = students[kind]
        student = transfer_attention_to_mamba(teacher, ssm).float().to(env.device).train()
        n_t = teacher.num_params() - teacher.model.embed_tokens.weight.numel() * (not mcfg.tie_word_embeddings)
        n_s = student.num_params() - student.model.embed_tokens.weight.numel() * (not mcfg.tie_word_embeddings)
        loss_fn = kl_loss_fn(compiled(teacher, cfg, env), "forward", 1.0, pad_id=-1)
        torch.cuda.reset_peak_memory_stats(env.device)
        run_stage("kl", student, loss_fn, warmup, 1e-5, cfg, env, batches, None, None, logger)
        torch.cuda.synchronize(env.device)
        t0 = time.time()
        run_stage("kl", student, loss_fn, steps, 1e-5, cfg, env, batches, None, None, logger)
        torch.cuda.synchronize(env.device)
        dt = time.time() - t0
        tok_s = steps * cfg.batch_size * cfg.seq_len / dt  # all GPUs together
        mfu = (6 * n_s + 2 * n_t) * tok_s / env.world / peak if peak else float("nan")
        mem = torch.cuda.max_memory_allocated(env.device) / 2**30
        results.append({"student": kind, "tokens_per_s": tok_s, "mfu": mfu, "peak_mem_GiB": mem, "compile": cfg.compile,
                        "gpus": env.world, "batch": cfg.batch_size, "seq_len": cfg.seq_len})
        if env.main:
            print(f"{name} x{env.world}: {kind:>6} student ({'compiled' if cfg.compile else 'eager'}), "
                  f"batch {cfg.batch_size}x{cfg.seq_len} in {cfg.grad_accum} micro-batches: "
                  f"{tok_s:,.0f} tok/s, MFU {mfu:.1%} (6N_s+2N_t), peak memory {mem:.1f} GiB/GPU")
        del student
        torch.cuda.empty_cache()
    if env.main:  # next to sample.py's decode.json, for the record
        write_text(os.path.join(cfg.out_dir, "bench", "distill.json"), json.dumps(
            {"device": name, "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"), "shape": "llama-3.2-1b",
             "flops_per_token": "6 N_student + 2 N_teacher", "peak_flops": peak, "results": results}, indent=2))
    if env.world > 1:
        dist.destroy_process_group()
    return results


if __name__ == "__main__":
    try:
        main()
    except (InputError, TrainingError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2 if isinstance(e, InputError) else 1)
