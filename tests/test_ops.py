"""bitkern.ops on every CPU backend and ISA path against the numpy reference (python_ref)."""
import os
import random
import zlib

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import bitkern
from bitkern import dispatch, ops
from bitkern.ops.eager import plain_eager
from python_ref import (binary_conv2d_ref, mbn_conv2d_grads_ref, mbn_conv2d_ref, pack_signs_ref,
                        unpack_signs_ref)

# Float outputs are sums of up to C*KH*KW*M*N scaled integers accumulated in float32: compare with a
# tolerance relative to the largest magnitude involved.
FLOAT_RTOL = 2e-6

# Inputs are generated deterministically from each config, so one reference result serves every backend.
_REF_CACHE = {}


def _seed(cfg) -> int:
    """A seed fixed by the config (str hashes are salted per process: PYTHONHASHSEED)."""
    return zlib.crc32(str(cfg).encode())


def _cached(key, compute):
    if key not in _REF_CACHE:
        _REF_CACHE[key] = compute()
    return _REF_CACHE[key]


def _random_configs(count, seed, max_bases=5):
    """Random conv shapes that always include the awkward cases (C not a multiple of 64, stride 2/3,
    padding 0..3, kernel 1/3/5/7, batch 1, H != W)."""
    rng = random.Random(seed)
    fixed = [
        dict(B=1, C=1, Co=3, H=5, W=7, k=3, s=1, p=1), dict(B=2, C=3, Co=4, H=9, W=6, k=5, s=2, p=2),
        dict(B=1, C=63, Co=5, H=6, W=5, k=1, s=1, p=0), dict(B=2, C=65, Co=3, H=7, W=8, k=3, s=3, p=3),
        dict(B=1, C=130, Co=9, H=5, W=5, k=7, s=1, p=3), dict(B=3, C=64, Co=17, H=4, W=9, k=3, s=2, p=0),
        dict(B=1, C=128, Co=8, H=3, W=3, k=3, s=1, p=1),
    ]
    for cfg in fixed:
        yield cfg
    for _ in range(count - len(fixed)):
        k = rng.choice([1, 3, 5, 7])
        p = rng.choice([0, 1, 2, 3])
        h = rng.randint(max(1, k - 2 * p), 10)
        w = rng.randint(max(1, k - 2 * p), 10)
        yield dict(B=rng.choice([1, 2, 3]), C=rng.choice([1, 2, 3, 31, 63, 64, 65, 100, 130]),
                   Co=rng.randint(1, 20), H=h, W=w, k=k, s=rng.choice([1, 2, 3]), p=p,
                   M=rng.randint(1, max_bases), N=rng.randint(1, max_bases))


def _inputs(cfg, gen, channels_last=False):
    x = torch.randn(cfg["B"], cfg["C"], cfg["H"], cfg["W"], generator=gen)
    x[..., 0, 0] = 0.0      # sign(0) = +1
    x[..., -1, 0] = -0.0    # sign(-0.0) = +1
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return x


@pytest.mark.parametrize("cfg", list(_random_configs(24, seed=1)), ids=str)
def test_binary_conv2d_matches_reference(cpu_backend, cfg):
    gen = torch.Generator().manual_seed(_seed(cfg))
    for channels_last in (False, True):
        x = _inputs(cfg, gen, channels_last)
        w = torch.randn(cfg["Co"], cfg["C"], cfg["k"], cfg["k"], generator=gen)
        w[0, 0] = 0.0
        got = ops.binary_conv2d(x, w, stride=cfg["s"], padding=cfg["p"])
        assert got.dtype == torch.int32
        want = _cached(("binary", str(cfg), channels_last),
                       lambda: binary_conv2d_ref(x.numpy(), w.numpy(), cfg["s"], cfg["p"]))
        np.testing.assert_array_equal(got.numpy(), want)


def test_binary_conv2d_equals_float_conv_of_signs(cpu_backend):
    gen = torch.Generator().manual_seed(0)
    x, w = torch.randn(2, 70, 11, 9, generator=gen), torch.randn(33, 70, 3, 3, generator=gen)
    sign = lambda t: torch.where(t >= 0, 1.0, -1.0).double()  # noqa: E731
    want = F.conv2d(sign(x), sign(w), stride=(2, 1), padding=(1, 2))
    got = ops.binary_conv2d(x, w, stride=(2, 1), padding=(1, 2))
    assert torch.equal(got.double(), want)


@pytest.mark.parametrize("shape", [(2, 1, 3, 4), (1, 63, 2, 5), (3, 64, 1, 1), (2, 65, 3, 2), (1, 200, 2, 2)])
def test_pack_signs_matches_reference(cpu_backend, shape):
    x = torch.randn(shape, generator=torch.Generator().manual_seed(3))
    x.view(-1)[::7] = 0.0
    x.view(-1)[1::11] = -0.0
    got = ops.pack_signs(x)
    np.testing.assert_array_equal(got.numpy(), pack_signs_ref(x.numpy()))
    np.testing.assert_array_equal(unpack_signs_ref(got.numpy(), shape[1]),
                                  np.where(x.numpy() >= 0, 1, -1))


def test_pack_signs_2d_rows(cpu_backend):
    w = torch.randn(5, 130, generator=torch.Generator().manual_seed(4))
    got = ops.pack_signs(w)
    assert got.shape == (5, 3)
    np.testing.assert_array_equal(got.numpy(), pack_signs_ref(w.numpy()[:, :, None, None])[:, 0, 0])


def _mbn_args(cfg, gen, per_channel, sign_mode):
    M, N = cfg.get("M", 2), (1 if sign_mode else cfg.get("N", 2))
    x = torch.rand(cfg["B"], cfg["C"], cfg["H"], cfg["W"], generator=gen) * 1.6 - 0.3
    w = torch.randn(M, cfg["Co"], cfg["C"], cfg["k"], cfg["k"], generator=gen)
    alpha = torch.rand((M, cfg["Co"]) if per_channel else (M,), generator=gen) + 0.1
    v = None if sign_mode else torch.linspace(-0.2, 0.6, N)
    beta = torch.rand(N, generator=gen) + 0.1
    return x, w, alpha, v, beta


def _np(t):
    return None if t is None else t.detach().numpy()


@pytest.mark.parametrize("cfg", list(_random_configs(20, seed=2)), ids=str)
def test_mbn_conv2d_matches_reference(cpu_backend, cfg):
    gen = torch.Generator().manual_seed(_seed(cfg))
    for per_channel, sign_mode in ((False, False), (True, False), (True, True)):
        x, w, alpha, v, beta = _mbn_args(cfg, gen, per_channel, sign_mode)
        got = ops.mbn_conv2d(x, w, alpha, v, beta, stride=cfg["s"], padding=cfg["p"])
        want = _cached(("mbn", str(cfg), per_channel, sign_mode), lambda: mbn_conv2d_ref(
            x.numpy(), w.numpy(), alpha.numpy(), _np(v), beta.numpy(), cfg["s"], cfg["p"]))
        assert got.dtype == torch.float32 and got.shape == want.shape
        scale = np.abs(want).max() + cfg["C"] * cfg["k"] ** 2
        np.testing.assert_allclose(got.numpy(), want, rtol=0, atol=FLOAT_RTOL * scale)


@pytest.mark.parametrize("cfg", list(_random_configs(8, seed=3, max_bases=3)), ids=str)
def test_mbn_conv2d_ste_gradients_match_reference(cpu_backend, cfg):
    gen = torch.Generator().manual_seed(_seed(cfg))
    for per_channel, sign_mode in ((True, False), (False, True)):
        args = [t.requires_grad_() if t is not None else None
                for t in _mbn_args(cfg, gen, per_channel, sign_mode)]
        x, w, alpha, v, beta = args
        out = ops.mbn_conv2d(x, w, alpha, v, beta, stride=cfg["s"], padding=cfg["p"])
        grad_out = torch.randn(out.shape, generator=gen)
        out.backward(grad_out)
        want = _cached(("grads", str(cfg), per_channel, sign_mode), lambda: mbn_conv2d_grads_ref(
            x.detach().numpy(), w.detach().numpy(), alpha.detach().numpy(), _np(v), beta.detach().numpy(),
            grad_out.numpy(), cfg["s"], cfg["p"]))
        for name, tensor in (("x", x), ("w_bases", w), ("alpha", alpha), ("v", v), ("beta", beta)):
            if tensor is None:
                continue
            scale = np.abs(want[name]).max() + 1.0
            np.testing.assert_allclose(tensor.grad.numpy(), want[name], rtol=0, atol=1e-5 * scale,
                                       err_msg=name)


def test_packed_op_equals_float_weight_op(cpu_backend):
    gen = torch.Generator().manual_seed(5)
    cfg = dict(B=2, C=70, Co=6, H=7, W=5, k=3, s=2, p=1, M=3, N=2)
    x, w, alpha, v, beta = _mbn_args(cfg, gen, per_channel=True, sign_mode=False)
    w_packed = ops.pack_signs(w.flatten(0, 1)).unflatten(0, (3, 6))
    leaves = [t.clone().requires_grad_() for t in (x, alpha, v, beta)]
    out_f = ops.mbn_conv2d(leaves[0], w, leaves[1], leaves[2], leaves[3], stride=2, padding=1)
    leaves_p = [t.clone().requires_grad_() for t in (x, alpha, v, beta)]
    out_p = ops.mbn_conv2d_packed(leaves_p[0], w_packed, 70, 3, leaves_p[1], leaves_p[2], leaves_p[3],
                                  stride=2, padding=1)
    assert torch.equal(out_f, out_p)
    g = torch.randn(out_f.shape, generator=gen)
    out_f.backward(g)
    out_p.backward(g)
    for a, b in zip(leaves, leaves_p):
        torch.testing.assert_close(a.grad, b.grad)


def test_opcheck_all_ops(cpu_backend):
    gen = torch.Generator().manual_seed(6)
    x = torch.rand(2, 5, 6, 7, generator=gen, requires_grad=True)
    w = torch.randn(3, 4, 5, 3, 3, generator=gen, requires_grad=True)
    alpha = torch.rand(3, 4, generator=gen, requires_grad=True)
    v = torch.tensor([0.1, 0.4], requires_grad=True)
    beta = torch.rand(2, generator=gen, requires_grad=True)
    w_packed = ops.pack_signs(w.detach().flatten(0, 1)).unflatten(0, (3, 4))
    cases = [
        (torch.ops.bitkern.pack_signs.default, (x.detach(),)),
        (torch.ops.bitkern.binary_conv2d.default, (x.detach(), w.detach()[0], [2, 1], [1, 0])),
        (torch.ops.bitkern.mbn_conv2d.default, (x, w, alpha, v, beta, [1, 1], [1, 1])),
        (torch.ops.bitkern.mbn_conv2d.default, (x, w, alpha[:, 0].detach().requires_grad_(), None,
                                                beta[:1].detach().requires_grad_(), [2, 2], [0, 0])),
        (torch.ops.bitkern.mbn_conv2d_packed.default, (x, w_packed, 5, [3, 3], alpha, v, beta, [1, 1], [1, 1])),
        (torch.ops.bitkern.mbn_pair_counts.default, (x.detach(), w_packed, 5, [3, 3], v.detach(), [1, 1], [2, 2])),
    ]
    for op, args in cases:
        torch.library.opcheck(op, args)


def test_gradcheck_alpha_beta_exact(cpu_backend):
    # The output is linear in alpha and beta, so their gradients are exact and gradcheck applies.
    gen = torch.Generator().manual_seed(7)
    x = torch.rand(1, 3, 5, 4, generator=gen)
    w = torch.randn(2, 3, 3, 3, 3, generator=gen)
    v = torch.tensor([0.2, 0.5])
    alpha = torch.rand(2, 3, generator=gen, requires_grad=True)
    beta = torch.rand(2, generator=gen, requires_grad=True)
    fn = lambda a, b: ops.mbn_conv2d(x, w, a, v, b, padding=1)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (alpha, beta), eps=1e-2, atol=5e-2, rtol=1e-3)


def test_ste_identity_mode_passes_gradient_everywhere(cpu_backend):
    x = torch.tensor([[[[-3.0, 0.2], [2.5, 0.9]]]], requires_grad=True)
    w = torch.ones(1, 1, 1, 1, 1)
    out = ops.mbn_conv2d(x, w, torch.ones(1), None, None)
    (grad_clipped,) = torch.autograd.grad(out.sum(), x)
    assert grad_clipped.flatten().tolist() == [0.0, 1.0, 0.0, 1.0]
    with ops.ste_mode("identity"):
        out = ops.mbn_conv2d(x, w, torch.ones(1), None, None)
        (grad_identity,) = torch.autograd.grad(out.sum(), x)
    assert grad_identity.flatten().tolist() == [1.0, 1.0, 1.0, 1.0]
    assert ops.get_ste_mode() == "clipped"


# ------------------------------------------------------------------------------------------------
# bad input: clear errors naming the argument, what was received and what was expected

def _good():
    return torch.rand(2, 4, 6, 6), torch.randn(3, 5, 4, 3, 3), torch.rand(3), torch.tensor([0.2]), torch.ones(1)


@pytest.mark.parametrize("mutate, exc, words", [
    (lambda a: a.update(x=a["x"].to(torch.int32)), TypeError, ["x", "floating", "torch.int32"]),
    (lambda a: a.update(x=a["x"][0]), ValueError, ["x", "4-d", "(4, 6, 6)"]),
    (lambda a: a.update(x=torch.rand(2, 7, 6, 6)), ValueError, ["x", "4 input channels", "(2, 7, 6, 6)"]),
    (lambda a: a.update(padding=-1), ValueError, ["padding", ">= 0"]),
    (lambda a: a.update(stride=0), ValueError, ["stride", ">= 1"]),
    (lambda a: a.update(stride=1.5), TypeError, ["stride", "int"]),
    (lambda a: a.update(x=torch.rand(2, 4, 2, 2)), ValueError, ["kernel 3x3", "larger than the padded input"]),
    (lambda a: a["x"].view(-1).__setitem__(5, float("nan")), ValueError, ["x", "NaN"]),
    (lambda a: a.update(alpha=torch.rand(4)), ValueError, ["alpha", "[3] or [3, 5]", "(4,)"]),
    (lambda a: a.update(alpha=torch.tensor([1.0, float("inf"), 1.0])), ValueError, ["alpha", "Inf"]),
    (lambda a: a.update(beta=torch.ones(2)), ValueError, ["beta", "one per shift", "(2,)"]),
    (lambda a: a.update(v=torch.tensor([[0.2]])), ValueError, ["v", "1-d"]),
    (lambda a: a.update(w=torch.randn(5, 4, 3, 3)), ValueError, ["w_bases", "5-d"]),
])
def test_mbn_conv2d_bad_input(mutate, exc, words):
    x, w, alpha, v, beta = _good()
    args = dict(x=x, w=w, alpha=alpha, v=v, beta=beta, stride=1, padding=0)
    mutate(args)
    with pytest.raises(exc) as info:
        ops.mbn_conv2d(args["x"], args["w"], args["alpha"], args["v"], args["beta"], stride=args["stride"],
                       padding=args["padding"])
    for word in words:
        assert word in str(info.value), (word, str(info.value))


def test_binary_conv2d_bad_input():
    with pytest.raises(ValueError, match=r"x: expected 3 input channels .*\(1, 4, 5, 5\)"):
        ops.binary_conv2d(torch.rand(1, 4, 5, 5), torch.rand(2, 3, 3, 3))
    with pytest.raises(TypeError, match="w: expected a floating-point tensor"):
        ops.binary_conv2d(torch.rand(1, 3, 5, 5), torch.ones(2, 3, 3, 3, dtype=torch.int64))
    with pytest.raises(ValueError, match="w_packed: expected shape"):
        ops.mbn_conv2d_packed(torch.rand(1, 3, 5, 5), torch.zeros(1, 2, 3, 3, 2, dtype=torch.int64), 3, 3,
                              torch.ones(1))


def test_dispatch_errors_and_status(monkeypatch):
    with pytest.raises(ValueError, match="unknown backend 'fpga'"):
        dispatch.set_backend("fpga")
    monkeypatch.setenv("BITKERN_BACKEND", "cpp")
    if dispatch.get("cpp").available:
        with pytest.raises(RuntimeError, match="cannot run on cuda tensors"):
            dispatch.backend_for("cuda")
    else:
        with pytest.raises(RuntimeError, match="unavailable"):
            dispatch.backend_for("cpu")
    monkeypatch.setenv("BITKERN_BACKEND", "torch")
    assert dispatch.backend_for("cpu").name == "torch"
    status = bitkern.backends_status()
    assert status["torch"] == (True, "")
    assert all(ok or reason for ok, reason in status.values()), status  # unavailable always says why
    assert "torch" in bitkern.backend_report()


def test_use_backend_context_restores():
    with dispatch.use_backend("torch"):
        assert dispatch.backend_for("cpu").name == "torch"
    assert dispatch.forced_backend() == os.environ.get("BITKERN_BACKEND")


@pytest.mark.skipif(os.environ.get("BITKERN_ALLOW_NO_CPP") == "1", reason="BITKERN_ALLOW_NO_CPP=1")
def test_cpp_backend_is_built():
    # A broken build must fail the suite, not fall back to the torch backend silently.
    cpp = dispatch.get("cpp")
    assert cpp.available, cpp.reason
    assert dispatch.backend_for("cpu").name == "cpp" or dispatch.forced_backend()


def test_ste_smooth_mode_is_a_triangle_of_the_box_area():
    x = torch.tensor([[[[-1.5, -0.5, 0.0, 0.75]]]], requires_grad=True)
    w = torch.ones(1, 1, 1, 1, 1)
    with ops.ste_mode("smooth"):
        (grad,) = torch.autograd.grad(ops.mbn_conv2d(x, w, torch.ones(1)).sum(), x)
    assert grad.flatten().tolist() == [0.0, 1.0, 2.0, 0.5]
    xv = torch.tensor([[[[0.0, 0.25, 0.5, 1.2]]]], requires_grad=True)
    with ops.ste_mode("smooth"):
        (grad,) = torch.autograd.grad(ops.mbn_conv2d(xv, w, torch.ones(1), torch.zeros(1)).sum(), xv)
    assert grad.flatten().tolist() == [0.0, 1.0, 2.0, 0.0]
    with pytest.raises(ValueError, match="mode: expected one of"):
        ops.set_ste_mode("straight")


@pytest.mark.parametrize("cfg", list(_random_configs(10, seed=4)), ids=str)
def test_backends_agree_bit_for_bit(cfg):
    """The torch backend replicates the packed kernels' float arithmetic exactly (same products, same sum
    order, no FMA): outputs, bias and clamp included, are identical on every ISA path. Attack trajectories
    on binary nets depend on this (a 1-ulp difference at a threshold changes the gradient field)."""
    cpp = dispatch.get("cpp")
    if not cpp.available:
        pytest.skip(f"cpp backend unavailable: {cpp.reason}")
    gen = torch.Generator().manual_seed(_seed(cfg))
    x, w, alpha, v, beta = _mbn_args(cfg, gen, per_channel=True, sign_mode=False)
    w_packed = ops.pack_signs(w.flatten(0, 1)).unflatten(0, w.shape[:2])
    bias = torch.randn(cfg["Co"], generator=gen)
    outputs = {}
    for name, isa in [("torch", None)] + [("cpp", i) for i in cpp.isa_supported()]:
        with dispatch.use_backend(name):
            if isa:
                dispatch.set_isa(isa)
            try:
                outputs[f"{name}-{isa}"] = (
                    ops.mbn_conv2d(x, w, alpha, v, beta, stride=cfg["s"], padding=cfg["p"]),
                    ops.mbn_conv2d_packed(x, w_packed, cfg["C"], cfg["k"], alpha, v, beta, stride=cfg["s"],
                                          padding=cfg["p"], bias=bias, clamp=(-1.0, 1.0)))
            finally:
                dispatch.set_isa(None)
    reference = outputs.pop("torch-None")
    for key, got in outputs.items():
        for want_t, got_t in zip(reference, got):
            assert torch.equal(want_t, got_t), key


def test_eager_fast_path_only_when_nothing_else_would_run():
    """Plain eager calls skip the custom-op dispatcher; modes, subclasses and autograd still see the op."""
    from torch.utils._python_dispatch import TorchDispatchMode

    gen = torch.Generator().manual_seed(0)
    x, w = torch.randn(2, 5, 6, 7, generator=gen), torch.randn(4, 5, 3, 3, generator=gen)
    assert plain_eager((x, w), differentiable=False)
    x_grad = x.clone().requires_grad_()
    assert not plain_eager((x_grad, w), differentiable=True)
    assert plain_eager((x_grad, w), differentiable=False)
    with torch.no_grad():
        assert plain_eager((x_grad, w), differentiable=True)

    seen = []

    class Log(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            seen.append(str(func))
            return func(*args, **(kwargs or {}))

    fast = ops.binary_conv2d(x, w, padding=1)
    with Log():
        assert not plain_eager((x, w), differentiable=False)
        logged = ops.binary_conv2d(x, w, padding=1)
    assert any("bitkern.binary_conv2d" in name for name in seen)
    assert torch.equal(fast, logged)
