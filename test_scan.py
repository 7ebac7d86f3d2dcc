"""Tests of scan_kernel.py: the Triton SSD scan (forward, every gradient) and decode step against the
sequential PyTorch references. CPU: Triton interpreter, fp32, tiny shapes. GPU: bf16, long l, CUDA graph.
Run: python -m pytest -q test_scan.py"""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # must be set before triton is imported

from scan_kernel import (ssd_scan, ssd_scan_chunked_torch, ssd_scan_ref, ssd_step, ssd_step_ref,  # noqa: E402
                         random_inputs)

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
CHUNK = 64 if DEVICE.type == "cuda" else 16  # small chunks keep the interpreter fast
# relative error norms: exact fp32 under the interpreter, tf32 / bf16 tensor-core dots on GPU
TOL = {torch.float32: 1e-4 if DEVICE.type == "cpu" else 5e-3, torch.bfloat16: 3e-2}
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def assert_close(name, got, want, tol):
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


NAMES = ["x", "dt", "A", "B", "C", "D", "initial_state"]
CASES = {  # b, l, h, p, n, g, with D, with initial state
    "l_not_multiple_g_lt_h": (2, 37, 4, 16, 16, 2, True, True),
    "tiny_p_n_padded_one_group": (1, 21, 2, 8, 8, 1, False, True),
    "g_eq_h_no_init": (1, 32, 2, 16, 32, 2, True, False),
}


@pytest.mark.parametrize("case", list(CASES))
def test_scan_forward_and_grads_match_reference(case):
    b, l, h, p, n, g, use_d, use_init = CASES[case]
    x, dt, A, B, C, D = random_inputs(b, l, h, p, n, g, DEVICE, torch.float32, seed=1)
    D = D if use_d else None
    s0 = torch.randn(b, h, p, n, device=DEVICE) if use_init else None
    dy, dfinal = torch.randn_like(x), torch.randn(b, h, p, n, device=DEVICE)
    y, final, grads = scan_and_grads(ssd_scan, [x, dt, A, B, C, D, s0], dy, dfinal, chunk_size=CHUNK)
    y_r, final_r, grads_r = scan_and_grads(ssd_scan_ref, [x, dt, A, B, C, D, s0], dy, dfinal)
    tol = TOL[torch.float32]
    assert_close("y", y, y_r, tol)
    assert_close("final", final, final_r, tol)
    for name, gk, gr in zip(NAMES, grads, grads_r):
        if gr is not None:
            assert_close("d" + name, gk, gr, tol)


def test_grad_through_final_state_only():
    x, dt, A, B, C, D = random_inputs(1, 20, 2, 16, 16, 1, DEVICE, torch.float32, seed=2)
    leaves = [t.clone().requires_grad_() for t in (x, dt, A, B, C)]
    leaves_r = [t.clone().requires_grad_() for t in (x, dt, A, B, C)]
    grads = torch.autograd.grad(ssd_scan(*leaves, return_final_state=True, chunk_size=CHUNK)[1].sum(), leaves)
    grads_r = torch.autograd.grad(ssd_scan_ref(*leaves_r, return_final_state=True)[1].sum(), leaves_r[:4])
    for name, gk, gr in zip(["dx", "ddt", "dA", "dB"], grads, grads_r):
        assert_close(name, gk, gr, TOL[torch.float32])
    assert grads[4].abs().max().item() == 0.0  # the final state does not depend on C


def test_chunked_torch_path_matches_reference():
    x, dt, A, B, C, D = random_inputs(2, 37, 4, 8, 16, 2, DEVICE, torch.float32, seed=3)
    s0 = torch.randn(2, 4, 8, 16, device=DEVICE)
    y, final = ssd_scan_chunked_torch(x, dt, A, B, C, D, s0, chunk_size=16)
    y_r, final_r = ssd_scan_ref(x, dt, A, B, C, D, s0, return_final_state=True)
    assert_close("y", y, y_r, 1e-5)
    assert_close("final", final, final_r, 1e-5)


def test_step_matches_reference_several_steps():
    b, h, p, n, g = 3, 4, 16, 8, 2
    x, dt, A, B, C, D = random_inputs(b, 5, h, p, n, g, DEVICE, torch.float32, seed=4)
    state = torch.randn(b, h, p, n, device=DEVICE)
    state_r = state.clone()
    for t in range(5):
        y = ssd_step(state, x[:, t], dt[:, t], A, B[:, t], C[:, t], D)
        y_r = ssd_step_ref(state_r, x[:, t], dt[:, t], A, B[:, t], C[:, t], D)
        assert_close(f"y step {t}", y, y_r, 1e-5)
        assert_close(f"state step {t}", state, state_r, 1e-5)


def test_scan_equals_stepping_token_by_token():
    b, l, h, p, n, g = 2, 19, 4, 16, 16, 2
    x, dt, A, B, C, D = random_inputs(b, l, h, p, n, g, DEVICE, torch.float32, seed=5)
    s0 = torch.randn(b, h, p, n, device=DEVICE)
    y, final = ssd_scan(x, dt, A, B, C, D, s0, return_final_state=True, chunk_size=CHUNK)
    state = s0.clone()
    ys = torch.stack([ssd_step(state, x[:, t], dt[:, t], A, B[:, t], C[:, t], D) for t in range(l)], dim=1)  # (b, l, h, p)
    assert_close("y", y, ys, TOL[torch.float32])
    assert_close("final", final, state, TOL[torch.float32])


def test_bad_shapes_raise():
    x, dt, A, B, C, D = random_inputs(1, 8, 4, 16, 16, 2, DEVICE, torch.float32)
    with pytest.raises(ValueError, match="dt has shape"):
        ssd_scan(x, dt[:, :4], A, B, C, D)
    with pytest.raises(ValueError, match="multiple of groups"):
        ssd_scan(x, dt, A, B[:, :, :1].expand(1, 8, 3, 16), C[:, :, :1].expand(1, 8, 3, 16), D)
    with pytest.raises(ValueError, match="chunk_size"):
        ssd_scan(x, dt, A, B, C, D, chunk_size=24)


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_scan_and_grads_vs_fp32_reference(dtype):
    b, l, h, p, n, g = 2, 300, 8, 64, 64, 2
    x, dt, A, B, C, D = random_inputs(b, l, h, p, n, g, DEVICE, dtype, seed=6)
    s0 = torch.randn(b, h, p, n, device=DEVICE)
    dy, dfinal = torch.randn(b, l, h, p, device=DEVICE), torch.randn(b, h, p, n, device=DEVICE)
    inputs = [x, dt, A, B, C, D, s0]
    y, final, grads = scan_and_grads(ssd_scan, inputs, dy, dfinal)
    y_r, final_r, grads_r = scan_and_grads(ssd_scan_ref, [t.float() for t in inputs], dy, dfinal)
    assert y.dtype == dtype and final.dtype == torch.float32
    assert_close("y", y, y_r, TOL[dtype])
    assert_close("final", final, final_r, TOL[dtype])
    for name, t, gk, gr in zip(NAMES, inputs, grads, grads_r):
        assert gk.dtype == t.dtype
        assert_close("d" + name, gk, gr, TOL[dtype])


@needs_cuda
def test_gpu_long_sequence_bf16():
    b, l, h, p, n, g = 1, 8192, 4, 64, 64, 2
    x, dt, A, B, C, D = random_inputs(b, l, h, p, n, g, DEVICE, torch.bfloat16, seed=7)
    y, final = ssd_scan(x, dt, A, B, C, D, return_final_state=True)
    y_r, final_r = ssd_scan_ref(x.float(), dt, A, B.float(), C.float(), D, return_final_state=True)
    assert_close("y", y, y_r, TOL[torch.bfloat16])
    assert_close("final", final, final_r, TOL[torch.bfloat16])
    # gradients at this length against the chunked fp32 PyTorch path (checked against the reference above)
    dy = torch.randn(b, l, h, p, device=DEVICE)
    leaves = [t.clone().requires_grad_() for t in (x, dt, A, B, C, D)]
    leaves_r = [t.float().clone().requires_grad_() for t in (x, dt, A, B, C, D)]
    grads = torch.autograd.grad(ssd_scan(*leaves), leaves, dy.bfloat16())
    grads_r = torch.autograd.grad(ssd_scan_chunked_torch(*leaves_r)[0], leaves_r, dy.bfloat16().float())
    for name, gk, gr in zip(["dx", "ddt", "dA", "dB", "dC", "dD"], grads, grads_r):
        assert_close(name, gk, gr, TOL[torch.bfloat16])


@needs_cuda
def test_gpu_step_many_steps_bf16():
    b, h, p, n, g, steps = 8, 8, 64, 64, 4, 300
    x, dt, A, B, C, D = random_inputs(b, steps, h, p, n, g, DEVICE, torch.bfloat16, seed=8)
    state = torch.randn(b, h, p, n, device=DEVICE)
    state_r = state.clone()
    for t in range(steps):
        y = ssd_step(state, x[:, t], dt[:, t], A, B[:, t], C[:, t], D)
        y_r = ssd_step_ref(state_r, x[:, t].float(), dt[:, t], A, B[:, t].float(), C[:, t].float(), D)
    assert_close("y after many steps", y, y_r, 1e-2)  # y is rounded to bf16
    assert_close("state after many steps", state, state_r, 1e-5)


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
        assert_close(f"graph y step {t}", y_static, y_r, 1e-2)
    assert_close("graph state", state, state_r, 1e-5)
