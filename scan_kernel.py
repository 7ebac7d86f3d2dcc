"""Triton SSD scan (Mamba-2 "state-space duality"): forward, backward and the one-token decode step.

The student's mixer is the selective state-space recurrence of Mamba-2, per batch b and head h:

    state_t = exp(dt_t * A_h) * state_{t-1} + dt_t * outer(x_t, B_t[g(h)])     # (p, n)
    y_t     = state_t @ C_t[g(h)] + D_h * x_t                                   # (p,)

Run:  python scan_kernel.py --check           quick correctness check on the current device
      python scan_kernel.py --bench [--mamba_path DIR]   speed vs the PyTorch path and mamba_ssm
      python -m pytest -q test_scan.py          the tests (CPU: Triton interpreter, tiny shapes)

Glossary: b batch, l length, h heads, p head dim (x, y), n state dim (B, C), g groups (heads
h // (h/g) share one B and C row), c chunk length, k chunk index, i/j/t positions inside a chunk,
s the running sum of the log-decay dt*A inside a chunk, S a (p, n) state.

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
    _chunk_out_kernel     every chunk in parallel: y from (1) + (2) + D x; the C B^T product is
                          computed once per group and reused by its h/g heads.
The backward has the same shape run in reverse: dL/dS_k gets (dy exp(s))^T C from chunk k (the same
chunk-state kernel), the passing kernel runs from the last chunk to the first (dS_k = exp(s_last)
dS_{k+1} + that), and one kernel per chunk and group computes dx, dB, dC, ddt and the dA, dD partial
sums from the saved states S_k. Gradients of the log-decays: d(loss)/ds_i collects from (1), (2),
(3); since s is a running sum, d/d(dt_t A) = sum_{i>=t} d/ds_i (a reverse cumulative sum).

Decode (ssd_step) is one step of the recurrence: a pure read-modify-write of the (b, h, p, n) fp32
state, so it is limited by memory bandwidth; one program per (b, h, block of p rows).
"""
import argparse
import dataclasses
import importlib.util
import math
import os
import sys
import time
import types

import torch
import triton
import triton.language as tl

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


# ----------------------------------------------------------------------------- references

def ssd_scan_ref(x, dt, A, B, C, D=None, initial_state=None, return_final_state=False):
    """Sequential definition, one token at a time, fp32 math; y in x's dtype."""
    b, l, h, p = x.shape
    g, n = B.shape[2], B.shape[3]
    rep = h // g
    xf, dtf, Af = x.float(), dt.float(), A.float()
    Bh = B.float().repeat_interleave(rep, dim=2)  # (b, l, h, n)
    Ch = C.float().repeat_interleave(rep, dim=2)  # (b, l, h, n)
    state = (torch.zeros(b, h, p, n, device=x.device, dtype=torch.float32) if initial_state is None
             else initial_state.float())  # (b, h, p, n)
    ys = []
    for t in range(l):
        decay = torch.exp(dtf[:, t] * Af)  # (b, h)
        state = decay[..., None, None] * state + (dtf[:, t, :, None] * xf[:, t])[..., None] * Bh[:, t, :, None, :]  # (b, h, p, n)
        y = (state @ Ch[:, t, :, :, None]).squeeze(-1)  # (b, h, p)
        if D is not None:
            y = y + D.float()[:, None] * xf[:, t]
        ys.append(y)
    y = torch.stack(ys, dim=1).to(x.dtype)  # (b, l, h, p)
    return (y, state) if return_final_state else y


def ssd_step_ref(state, x, dt, A, B, C, D=None):
    """One decode step: updates state (b, h, p, n) fp32 in place, returns y (b, h, p) in x's dtype."""
    h = x.shape[1]
    rep = h // B.shape[1]
    Bh = B.float().repeat_interleave(rep, dim=1)  # (b, h, n)
    Ch = C.float().repeat_interleave(rep, dim=1)  # (b, h, n)
    decay = torch.exp(dt.float() * A.float())  # (b, h)
    new = decay[..., None, None] * state + (dt.float()[..., None] * x.float())[..., None] * Bh[:, :, None, :]  # (b, h, p, n)
    state.copy_(new)
    y = (new @ Ch[..., None]).squeeze(-1)  # (b, h, p)
    if D is not None:
        y = y + D.float()[:, None] * x.float()
    return y.to(x.dtype)


def ssd_scan_chunked_torch(x, dt, A, B, C, D=None, initial_state=None, chunk_size=64):
    """The chunked algorithm of the docstring in plain PyTorch (fp32): the benchmark's PyTorch path,
    since the sequential reference is far too slow at l = 8192."""
    b, l, h, p = x.shape
    g, n = B.shape[2], B.shape[3]
    c = chunk_size
    pad = (-l) % c
    k = (l + pad) // c
    f = lambda t: torch.nn.functional.pad(t.float(), [0, 0] * (t.dim() - 2) + [0, pad])
    xs = f(x).view(b, k, c, h, p)  # (b, k, c, h, p)
    dts = f(dt).view(b, k, c, h)  # (b, k, c, h)
    Bs = f(B).repeat_interleave(h // g, dim=2).view(b, k, c, h, n)  # (b, k, c, h, n)
    Cs = f(C).repeat_interleave(h // g, dim=2).view(b, k, c, h, n)  # (b, k, c, h, n)
    s = torch.cumsum(dts * A.float(), dim=2)  # (b, k, c, h)
    xd = xs * dts[..., None]  # (b, k, c, h, p)
    causal = torch.ones(c, c, dtype=torch.bool, device=x.device).tril()
    seg = (s[:, :, :, None, :] - s[:, :, None, :, :]).masked_fill(~causal[None, None, :, :, None], -math.inf)  # (b, k, i, j, h)
    cb = torch.einsum("bkihn,bkjhn->bkijh", Cs, Bs)  # (b, k, i, j, h)
    y = torch.einsum("bkijh,bkjhp->bkihp", cb * torch.exp(seg), xd)  # (b, k, c, h, p)
    w = torch.exp(s[:, :, -1:, :] - s)  # (b, k, c, h)
    local = torch.einsum("bkchp,bkchn->bkhpn", xd * w[..., None], Bs)  # (b, k, h, p, n)
    state = (torch.zeros(b, h, p, n, device=x.device) if initial_state is None else initial_state.float())
    states = []
    for kk in range(k):
        states.append(state)
        state = torch.exp(s[:, kk, -1])[..., None, None] * state + local[:, kk]  # (b, h, p, n)
    states = torch.stack(states, dim=1)  # (b, k, h, p, n)
    y = y + torch.einsum("bkchn,bkhpn->bkchp", Cs, states) * torch.exp(s)[..., None]
    if D is not None:
        y = y + D.float()[:, None] * xs
    return y.reshape(b, k * c, h, p)[:, :l].to(x.dtype), state


# ----------------------------------------------------------------------------- kernels

@triton.jit
def _chunk_log_decay(dt_ptr, A_ptr, b, h, t, t_mask, s_dt_b, s_dt_l, s_dt_h):
    """dt (c,), the running log-decay s (c,) and its chunk total, for one (b, chunk, head)."""
    dt = tl.load(dt_ptr + b * s_dt_b + t * s_dt_l + h * s_dt_h, mask=t_mask, other=0.0).to(tl.float32)
    a = dt * tl.load(A_ptr + h).to(tl.float32)  # (c,) padded tokens have dt = 0: no decay, no input
    return dt, tl.cumsum(a, 0), tl.sum(a, 0)


@triton.jit
def _chunk_state_kernel(u_ptr, v_ptr, dt_ptr, A_ptr, out_ptr, logdecay_ptr,
                        L, H, HPG, P, N, NCHUNKS,
                        s_u_b, s_u_l, s_u_h, s_u_p, s_v_b, s_v_l, s_v_g, s_v_n, s_dt_b, s_dt_l, s_dt_h,
                        BACKWARD: tl.constexpr, CHUNK: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr):
    """One (chunk, b*h): out[b, h, k] = (u * w)^T @ v, a (p, n) matrix.
    Forward: u = x, v = B, w = dt * exp(s_last - s), the chunk's own state contribution (3);
    also stores s_last. Backward: u = dy, v = C, w = exp(s), the gradient of the entering state (1)."""
    k = tl.program_id(0)
    bh = tl.program_id(1)
    b, h = bh // H, bh % H
    t = k * CHUNK + tl.arange(0, CHUNK)
    t_mask = t < L
    offs_p = tl.arange(0, BLOCK_P)
    offs_n = tl.arange(0, BLOCK_N)
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
    out = tl.dot(tl.trans(uw), v)  # (p, n) fp32
    out_ptrs = out_ptr + (bh * NCHUNKS + k) * P * N + offs_p[:, None] * N + offs_n[None, :]
    tl.store(out_ptrs, out, mask=(offs_p[:, None] < P) & (offs_n[None, :] < N))


@triton.jit
def _state_passing_kernel(states_ptr, logdecay_ptr, init_ptr, last_ptr, NCHUNKS, PN,
                          HAS_INIT: tl.constexpr, REVERSE: tl.constexpr, BLOCK: tl.constexpr):
    """One (b*h, block of the p*n state entries), sequential over chunks, in place.
    Forward: states[k] holds chunk k's own contribution on entry, the state entering chunk k on exit;
    last = final state. Reverse (backward): states[k] holds dloss/dS_k from chunk k's outputs on
    entry, the gradient of the state leaving chunk k on exit; last = gradient of the initial state."""
    bh = tl.program_id(0)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < PN
    if HAS_INIT:
        run = tl.load(init_ptr + bh * PN + offs, mask=mask, other=0.0).to(tl.float32)
    else:
        run = tl.zeros([BLOCK], dtype=tl.float32)
    for i in range(NCHUNKS):
        k = NCHUNKS - 1 - i if REVERSE else i
        ptrs = states_ptr + (bh * NCHUNKS + k) * PN + offs
        own = tl.load(ptrs, mask=mask, other=0.0)
        tl.store(ptrs, run, mask=mask)
        run = tl.exp(tl.load(logdecay_ptr + bh * NCHUNKS + k)) * run + own
    tl.store(last_ptr + bh * PN + offs, run, mask=mask)


@triton.jit
def _decay_matrix(s, CHUNK: tl.constexpr):
    """L_ij = exp(s_i - s_j) for j <= i, else 0 (exp of -inf: never exp of a large positive)."""
    i = tl.arange(0, CHUNK)
    seg = s[:, None] - s[None, :]
    return tl.exp(tl.where(i[:, None] >= i[None, :], seg, float("-inf")))  # (c, c)


@triton.jit
def _chunk_out_kernel(x_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, D_ptr, states_ptr, y_ptr,
                      L, H, HPG, P, N, NCHUNKS,
                      s_x_b, s_x_l, s_x_h, s_x_p, s_dt_b, s_dt_l, s_dt_h,
                      s_b_b, s_b_l, s_b_g, s_b_n, s_c_b, s_c_l, s_c_g, s_c_n,
                      HAS_D: tl.constexpr, CHUNK: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr):
    """One (chunk, b*g): y = exp(s) C S_k^T + (L o C B^T)(dt x) + D x for the h/g heads of group g."""
    k = tl.program_id(0)
    bg = tl.program_id(1)
    G = H // HPG
    b, grp = bg // G, bg % G
    t = k * CHUNK + tl.arange(0, CHUNK)
    t_mask = t < L
    offs_p = tl.arange(0, BLOCK_P)
    offs_n = tl.arange(0, BLOCK_N)
    tp_mask = t_mask[:, None] & (offs_p[None, :] < P)
    tn_mask = t_mask[:, None] & (offs_n[None, :] < N)
    Bm = tl.load(B_ptr + b * s_b_b + t[:, None] * s_b_l + grp * s_b_g + offs_n[None, :] * s_b_n, mask=tn_mask, other=0.0)  # (c, n)
    Cm = tl.load(C_ptr + b * s_c_b + t[:, None] * s_c_l + grp * s_c_g + offs_n[None, :] * s_c_n, mask=tn_mask, other=0.0)  # (c, n)
    cb = tl.dot(Cm, tl.trans(Bm))  # (c, c) fp32, shared by the group's heads
    for hh in range(HPG):
        h = grp * HPG + hh
        dt, s, s_last = _chunk_log_decay(dt_ptr, A_ptr, b, h, t, t_mask, s_dt_b, s_dt_l, s_dt_h)
        x = tl.load(x_ptr + b * s_x_b + t[:, None] * s_x_l + h * s_x_h + offs_p[None, :] * s_x_p, mask=tp_mask, other=0.0)  # (c, p)
        S = tl.load(states_ptr + ((b * H + h) * NCHUNKS + k) * P * N + offs_p[:, None] * N + offs_n[None, :],
                    mask=(offs_p[:, None] < P) & (offs_n[None, :] < N), other=0.0)  # (p, n) fp32
        y = tl.dot(Cm, tl.trans(S.to(Cm.dtype))) * tl.exp(s)[:, None]  # (c, p) term (1)
        m = (cb * _decay_matrix(s, CHUNK)).to(x.dtype)  # (c, c)
        xd = (x.to(tl.float32) * dt[:, None]).to(x.dtype)  # (c, p)
        y = tl.dot(m, xd, y)  # (c, p) + term (2)
        if HAS_D:
            y += tl.load(D_ptr + h).to(tl.float32) * x.to(tl.float32)
        tl.store(y_ptr + ((b * L + t[:, None]) * H + h) * P + offs_p[None, :], y.to(y_ptr.dtype.element_ty), mask=tp_mask)


@triton.jit
def _chunk_bwd_kernel(x_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, D_ptr, states_ptr, dstates_ptr, dy_ptr,
                      dx_ptr, ddt_ptr, dB_ptr, dC_ptr, dA_part_ptr, dD_part_ptr,
                      L, H, HPG, P, N, NCHUNKS,
                      s_x_b, s_x_l, s_x_h, s_x_p, s_dt_b, s_dt_l, s_dt_h,
                      s_b_b, s_b_l, s_b_g, s_b_n, s_c_b, s_c_l, s_c_g, s_c_n,
                      s_dy_b, s_dy_l, s_dy_h, s_dy_p,
                      HAS_D: tl.constexpr, CHUNK: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr):
    """One (chunk, b*g). Inputs: the saved entering state S_k and the gradient G of the leaving
    state S_{k+1}, both (p, n). dx, ddt per head; dB, dC summed over the group's heads in registers;
    per-(b, h, k) partial sums for dA and dD."""
    k = tl.program_id(0)
    bg = tl.program_id(1)
    G_ = H // HPG
    b, grp = bg // G_, bg % G_
    t = k * CHUNK + tl.arange(0, CHUNK)
    t_mask = t < L
    offs_p = tl.arange(0, BLOCK_P)
    offs_n = tl.arange(0, BLOCK_N)
    tp_mask = t_mask[:, None] & (offs_p[None, :] < P)
    tn_mask = t_mask[:, None] & (offs_n[None, :] < N)
    pn_mask = (offs_p[:, None] < P) & (offs_n[None, :] < N)
    Bm = tl.load(B_ptr + b * s_b_b + t[:, None] * s_b_l + grp * s_b_g + offs_n[None, :] * s_b_n, mask=tn_mask, other=0.0)  # (c, n)
    Cm = tl.load(C_ptr + b * s_c_b + t[:, None] * s_c_l + grp * s_c_g + offs_n[None, :] * s_c_n, mask=tn_mask, other=0.0)  # (c, n)
    cb = tl.dot(Cm, tl.trans(Bm))  # (c, c) fp32
    dB = tl.zeros([CHUNK, BLOCK_N], dtype=tl.float32)
    dC = tl.zeros([CHUNK, BLOCK_N], dtype=tl.float32)
    for hh in range(HPG):
        h = grp * HPG + hh
        dt, s, s_last = _chunk_log_decay(dt_ptr, A_ptr, b, h, t, t_mask, s_dt_b, s_dt_l, s_dt_h)
        x = tl.load(x_ptr + b * s_x_b + t[:, None] * s_x_l + h * s_x_h + offs_p[None, :] * s_x_p, mask=tp_mask, other=0.0)  # (c, p)
        dy = tl.load(dy_ptr + b * s_dy_b + t[:, None] * s_dy_l + h * s_dy_h + offs_p[None, :] * s_dy_p, mask=tp_mask, other=0.0)  # (c, p)
        xf = x.to(tl.float32)
        xd = xf * dt[:, None]  # (c, p) fp32
        dyc = dy.to(x.dtype)
        xdc = xd.to(x.dtype)
        decay = _decay_matrix(s, CHUNK)  # (c, c)
        # term (2): y_i += sum_j L_ij cb_ij xd_j. r_ij = L_ij (dy_i . xd_j)
        r = decay * tl.dot(dyc, tl.trans(xdc))  # (c, c)
        pr = r * cb
        ds = tl.sum(pr, 1) - tl.sum(pr, 0)  # (c,) dloss/ds_i from (2): +row sums, -column sums
        rc = r.to(Cm.dtype)
        dC = tl.dot(rc, Bm, dC)
        dB = tl.dot(tl.trans(rc), Cm, dB)
        dxd = tl.dot(tl.trans((decay * cb).to(x.dtype)), dyc)  # (c, p)
        # term (1): y_i += exp(s_i) S_k C_i
        sk_ptrs = ((b * H + h) * NCHUNKS + k) * P * N + offs_p[:, None] * N + offs_n[None, :]
        S = tl.load(states_ptr + sk_ptrs, mask=pn_mask, other=0.0)  # (p, n) fp32
        es = tl.exp(s)
        dys = tl.dot(dyc, S.to(x.dtype)) * es[:, None]  # (c, n)
        dC += dys
        ds += tl.sum(dys * Cm.to(tl.float32), 1)
        # term (3): S_{k+1} = exp(s_last) S_k + sum_j exp(s_last - s_j) outer(xd_j, B_j)
        Gm = tl.load(dstates_ptr + sk_ptrs, mask=pn_mask, other=0.0)  # (p, n) fp32
        el = tl.exp(s_last - s)  # (c,)
        Gc = Gm.to(x.dtype)
        dB += tl.dot(xdc, Gc) * el[:, None]
        dxs = tl.dot(Bm.to(x.dtype), tl.trans(Gc)) * el[:, None]  # (c, p)
        q = tl.sum(xd * dxs, 1)  # (c,)
        ds -= q
        ds_last = tl.exp(s_last) * tl.sum(tl.sum(Gm * S, 1), 0) + tl.sum(q, 0)
        dxd += dxs
        # s_i = sum_{t<=i} a_t and s_last = sum of all a_t in the chunk
        da = tl.cumsum(ds, 0, reverse=True) + ds_last  # (c,)
        A_h = tl.load(A_ptr + h).to(tl.float32)
        ddt = tl.sum(dxd * xf, 1) + da * A_h  # (c,)
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
