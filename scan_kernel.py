"""
The Triton SSD scan of the students' Mamba-2 mixers (forward, backward, decode step) beside its
pure-PyTorch reference; the other kernels the speed comparison depends on (the teacher's decode
attention, the students' conv step, stage 2's fused KL loss); the check, the benchmark and the
command line the project's scripts share.

The mixer is the selective state-space recurrence of Mamba-2, per batch b and head h:

    state_t = exp(dt_t * A_h) * state_{t-1} + dt_t * outer(x_t, B_t[g(h)])     # (p, n)
    y_t     = state_t @ C_t[g(h)] + D_h * x_t                                   # (p,)

Run:  python scan_kernel.py --check           correctness check on the current device
      python scan_kernel.py --bench [--mamba_path DIR]   speed against the PyTorch path and mamba_ssm
      python -m pytest -q test_all.py -k "scan or step or kl or decode_attention or conv"

Glossary: b batch, l length, h heads, p head dim (x, y), n state dim (B, C), g groups (head h reads
B and C of group h // (h/g); the student's scan gets g == h, its decode step x and B per kv head and
C per head), c chunk length, k chunk index, i/j/t positions inside a chunk, s the running sum of the
log-decay dt*A inside a chunk, S a (p, n) state. Decode attention: e head dim, g kv heads, r = h/g
query heads per kv head, s cache slots, t the slot of the newest token, pad the left padding of each
row. Conv step: d channels (the mixer's x, B and C), w taps, a ring of the last w-1 inputs. KL: N
rows, V vocabulary, T temperature.

The trick (chunked SSD, Dao & Gu 2024, "Transformers are SSMs", sec. 6). Run sequentially, the
recurrence needs l dependent steps of p*n work: no matrix multiplies, no parallelism along l. Cut
the sequence into chunks of c tokens. Inside chunk k let s_i = sum_{t<=i} dt_t*A (so the decay from
token j to token i is exp(s_i - s_j)) and S_k the state entering the chunk. Unrolling gives

    y_i = exp(s_i) * S_k @ C_i                                         (1) what came before the chunk
        + sum_{j<=i} exp(s_i - s_j) * (C_i . B_j) * dt_j * x_j          (2) the chunk itself
        + D * x_i
    S_{k+1} = exp(s_last) * S_k + sum_j exp(s_last - s_j) * dt_j * outer(x_j, B_j)      (3)

(2) is causal linear attention with a decay mask: Y = (L o C B^T) (dt x), L_ij = exp(s_i - s_j)
for j <= i, a (c, c) matrix product; (1) is C S_k^T, and the sum in (3) is (w x)^T B: all three
are tensor-core matmuls (tl.dot, fp32 accumulation). Only (3)'s first term is sequential, and it is
a cheap elementwise pass over l/c chunk states. Forward = three kernels:
    _chunk_state_kernel   every chunk in parallel: its own contribution sum_j ... outer(x_j, B_j)
    _state_passing_kernel along the chunks: turns those into the states S_k entering each chunk
                          (16 chunks per step, with the same trick one level up, see the kernel)
    _chunk_out_kernel     every chunk in parallel: y from (1) + (2) + D x; the C B^T product is
                          computed once per group and reused by its h/g heads.
The backward has the same shape run in reverse: dL/dS_k gets (dy exp(s))^T C from chunk k (the same
chunk-state kernel), the passing kernel runs from the last chunk to the first (dS_k = exp(s_last)
dS_{k+1} + that), and one kernel per chunk and group computes dx, dB, dC, ddt and the dA, dD partial
sums from the saved states S_k. Gradients of the log-decays: d(loss)/ds_i collects from (1), (2),
(3); since s is a running sum, d/d(dt_t A) = sum_{i>=t} d/ds_i (a reverse cumulative sum).

Decode (ssd_step) is one step of the recurrence: a memory-bound read-modify-write of the (b, h, p, n)
state, one program per (b, h, block of p rows); a bf16 state halves the bytes (fp32 math inside).

Shapes and dtypes: any l; any p, n up to 128 (tiles are padded to powers of two >= 16 by masks); x,
B, C in bf16, fp16 or fp32 (fp32 gets exact dots, not tf32); dt, A, D fp32; the scan's states fp32
(the decode step's may be bf16); any strides. The forward saves the entering state of every chunk
for the backward: b*h*ceil(l/c)*p*n*4 bytes. Under the interpreter (TRITON_INTERPRET=1) kernels loop
with `while` or over constexpr bounds: `range(runtime int)` fails there with numpy 2.4.

The teacher's decode attention (decode_attention) is one token of grouped-query attention against
the KV cache, memory-bound. "Flash-decoding": each program takes one (row, kv head), so the r query
heads of a group share each key they read (an (r, e) x (e, block) tl.dot), and one fixed range of
SPLIT slots, so a row's result never depends on the batch (samples are the same at any batch size)
and a long cache is read by several programs per row; a second kernel merges the splits' softmaxes.

The conv step (conv_step) is the mixer's causal depthwise conv for one decode token: out =
silu(bias + sum_j weight_j * input_{t-w+1+j}), over a ring of the last w-1 inputs (slot s in row s % (w-1)).

The fused KL loss (fused_kl_div) is stage 2 of distillation: per row of student and teacher logits,
KL(p_t || p_s) (forward) or KL(p_s || p_t) (reverse) at temperature T. PyTorch materialises several
fp32 (N, V) tensors; the kernel streams each row's logits in blocks, in fp32 registers: pass 1 finds
both log-sum-exps online, pass 2 sums the KL (and writes the forward KL's gradient), pass 3 writes the
reverse KL's gradient, which needs the finished KL. The gradient goes into one (N, V) buffer of the
logits' dtype, which the backward scales in place.
"""
import argparse
import dataclasses
import functools
import importlib
import math
import os
import sys
import time
import types

import torch
import triton
import triton.language as tl
import triton.testing

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


# -----------------------------------------------------------------------------
# References: the recurrence as written, and the chunked algorithm in plain PyTorch

def _ssd_update(state, x, dt, A, B, C, D):
    """One token of the recurrence, fp32, out of place: the new state (b, h, p, n) and y (b, h, p). x (b, gx, p),
    B (b, gb, n), C (b, gc, n) may be shared by groups of heads: head i reads group i // (h / g)."""
    h = state.shape[1]
    xh, Bh, Ch = (v.float().repeat_interleave(h // v.shape[1], dim=1) for v in (x, B, C))  # (b, h, p), (b, h, n) x2
    decay = torch.exp(dt.float() * A.float())  # (b, h)
    new = decay[..., None, None] * state + (dt.float()[..., None] * xh)[..., None] * Bh[:, :, None, :]  # (b, h, p, n)
    y = (new @ Ch[..., None]).squeeze(-1)  # (b, h, p)
    if D is not None:
        y = y + D.float()[:, None] * xh
    return new, y


def ssd_scan_ref(x, dt, A, B, C, D=None, initial_state=None, return_final_state=False):
    """Sequential definition, one token at a time, fp32 math; y in x's dtype."""
    (b, l, h, p), n = x.shape, B.shape[3]
    state = torch.zeros(b, h, p, n, device=x.device) if initial_state is None else initial_state.float()  # (b, h, p, n)
    ys = []
    for t in range(l):
        state, y = _ssd_update(state, x[:, t], dt[:, t], A, B[:, t], C[:, t], D)  # (b, h, p, n), (b, h, p)
        ys.append(y)
    y = torch.stack(ys, dim=1).to(x.dtype)  # (b, l, h, p)
    return (y, state) if return_final_state else y


def ssd_scan_chunked_torch(x, dt, A, B, C, D=None, initial_state=None, return_final_state=False, chunk_size=64):
    """The chunked algorithm in plain PyTorch (fp32), ssd_scan's interface: the CPU path and the
    benchmark's PyTorch path."""
    (b, l, h, p), (g, n) = x.shape, B.shape[2:]
    c, pad = chunk_size, (-l) % chunk_size
    k = (l + pad) // c
    f = lambda t: torch.nn.functional.pad(t.float(), [0, 0] * (t.dim() - 2) + [0, pad])
    xs = f(x).view(b, k, c, h, p)  # (b, k, c, h, p)
    dts = f(dt).view(b, k, c, h)  # (b, k, c, h)
    Bs, Cs = (f(v).repeat_interleave(h // g, dim=2).view(b, k, c, h, n) for v in (B, C))  # (b, k, c, h, n) each
    s = torch.cumsum(dts * A.float(), dim=2)  # (b, k, c, h)
    xd = xs * dts[..., None]  # (b, k, c, h, p)
    causal = torch.ones(c, c, dtype=torch.bool, device=x.device).tril()
    seg = (s[:, :, :, None, :] - s[:, :, None, :, :]).masked_fill(~causal[None, None, :, :, None], -math.inf)  # (b, k, i, j, h)
    cb = torch.einsum("bkihn,bkjhn->bkijh", Cs, Bs)  # (b, k, i, j, h)
    y = torch.einsum("bkijh,bkjhp->bkihp", cb * torch.exp(seg), xd)  # (b, k, c, h, p)
    w = torch.exp(s[:, :, -1:, :] - s)  # (b, k, c, h)
    local = torch.einsum("bkchp,bkchn->bkhpn", xd * w[..., None], Bs)  # (b, k, h, p, n)
    state = x.new_zeros(b, h, p, n, dtype=torch.float32) if initial_state is None else initial_state.float()
    states = []
    for kk in range(k):
        states.append(state)
        state = torch.exp(s[:, kk, -1])[..., None, None] * state + local[:, kk]  # (b, h, p, n)
    states = torch.stack(states, dim=1)  # (b, k, h, p, n)
    y = y + torch.einsum("bkchn,bkhpn->bkchp", Cs, states) * torch.exp(s)[..., None]
    if D is not None:
        y = y + D.float()[:, None] * xs
    y = y.reshape(b, k * c, h, p)[:, :l].to(x.dtype)
    return (y, state) if return_final_state else y


def ssd_step_ref(state, x, dt, A, B, C, D=None):
    """One decode step in place on state (b, h, p, n), _ssd_update's inputs; y (b, h, p) in x's dtype."""
    new, y = _ssd_update(state.float(), x, dt, A, B, C, D)
    state.copy_(new)
    return y.to(x.dtype)


# -----------------------------------------------------------------------------
# Forward kernels

@triton.jit
def _chunk_log_decay(dt_ptr, A_ptr, b, h, t, t_mask, s_dt_b, s_dt_l, s_dt_h):
    """dt (c,), the running log-decay s (c,) and its chunk total, for one (b, chunk, head)."""
    dt = tl.load(dt_ptr + b * s_dt_b + t * s_dt_l + h * s_dt_h, mask=t_mask, other=0.0).to(tl.float32)
    a = dt * tl.load(A_ptr + h).to(tl.float32)  # (c,) padded tokens have dt = 0: no decay, no input
    return dt, tl.cumsum(a, 0), tl.sum(a, 0)


@triton.jit
def _chunk_state_kernel(u_ptr, v_ptr, dt_ptr, A_ptr, out_ptr, logdecay_ptr, L, H, HPG, P, N, NCHUNKS,
                        s_u_b, s_u_l, s_u_h, s_u_p, s_v_b, s_v_l, s_v_g, s_v_n, s_dt_b, s_dt_l, s_dt_h,
                        BACKWARD: tl.constexpr, CHUNK: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr,
                        DOT: tl.constexpr):
    """One (chunk, b*h): out[b, h, k] = (u * w)^T @ v, a (p, n) matrix.
    Forward: u = x, v = B, w = dt * exp(s_last - s), the chunk's own state contribution (3);
    also stores s_last. Backward: u = dy, v = C, w = exp(s), the gradient of the entering state (1)."""
    k, bh = tl.program_id(0), tl.program_id(1)
    b, h = bh // H, bh % H
    t = k * CHUNK + tl.arange(0, CHUNK)
    t_mask = t < L
    offs_p, offs_n = tl.arange(0, BLOCK_P), tl.arange(0, BLOCK_N)
    dt, s, s_last = _chunk_log_decay(dt_ptr, A_ptr, b, h, t, t_mask, s_dt_b, s_dt_l, s_dt_h)
    if BACKWARD:
        w = tl.exp(s)
    else:
        w = dt * tl.exp(s_last - s)
        tl.store(logdecay_ptr + bh * NCHUNKS + k, s_last)
    u = tl.load(u_ptr + b * s_u_b + t[:, None] * s_u_l + h * s_u_h + offs_p[None, :] * s_u_p,
                mask=t_mask[:, None] & (offs_p[None, :] < P), other=0.0)  # (c, p)
    v = tl.load(v_ptr + b * s_v_b + t[:, None] * s_v_l + (h // HPG) * s_v_g + offs_n[None, :] * s_v_n,
                mask=t_mask[:, None] & (offs_n[None, :] < N), other=0.0)  # (c, n)
    uw = (u.to(tl.float32) * w[:, None]).to(v.dtype)
    out = tl.dot(tl.trans(uw), v, input_precision=DOT)  # (p, n) fp32
    out_ptrs = out_ptr + (bh * NCHUNKS + k) * P * N + offs_p[:, None] * N + offs_n[None, :]
    tl.store(out_ptrs, out, mask=(offs_p[:, None] < P) & (offs_n[None, :] < N))


@triton.jit
def _state_passing_kernel(states_ptr, logdecay_ptr, init_ptr, last_ptr, NCHUNKS, PN,
                          HAS_INIT: tl.constexpr, REVERSE: tl.constexpr, STEP: tl.constexpr, BLOCK: tl.constexpr):
    """One (b*h, block of the p*n state entries), in place along the chunks.
    Forward: states[k] holds chunk k's own contribution on entry, the state entering chunk k on exit;
    last = final state. Reverse: the same for the gradients, last = gradient of the initial state.
    STEP chunks are solved at once with the chunk trick one level up: the state entering chunk u is
    exp(decay before u) * run + sum_{v<u} (decay from v to u) * own_v, a (STEP, STEP) lower-triangular
    matmul, rather than waiting for one small load per chunk."""
    bh = tl.program_id(0)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < PN
    u = tl.arange(0, STEP)
    if HAS_INIT:
        run = tl.load(init_ptr + bh * PN + offs, mask=mask, other=0.0).to(tl.float32)
    else:
        run = tl.zeros([BLOCK], dtype=tl.float32)
    i = 0
    while i < NCHUNKS:  # a while loop: range(runtime int) breaks the interpreter under numpy >= 2.4
        k = NCHUNKS - 1 - (i + u) if REVERSE else i + u  # (STEP,) chunk ids in the order of the recurrence
        k_mask = (i + u) < NCHUNKS
        ptrs = states_ptr + (bh * NCHUNKS + k)[:, None] * PN + offs[None, :]
        tile_mask = k_mask[:, None] & mask[None, :]
        own = tl.load(ptrs, mask=tile_mask, other=0.0)  # (STEP, BLOCK)
        ld = tl.load(logdecay_ptr + bh * NCHUNKS + k, mask=k_mask, other=0.0)  # (STEP,) log-decay of each chunk
        cl = tl.cumsum(ld, 0)  # (STEP,) inclusive
        before = cl - ld  # log-decay from the group start to the start of chunk u
        w = tl.exp(tl.where(u[None, :] < u[:, None], before[:, None] - cl[None, :], float("-inf")))  # (STEP, STEP)
        enter = tl.dot(w, own, input_precision="ieee") + tl.exp(before)[:, None] * run[None, :]  # (STEP, BLOCK)
        tl.store(ptrs, enter, mask=tile_mask)
        cl_last = tl.sum(ld, 0)
        run = tl.exp(cl_last) * run + tl.sum(tl.exp(cl_last - cl)[:, None] * own, 0)
        i += STEP
    tl.store(last_ptr + bh * PN + offs, run, mask=mask)


@triton.jit
def _decay_matrix(s, CHUNK: tl.constexpr):
    """L_ij = exp(s_i - s_j) for j <= i, else 0 (exp of -inf: never exp of a large positive)."""
    i = tl.arange(0, CHUNK)
    return tl.exp(tl.where(i[:, None] >= i[None, :], s[:, None] - s[None, :], float("-inf")))  # (c, c)


@triton.jit
def _chunk_group(B_ptr, C_ptr, L, H, N, s_b_b, s_b_l, s_b_g, s_b_n, s_c_b, s_c_l, s_c_g, s_c_n,
                 HPG: tl.constexpr, CHUNK: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr, DOT: tl.constexpr):
    """The start of a (chunk, b*g) program: indices, the group's B and C (c, n) and their shared C B^T (c, c)."""
    k, bg = tl.program_id(0), tl.program_id(1)
    G = H // HPG
    b, grp = bg // G, bg % G
    t = k * CHUNK + tl.arange(0, CHUNK)
    t_mask = t < L
    offs_p, offs_n = tl.arange(0, BLOCK_P), tl.arange(0, BLOCK_N)
    tn_mask = t_mask[:, None] & (offs_n[None, :] < N)
    Bm = tl.load(B_ptr + b * s_b_b + t[:, None] * s_b_l + grp * s_b_g + offs_n[None, :] * s_b_n, mask=tn_mask, other=0.0)  # (c, n)
    Cm = tl.load(C_ptr + b * s_c_b + t[:, None] * s_c_l + grp * s_c_g + offs_n[None, :] * s_c_n, mask=tn_mask, other=0.0)  # (c, n)
    return k, b, grp, G, t, t_mask, offs_p, offs_n, tn_mask, Bm, Cm, tl.dot(Cm, tl.trans(Bm), input_precision=DOT)


@triton.jit
def _chunk_out_kernel(x_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, D_ptr, states_ptr, y_ptr, L, H, P, N, NCHUNKS,
                      s_x_b, s_x_l, s_x_h, s_x_p, s_dt_b, s_dt_l, s_dt_h, s_b_b, s_b_l, s_b_g, s_b_n,
                      s_c_b, s_c_l, s_c_g, s_c_n, HPG: tl.constexpr, HAS_D: tl.constexpr, CHUNK: tl.constexpr,
                      BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr, DOT: tl.constexpr):
    """One (chunk, b*g): y = exp(s) C S_k^T + (L o C B^T)(dt x) + D x for the h/g heads of group g."""
    k, b, grp, G, t, t_mask, offs_p, offs_n, tn_mask, Bm, Cm, cb = _chunk_group(
        B_ptr, C_ptr, L, H, N, s_b_b, s_b_l, s_b_g, s_b_n, s_c_b, s_c_l, s_c_g, s_c_n, HPG, CHUNK, BLOCK_P, BLOCK_N, DOT)
    tp_mask = t_mask[:, None] & (offs_p[None, :] < P)
    for hh in range(HPG):
        h = grp * HPG + hh
        dt, s, s_last = _chunk_log_decay(dt_ptr, A_ptr, b, h, t, t_mask, s_dt_b, s_dt_l, s_dt_h)
        x = tl.load(x_ptr + b * s_x_b + t[:, None] * s_x_l + h * s_x_h + offs_p[None, :] * s_x_p, mask=tp_mask, other=0.0)  # (c, p)
        S = tl.load(states_ptr + ((b * H + h) * NCHUNKS + k) * P * N + offs_p[:, None] * N + offs_n[None, :],
                    mask=(offs_p[:, None] < P) & (offs_n[None, :] < N), other=0.0)  # (p, n) fp32
        y = tl.dot(Cm, tl.trans(S.to(Cm.dtype)), input_precision=DOT) * tl.exp(s)[:, None]  # (c, p) term (1)
        m = (cb * _decay_matrix(s, CHUNK)).to(x.dtype)  # (c, c)
        xd = (x.to(tl.float32) * dt[:, None]).to(x.dtype)  # (c, p)
        y = tl.dot(m, xd, y, input_precision=DOT)  # (c, p) + term (2)
        if HAS_D:
            y += tl.load(D_ptr + h).to(tl.float32) * x.to(tl.float32)
        tl.store(y_ptr + ((b * L + t[:, None]) * H + h) * P + offs_p[None, :], y.to(y_ptr.dtype.element_ty), mask=tp_mask)


# Fixed launch options, no autotune, so that results never depend on which config won. num_warps=8
# is only safe for large tiles (the backward of groups of several heads); larger chunks than the
# defaults need more shared memory than an H100/H200 has.
CHUNK_OPTS = dict(num_warps=4, num_stages=1)
PASS_STEP, PASS_BLOCK = 16, 256  # passing kernel: chunks per step (tl.dot needs >= 16), state entries per program


def _dot_precision(t):
    """tl.dot's input_precision for operands of t's dtype: fp32 operands get exact dots, not tf32 (the
    models run the scan in bf16 on a GPU; fp32 is for checks, which should be as exact there as under the
    interpreter)."""
    return "ieee" if t.dtype == torch.float32 else "tf32"


def _blocks(*dims):
    # tl.dot needs every dimension >= 16; smaller or odd sizes are padded by masks
    return tuple(max(16, triton.next_power_of_2(d)) for d in dims)


def _expect_shapes(want, of):
    """want: {name: (tensor or None, expected shape)}; a wrong shape would read out of bounds."""
    for name, (t, shape) in want.items():
        if t is not None and tuple(t.shape) != shape:
            raise ValueError(f"scan_kernel.py: {name} has shape {tuple(t.shape)}, expected {shape} for {of}")


def _check_groups(h, g, p, n):
    if h % g:
        raise ValueError(f"scan_kernel.py: heads h={h} must be a multiple of groups g={g}")
    if p > 128 or n > 128:
        raise ValueError(f"scan_kernel.py: p={p} and n={n} must be at most 128 (one tile per head)")


def _pass_states(u, v, dt, A, logdecay, init, chunk, reverse):
    """The chunk-state kernel, then the passing kernel. Forward (u = x, v = B; fills logdecay): the states
    entering the chunks and the final state. Reverse (u = dy, v = C, init = the final state's gradient):
    the gradients of the states leaving the chunks and of the initial state."""
    (b, l, h, p), (g, n) = u.shape, v.shape[2:]
    nchunks = logdecay.shape[2]
    BLOCK_P, BLOCK_N = _blocks(p, n)
    states = u.new_empty(b, h, nchunks, p, n, dtype=torch.float32)  # own contributions first
    _chunk_state_kernel[(nchunks, b * h)](u, v, dt, A, states, logdecay, l, h, h // g, p, n, nchunks,
                                          *u.stride(), *v.stride(), *dt.stride(), BACKWARD=reverse, CHUNK=chunk,
                                          BLOCK_P=BLOCK_P, BLOCK_N=BLOCK_N, DOT=_dot_precision(v), **CHUNK_OPTS)
    last = u.new_empty(b, h, p, n, dtype=torch.float32)
    _state_passing_kernel[(b * h, triton.cdiv(p * n, PASS_BLOCK))](
        states, logdecay, states if init is None else init.to(torch.float32).contiguous(), last, nchunks, p * n,
        HAS_INIT=init is not None, REVERSE=reverse, STEP=PASS_STEP, BLOCK=PASS_BLOCK)
    return states, last


# -----------------------------------------------------------------------------
# Backward kernel, and the autograd Function that ties forward and backward together

@triton.jit
def _chunk_bwd_kernel(x_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, D_ptr, states_ptr, dstates_ptr, dy_ptr,
                      dx_ptr, ddt_ptr, dB_ptr, dC_ptr, dA_part_ptr, dD_part_ptr, L, H, P, N, NCHUNKS,
                      s_x_b, s_x_l, s_x_h, s_x_p, s_dt_b, s_dt_l, s_dt_h, s_b_b, s_b_l, s_b_g, s_b_n,
                      s_c_b, s_c_l, s_c_g, s_c_n, s_dy_b, s_dy_l, s_dy_h, s_dy_p, HPG: tl.constexpr,
                      HAS_D: tl.constexpr, CHUNK: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr,
                      DOT: tl.constexpr):
    """One (chunk, b*g). Inputs: the saved entering state S_k and the gradient G of the leaving
    state S_{k+1}, both (p, n). dx, ddt per head; dB, dC summed over the group's heads in registers;
    per-(b, h, k) partial sums for dA and dD."""
    k, b, grp, G_, t, t_mask, offs_p, offs_n, tn_mask, Bm, Cm, cb = _chunk_group(
        B_ptr, C_ptr, L, H, N, s_b_b, s_b_l, s_b_g, s_b_n, s_c_b, s_c_l, s_c_g, s_c_n, HPG, CHUNK, BLOCK_P, BLOCK_N, DOT)
    tp_mask = t_mask[:, None] & (offs_p[None, :] < P)
    pn_mask = (offs_p[:, None] < P) & (offs_n[None, :] < N)
    dB, dC = tl.zeros([CHUNK, BLOCK_N], dtype=tl.float32), tl.zeros([CHUNK, BLOCK_N], dtype=tl.float32)
    for hh in range(HPG):
        h = grp * HPG + hh
        dt, s, s_last = _chunk_log_decay(dt_ptr, A_ptr, b, h, t, t_mask, s_dt_b, s_dt_l, s_dt_h)
        x = tl.load(x_ptr + b * s_x_b + t[:, None] * s_x_l + h * s_x_h + offs_p[None, :] * s_x_p, mask=tp_mask, other=0.0)  # (c, p)
        dy = tl.load(dy_ptr + b * s_dy_b + t[:, None] * s_dy_l + h * s_dy_h + offs_p[None, :] * s_dy_p, mask=tp_mask, other=0.0)  # (c, p)
        xf = x.to(tl.float32)
        xd = xf * dt[:, None]  # (c, p) fp32
        dyc, xdc = dy.to(x.dtype), xd.to(x.dtype)  # tl.dot operands
        decay = _decay_matrix(s, CHUNK)  # (c, c)
        # term (2): y_i += sum_j L_ij cb_ij xd_j. r_ij = L_ij (dy_i . xd_j)
        r = decay * tl.dot(dyc, tl.trans(xdc), input_precision=DOT)  # (c, c)
        pr = r * cb
        ds = tl.sum(pr, 1) - tl.sum(pr, 0)  # (c,) dloss/ds_i from (2): +row sums, -column sums
        rc = r.to(Cm.dtype)
        dC = tl.dot(rc, Bm, dC, input_precision=DOT)
        dB = tl.dot(tl.trans(rc), Cm, dB, input_precision=DOT)
        dxd = tl.dot(tl.trans((decay * cb).to(x.dtype)), dyc, input_precision=DOT)  # (c, p)
        # term (1): y_i += exp(s_i) S_k C_i
        sk_ptrs = ((b * H + h) * NCHUNKS + k) * P * N + offs_p[:, None] * N + offs_n[None, :]
        S = tl.load(states_ptr + sk_ptrs, mask=pn_mask, other=0.0)  # (p, n) fp32
        dys = tl.dot(dyc, S.to(x.dtype), input_precision=DOT) * tl.exp(s)[:, None]  # (c, n)
        dC += dys
        ds += tl.sum(dys * Cm.to(tl.float32), 1)
        # term (3): S_{k+1} = exp(s_last) S_k + sum_j exp(s_last - s_j) outer(xd_j, B_j)
        Gm = tl.load(dstates_ptr + sk_ptrs, mask=pn_mask, other=0.0)  # (p, n) fp32
        el = tl.exp(s_last - s)  # (c,)
        Gc = Gm.to(x.dtype)
        dB += tl.dot(xdc, Gc, input_precision=DOT) * el[:, None]
        dxs = tl.dot(Bm.to(x.dtype), tl.trans(Gc), input_precision=DOT) * el[:, None]  # (c, p)
        q = tl.sum(xd * dxs, 1)  # (c,)
        ds -= q
        ds_last = tl.exp(s_last) * tl.sum(tl.sum(Gm * S, 1), 0) + tl.sum(q, 0)
        dxd += dxs
        # s_i = sum_{t<=i} a_t and s_last = sum of all a_t in the chunk: da_t = sum_{i>=t} ds_i + ds_last
        da = tl.sum(ds, 0) - tl.cumsum(ds, 0) + ds + ds_last  # (c,)
        ddt = tl.sum(dxd * xf, 1) + da * tl.load(A_ptr + h).to(tl.float32)  # (c,)
        dyf = dy.to(tl.float32)
        dx = dxd * dt[:, None]
        if HAS_D:
            dx += tl.load(D_ptr + h).to(tl.float32) * dyf
            tl.store(dD_part_ptr + (b * H + h) * NCHUNKS + k, tl.sum(tl.sum(xf * dyf, 1), 0))
        tl.store(dx_ptr + ((b * L + t[:, None]) * H + h) * P + offs_p[None, :], dx.to(dx_ptr.dtype.element_ty), mask=tp_mask)
        tl.store(ddt_ptr + (b * L + t) * H + h, ddt, mask=t_mask)
        tl.store(dA_part_ptr + (b * H + h) * NCHUNKS + k, tl.sum(da * dt, 0))
    dbc_offs = ((b * L + t[:, None]) * G_ + grp) * N + offs_n[None, :]  # dB, dC are contiguous (b, l, g, n)
    tl.store(dB_ptr + dbc_offs, dB.to(dB_ptr.dtype.element_ty), mask=tn_mask)
    tl.store(dC_ptr + dbc_offs, dC.to(dC_ptr.dtype.element_ty), mask=tn_mask)


class _SSDScanFn(torch.autograd.Function):
    """Forward: the chunks' own states, their passing, the outputs. Backward: the same two state passes in
    reverse, then one kernel for every other gradient."""

    @staticmethod
    def forward(ctx, x, dt, A, B, C, D, initial_state, chunk):
        (b, l, h, p), (g, n) = x.shape, B.shape[2:]
        nchunks = triton.cdiv(l, chunk)
        BLOCK_P, BLOCK_N = _blocks(p, n)
        logdecay = x.new_empty(b, h, nchunks, dtype=torch.float32)  # s_last of every chunk
        states, final = _pass_states(x, B, dt, A, logdecay, initial_state, chunk, reverse=False)
        y = x.new_empty(b, l, h, p)
        _chunk_out_kernel[(nchunks, b * g)](x, dt, A, B, C, A if D is None else D, states, y, l, h, p, n, nchunks,
                                            *x.stride(), *dt.stride(), *B.stride(), *C.stride(),
                                            HPG=h // g, HAS_D=D is not None, CHUNK=chunk, BLOCK_P=BLOCK_P,
                                            BLOCK_N=BLOCK_N, DOT=_dot_precision(x), **CHUNK_OPTS)
        ctx.save_for_backward(x, dt, A, B, C, D, states, logdecay)
        ctx.chunk = chunk
        ctx.init_dtype = None if initial_state is None else initial_state.dtype
        ctx.set_materialize_grads(False)
        return y, final

    @staticmethod
    def backward(ctx, dy, dfinal):
        x, dt, A, B, C, D, states, logdecay = ctx.saved_tensors
        if dy is None:  # only the final state was used
            dy = torch.zeros_like(x)
        (b, l, h, p), (g, n) = x.shape, B.shape[2:]
        nchunks = states.shape[2]
        BLOCK_P, BLOCK_N = _blocks(p, n)
        # dloss/dS_k from chunk k's outputs, then dloss/dS_{k+1}
        dstates, dinit = _pass_states(dy, C, dt, A, logdecay, dfinal, ctx.chunk, reverse=True)
        dx, ddt = x.new_empty(b, l, h, p), x.new_empty(b, l, h, dtype=torch.float32)
        dB, dC = B.new_empty(b, l, g, n), C.new_empty(b, l, g, n)
        dA_part, dD_part = x.new_empty(2, b, h, nchunks, dtype=torch.float32)  # (b, h, k) each
        opts = dict(CHUNK_OPTS, num_warps=8) if h > g and min(BLOCK_P, BLOCK_N) >= 64 and not INTERPRET else CHUNK_OPTS
        _chunk_bwd_kernel[(nchunks, b * g)](
            x, dt, A, B, C, A if D is None else D, states, dstates, dy, dx, ddt, dB, dC, dA_part, dD_part, l, h, p, n,
            nchunks, *x.stride(), *dt.stride(), *B.stride(), *C.stride(), *dy.stride(), HPG=h // g, HAS_D=D is not None,
            CHUNK=ctx.chunk, BLOCK_P=BLOCK_P, BLOCK_N=BLOCK_N, DOT=_dot_precision(x), **opts)
        dD = None if D is None else dD_part.sum((0, 2)).to(D.dtype)  # (h,)
        dinit = None if ctx.init_dtype is None else dinit.to(ctx.init_dtype)
        return dx, ddt.to(dt.dtype), dA_part.sum((0, 2)).to(A.dtype), dB, dC, dD, dinit, None


def ssd_scan(x, dt, A, B, C, D=None, initial_state=None, return_final_state=False, *, chunk_size=None):
    """Chunked Triton scan; same semantics as ssd_scan_ref. chunk_size: power of two >= 16
    (default 64 on GPU, 32 when p or n > 64, 16 under the interpreter)."""
    (b, l, h, p), (g, n) = x.shape, B.shape[2:]
    chunk = chunk_size or (16 if INTERPRET else (64 if max(_blocks(p, n)) <= 64 else 32))  # 16: the interpreter is slow
    _expect_shapes({"dt": (dt, (b, l, h)), "A": (A, (h,)), "B": (B, (b, l, g, n)), "C": (C, (b, l, g, n)),
                    "D": (D, (h,)), "initial_state": (initial_state, (b, h, p, n))}, f"x {tuple(x.shape)}")
    _check_groups(h, g, p, n)
    if chunk < 16 or chunk & (chunk - 1):
        raise ValueError(f"scan_kernel.py: chunk_size={chunk} must be a power of two >= 16")
    # the kernels index A and D as plain (h,) arrays: any other stride would read the wrong heads
    A, D = A.contiguous(), (None if D is None else D.contiguous())
    y, final = _SSDScanFn.apply(x, dt, A, B, C, D, initial_state, chunk)
    return (y, final) if return_final_state else y


# -----------------------------------------------------------------------------
# Decode step: one token of the recurrence, in place on the state

@triton.jit
def _step_kernel(state_ptr, x_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, D_ptr, y_ptr, H, XPG, BPG, CPG, P, N,
                 s_st_b, s_st_h, s_st_p, s_st_n, s_x_b, s_x_g, s_x_p, s_dt_b, s_dt_h, s_b_b, s_b_g, s_b_n,
                 s_c_b, s_c_g, s_c_n, HAS_D: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr):
    """One (b*h, block of p rows): state = exp(dt A) state + dt outer(x, B); y = state C + D x
    (x, B, C read from head h's group: XPG, BPG, CPG heads per group)."""
    bh = tl.program_id(0)
    b, h = (bh // H).to(tl.int64), bh % H  # int64: b * s_st_b passes 2^31 at 8k rows of a 3B student
    offs_p = tl.program_id(1) * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_n = tl.arange(0, BLOCK_N)
    p_mask, n_mask = offs_p < P, offs_n < N
    dt = tl.load(dt_ptr + b * s_dt_b + h * s_dt_h).to(tl.float32)
    decay = tl.exp(dt * tl.load(A_ptr + h).to(tl.float32))
    x = tl.load(x_ptr + b * s_x_b + (h // XPG) * s_x_g + offs_p * s_x_p, mask=p_mask, other=0.0).to(tl.float32)  # (p,)
    Bv = tl.load(B_ptr + b * s_b_b + (h // BPG) * s_b_g + offs_n * s_b_n, mask=n_mask, other=0.0).to(tl.float32)  # (n,)
    Cv = tl.load(C_ptr + b * s_c_b + (h // CPG) * s_c_g + offs_n * s_c_n, mask=n_mask, other=0.0).to(tl.float32)  # (n,)
    ptrs = state_ptr + b * s_st_b + h * s_st_h + offs_p[:, None] * s_st_p + offs_n[None, :] * s_st_n
    mask = p_mask[:, None] & n_mask[None, :]
    S = tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)  # (p, n)
    S = S * decay + (dt * x)[:, None] * Bv[None, :]
    # a bf16 state moves half the bytes; y uses the unrounded fp32 state
    tl.store(ptrs, S.to(state_ptr.dtype.element_ty), mask=mask)
    y = tl.sum(S * Cv[None, :], 1)  # (p,)
    if HAS_D:
        y += tl.load(D_ptr + h).to(tl.float32) * x
    tl.store(y_ptr + bh * P + offs_p, y.to(y_ptr.dtype.element_ty), mask=p_mask)


# state entries per program of the step kernel: a whole 64 x 64 head
STEP_TILE, STEP_OPTS = 4096, dict(num_warps=4)


def ssd_step(state, x, dt, A, B, C, D=None):
    """Triton ssd_step_ref: the state fp32, bf16 or fp16 (fp32 math). Shared x, B, C are read in place
    by each head of their group (no repeat to h heads). No host sync: safe inside a CUDA graph."""
    (b, h, p, n), (gx, gb, gc) = state.shape, (x.shape[1], B.shape[1], C.shape[1])
    if state.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"scan_kernel.py: state must be fp32, bf16 or fp16, got {state.dtype}")
    _expect_shapes({"x": (x, (b, gx, p)), "dt": (dt, (b, h)), "A": (A, (h,)), "B": (B, (b, gb, n)),
                    "C": (C, (b, gc, n)), "D": (D, (h,))}, f"state {tuple(state.shape)}")
    for g in (gx, gb, gc):
        _check_groups(h, g, p, n)
    A, D = A.contiguous(), (None if D is None else D.contiguous())  # indexed as plain (h,) arrays
    BLOCK_N = triton.next_power_of_2(n)
    BLOCK_P = min(triton.next_power_of_2(p), max(1, STEP_TILE // BLOCK_N))
    y = x.new_empty(b, h, p)
    _step_kernel[(b * h, triton.cdiv(p, BLOCK_P))](
        state, x, dt, A, B, C, A if D is None else D, y, h, h // gx, h // gb, h // gc, p, n, *state.stride(),
        *x.stride(), *dt.stride(), *B.stride(), *C.stride(), HAS_D=D is not None, BLOCK_P=BLOCK_P, BLOCK_N=BLOCK_N,
        **STEP_OPTS)
    return y


# -----------------------------------------------------------------------------
# The kernels the speed comparison needs: the teacher's decode attention, the students' conv step,
# stage 2's fused KL loss; each after its PyTorch definition

def decode_attention_ref(q, k_cache, v_cache, t, pad, scale=None):
    """One decode step of grouped-query attention, fp32 math: q (b, h, e) against the cached keys
    k_cache, v_cache (b, g, s, e) at slots pad[i]..t of row i (t a 1-element tensor). (b, h, e)."""
    (b, h, e), (g, s) = q.shape, k_cache.shape[1:3]
    slots = torch.arange(s, device=q.device)  # (s,)
    lo = pad.clamp(max=int(t))  # (b,) an all-padding row sees slot t alone, as the kernel does
    ok = (slots[None, :] >= lo[:, None]) & (slots[None, :] <= t)  # (b, s) the keys row i may see
    qg = q.float().view(b, g, h // g, e)  # (b, g, r, e): the r query heads that share kv head g
    scores = torch.einsum("bgre,bgse->bgrs", qg, k_cache.float()) * (scale or e ** -0.5)  # (b, g, r, s)
    scores = scores.masked_fill(~ok[:, None, None, :], -math.inf)
    y = torch.einsum("bgrs,bgse->bgre", scores.softmax(-1), v_cache.float())  # (b, g, r, e)
    return y.reshape(b, h, e).to(q.dtype)


@triton.jit
def _decode_attn_kernel(q_ptr, k_ptr, v_ptr, t_ptr, pad_ptr, acc_ptr, m_ptr, l_ptr, G, R, E, scale,
                        s_q_b, s_q_h, s_k_b, s_k_g, s_k_s, s_v_b, s_v_g, s_v_s, NSPLIT: tl.constexpr,
                        SPLIT: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_S: tl.constexpr,
                        PRECISION: tl.constexpr):
    """One (row b, kv head g, split j): the r query heads against the row's keys [pad_b, t] in slots
    [j * SPLIT, (j + 1) * SPLIT), online softmax; writes unnormalised partials for the combine."""
    bg, j = tl.program_id(0), tl.program_id(1)
    # int64: b * s_k_b may pass 2^31 in a large cache
    b, g = (bg // G).to(tl.int64), bg % G
    t = tl.load(t_ptr)  # the newest slot, read from memory: one captured graph serves every step
    # a row whose padding reaches t (an empty prompt) sees slot t alone, as in the parallel forward: no NaN
    lo = tl.minimum(tl.load(pad_ptr + b), t)
    start = tl.maximum(lo, j * SPLIT)
    end = tl.minimum((j + 1) * SPLIT, t + 1)  # start >= end: an empty split
    offs_r, offs_e, offs_s = tl.arange(0, BLOCK_R), tl.arange(0, BLOCK_E), tl.arange(0, BLOCK_S)
    r_mask, e_mask = offs_r < R, offs_e < E
    q = tl.load(q_ptr + b * s_q_b + (g * R + offs_r[:, None]) * s_q_h + offs_e[None, :],
                mask=r_mask[:, None] & e_mask[None, :], other=0.0)  # (r, e), rows past R are zero
    m = tl.full([BLOCK_R], -float("inf"), tl.float32)  # running max of the scores
    l = tl.zeros([BLOCK_R], dtype=tl.float32)  # running sum of exp(score - m)
    acc = tl.zeros([BLOCK_R, BLOCK_E], dtype=tl.float32)  # running sum of exp(score - m) * v
    k_base = k_ptr + b * s_k_b + g * s_k_g
    v_base = v_ptr + b * s_v_b + g * s_v_g
    s0 = start
    while s0 < end:
        slots = s0 + offs_s
        s_mask = slots < end
        kv_mask = s_mask[:, None] & e_mask[None, :]
        k = tl.load(k_base + slots[:, None] * s_k_s + offs_e[None, :], mask=kv_mask, other=0.0)  # (s, e)
        v = tl.load(v_base + slots[:, None] * s_v_s + offs_e[None, :], mask=kv_mask, other=0.0)  # (s, e)
        # (r, s); the cast: torch.compile passes the Python float scale as fp64
        scores = (tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale).to(tl.float32)
        scores = tl.where(s_mask[None, :], scores, -float("inf"))
        m_new = tl.maximum(m, tl.max(scores, 1))  # finite: the block holds at least one key
        alpha = tl.exp(m - m_new)  # rescales what was summed under the old max (0 on the first block)
        prob = tl.exp(scores - m_new[:, None])  # (r, s)
        l = l * alpha + tl.sum(prob, 1)
        acc = acc * alpha[:, None] + tl.dot(prob.to(v.dtype), v, input_precision=PRECISION)
        m = m_new
        s0 += BLOCK_S
    part = bg * NSPLIT + j  # an empty split leaves m = -inf, l = 0, acc = 0: it weighs nothing below
    # the r real heads only
    tl.store(acc_ptr + (part * BLOCK_R + offs_r[:, None]) * BLOCK_E + offs_e[None, :], acc, mask=r_mask[:, None])
    tl.store(m_ptr + part * BLOCK_R + offs_r, m)
    tl.store(l_ptr + part * BLOCK_R + offs_r, l)


@triton.jit
def _decode_attn_combine_kernel(acc_ptr, m_ptr, l_ptr, o_ptr, G, R, E, s_o_b, s_o_h,
                                NSPLIT: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_E: tl.constexpr):
    """One (row b, kv head g): merge the splits' partial softmaxes, rescaled to their common max."""
    bg = tl.program_id(0)
    b, g = bg // G, bg % G
    offs_j, offs_r, offs_e = tl.arange(0, NSPLIT), tl.arange(0, BLOCK_R), tl.arange(0, BLOCK_E)
    ml = (bg * NSPLIT + offs_j[:, None]) * BLOCK_R + offs_r[None, :]  # (j, r)
    m, l = tl.load(m_ptr + ml), tl.load(l_ptr + ml)
    m_all = tl.max(m, 0)  # (r,) finite: slot t itself is a key of every row
    w = tl.exp(m - m_all[None, :])  # (j, r) 0 for empty splits
    acc = tl.load(acc_ptr + ml[:, :, None] * BLOCK_E + offs_e[None, None, :],
                  mask=(offs_r < R)[None, :, None], other=0.0)  # (j, r, e)
    y = tl.sum(acc * w[:, :, None], 0) / tl.sum(l * w, 0)[:, None]  # (r, e)
    tl.store(o_ptr + b * s_o_b + (g * R + offs_r[:, None]) * s_o_h + offs_e[None, :],
             y.to(o_ptr.dtype.element_ty), mask=(offs_r[:, None] < R) & (offs_e[None, :] < E))


# keys per block of the decode attention, and slots per split (programs of splits past t exit at once)
ATTN_BLOCK_S, ATTN_SPLIT, ATTN_OPTS = 64, 1024, dict(num_warps=4)


def decode_attention(q, k_cache, v_cache, t, pad, scale=None):
    """Triton decode_attention_ref (flash-decoding): row i attends to slots pad[i]..t of the cache, this
    step's key and value already written at t. fp32 inputs get exact (not tf32) dots."""
    (b, h, e), (g, s) = q.shape, k_cache.shape[1:3]
    _expect_shapes({"k_cache": (k_cache, (b, g, s, e)), "v_cache": (v_cache, (b, g, s, e)), "t": (t, (1,)),
                    "pad": (pad, (b,))}, f"q {tuple(q.shape)}")
    if h % g:
        raise ValueError(f"scan_kernel.py: query heads h={h} must be a multiple of kv heads g={g}")
    if not q.dtype == k_cache.dtype == v_cache.dtype:  # tl.dot takes one operand dtype
        raise ValueError(f"scan_kernel.py: q, k_cache, v_cache must share a dtype, got {q.dtype}, "
                         f"{k_cache.dtype}, {v_cache.dtype}")
    if q.stride(2) != 1 or k_cache.stride(3) != 1 or v_cache.stride(3) != 1:
        raise ValueError("scan_kernel.py: decode_attention needs the head dim e contiguous")
    r = h // g
    BLOCK_R, BLOCK_E = _blocks(r, e)
    nsplit = triton.next_power_of_2(triton.cdiv(s, ATTN_SPLIT))  # depends on the cache length alone
    acc = q.new_empty(b * g, nsplit, BLOCK_R, BLOCK_E, dtype=torch.float32)
    # two tensors, not two views of one: the sampler torch.compiles the step that launches this kernel, and
    # torch.compile's handling of a Triton kernel that writes into views of one tensor has known bugs
    m = q.new_empty(b * g, nsplit, BLOCK_R, dtype=torch.float32)  # running max
    l = torch.empty_like(m)  # sum of exps
    _decode_attn_kernel[(b * g, nsplit)](q, k_cache, v_cache, t, pad, acc, m, l, g, r, e, scale or e ** -0.5,
                                         *q.stride()[:2], *k_cache.stride()[:3], *v_cache.stride()[:3], NSPLIT=nsplit,
                                         SPLIT=ATTN_SPLIT, BLOCK_R=BLOCK_R, BLOCK_E=BLOCK_E, BLOCK_S=ATTN_BLOCK_S,
                                         PRECISION=_dot_precision(q), **ATTN_OPTS)
    y = q.new_empty(b, h, e)
    _decode_attn_combine_kernel[(b * g,)](acc, m, l, y, g, r, e, *y.stride()[:2],
                                          NSPLIT=nsplit, BLOCK_R=BLOCK_R, BLOCK_E=BLOCK_E)
    return y


def ring_rows(t, r):
    """The ring rows (slot s in row s % r) of the r inputs before slot t, oldest first: (t + j) % r."""
    return (t + torch.arange(r, device=t.device)) % r  # (r,)


def conv_step_ref(state, x, weight, bias, slot, activation=True):
    """One token of the causal depthwise conv, fp32 math: state (b, w-1, d) the ring, x (b, d) the input
    of slot `slot` (1-element tensor), weight (d, w), bias (d,). x overwrites the oldest row; returns
    silu(conv) (or the conv alone) (b, d) in x's dtype."""
    r = weight.shape[1] - 1
    past = state.index_select(1, ring_rows(slot, r)).float()  # (b, w-1, d) oldest first
    out = (past * weight[:, :r].t().float()).sum(1) + x.float() * weight[:, r].float() + bias.float()  # (b, d)
    state.index_copy_(1, slot % r, x[:, None].to(state.dtype))
    return (torch.nn.functional.silu(out) if activation else out).to(x.dtype)


@triton.jit
def _conv_step_kernel(state_ptr, x_ptr, w_ptr, bias_ptr, out_ptr, slot_ptr, D, s_st_b, s_st_r, s_x_b, s_w_d, s_o_b,
                      R: tl.constexpr, W: tl.constexpr, ACT: tl.constexpr, BLOCK_D: tl.constexpr):
    """One (row b, block of channels): the conv over the ring's R past inputs and x, then x written over
    the oldest row. The taps are one (d, W) tile, W >= R + 1: column j < R holds slot t-R+j, column R x,
    the rest zero; the weight is loaded the same way, in one contiguous read."""
    b = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)  # (d,)
    taps = tl.arange(0, W)  # (W,)
    mask = offs < D
    t = tl.load(slot_ptr)  # the slot of x, read on the device: one captured graph serves every step
    w = tl.load(w_ptr + offs[:, None] * s_w_d + taps[None, :], mask=mask[:, None] & (taps[None, :] <= R),
                other=0.0).to(tl.float32)  # (d, W)
    xv = tl.load(x_ptr + b * s_x_b + offs, mask=mask, other=0.0)  # (d,)
    past = tl.load(state_ptr + b * s_st_b + ((t + taps[None, :]) % R) * s_st_r + offs[:, None],
                   mask=mask[:, None] & (taps[None, :] < R), other=0.0).to(tl.float32)  # (d, W)
    inp = tl.where(taps[None, :] == R, xv.to(tl.float32)[:, None], past)  # (d, W) oldest first, then x
    acc = tl.sum(inp * w, axis=1) + tl.load(bias_ptr + offs, mask=mask, other=0.0).to(tl.float32)  # (d,)
    tl.store(state_ptr + b * s_st_b + (t % R) * s_st_r + offs, xv.to(state_ptr.dtype.element_ty), mask=mask)
    if ACT:
        acc = acc * tl.sigmoid(acc)  # silu
    tl.store(out_ptr + b * s_o_b + offs, acc.to(out_ptr.dtype.element_ty), mask=mask)


CONV_BLOCK_D, CONV_OPTS = 1024, dict(num_warps=4)  # channels per program


def conv_step(state, x, weight, bias, slot, activation=True):
    """Triton conv_step_ref: one kernel, in place on the ring, safe inside a captured CUDA graph."""
    b, r, d = state.shape
    if r < 1:
        raise ValueError(f"scan_kernel.py: conv_step needs a conv width of at least 2, got a ring of {r} rows")
    _expect_shapes({"x": (x, (b, d)), "weight": (weight, (d, r + 1)), "bias": (bias, (d,)), "slot": (slot, (1,))},
                   f"state {tuple(state.shape)}")
    if state.stride(2) != 1 or x.stride(1) != 1 or weight.stride(1) != 1:
        raise ValueError("scan_kernel.py: conv_step needs state's and x's channels and weight's taps contiguous")
    out = x.new_empty(b, d)
    _conv_step_kernel[(b, triton.cdiv(d, CONV_BLOCK_D))](
        state, x, weight, bias, out, slot, d, *state.stride()[:2], x.stride(0), weight.stride(0), out.stride(0),
        R=r, W=triton.next_power_of_2(r + 1), ACT=activation, BLOCK_D=CONV_BLOCK_D, **CONV_OPTS)
    return out


def _check_kl_args(s_logits, t_logits, temperature, direction):
    if direction not in ("forward", "reverse"):
        raise ValueError(f"scan_kernel.py: direction must be 'forward' or 'reverse', got {direction!r}")
    if s_logits.shape != t_logits.shape or s_logits.dim() == 0 or s_logits.numel() == 0:
        raise ValueError(f"scan_kernel.py: s_logits {tuple(s_logits.shape)} and t_logits {tuple(t_logits.shape)} "
                         "must have the same non-empty (..., V) shape")
    if not temperature > 0:
        raise ValueError(f"scan_kernel.py: temperature must be > 0, got {temperature}")


def kl_div_ref(s_logits, t_logits, temperature=1.0, direction="forward"):
    """Definition, fp32: per row of (..., V) logits, forward KL(p_t || p_s) (mass-covering) or reverse
    KL(p_s || p_t) (mode-seeking) of the softmaxes at temperature T, (...,) fp32, without the T^2 factor."""
    _check_kl_args(s_logits, t_logits, temperature, direction)
    t_logp, s_logp = (torch.log_softmax(v.float() / temperature, -1) for v in (t_logits, s_logits))  # (..., V) each
    p, q = (t_logp, s_logp) if direction == "forward" else (s_logp, t_logp)
    return (p.exp() * (p - q)).sum(-1)  # (...,) KL(p || q)


@triton.jit
def _kl_log_probs(s_row, t_row, v0, offs, V, inv_t, lse_s, lse_t):
    """log p_s, log p_t (BLOCK_V,) of the block at v0 and its mask; the tail past V is loaded as
    0 (finite, so differences stay finite there) and must be masked by the caller."""
    mask = v0 + offs < V
    ls = tl.load(s_row + v0 + offs, mask=mask, other=0.0).to(tl.float32) * inv_t - lse_s  # (BLOCK_V,)
    lt = tl.load(t_row + v0 + offs, mask=mask, other=0.0).to(tl.float32) * inv_t - lse_t  # (BLOCK_V,)
    return mask, ls, lt


@triton.jit
def _kl_fwd_kernel(s_ptr, t_ptr, grad_ptr, loss_ptr, V, s_stride, t_stride, inv_t,
                   REVERSE: tl.constexpr, WRITE_GRAD: tl.constexpr, BLOCK_V: tl.constexpr):
    """One row: loss = KL, and (WRITE_GRAD) dKL/ds into the contiguous (N, V) buffer grad, in s's dtype."""
    row = tl.program_id(0).to(tl.int64)  # row * V may pass 2^31
    s_row, t_row, g_row = s_ptr + row * s_stride, t_ptr + row * t_stride, grad_ptr + row * V
    offs = tl.arange(0, BLOCK_V)
    # pass 1, online: rescale the running sum of exp(x - max) whenever the max grows. Every block holds
    # a real entry, so the max is finite and the padding's exp(-inf - max) = 0: no NaN
    m_s, m_t = float("-inf"), float("-inf")
    z_s, z_t = 0.0, 0.0
    v0 = 0
    while v0 < V:  # a while loop: range(runtime int) breaks the interpreter under numpy >= 2.4
        mask = v0 + offs < V
        s = tl.load(s_row + v0 + offs, mask=mask, other=float("-inf")).to(tl.float32) * inv_t  # (BLOCK_V,)
        t = tl.load(t_row + v0 + offs, mask=mask, other=float("-inf")).to(tl.float32) * inv_t  # (BLOCK_V,)
        new_s, new_t = tl.maximum(m_s, tl.max(s, 0)), tl.maximum(m_t, tl.max(t, 0))
        z_s = z_s * tl.exp(m_s - new_s) + tl.sum(tl.exp(s - new_s), 0)
        z_t = z_t * tl.exp(m_t - new_t) + tl.sum(tl.exp(t - new_t), 0)
        m_s, m_t = new_s, new_t
        v0 += BLOCK_V
    lse_s, lse_t = m_s + tl.log(z_s), m_t + tl.log(z_t)
    # pass 2: forward KL = sum p_t (log p_t - log p_s), d/ds_j = (p_s_j - p_t_j) / T;
    # reverse KL = sum p_s (log p_s - log p_t), and z = sum p_s
    kl, z = 0.0, 0.0
    v0 = 0
    while v0 < V:
        mask, ls, lt = _kl_log_probs(s_row, t_row, v0, offs, V, inv_t, lse_s, lse_t)
        if REVERSE:
            p_s = tl.where(mask, tl.exp(ls), 0.0)  # (BLOCK_V,) zero past V
            kl += tl.sum(p_s * (ls - lt), 0)
            z += tl.sum(p_s, 0)
        else:
            p_t = tl.where(mask, tl.exp(lt), 0.0)  # (BLOCK_V,) zero past V
            kl += tl.sum(p_t * (lt - ls), 0)
            if WRITE_GRAD:
                tl.store(g_row + v0 + offs, ((tl.exp(ls) - p_t) * inv_t).to(grad_ptr.dtype.element_ty), mask=mask)
        v0 += BLOCK_V
    if not REVERSE:
        tl.store(loss_ptr + row, kl)
    else:
        # A rounding error e of lse_s shifts every log p_s by -e and makes z = exp(-e); the reverse
        # gradient would multiply it by the (large) KL. Normalising by z cancels it: kl / z = KL - e,
        # the shift log p_s has too; the KL is kl / z - log z.
        kl = kl / z
        tl.store(loss_ptr + row, kl - tl.log(z))
        if WRITE_GRAD:
            # pass 3: d/ds_j = p_s_j ((log p_s_j - log p_t_j) - KL) / T, with p_s_j = exp(ls_j) / z
            v0 = 0
            while v0 < V:
                mask, ls, lt = _kl_log_probs(s_row, t_row, v0, offs, V, inv_t, lse_s, lse_t)
                tl.store(g_row + v0 + offs, (tl.exp(ls) / z * ((ls - lt) - kl) * inv_t).to(grad_ptr.dtype.element_ty),
                         mask=mask)
                v0 += BLOCK_V


# Vocabulary entries per loop step and warps per row; small blocks keep the interpreter fast.
KL_BLOCK_V, KL_OPTS = (256 if INTERPRET else 4096), dict(num_warps=8)


class _KLDivFn(torch.autograd.Function):
    """On (N, V) rows with unit last stride; the gradient is computed in the forward, in s's dtype."""

    @staticmethod
    def forward(ctx, s_logits, t_logits, temperature, reverse, write_grad):
        n, v = s_logits.shape
        loss = s_logits.new_empty(n, dtype=torch.float32)  # (N,)
        grad = s_logits.new_empty(n, v) if write_grad else None  # (N, V)
        _kl_fwd_kernel[(n,)](s_logits, t_logits, loss if grad is None else grad, loss, v, s_logits.stride(0),
                             t_logits.stride(0), 1.0 / temperature, REVERSE=reverse, WRITE_GRAD=write_grad,
                             BLOCK_V=KL_BLOCK_V, **KL_OPTS)
        ctx.save_for_backward(grad)
        return loss

    @staticmethod
    def backward(ctx, dloss):
        grad, = ctx.saved_tensors
        # in place, to avoid a second (N, V) tensor; a second backward fails autograd's version check
        return grad.mul_(dloss[:, None]), None, None, None, None


def fused_kl_div(s_logits, t_logits, temperature=1.0, direction="forward"):
    """Triton version of kl_div_ref: (..., V) logits of any dtype, (...,) fp32 KL per row (no T^2).
    Gradient only for s_logits, in its dtype; t_logits is a constant (the teacher)."""
    _check_kl_args(s_logits, t_logits, temperature, direction)
    if torch.is_grad_enabled() and t_logits.requires_grad:  # rather than a silently missing gradient
        raise ValueError("scan_kernel.py: fused_kl_div gives t_logits no gradient; pass t_logits.detach()")
    v = s_logits.shape[-1]
    # the kernel takes any row stride but walks a row with unit steps
    s2, t2 = (x.reshape(-1, v) for x in (s_logits, t_logits))  # (N, V) each, views when the strides allow
    s2, t2 = (x if x.stride(1) == 1 else x.contiguous() for x in (s2, t2))
    # decided here: inside forward grad mode is always off, and needs_input_grad ignores torch.no_grad()
    write_grad = torch.is_grad_enabled() and s_logits.requires_grad
    loss = _KLDivFn.apply(s2, t2, float(temperature), direction == "reverse", write_grad)  # (N,)
    return loss.reshape(s_logits.shape[:-1])  # (...,)


# -----------------------------------------------------------------------------
# Check: every kernel against its reference on the current device

def _rel_err(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12)).item()


def _report(label, errs, tol):
    """Print a check line of relative errors; True when each is within tol (a number, or one per name)."""
    bad = [k for k, e in errs.items() if not e <= (tol[k] if isinstance(tol, dict) else tol)]
    print(label, " ".join(f"{k} {e:.1e}".lstrip() for k, e in errs.items())
          + ("  FAIL " + ",".join(bad) if bad else "  ok").rstrip())
    return not bad


def random_inputs(b, l, h, p, n, g, device, dtype, seed=0):
    """Inputs in the regime of a trained Mamba-2 layer: dt ~ 0.001..0.1, A ~ -1..-16."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    r = lambda *shape: torch.randn(*shape, generator=gen)
    x = r(b, l, h, p).to(device, dtype)
    dt = torch.exp(torch.rand(b, l, h, generator=gen) * (math.log(0.1) - math.log(0.001)) + math.log(0.001)).to(device)
    A = -torch.exp(torch.rand(h, generator=gen) * math.log(16)).to(device)
    B, C = ((r(b, l, g, n) / math.sqrt(n)).to(device, dtype) for _ in range(2))
    D = r(h).to(device)
    return x, dt, A, B, C, D


def random_logits(n, v, device, dtype, seed=0):
    """Student and teacher logits (n, v) as in distillation, drawn on the device. A +100 logit in row 0
    of the student and row 1 of the teacher overflows exp in fp32: only a max-subtracting softmax survives."""
    gen = torch.Generator(device=device).manual_seed(seed)
    t = 3 * torch.randn(n, v, generator=gen, device=device)  # (n, v)
    s = t + torch.randn(n, v, generator=gen, device=device)  # (n, v)
    s[0, 7] = t[min(1, n - 1), 3] = 100.0
    return s.to(dtype), t.to(dtype)


def check(device):
    """Every kernel (and gradient) against its reference, in fp32 and on a GPU in bf16; True when all pass."""
    small, cpu = INTERPRET, device.type == "cpu"
    ok = True
    for dtype in [torch.float32] if cpu else [torch.float32, torch.bfloat16]:
        fp32, tag = dtype == torch.float32, f"check {device.type} {str(dtype):15s}"
        # the scan, its gradients and the decode step
        b, l, h, p, n, g = (2, 37, 4, 16, 16, 2) if small else (2, 300, 8, 64, 64, 2)
        x, dt, A, B, C, D = random_inputs(b, l, h, p, n, g, device, dtype)
        s0 = torch.randn(b, h, p, n, device=device)
        dy, dfinal = torch.randn(b, l, h, p, device=device), torch.randn(b, h, p, n, device=device)
        outs = []  # ours, then the fp32 reference: y, the final state, 7 gradients, y and state after 4 steps
        for scan, step, cast in ((ssd_scan, ssd_step, torch.clone), (ssd_scan_ref, ssd_step_ref, torch.Tensor.float)):
            ins = [cast(t).detach().requires_grad_() for t in (x, dt, A, B, C, D, s0)]
            y, fin = scan(*ins, return_final_state=True)
            grads = torch.autograd.grad((y.float() * dy).sum() + (fin * dfinal).sum(), ins)
            state = s0.clone()
            for t in range(4):
                y1 = step(state, cast(x[:, t]), dt[:, t], A, cast(B[:, t]), cast(C[:, t]), D)
            outs.append([y, fin, *grads, y1, state])
        names = ["y", "final", "dx", "ddt", "dA", "dB", "dC", "dD", "dinit", "step_y", "step_state"]
        errs = dict(zip(names, map(_rel_err, *outs)))
        ok &= _report(f"{tag} rel errors:", errs, 1e-4 if fp32 else 3e-2)
        # the fused KL loss; ds is stored in s's dtype
        n, v = (5, 1000) if small else (64, 128256)
        s_logits, t_logits = random_logits(n, v, device, dtype)
        dloss = torch.randn(n, device=device)
        for direction in ("forward", "reverse"):
            s_ours, s_ref = s_logits.clone().requires_grad_(), s_logits.float().clone().requires_grad_()
            loss = fused_kl_div(s_ours, t_logits, 2.0, direction)
            loss_r = kl_div_ref(s_ref, t_logits.float(), 2.0, direction)
            errs = {"loss": _rel_err(loss, loss_r),
                    "ds": _rel_err(torch.autograd.grad(loss, s_ours, dloss)[0], torch.autograd.grad(loss_r, s_ref, dloss)[0])}
            ok &= _report(f"{tag} kl {direction:7s} (T = 2, N={n}, V={v}) rel errors:", errs,
                          {"loss": 1e-4, "ds": 1e-4 if fp32 else 1e-2})
        # decode attention
        b, h, g, e, s = (3, 8, 2, 16, 100) if small else (64, 32, 8, 64, 2048)
        gen = torch.Generator(device=device).manual_seed(0)
        q = torch.randn(b, h, e, generator=gen, device=device, dtype=dtype)
        k, v = torch.randn(2, b, g, s, e, generator=gen, device=device, dtype=dtype)
        t, pad = torch.tensor([s - 10], device=device), torch.randint(0, s // 2, (b,), generator=gen, device=device)
        err = _rel_err(decode_attention(q, k, v, t, pad), decode_attention_ref(q.float(), k.float(), v.float(), t, pad))
        ok &= _report(f"{tag} decode attention (b={b}, h={h}, g={g}, s={s}) rel error", {"": err},
                      1e-4 if fp32 else 1e-2)
        # the conv step over 5 slots, which wrap the ring; the ring itself must match exactly
        b, d, w = (3, 40, 4) if small else (256, 3072, 4)
        weight, bias = torch.randn(d, w, device=device, dtype=dtype), torch.randn(d, device=device, dtype=dtype)
        ring = torch.randn(b, w - 1, d, device=device, dtype=dtype)
        ring_r = ring.clone()
        errs = []
        for step in range(5):
            x, slot = torch.randn(b, d, device=device, dtype=dtype), torch.tensor([step], device=device)
            errs.append(_rel_err(conv_step(ring, x, weight, bias, slot), conv_step_ref(ring_r, x, weight, bias, slot)))
        errs.append(0.0 if torch.equal(ring, ring_r) else math.inf)
        ok &= _report(f"{tag} conv step (b={b}, d={d}, w={w}, 5 steps) rel error", {"": max(errs)},
                      1e-5 if fp32 else 1e-2)
    return ok


# -----------------------------------------------------------------------------
# Benchmark: the scan against the PyTorch path and mamba_ssm's kernels; the step and the KL loss

def load_mamba(path):
    """Import mamba_ssm's Triton sources without its __init__.py (which needs compiled CUDA extensions)."""
    root = os.path.abspath(path)
    if not os.path.isdir(os.path.join(root, "mamba_ssm", "ops", "triton")):
        raise InputError(f"--mamba_path {path}: no mamba_ssm/ops/triton inside")
    sys.path.append(root)  # for pure-Python helpers placed beside it (einops)
    for name in ("mamba_ssm", "mamba_ssm.ops", "mamba_ssm.ops.triton", "mamba_ssm.utils"):
        sys.modules[name] = mod = types.ModuleType(name)
        mod.__path__ = [os.path.join(root, *name.split("."))]
    combined = importlib.import_module("mamba_ssm.ops.triton.ssd_combined")
    step = importlib.import_module("mamba_ssm.ops.triton.selective_state_update")
    return combined.mamba_chunk_scan_combined, step.selective_state_update


def time_ms(fn):
    """GPU time of fn in ms: the median of triton's do_bench (CUDA events, after a warm-up)."""
    return triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median")


def host_ms(fn, reps=10):
    """CPU time to issue fn (no sync inside): when it exceeds the GPU time, do_bench measures the host."""
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    host = (time.perf_counter() - t0) / reps * 1e3
    torch.cuda.synchronize()
    return host


def copy_bandwidth(device, n_bytes=1 << 31):
    """Device memory bandwidth of a plain copy of n_bytes, (read + write bytes) / time, in GB/s."""
    src = torch.empty(n_bytes // 4, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    return 2 * n_bytes / triton.testing.do_bench_cudagraph(lambda: dst.copy_(src)) / 1e6


def bench(cfg):
    if not torch.cuda.is_available():
        raise InputError("--bench needs a CUDA GPU")
    dev = torch.device("cuda")
    print(f"GPU: {torch.cuda.get_device_name()}  torch {torch.__version__}  triton {triton.__version__}")
    peer_scan, peer_step = load_mamba(cfg.mamba_path) if cfg.mamba_path else (None, None)
    print(f"scan (ms, median of do_bench; ours chunk {cfg.chunk_size or 'auto'}, mamba_ssm chunk {cfg.peer_chunk_size}; "
          "torch = the chunked PyTorch path in fp32; ratio = ours / other)")
    for shape in cfg.shapes.split(";"):
        b, l, h, p, n, g = map(int, shape.split(","))
        ins = [t.requires_grad_() for t in random_inputs(b, l, h, p, n, g, dev, torch.bfloat16)]  # x, dt, A, B, C, D
        dy = torch.randn_like(ins[0])
        paths = {"ours": lambda *a: ssd_scan(*a, chunk_size=cfg.chunk_size),
                 "torch": lambda *a: ssd_scan_chunked_torch(*a, chunk_size=cfg.chunk_size or 64)}
        if peer_scan is not None:
            paths["mamba_ssm"] = lambda x, dt, A, B, C, D: peer_scan(x, dt, A, B, C, cfg.peer_chunk_size, D=D)
        y_ours = paths["ours"](*ins).detach()
        times = {}
        for name, f in paths.items():
            fwd_bwd = lambda: torch.autograd.grad(f(*ins), ins, dy)
            with torch.no_grad():
                fwd = time_ms(lambda: f(*ins))
            fwdbwd = time_ms(fwd_bwd)
            times[name] = (fwd, fwdbwd)
            print(f"  b={b} l={l} h={h} p={p} n={n} g={g}  {name:9s} fwd {fwd:7.3f}  fwd+bwd {fwdbwd:7.3f}"
                  f"  (host time to launch fwd+bwd {host_ms(fwd_bwd):.3f})"
                  f"   rel diff of y vs ours {_rel_err(y_ours, f(*ins).detach()):.1e}")
        for name in list(times)[1:]:  # the paths after ours
            print(f"  ratio ours/{name}: fwd {times['ours'][0] / times[name][0]:.2f}  "
                  f"fwd+bwd {times['ours'][1] / times[name][1]:.2f}")
        if cfg.breakdown:
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
                torch.autograd.grad(paths["ours"](*ins), ins, dy)
                torch.cuda.synchronize()
            print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=12))
    # decode step: bytes of state read + written per step against a device-to-device copy
    h, p, n, g = 32, 64, 64, 8
    copy_bw = copy_bandwidth(dev, 2 ** 28)
    print(f"step (CUDA graph replay; state fp32 (b, 32, 64, 64), x/B/C bf16, g=8; GB/s of state read + written). "
          f"Copy bandwidth (read + write): {copy_bw:.0f} GB/s for 256 MiB; 'copy' below = a copy of the state's size")
    for bs in map(int, cfg.step_batches.split(",")):
        x, dt, A, B, C, D = random_inputs(bs, 1, h, p, n, g, dev, torch.bfloat16)
        x, dt, B, C = x[:, 0], dt[:, 0], B[:, 0], C[:, 0]
        state = torch.zeros(bs, h, p, n, device=dev)
        same_size_bw = copy_bandwidth(dev, 4 * state.numel())  # the state may partly stay in L2: like with like
        fns = {"ours": lambda: ssd_step(state, x, dt, A, B, C, D)}
        if peer_step is not None:
            # mamba_ssm's kernel takes per-channel dt, A, D: broadcast views (stride 0), as Mamba-2 does
            fns["mamba_ssm"] = functools.partial(peer_step, state, x, dt[:, :, None].expand(bs, h, p),
                                                 A[:, None, None].expand(h, p, n), B, C, D[:, None].expand(h, p),
                                                 dt_bias=torch.zeros(h, device=dev)[:, None].expand(h, p))
        line = f"  batch {bs:5d}  copy {same_size_bw:5.0f} GB/s"
        for name, f in fns.items():
            ms = triton.testing.do_bench_cudagraph(f)
            gbs = 2 * state.numel() * 4 / ms / 1e6
            line += (f"   {name} {ms * 1e3:6.1f} us {gbs:5.0f} GB/s = {100 * gbs / same_size_bw:3.0f}% of copy"
                     f" ({100 * gbs / copy_bw:.0f}% of 256 MiB copy)")
        print(line)
    bench_kl(cfg.kl_shape, dev)


def bench_kl(shape, dev):
    """Fused KL loss against its PyTorch definition: the loss and ds of one micro-batch's logits."""
    n, v = map(int, shape.split(","))
    s, t = random_logits(n, v, dev, torch.bfloat16)
    s.requires_grad_()
    dloss = torch.randn(n, device=dev)
    paths = {"fused": fused_kl_div, "reference": kl_div_ref}
    print(f"kl (ms, median of do_bench; N={n} V={v} bf16 logits, T = 1; fwd+bwd = the loss and its gradient wrt s)")
    for direction in ("forward", "reverse"):
        times = {name: time_ms(lambda: torch.autograd.grad(f(s, t, 1.0, direction), s, dloss)) for name, f in paths.items()}
        with torch.no_grad():
            err = _rel_err(fused_kl_div(s, t, 1.0, direction), kl_div_ref(s, t, 1.0, direction))
        print(f"  {direction:7s}  fused fwd+bwd {times['fused']:7.3f}  reference fwd+bwd {times['reference']:7.3f}"
              f"  ratio fused/reference {times['fused'] / times['reference']:.2f}   rel diff of the loss {err:.1e}")


# -----------------------------------------------------------------------------
# Command line, shared by the project's scripts: one dataclass per script, a flag per field


class InputError(Exception):
    """Bad user input (a flag, a file, a config). The message is one line naming what is wrong."""


def flag(default, help, **bounds):
    """A config field and its flag; bounds: at_least, above, at_most (numbers) or choices."""
    return dataclasses.field(default=default, metadata={"help": help, **bounds})


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line and exit status 2, as every other bad input
        print(f"error: {message} (see --help)", file=sys.stderr)
        sys.exit(2)


def parse_config(cls, argv=None, description=None):
    """--field value for every field of a dataclass, each type- and bounds-checked."""
    parser = _Parser(description=description, allow_abbrev=False, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    for f in dataclasses.fields(cls):
        kind = type(f.default)  # every flag() has a default of its type
        text = f.metadata.get("help", " ").replace("%", "%%")  # argparse formats help with %
        how = dict(type=_parse_bool, metavar="{true,false}", nargs="?", const=True) if kind is bool else dict(type=kind)
        parser.add_argument(f"--{f.name}", default=f.default, help=text, **how)
    return check_bounds(cls(**vars(parser.parse_args(argv))))


def check_bounds(cfg):
    """Every field within the bounds its flag() declared; floats finite. Returns cfg."""
    for f in dataclasses.fields(cfg):
        v, m = getattr(cfg, f.name), f.metadata
        bad = None
        if isinstance(v, float) and not math.isfinite(v):
            bad = "a finite number"
        elif "choices" in m and v not in m["choices"]:
            bad = f"one of {', '.join(map(repr, m['choices']))}"
        elif "at_least" in m and v < m["at_least"]:
            bad = f"at least {m['at_least']}"
        elif "above" in m and v <= m["above"]:
            bad = f"more than {m['above']}"
        elif "at_most" in m and v > m["at_most"]:
            bad = f"at most {m['at_most']}"
        if bad:
            raise InputError(f"--{f.name}: expected {bad}, got {v!r}")
    return cfg


_BOOLS = dict.fromkeys(("1", "true", "yes", "on"), True) | dict.fromkeys(("0", "false", "no", "off"), False)


def _parse_bool(s):
    if s.lower() not in _BOOLS:
        raise argparse.ArgumentTypeError(f"expected true or false, got {s!r}")
    return _BOOLS[s.lower()]


@dataclasses.dataclass
class Config:
    check: bool = flag(False, "run the correctness check on the current device")
    bench: bool = flag(False, "run the speed benchmark (needs CUDA)")
    mamba_path: str = flag("", "dir holding mamba_ssm/ops/triton and mamba_ssm/utils: compare with mamba_ssm")
    chunk_size: int = flag(0, "our chunk length (a power of two >= 16; 0 = the default for p, n)", at_least=0)
    peer_chunk_size: int = flag(256, "mamba_ssm's chunk length (its Mamba-2 default)", at_least=16)
    shapes: str = flag("4,2048,32,64,64,8;1,8192,32,64,64,8", "scan shapes b,l,h,p,n,g separated by ';'")
    step_batches: str = flag("64,256,1024", "batch sizes of the decode-step benchmark")
    breakdown: bool = flag(False, "also print per-kernel GPU times of one forward+backward (torch.profiler)")
    kl_shape: str = flag("8192,128256", "fused KL benchmark: rows N, vocabulary V (Llama 3's)")


def main(argv=None):
    cfg = parse_config(Config, argv, description=__doc__.strip().split("\n")[0])
    if not (cfg.check or cfg.bench):
        raise InputError("give --check and/or --bench")
    if cfg.check:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        if device.type == "cpu" and not INTERPRET:
            raise InputError("--check without CUDA needs TRITON_INTERPRET=1")
        if not check(device):
            raise SystemExit("scan_kernel.py: --check failed")
    if cfg.bench:
        bench(cfg)


def run_cli(main, *fatal):
    """A script's entry point: an InputError (exit status 2) or one of `fatal` (1) is one line on stderr."""
    try:
        main()
    except (InputError, *fatal) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2 if isinstance(e, InputError) else 1)


if __name__ == "__main__":
    run_cli(main)
