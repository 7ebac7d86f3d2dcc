"""
Distil a Llama 3 teacher into hybrid and pure Mamba students ("Thinking Slow, Fast", Paliotta et al. 2025).

What is in this file, top to bottom:
  1. the model: one `LM` class that is a Llama 3 decoder when every layer keeps attention (the
     teacher) and a Mamba / hybrid student when some layers' attention became a Mamba-2 mixer;
  2. checkpoint files: HF-format directories (config.json + safetensors + a tiktoken BPE file);
  3. attention -> SSM weight transfer (MambaInLlama / MOHAWK): an explicit mapping table;
  4. data: a synthetic GSM8K-style reasoning set, GSM8K jsonl reading, the project's own tokenizer;
  5. the distillation loop (teacher training for the default run, then staged distillation).

Run:
  python mamba_distill.py               # default: makes data, trains a small teacher, distils students
  python mamba_distill.py --help        # every option of the config below
  python mamba_distill.py --teacher /path/to/Llama-3.2-1B-Instruct --data gsm8k/train.jsonl

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
import json
import math
import os
import sys
from dataclasses import asdict, dataclass, field, fields, replace

import torch
import torch.nn as nn
import torch.nn.functional as F

from scan_kernel import ssd_scan, ssd_scan_ref, ssd_step, ssd_step_ref


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
    """Rotary frequencies (e/2,), with Llama 3's long-context rescaling when rope_scaling asks for it."""
    e = cfg.head_dim
    inv_freq = 1.0 / cfg.rope_theta ** (torch.arange(0, e, 2, dtype=torch.float32) / e)  # (e/2,)
    rs = cfg.rope_scaling
    if not rs or rs.get("rope_type", rs.get("type")) in (None, "default"):
        return inv_freq
    if rs.get("rope_type", rs.get("type")) != "llama3":
        raise InputError(f"config.json: rope_scaling type {rs.get('rope_type')!r} is not supported (llama3 only)")
    # Llama 3.1: slow (long-wavelength) frequencies are divided by `factor`, fast ones kept, and the
    # band in between interpolated smoothly, so the model sees longer contexts as it saw 8k.
    factor, lo, hi, old = rs["factor"], rs["low_freq_factor"], rs["high_freq_factor"], rs["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old / lo, inv_freq / factor, inv_freq)
    smooth = (old / wavelen - lo) / (hi - lo)
    mid = (wavelen >= old / hi) & (wavelen <= old / lo)
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

    def forward(self, x, rope, cache=None, ctx=None):
        b, l, _ = x.shape
        q = self.q_proj(x).view(b, l, self.h, self.e).transpose(1, 2)  # (b, h, l, e)
        k = self.k_proj(x).view(b, l, self.k, self.e).transpose(1, 2)  # (b, k, l, e)
        v = self.v_proj(x).view(b, l, self.k, self.e).transpose(1, 2)  # (b, k, l, e)
        q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        if cache is None:  # training / plain forward: causal over this sequence only
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)  # (b, h, l, e)
        else:
            k_cache, v_cache = cache  # (b, k, s, e) each, written in place at slots ctx.slots
            k_cache.index_copy_(2, ctx.slots, k.to(k_cache.dtype))
            v_cache.index_copy_(2, ctx.slots, v.to(v_cache.dtype))
            kv = ctx.kv_len
            if l == 1:
                # Decode: fold the r query heads of a group into the "query length" so that every
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
        z, xBC, dt = torch.split(self.in_proj(u), [self.sizes["z"], self.conv_dim, self.h], dim=-1)
        if ctx is not None and ctx.valid is not None:
            # left padding must leave no trace: a zero conv input looks like "before the start",
            # and dt = 0 means the state neither decays nor receives anything (exp(0) = 1).
            xBC = xBC * ctx.valid[..., None].to(xBC.dtype)  # (b, l, conv_dim)
        if cache is not None and l == 1:
            return self._step(z, xBC, dt, cache)
        conv_state = None if cache is None else cache[0]  # (b, conv_dim, w-1)
        xBC_t = xBC.transpose(1, 2)  # (b, conv_dim, l)
        if conv_state is not None:  # continue from the previous chunk's last w-1 inputs
            xBC_t = torch.cat([conv_state.to(xBC_t.dtype), xBC_t], dim=-1)  # (b, conv_dim, w-1+l)
            conv_state.copy_(xBC_t[:, :, -(self.w - 1):])
            xBC = F.conv1d(xBC_t, self.conv1d.weight, self.conv1d.bias, groups=self.conv_dim)  # (b, conv_dim, l)
        else:
            xBC = self.conv1d(xBC_t)[..., :l]  # (b, conv_dim, l): keep the causal outputs
        xBC = xBC.transpose(1, 2)  # (b, l, conv_dim)
        if self.conv_act:
            xBC = F.silu(xBC)
        x, B, C = torch.split(xBC, [self.k * self.p, self.k * self.n, self.h * self.n], dim=-1)
        r = self.h // self.k
        x = x.view(b, l, self.k, self.p).repeat_interleave(r, dim=2)  # (b, l, h, p) shared in a group
        B = B.view(b, l, self.k, self.n).repeat_interleave(r, dim=2)  # (b, l, h, n)
        C = C.reshape(b, l, self.h, self.n)  # (b, l, h, n)
        dt = F.softplus(dt.float() + self.dt_bias.float())  # (b, l, h) > 0
        if ctx is not None and ctx.valid is not None:
            dt = dt * ctx.valid[..., None]
        A = -torch.exp(self.A_log.float())  # (h,) < 0: a decay per head
        scan = ssd_scan if x.is_cuda else ssd_scan_ref
        if cache is None:
            y = scan(x, dt, A, B, C, self.D.float())  # (b, l, h, p)
        else:
            y, final = scan(x, dt, A, B, C, self.D.float(), initial_state=cache[1], return_final_state=True)
            cache[1].copy_(final)
        return self._out(y.reshape(b, l, -1), z)

    def _step(self, z, xBC, dt, cache):
        """One decode token: roll the conv window, then one SSM recurrence step (in place)."""
        conv_state, ssm_state = cache  # (b, conv_dim, w-1), (b, h, p, n) fp32
        b = z.shape[0]
        window = torch.cat([conv_state, xBC.transpose(1, 2).to(conv_state.dtype)], dim=-1)  # (b, conv_dim, w)
        conv_state.copy_(window[:, :, 1:])
        xBC = (window * self.conv1d.weight[:, 0]).sum(-1) + self.conv1d.bias  # (b, conv_dim)
        if self.conv_act:
            xBC = F.silu(xBC)
        x, B, C = torch.split(xBC, [self.k * self.p, self.k * self.n, self.h * self.n], dim=-1)
        r = self.h // self.k
        x = x.view(b, self.k, self.p).repeat_interleave(r, dim=1).to(z.dtype)  # (b, h, p)
        B = B.view(b, self.k, self.n).repeat_interleave(r, dim=1).to(z.dtype)  # (b, h, n)
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
        h = self.input_layernorm(x)
        m = self.mix(h, rope, cache, ctx)
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
    mask: torch.Tensor   # (b, 1, l, kv_len) bool, True = may attend
    valid: torch.Tensor | None  # (b, l) float, 0 at left padding (None when there is none)


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
        self.register_buffer("inv_freq", rope_inv_freq(cfg), persistent=False)  # (e/2,)

    def rope(self, pos, dtype):
        """cos, sin (b, 1, l, e) for integer positions pos (b, l), computed in fp32."""
        ang = pos[..., None].float() * self.inv_freq  # (b, l, e/2)
        ang = torch.cat([ang, ang], dim=-1)[:, None]  # (b, 1, l, e)
        return ang.cos().to(dtype), ang.sin().to(dtype)

    def allocate_cache(self, batch, max_len, dtype, device):
        """Per layer: (k, v) (b, k, s, e) for attention, (conv, state) for a mixer, state in fp32."""
        c = self.cfg
        cache = []
        for blk in self.model.layers:
            if hasattr(blk, "mixer"):
                m = blk.mixer
                cache.append((torch.zeros(batch, m.conv_dim, m.w - 1, dtype=dtype, device=device),
                              torch.zeros(batch, m.h, m.p, m.n, dtype=torch.float32, device=device)))
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
        s = max((kv[0].shape[2] for kv, blk in zip(cache, self.model.layers) if not hasattr(blk, "mixer")),
                default=0)
        if torch.is_tensor(start):  # decode step under a CUDA graph: fixed shapes, read all s slots
            assert l == 1, "a tensor start is for one-token decode steps"
            slots = start.view(1)  # (1,)
            kv_len = s
        else:
            slots = torch.arange(start, start + l, device=device)  # (l,)
            kv_len = start + l
        pad = torch.zeros(b, dtype=torch.long, device=device) if pad is None else pad
        pos = (slots[None, :] - pad[:, None]).clamp(min=0)  # (b, l) positions from each row's start
        key = torch.arange(max(kv_len, 1), device=device)[:kv_len]  # (kv_len,)
        mask = (key[None, None, :] <= slots[None, :, None]) & (key[None, None, :] >= pad[:, None, None])
        # a padding query sees only itself: a row with nothing to attend to would give NaN, and a
        # NaN value, even masked out later, poisons every real query through 0 * NaN
        mask = mask | (key[None, None, :] == slots[None, :, None])  # (b, l, kv_len)
        valid = None
        if l > 1 and bool(pad.any()):  # only a prefill can contain padding
            valid = (slots[None, :] >= pad[:, None]).float()  # (b, l)
        return StepContext(slots, kv_len, mask[:, None], valid), pos  # mask (b, 1, l, kv_len)

    def num_params(self):
        return sum(p.numel() for p in self.parameters())


# -----------------------------------------------------------------------------
# 2. Checkpoint directories (HF layout: config.json, model*.safetensors, tokenizer.model)

TOKENIZER_FILES = ("tokenizer.model", "original/tokenizer.model")  # ours, Meta's HF repos


def _atomic_write_text(path, text):
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as fh:
        fh.write(text)
    os.replace(tmp, path)  # readers see the old file or the new one, never half of one


def read_config(path) -> ModelConfig:
    cfg_path = os.path.join(path, "config.json")
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
    model.inv_freq = rope_inv_freq(cfg)
    return model.to(device)


def find_tokenizer(path) -> str:
    for name in TOKENIZER_FILES:
        if os.path.isfile(os.path.join(path, name)):
            return os.path.join(path, name)
    raise InputError(f"{path}: no tokenizer file (looked for {', '.join(TOKENIZER_FILES)})")


def load_teacher(path, device="cpu", dtype=torch.float32):
    """A local HF-format Llama directory -> (LM, Tokenizer)."""
    tokenizer = Tokenizer(find_tokenizer(path))
    return load_model(path, device, dtype), tokenizer


def save_model(model: LM, tokenizer, path, max_shard_bytes=None):
    """Write an HF-style directory; a teacher written here loads in HF's LlamaForCausalLM too."""
    os.makedirs(path, exist_ok=True)
    sd = {k: v.detach() for k, v in model.state_dict().items()}
    if model.cfg.tie_word_embeddings:
        sd.pop("lm_head.weight")
    dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
    save_state_dict(sd, path, max_shard_bytes)
    tokenizer.save(os.path.join(path, "tokenizer.model"))
    _atomic_write_text(os.path.join(path, "config.json"),
                       json.dumps({**model.cfg.to_dict(), "torch_dtype": dtype}, indent=2))


save_teacher = save_model  # a teacher is an LM with no ssm_layers


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
    initialisation (MambaMixer.reset_ssm_parameters): MambaInLlama found the attention weights to be
    what matters, and a mixer with random z, dt and A still starts far closer to the teacher than one
    with random projections, so that stage 1 only has to learn the decay and the gate.
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
