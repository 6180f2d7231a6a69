"""The backend conformance checks: one body per property, run on every registered backend (and every CPU
ISA path) by tests/test_conformance.py, and on a toy backend by tests/test_backend_contract.py. A new
backend gets all of them by registering itself (bitkern.backends.registry.register).

Integers (packed words, pair counts) must equal python_ref exactly; float outputs must equal
python_ref.mbn_epilogue_ref bit for bit (the contract's float32 order: n outer, m inner, then bias,
residual, clamp), which makes every backend agree with every other bit for bit.
"""
from __future__ import annotations

import numpy as np
import torch

from bitkern.backends.base import Backend
from python_ref import ops_ref

# (B, C, H, W, Co, kernel, stride, padding, M, N): partial and multiple words, 1x1 / 3x3 / 5x3 kernels,
# strides 1..3, paddings 0..2, H != W, batch 1, the lane engines' channel counts (<= 16, <= 32).
SHAPES = [
    (2, 1, 5, 6, 3, (1, 1), (1, 1), (0, 0), 1, 1),
    (1, 3, 7, 5, 4, (3, 3), (1, 1), (1, 1), 2, 1),
    (2, 16, 6, 6, 5, (3, 3), (2, 2), (1, 1), 3, 2),
    (1, 17, 5, 7, 2, (5, 3), (1, 2), (2, 1), 1, 3),
    (2, 31, 4, 4, 3, (3, 3), (3, 1), (0, 2), 2, 2),
    (1, 33, 6, 5, 4, (3, 3), (1, 1), (1, 1), 1, 1),
    (1, 64, 3, 3, 2, (3, 3), (1, 1), (1, 1), 2, 3),
    (2, 65, 5, 4, 3, (1, 1), (2, 1), (0, 0), 3, 1),
    (1, 130, 4, 4, 2, (3, 3), (1, 1), (2, 2), 1, 2),
]
# The Triton interpreter runs a kernel in Python: a subset keeps its checks short.
SMALL_SHAPES = [SHAPES[i] for i in (1, 3, 6, 7)]


def awkward_randn(shape, g: torch.Generator) -> torch.Tensor:
    """Random floats with exact zeros, -0.0 and values right at the hv threshold (0.5) mixed in."""
    x = torch.randn(shape, generator=g)
    flat = x.view(-1)
    idx = torch.randperm(flat.numel(), generator=g)
    q = max(1, flat.numel() // 10)
    flat[idx[:q]] = 0.0
    flat[idx[q:2 * q]] = -0.0
    flat[idx[2 * q:3 * q]] = 0.5
    return x


def case(shape, seed):
    """Random inputs for one shape of SHAPES (awkward values mixed in)."""
    B, C, H, W, Co, k, s, p, M, N = shape
    g = torch.Generator().manual_seed(seed)
    x = awkward_randn((B, C, H, W), g)
    w_bases = torch.randn(M, Co, C, *k, generator=g)
    w_bases[..., 0, 0] = 0.0  # sign(0) = +1
    v = None if N == 1 and seed % 2 == 0 else torch.rand(N, generator=g) * 1.2 - 0.1
    num_a = 1 if v is None else N
    alpha2d = torch.randn(M, Co, generator=g)  # signed: cancellations exercise the rounding order
    beta = torch.rand(num_a, generator=g) + 0.25
    bias = torch.randn(Co, generator=g)
    return dict(x=x, w_bases=w_bases, v=v, alpha2d=alpha2d, beta=beta, bias=bias, kernel=k, stride=s,
                padding=p)


def _packed_weights(c):
    return torch.from_numpy(ops_ref.pack_signs_ref(c["w_bases"].flatten(0, 1).numpy())).unflatten(
        0, c["w_bases"].shape[:2])


def _call(backend: Backend, c, **kwargs):
    return backend.mbn_conv2d_packed(c["x"], _packed_weights(c), c["x"].shape[1], c["kernel"],
                                     kwargs.pop("alpha2d", c["alpha2d"]), c["v"], c["beta"], c["stride"],
                                     c["padding"], **kwargs)


def _ref_pairs(c):
    return ops_ref.mbn_pairs_ref(c["x"].numpy(), c["w_bases"].numpy(),
                                 None if c["v"] is None else c["v"].numpy(), c["stride"], c["padding"])


def check_pack_signs(backend: Backend, shapes=SHAPES, seed=0):
    for i, shape in enumerate(shapes):
        c = case(shape, seed + i)
        got = backend.pack_signs(c["x"])
        np.testing.assert_array_equal(got.cpu().numpy(), ops_ref.pack_signs_ref(c["x"].numpy()))
        got = backend.pack_signs(c["w_bases"])  # 5-d weight bases [M, Co, C, KH, KW]
        np.testing.assert_array_equal(got.cpu().numpy(), _packed_weights(c).numpy())
        if c["v"] is not None:
            shift = float(c["v"][0])
            expected = ops_ref.pack_signs_ref(ops_ref.hv_sign(c["x"].numpy(), shift).astype(np.float32))
            np.testing.assert_array_equal(backend.pack_signs(c["x"], "hv", shift).cpu().numpy(), expected)


def check_pair_counts(backend: Backend, shapes=SHAPES, seed=100):
    for i, shape in enumerate(shapes):
        c = case(shape, seed + i)
        out, pairs = _call(backend, c, alpha2d=None, want_pairs=True)
        assert out is None
        np.testing.assert_array_equal(pairs.cpu().numpy(), _ref_pairs(c))


def check_float_output(backend: Backend, shapes=SHAPES, seed=200):
    """out (with and without pairs) equals the float32 reference bit for bit."""
    for i, shape in enumerate(shapes):
        c = case(shape, seed + i)
        expected = ops_ref.mbn_epilogue_ref(_ref_pairs(c), c["alpha2d"].numpy(), c["beta"].numpy())
        out, pairs = _call(backend, c)
        assert pairs is None
        np.testing.assert_array_equal(out.cpu().numpy(), expected)
        out2, pairs2 = _call(backend, c, want_pairs=True)
        np.testing.assert_array_equal(out2.cpu().numpy(), expected)
        np.testing.assert_array_equal(pairs2.cpu().numpy(), _ref_pairs(c))


def check_epilogue(backend: Backend, shapes=SHAPES, seed=300):
    """bias, residual and clamp in the contract's order, bit for bit, fused or not."""
    for i, shape in enumerate(shapes):
        c = case(shape, seed + i)
        pairs = _ref_pairs(c)
        residual = torch.randn(pairs.shape[2:], generator=torch.Generator().manual_seed(seed + i))
        for clamp in (None, (-1.0, 1.0), (0.0, float("inf"))):
            expected = ops_ref.mbn_epilogue_ref(pairs, c["alpha2d"].numpy(), c["beta"].numpy(),
                                                c["bias"].numpy(), residual.numpy(), clamp)
            out, _ = _call(backend, c, bias=c["bias"], residual=residual, clamp=clamp)
            np.testing.assert_array_equal(out.cpu().numpy(), expected)


def check_nan_rejected(backend: Backend, seed=400):
    """NaN in x raises the same error text on every backend (the kernel's own check or the op's)."""
    import pytest

    from bitkern import dispatch, ops
    c = case(SHAPES[1], seed)
    c["x"][0, 0, 0, 0] = float("nan")
    with dispatch.use_backend(backend.name):
        with pytest.raises(ValueError, match=r"x: contains NaN"):
            ops.mbn_conv2d_packed(c["x"], _packed_weights(c), c["x"].shape[1], c["kernel"],
                                  c["alpha2d"][:, 0], c["v"], c["beta"], c["stride"], c["padding"])


def check_capabilities(backend: Backend):
    """Declared capabilities are consistent, and the device it runs on is one it declares."""
    caps = backend.capabilities
    assert not caps.fused_residual or caps.fused_epilogue
    assert backend.available and backend.supports("cpu")  # every backend tested here runs on CPU tensors
    assert set(caps.devices) >= {"cpu"} or caps.devices == ("*",)


def ste_boundary_case(shape, seed, v):
    """x and an incoming gradient for the STE backward: randn plus values exactly on the windows' edges
    (x + v_n exactly 0 and 1, |x| exactly 1) and one float32 step inside / outside them, +-0.0."""
    B, C, H, W = shape
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, C, H, W, generator=g)
    edges = [1.0, -1.0, 0.0, -0.0, 0.5]
    for vn in ([] if v is None else v.tolist()):
        lo, hi = np.float32(0) - np.float32(vn), np.float32(1) - np.float32(vn)  # exact for these v
        edges += [float(lo), float(hi)]
    steps = []
    for e in edges:
        e32 = np.float32(e)
        steps += [e, float(np.nextafter(e32, np.float32(np.inf))), float(np.nextafter(e32, np.float32(-np.inf)))]
    flat = x.view(-1)
    idx = torch.randperm(flat.numel(), generator=g)
    for i, val in enumerate(steps):
        flat[idx[i::len(steps) * 2][:max(1, flat.numel() // (len(steps) * 3))]] = val
    grad = torch.randn(B, C, H, W, generator=g)
    grad.view(-1)[idx[-3:]] = -0.0
    return x, grad


def _bits(t):
    return t.contiguous().view(torch.int32)


def check_ste_backward(backend: Backend, seed=500):
    """The STE backward kernels (Capabilities.ste_backward) equal the float32 reference bit for bit:
    the input gradient's windows (edges included), products and sum order, and the clamp mask; any
    layout of x / the gradient, lengths that leave vector tails. Backends without them: the torch
    expressions bitkern.ops uses instead are checked (the same arithmetic on every backend)."""
    from bitkern.ops import autograd as ag

    exact_v = [None, torch.tensor([0.25]), torch.tensor([0.5, 0.25, 0.75]),
               torch.tensor([0.125, -0.5, 1.5, 0.375])]  # x + v exactly 0 / 1 representable
    for i, (shape, v) in enumerate(zip([(2, 3, 5, 7), (1, 16, 4, 4), (3, 17, 3, 5), (2, 33, 2, 3)], exact_v)):
        x, grad = ste_boundary_case(shape, seed + i, v)
        num_a = 1 if v is None else v.numel()
        beta = torch.rand(num_a, generator=torch.Generator().manual_seed(seed + i)) + 0.25
        want = ops_ref.ste_input_grad_f32_ref(x.numpy(), grad.numpy(), None if v is None else v.numpy(),
                                              beta.numpy())
        want_clamp = {(lo, hi): ops_ref.clamp_grad_f32_ref(grad.numpy(), x.numpy(), lo, hi)
                      for lo, hi in ((-1.0, 1.0), (0.0, float("inf")), (0.0, 6.0))}
        for x_cl, g_cl in ((False, False), (True, True), (False, True), (True, False)):
            xl = x.contiguous(memory_format=torch.channels_last) if x_cl else x
            gl = grad.contiguous(memory_format=torch.channels_last) if g_cl else grad
            if backend.capabilities.ste_backward:
                got = backend.run_ste_input_grad(xl, gl, v, beta)
            else:
                got = ag.ste_input_grad_torch(xl, gl, v, beta)
            assert got.shape == x.shape and got.dtype == torch.float32
            assert torch.equal(_bits(got), _bits(torch.from_numpy(want))), (shape, x_cl, g_cl)
            for (lo, hi), want_c in want_clamp.items():
                if backend.capabilities.ste_backward:
                    got_c = backend.run_clamp_grad(gl, xl, lo, hi)
                else:
                    got_c = ag.clamp_mask_grad_torch(gl, xl, lo, hi)
                assert torch.equal(_bits(got_c), _bits(torch.from_numpy(want_c))), (shape, lo, hi)


def check_window_bits(backend: Backend, seed=520):
    """The window bits the forward saves for the backward (Capabilities.ste_backward) equal python_ref's,
    bit for bit, and the masked gradient read from them equals the float32 reference: windows closed
    ([-1, 1], [0, 1] after a shift: edges exactly on them, one float32 step off, +-0, +-inf, NaN) and
    open (the clamp), 1-4 masks, element counts that end inside a byte / word or cross a task's chunk,
    both layouts, in place. Backends without the capability skip it (the backward saves x there)."""
    if not backend.capabilities.ste_backward:
        return
    exact_v = [None, torch.tensor([0.25]), torch.tensor([0.5, 0.25, 0.75]),
               torch.tensor([0.125, -0.5, 1.5, 0.375])]
    sizes = [(1, 1, 1, 1), (1, 3, 1, 5), (1, 1, 8, 8), (2, 3, 5, 7), (1, 65, 1, 1), (3, 17, 3, 5),
             (2, 16, 33, 32), (1, 3, 7, 3)]  # 1 .. 33,792 elements: byte / word tails, two 32,768 chunks
    for i, shape in enumerate(sizes):
        v = exact_v[i % len(exact_v)]
        x, grad = ste_boundary_case(shape, seed + i, v)
        flat = x.view(-1)
        flat[:3] = torch.tensor([float("inf"), float("-inf"), float("nan")])[:flat.numel()]
        scale = torch.rand(1 if v is None else v.numel(), generator=torch.Generator().manual_seed(seed + i)) + 0.25
        cases = [(v, 0.0, 1.0, False)] if v is not None else [(None, -1.0, 1.0, False)]
        cases += [(None, -1.0, 1.0, True), (None, 0.0, float("inf"), True)]
        for cl in (False, True):
            xl = x.contiguous(memory_format=torch.channels_last) if cl else x
            gl = grad.contiguous(memory_format=torch.channels_last) if cl else grad
            x_mem = xl.permute(0, 2, 3, 1).reshape(-1) if cl else xl.reshape(-1)  # memory order
            g_mem = gl.permute(0, 2, 3, 1).reshape(-1) if cl else gl.reshape(-1)
            for shift, lo, hi, open_ in cases:
                bits = backend.run_window_bits(xl, shift, lo, hi, open_)
                want = ops_ref.window_bits_ref(x_mem.numpy(), None if shift is None else shift.numpy(),
                                               lo, hi, open_)
                assert bits.dtype == torch.int64 and tuple(bits.shape) == want.shape, (shape, bits.shape)
                assert np.array_equal(bits.numpy().view(np.uint64), want), (shape, cl, shift, lo, hi, open_)
                sc = scale[:bits.shape[0]] if shift is not None else (None if open_ else scale[:1])
                want_g = ops_ref.masked_grad_ref(want, g_mem.numpy(), None if sc is None else sc.numpy())
                got = backend.run_masked_grad(bits, gl, sc)
                assert got.shape == x.shape and got.stride() == gl.stride()
                got_mem = got.permute(0, 2, 3, 1).reshape(-1) if cl else got.reshape(-1)
                assert torch.equal(_bits(got_mem), _bits(torch.from_numpy(want_g))), (shape, cl, open_)
                g_copy = gl.clone()
                in_place = backend.run_masked_grad(bits, g_copy, sc, out=g_copy)
                assert in_place.data_ptr() == g_copy.data_ptr() and torch.equal(_bits(in_place), _bits(got))
        if v is None:  # sign mode's window equals the float path's |x| <= 1; H_v's 0 <= fl32(x + v) <= 1
            continue
        bits = backend.run_window_bits(x, v, 0.0, 1.0, False)
        want_grad = ops_ref.ste_input_grad_f32_ref(x.numpy(), grad.numpy(), v.numpy(), scale.numpy())
        assert torch.equal(_bits(backend.run_masked_grad(bits, grad, scale)), _bits(torch.from_numpy(want_grad)))


CHECKS = (check_capabilities, check_pack_signs, check_pair_counts, check_float_output, check_epilogue,
          check_nan_rejected, check_ste_backward, check_window_bits)
