"""Fused epilogue of mbn_conv2d_packed: out = clamp((mbn + bias[co]) + residual, lo, hi), on every CPU
backend / ISA.

The fused result must equal the unfused op followed by the same bias add and clamp in torch (the kernel
adds the bias to the finished float32 sum and clamps it: same operations, same order), and also the
pure-torch backend within float32 accumulation tolerance. Gradients (x, alpha, v, beta, bias, residual) must equal
those of the unfused op followed by torch's own add + hardtanh / relu (strict pass-through window).
"""
import math

import pytest
import torch
import torch.nn.functional as F

from bitkern import dispatch, ops
from bitkern.backends import torch_backend
from bitkern.backends.base import Backend, Capabilities
from bitkern import _bitmath

# (B, C, H, W, Co, M, N, kernel, stride, padding, per_channel_alpha, channels_last). The shapes cover:
# M, N > 1 (the epilogue must wait for the last (n, m) contribution), Co not a multiple of 8, C <= 32
# (tap folding; on AVX-512 the lane16 / lane32 engines, dense and strided) and C > 64 (two words),
# stride 2, padding 0 / 1, and on AVX-512 the register-block variants (M * ceil(Co / 8) column groups =
# 1, 2, 3, 4, 5, 6 -> R = 24, 12, 8, 6 plus remainder tiles) with pixel counts that are not multiples
# of R.
SHAPES = [
    (2, 16, 9, 9, 13, 3, 2, (3, 3), 1, 1, True, False),
    (1, 16, 8, 7, 8, 1, 1, (3, 3), 2, 0, False, True),
    (2, 32, 7, 7, 16, 1, 3, (3, 3), 1, 1, True, True),
    (3, 5, 6, 9, 20, 1, 1, (3, 3), 2, 1, True, False),
    (1, 70, 5, 6, 7, 2, 2, (3, 3), 1, 0, True, False),
    (2, 64, 6, 6, 40, 1, 1, (1, 1), 2, 0, False, True),
    (1, 3, 10, 10, 19, 2, 1, (5, 3), 2, 1, False, False),
    (2, 24, 8, 9, 35, 2, 2, (3, 3), 2, 1, True, False),
]
CLAMPS = [None, (-1.0, 1.0), (0.0, math.inf), (-0.3, 0.2)]


def _case(shape, seed):
    B, C, H, W, Co, M, N, kernel, stride, padding, per_channel, channels_last = shape
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(B, C, H, W, generator=gen)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    w = torch.randn(M, Co, C, *kernel, generator=gen)
    w_packed = torch.stack([ops.pack_signs(w[m].contiguous()) for m in range(M)])
    alpha = torch.rand((M, Co) if per_channel else (M,), generator=gen) * 0.2 + 0.05
    v = None if N == 1 and seed % 2 == 0 else torch.rand(N, generator=gen) * 1.2 - 0.3
    beta = torch.rand(N, generator=gen) + 0.5
    bias = torch.randn(Co, generator=gen)
    return dict(x=x, w_packed=w_packed, in_channels=C, kernel_size=kernel, alpha=alpha, v=v, beta=beta,
                stride=stride, padding=padding), bias


def _unfused(args, bias, clamp, residual=None):
    """The same computation as separate torch passes (hardtanh / relu: strict gradient window)."""
    out = ops.mbn_conv2d_packed(**args)
    if bias is not None:
        out = out + bias.reshape(1, -1, 1, 1)
    if residual is not None:
        out = out + residual
    if clamp is None:
        return out
    if clamp[1] == math.inf:
        return F.relu(out) if clamp[0] == 0 else F.threshold(out, clamp[0], clamp[0])
    return F.hardtanh(out, *clamp)


@pytest.mark.parametrize("shape", SHAPES, ids=[f"s{i}" for i in range(len(SHAPES))])
def test_fused_equals_unfused(cpu_backend, shape):
    args, bias = _case(shape, SHAPES.index(shape))
    for clamp in CLAMPS:
        for b in (None, bias):
            expected = _unfused(args, b, clamp)
            got = ops.mbn_conv2d_packed(**args, bias=b, clamp=clamp)
            assert got.shape == expected.shape
            torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)
    # and the pure-torch backend (an independent F.conv2d computation), float32 accumulation tolerance
    dispatch.set_backend("torch")
    reference = _unfused(args, bias, (-1.0, 1.0))
    dispatch.set_backend(cpu_backend[0])
    got = ops.mbn_conv2d_packed(**args, bias=bias, clamp=(-1.0, 1.0))
    torch.testing.assert_close(got, reference, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("shape", SHAPES[:5], ids=[f"s{i}" for i in range(5)])
@pytest.mark.parametrize("clamp", [None, (-1.0, 1.0), (0.0, math.inf)], ids=["none", "hardtanh", "relu"])
def test_gradients_equal_unfused(cpu_backend, shape, clamp):
    args, bias = _case(shape, 10 + SHAPES.index(shape))
    leaves = {"x": args["x"], "alpha": args["alpha"], "beta": args["beta"], "bias": bias}
    if args["v"] is not None:
        leaves["v"] = args["v"]
    grads = []
    for fused in (True, False):
        inputs = {k: t.detach().clone().requires_grad_() for k, t in leaves.items()}
        call = {**args, **{k: t for k, t in inputs.items() if k != "bias"}}
        out = (ops.mbn_conv2d_packed(**call, bias=inputs["bias"], clamp=clamp) if fused
               else _unfused(call, inputs["bias"], clamp))
        weight = torch.randn(out.shape, generator=torch.Generator().manual_seed(3))
        (out * weight).sum().backward()
        grads.append({k: t.grad for k, t in inputs.items()})
    for name in leaves:
        torch.testing.assert_close(grads[0][name], grads[1][name], rtol=1e-5, atol=1e-5, msg=name)


def test_clamp_gradient_window_is_strict():
    # out exactly on a bound passes no gradient (torch's hardtanh / relu backward).
    x = torch.ones(1, 1, 1, 1, requires_grad=True)
    w_packed = ops.pack_signs(torch.ones(1, 1, 1, 1)).unsqueeze(0)
    alpha = torch.ones(1, requires_grad=True)
    bias = torch.zeros(1, requires_grad=True)
    out = ops.mbn_conv2d_packed(x, w_packed, 1, 1, alpha, bias=bias, clamp=(-1.0, 1.0))  # == 1.0
    out.sum().backward()
    assert out.item() == 1.0 and bias.grad.item() == 0.0 and alpha.grad.item() == 0.0
    alpha.grad = None
    ops.mbn_conv2d_packed(x, w_packed, 1, 1, alpha, clamp=(-1.0, 2.0)).sum().backward()  # no bias
    assert alpha.grad.item() == 1.0 and x.grad.item() == 1.0


def test_opcheck_with_bias_and_clamp(cpu_backend):
    args, bias = _case(SHAPES[0], 20)
    call = (args["x"].requires_grad_(), args["w_packed"], args["in_channels"], list(args["kernel_size"]),
            args["alpha"].requires_grad_(), args["v"].requires_grad_(), args["beta"].requires_grad_(),
            [1, 1], [1, 1], bias.requires_grad_(), [-1.0, 1.0])
    torch.library.opcheck(torch.ops.bitkern.mbn_conv2d_packed.default, call)


class _PlainBackend(Backend):
    """A backend without fused_epilogue (like triton / cuda); records the ConvArgs it gets."""
    name = "plain"
    capabilities = Capabilities(devices=("cpu",))
    available = True

    def __init__(self):
        self.calls = []

    def run_pack(self, x, mode, v):
        return torch_backend.backend.run_pack(x, mode, v)

    def run_conv(self, args):
        self.calls.append(args)
        return torch_backend.backend.run_conv(args)


def test_backend_without_fused_epilogue(monkeypatch):
    """A backend that does not declare fused_epilogue (triton / cuda) gets plain calls; the contract's
    epilogue applies the bias and clamp afterwards, in the same order."""
    plain = _PlainBackend()
    calls = plain.calls
    args, bias = _case(SHAPES[0], 30)
    expected = _unfused(args, bias, (-1.0, 1.0))
    monkeypatch.setattr(dispatch, "backend_for", lambda device: plain)
    got = ops.mbn_conv2d_packed(**args, bias=bias, clamp=(-1.0, 1.0))
    assert calls and all(a.bias is None and a.clamp is None and a.residual is None for a in calls)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def _direct_cpp_call(seed):
    """The cpp backend and positional arguments for calling it directly on SHAPES[0] (skips without it)."""
    cpp = dispatch.get("cpp")
    if not cpp.available:
        pytest.skip(f"cpp backend unavailable: {cpp.reason}")
    args, bias = _case(SHAPES[0], seed)
    alpha2d = args["alpha"].reshape(3, -1).expand(3, 13).contiguous()
    call = (args["x"], args["w_packed"], 16, (3, 3), alpha2d, args["v"], args["beta"], (1, 1), (1, 1))
    return cpp, call, bias


def test_cpp_pairs_unaffected_by_epilogue():
    cpp, call, bias = _direct_cpp_call(40)
    out0, pairs0 = cpp.mbn_conv2d_packed(*call, want_pairs=True)
    out1, pairs1 = cpp.mbn_conv2d_packed(*call, want_pairs=True, bias=bias, clamp=(-0.5, 0.5))
    assert torch.equal(pairs0, pairs1)
    torch.testing.assert_close(out1, (out0 + bias.reshape(1, -1, 1, 1)).clamp(-0.5, 0.5), rtol=0, atol=0)
    with pytest.raises(ValueError, match="bias"):
        cpp.mbn_conv2d_packed(*call, bias=torch.zeros(12))
    with pytest.raises(ValueError, match="clamp"):
        cpp.mbn_conv2d_packed(*call, clamp=(1.0, 1.0))


@pytest.mark.parametrize("kwargs,error,match", [
    ({"bias": torch.zeros(12)}, ValueError, r"bias: expected shape \[13\]"),
    ({"bias": torch.zeros(13, 1)}, ValueError, "bias: expected a 1-d"),
    ({"bias": torch.zeros(13, dtype=torch.int64)}, TypeError, "bias: expected a floating"),
    ({"bias": torch.full((13,), math.inf)}, ValueError, "bias: contains NaN or Inf"),
    ({"clamp": (1.0, -1.0)}, ValueError, "clamp: expected lo < hi"),
    ({"clamp": (0.5, 0.5)}, ValueError, "clamp: expected lo < hi"),
    ({"clamp": (math.nan, 1.0)}, ValueError, "clamp: expected lo < hi"),
    ({"clamp": 1.0}, TypeError, "clamp: expected None or a"),
    ({"clamp": (0.0, "1")}, TypeError, "clamp: expected None or a"),
])
def test_clear_errors(kwargs, error, match):
    args, _ = _case(SHAPES[0], 50)
    with pytest.raises(error, match=match):
        ops.mbn_conv2d_packed(**args, **kwargs)


def _residual(args, seed, channels_last=False):
    """A residual of the op's output shape [B, Co, OH, OW] (NCHW or channels_last memory)."""
    shape = ops.mbn_conv2d_packed(**args).shape
    r = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
    return r.contiguous(memory_format=torch.channels_last) if channels_last else r


@pytest.mark.parametrize("shape", SHAPES, ids=[f"s{i}" for i in range(len(SHAPES))])
def test_fused_residual_equals_unfused(cpu_backend, shape):
    seed = 60 + SHAPES.index(shape)
    args, bias = _case(shape, seed)
    for i, clamp in enumerate(CLAMPS):
        residual = _residual(args, seed + i, channels_last=i % 2 == 1)
        for b in (None, bias):
            expected = _unfused(args, b, clamp, residual)
            got = ops.mbn_conv2d_packed(**args, bias=b, clamp=clamp, residual=residual)
            assert got.shape == expected.shape
            torch.testing.assert_close(got, expected, rtol=0, atol=0)  # same roundings, same order
    residual = _residual(args, seed)
    got = ops.mbn_conv2d_packed(**args, bias=bias, clamp=(-1.0, 1.0), residual=residual)
    # bit-exact vs the pure-torch backend (it replicates the packed kernels' arithmetic) ...
    dispatch.set_backend("torch")
    exact = ops.mbn_conv2d_packed(**args, bias=bias, clamp=(-1.0, 1.0), residual=residual)
    dispatch.set_backend(cpu_backend[0])
    assert torch.equal(got, exact)
    # ... and within float32 accumulation tolerance vs a plain torch computation (F.conv2d on +-1 bases)
    x, alpha, beta = args["x"], args["alpha"], args["beta"]
    M, Co = args["w_packed"].shape[:2]
    weights = _bitmath.unpack_weight_bases(args["w_packed"], args["in_channels"])
    acts = _bitmath.activation_bases(x, args["v"])
    alpha2d = alpha.reshape(M, -1).expand(M, Co)
    plain = sum(alpha2d[m].reshape(1, -1, 1, 1) * beta[n]
                * F.conv2d(acts[n], weights[m], stride=args["stride"], padding=args["padding"])
                for m in range(M) for n in range(len(acts)))
    plain = (plain + bias.reshape(1, -1, 1, 1) + residual).clamp(-1.0, 1.0)
    torch.testing.assert_close(got, plain, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("shape", SHAPES[:5], ids=[f"s{i}" for i in range(5)])
@pytest.mark.parametrize("clamp", [None, (-1.0, 1.0), (0.0, math.inf)], ids=["none", "hardtanh", "relu"])
def test_residual_gradients_equal_unfused(cpu_backend, shape, clamp):
    args, bias = _case(shape, 70 + SHAPES.index(shape))
    leaves = {"x": args["x"], "alpha": args["alpha"], "beta": args["beta"], "bias": bias,
              "residual": _residual(args, 71)}
    if args["v"] is not None:
        leaves["v"] = args["v"]
    grads = []
    for fused in (True, False):
        inputs = {k: t.detach().clone().requires_grad_() for k, t in leaves.items()}
        call = {**args, **{k: t for k, t in inputs.items() if k not in ("bias", "residual")}}
        out = (ops.mbn_conv2d_packed(**call, bias=inputs["bias"], clamp=clamp, residual=inputs["residual"])
               if fused else _unfused(call, inputs["bias"], clamp, inputs["residual"]))
        weight = torch.randn(out.shape, generator=torch.Generator().manual_seed(3))
        (out * weight).sum().backward()
        grads.append({k: t.grad for k, t in inputs.items()})
    for name in leaves:
        torch.testing.assert_close(grads[0][name], grads[1][name], rtol=1e-5, atol=1e-5, msg=name)
    # only the residual needs a gradient (e.g. an attack through the shortcut alone)
    residual = leaves["residual"].detach().clone().requires_grad_()
    ops.mbn_conv2d_packed(**args, residual=residual, clamp=clamp).sum().backward()
    assert residual.grad is not None and residual.grad.shape == residual.shape


def test_opcheck_with_residual_bias_and_clamp(cpu_backend):
    args, bias = _case(SHAPES[0], 80)
    residual = _residual(args, 81)
    call = (args["x"].requires_grad_(), args["w_packed"], args["in_channels"], list(args["kernel_size"]),
            args["alpha"].requires_grad_(), args["v"].requires_grad_(), args["beta"].requires_grad_(),
            [1, 1], [1, 1], bias.requires_grad_(), [-1.0, 1.0], residual.requires_grad_())
    torch.library.opcheck(torch.ops.bitkern.mbn_conv2d_packed.default, call)


def test_backend_without_fused_epilogue_gets_residual_in_torch(monkeypatch):
    plain = _PlainBackend()
    calls = plain.calls
    args, bias = _case(SHAPES[0], 90)
    residual = _residual(args, 91)
    expected = _unfused(args, bias, (-1.0, 1.0), residual)
    monkeypatch.setattr(dispatch, "backend_for", lambda device: plain)
    got = ops.mbn_conv2d_packed(**args, bias=bias, clamp=(-1.0, 1.0), residual=residual)
    assert calls and all(a.bias is None and a.clamp is None and a.residual is None for a in calls)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_cpp_residual_layouts_and_errors():
    cpp, call, bias = _direct_cpp_call(95)
    out0, pairs0 = cpp.mbn_conv2d_packed(*call, want_pairs=True)
    residual = torch.randn(out0.shape)
    out1, pairs1 = cpp.mbn_conv2d_packed(*call, want_pairs=True, bias=bias, residual=residual)
    assert torch.equal(pairs0, pairs1)
    assert torch.equal(out1, out0 + bias.reshape(1, -1, 1, 1) + residual)  # no clamp: residual alone
    out2, _ = cpp.mbn_conv2d_packed(*call, residual=residual.contiguous(memory_format=torch.channels_last))
    assert torch.equal(out2, out0 + residual)
    with pytest.raises(ValueError, match="residual"):
        cpp.mbn_conv2d_packed(*call, residual=residual[:, :12])


@pytest.mark.parametrize("make,error,match", [
    (lambda s: torch.zeros(s[0], s[1] - 1, s[2], s[3]), ValueError, r"residual: expected shape"),
    (lambda s: torch.zeros(s[0], s[1], s[2] + 1, s[3]), ValueError, r"residual: expected shape"),
    (lambda s: torch.zeros(s[1], s[2], s[3]), ValueError, "residual: expected a 4-d"),
    (lambda s: torch.zeros(s, dtype=torch.int64), TypeError, "residual: expected a floating"),
    (lambda s: torch.zeros(s, device="meta"), ValueError, "residual: expected a tensor on cpu"),
])
def test_residual_clear_errors(make, error, match):
    args, _ = _case(SHAPES[0], 96)
    shape = ops.mbn_conv2d_packed(**args).shape
    with pytest.raises(error, match=match):
        ops.mbn_conv2d_packed(**args, residual=make(shape))
