"""The STE backward of issue 16 on every CPU backend and ISA path: the fused input-gradient and clamp-mask
passes, the cached effective weights, the channels_last transposed convolution; against python_ref's STE
and, bit for bit, across backends and against the float arithmetic bitkern/ops/autograd.py documents."""
import numpy as np
import pytest
import torch

import bitkern
from bitkern import dispatch, ops
from bitkern.nn.packed import pack_bases
from bitkern.ops import autograd as ag
from python_ref import mbn_conv2d_grads_ref
from python_ref.ops_ref import ste_input_grad_f32_ref

import conformance

# (B, C, H, W, Co, k, s, p, M, N): lane-engine and word-engine channel counts, strides 1/2, sign mode.
SHAPES = [(2, 3, 6, 5, 4, 3, 1, 1, 2, 3), (1, 16, 5, 5, 8, 3, 2, 1, 3, 1), (2, 17, 4, 6, 5, 1, 1, 0, 1, 1),
          (1, 65, 4, 4, 3, 3, 1, 1, 2, 2)]
V_EXACT = {1: torch.tensor([0.25]), 2: torch.tensor([0.5, -0.25]), 3: torch.tensor([0.25, 0.5, 0.75])}


def _targets():
    out = [("torch", None)]
    cpp = dispatch.get("cpp")
    if cpp.available:
        out += [("cpp", isa) for isa in cpp.isa_supported()]
    return out


_CPP = dispatch.get("cpp")
needs_cpp = pytest.mark.skipif(not _CPP.available, reason=f"cpp backend: {_CPP.reason}")


def _run_on(name, isa, fn):
    with dispatch.use_backend(name):
        dispatch.set_isa(isa)
        try:
            return fn()
        finally:
            dispatch.set_isa(None)


def _layer_args(shape, seed, sign_mode):
    B, C, H, W, Co, k, s, p, M, N = shape
    gen = torch.Generator().manual_seed(seed)
    v = None if sign_mode else V_EXACT[N]
    x, _ = conformance.ste_boundary_case((B, C, H, W), seed, v)
    w = torch.randn(M, Co, C, k, k, generator=gen)
    alpha = torch.rand(M, Co, generator=gen) + 0.1
    beta = torch.rand(1 if v is None else v.numel(), generator=gen) + 0.25
    bias = torch.randn(Co, generator=gen)
    return x, w, alpha, v, beta, bias


def _packed_grads(x, w_packed, C, k, alpha, v, beta, s, p, bias=None, clamp=None, residual=None, seed=0):
    xx = x.clone().requires_grad_()
    res = None if residual is None else residual.clone().requires_grad_()
    b = None if bias is None else bias.clone().requires_grad_()
    out = ops.mbn_conv2d_packed(xx, w_packed, C, k, alpha, v, beta, s, p, bias=b, clamp=clamp, residual=res)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed))
    out.backward(g)
    return out, g, xx.grad, None if b is None else b.grad, None if res is None else res.grad


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("sign_mode", [False, True], ids=["hv", "sign"])
def test_packed_input_grad_matches_reference_on_every_path(shape, sign_mode):
    """grad_x of the packed op equals python_ref's STE (float tolerance) on every backend / ISA path, with
    x + v exactly 0 and 1 (and |x| exactly 1) in the input, and all paths agree bit for bit."""
    B, C, H, W, Co, k, s, p, M, N = shape
    x, w, alpha, v, beta, _ = _layer_args(shape, 11, sign_mode)
    w_packed = pack_bases(w)
    results = {}
    for name, isa in _targets():
        _, g, gx, _, _ = _run_on(name, isa, lambda: _packed_grads(x, w_packed, C, k, alpha, v, beta, s, p))
        results[(name, isa)] = gx
    want = mbn_conv2d_grads_ref(x.numpy(), w.numpy(), alpha.numpy(), None if v is None else v.numpy(),
                                beta.numpy(), g.numpy(), s, p)["x"]
    scale = np.abs(want).max() + 1.0
    for key, gx in results.items():
        np.testing.assert_allclose(gx.numpy(), want, rtol=0, atol=1e-5 * scale, err_msg=str(key))
        ref = results[("torch", None)]
        assert torch.equal(gx, ref) and torch.equal(torch.signbit(gx), torch.signbit(ref)), key


@pytest.mark.parametrize("shape", SHAPES[:2], ids=str)
def test_epilogue_grads_agree_bit_for_bit(shape):
    """With bias, residual and a clamp (Hardtanh and ReLU), every path gives the same grad_x, grad_bias,
    grad_residual, bit for bit (the clamp mask in its fused kernel or in torch)."""
    B, C, H, W, Co, k, s, p, M, N = shape
    x, w, alpha, v, beta, bias = _layer_args(shape, 12, False)
    w_packed = pack_bases(w)
    oh, ow = (H + 2 * p - k) // s + 1, (W + 2 * p - k) // s + 1
    residual = torch.randn(B, Co, oh, ow, generator=torch.Generator().manual_seed(3))
    for clamp in ((-1.0, 1.0), (0.0, float("inf"))):
        ref = None
        for name, isa in _targets():
            got = _run_on(name, isa, lambda: _packed_grads(x, w_packed, C, k, alpha, v, beta, s, p, bias,
                                                           clamp, residual))
            got = [t.contiguous() for t in got]
            assert (got[0] == clamp[0]).any() or clamp[0] == 0.0  # the mask has work to do
            if ref is None:
                ref = got
                continue
            for a, b in zip(ref, got):
                assert torch.equal(a.view(torch.int32), b.view(torch.int32)), (name, isa, clamp)


def _old_arithmetic(x, g_act, v, beta):
    """Today's (pre issue 16) float expression of grad_x given G: sum(beta_n * float_window_n * G)."""
    xf = x.float()
    windows = ([((xf >= -1) & (xf <= 1)).float()] if v is None else
               [((xf + vn >= 0) & (xf + vn <= 1)).float() for vn in v.float()])
    return sum(beta[n] * windows[n] * g_act for n in range(len(windows)))


@pytest.mark.parametrize("sign_mode", [False, True], ids=["hv", "sign"])
def test_fused_pass_equals_previous_arithmetic(sign_mode):
    """Given the same G, the fused pass equals the previous float expression exactly, on every path."""
    shape = (3, 19, 5, 7)
    v = None if sign_mode else V_EXACT[3]
    x, g = conformance.ste_boundary_case(shape, 5, v)
    beta = torch.tensor([0.7, 1.3, 0.45])[:1 if v is None else 3]
    want = _old_arithmetic(x, g, v, beta)
    for name, isa in _targets():
        got = _run_on(name, isa, lambda: ag.ste_input_grad(x, g, v, beta))
        assert torch.equal(got, want), (name, isa)
    ref = ste_input_grad_f32_ref(x.numpy(), g.numpy(), None if v is None else v.numpy(), beta.numpy())
    assert torch.equal(want, torch.from_numpy(ref))


def test_transposed_conv_matches_conv2d_input():
    """The channels_last transposed convolution is the input gradient of conv2d (float tolerance)."""
    gen = torch.Generator().manual_seed(0)
    for (ci, co, h, s) in ((5, 7, 9, 1), (16, 32, 8, 2), (3, 4, 1, 1)):
        x = torch.randn(2, ci, h, h, generator=gen)
        w = torch.randn(co, ci, 3 if h > 1 else 1, 3 if h > 1 else 1, generator=gen)
        p = 1 if h > 1 else 0
        out = torch.nn.functional.conv2d(x, w, stride=s, padding=p)
        g = torch.randn(out.shape, generator=gen)
        got = ag.transposed_conv(g, w, x.shape, (s, s), (p, p))
        want = torch.nn.grad.conv2d_input(x.shape, w, g, s, p)
        assert got.is_contiguous(memory_format=torch.channels_last)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_effective_weight_cache_hits_and_invalidates():
    gen = torch.Generator().manual_seed(1)
    w = torch.randn(3, 4, 5, 3, 3, generator=gen)
    w_packed = pack_bases(w)
    alpha = torch.rand(3, 4, generator=gen) + 0.1
    fresh = lambda: ag.weff_from_signs(torch.where(w >= 0, 1.0, -1.0), alpha)  # noqa: E731
    first = ag.effective_weight(w_packed, 5, alpha)
    assert torch.equal(first, fresh())
    assert ag.effective_weight(w_packed, 5, alpha) is first  # cached
    alpha.mul_(2.0)  # in place: values change
    second = ag.effective_weight(w_packed, 5, alpha)
    assert second is not first and torch.equal(second, fresh())
    alpha2 = alpha.clone()  # another tensor, same values: still valid
    assert ag.effective_weight(w_packed, 5, alpha2) is second
    w.neg_()
    w_packed.copy_(pack_bases(w))  # in-place write bumps the version counter
    third = ag.effective_weight(w_packed, 5, alpha)
    assert third is not second and torch.equal(third, fresh())


def test_frozen_model_gradient_follows_fold_and_reload():
    """A frozen layer's cached W_eff follows fold_batchnorm (new alpha) and load_state_dict (in place)."""
    from bitkern.nn.packed import packed_from_bases
    gen = torch.Generator().manual_seed(2)
    w = torch.randn(2, 6, 4, 3, 3, generator=gen)
    layer = packed_from_bases(w, torch.rand(2, 6, generator=gen) + 0.1, torch.tensor([0.25, 0.5]),
                              torch.tensor([0.6, 0.9]), None, in_channels=4, out_channels=6, kernel_size=(3, 3),
                              padding=(1, 1), xnor=False)
    x = torch.rand(2, 4, 5, 5, generator=gen)

    def grad_x(module):
        xx = x.clone().requires_grad_()
        (g,) = torch.autograd.grad(module(xx).square().sum(), xx)
        return g

    def fresh_grad(module):
        ag.clear_effective_weight_cache()
        return grad_x(module)

    grad_x(layer)  # fills the cache
    bn = torch.nn.BatchNorm2d(6).eval()
    bn.running_mean.uniform_(-1, 1)
    bn.running_var.uniform_(0.5, 2)
    layer.fold_batchnorm(bn)
    after_fold = grad_x(layer)
    assert torch.equal(after_fold, fresh_grad(layer))
    other = packed_from_bases(-w, torch.rand(2, 6, generator=gen) + 0.1, torch.tensor([0.25, 0.5]),
                              torch.tensor([0.6, 0.9]), None, in_channels=4, out_channels=6, kernel_size=(3, 3),
                              padding=(1, 1), xnor=False)
    other.fold_batchnorm(bn)
    grad_x(layer)
    layer.load_state_dict(other.state_dict())  # in-place copies into w_packed and alpha
    assert torch.equal(grad_x(layer), fresh_grad(other))


@pytest.mark.parametrize("mode", ["identity", "smooth"])
def test_surrogate_modes_keep_float_windows(mode):
    gen = torch.Generator().manual_seed(4)
    x = torch.rand(2, 3, 5, 5, generator=gen) * 2 - 0.5
    w = torch.randn(2, 4, 3, 3, 3, generator=gen)
    alpha, v, beta = torch.rand(2, 4, generator=gen) + 0.1, torch.tensor([0.25, 0.5]), torch.tensor([0.6, 0.9])
    w_packed = pack_bases(w)
    grads = []
    for name, isa in _targets():
        with ops.ste_mode(mode):
            grads.append(_run_on(name, isa, lambda: _packed_grads(x, w_packed, 3, 3, alpha, v, beta, 1, 1))[2])
    g = _run_on("torch", None, lambda: _packed_grads(x, w_packed, 3, 3, alpha, v, beta, 1, 1))[1]
    w_eff = ag.effective_weight(w_packed, 3, alpha)
    g_act = ag.transposed_conv(g, w_eff, x.shape, (1, 1), (1, 1))
    windows = [ops.ste.ste_window(x + vn, mode, 0.0, 1.0) for vn in v]
    want = beta[0] * windows[0] * g_act + beta[1] * windows[1] * g_act
    for got in grads:
        assert torch.equal(got, want)


@pytest.mark.parametrize("quant", ["mbn3x1", "xnor"])
def test_frozen_resnet_input_grad_cpp_equals_torch(quant):
    """End to end: a frozen ResNet-20's input gradient is identical on both backends and every ISA (cpp:
    window bits, or none where the windows hold everywhere; torch: float windows)."""
    from bitkern.models import create
    torch.manual_seed(0)
    model = create("resnet20", quant).eval()
    with torch.no_grad():
        model(torch.rand(4, 3, 32, 32))
    frozen = bitkern.freeze(model)
    x = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    grads = []
    for name, isa in _targets():
        def step():
            xx = x.clone().requires_grad_()
            (g,) = torch.autograd.grad(frozen(xx).logsumexp(1).sum(), xx)
            return g
        grads.append(_run_on(name, isa, step))
    assert grads[0].abs().sum() > 0
    for g in grads[1:]:
        assert torch.equal(g, grads[0])


@pytest.mark.parametrize("N", [1, 2])
@pytest.mark.parametrize("channels_last", [False, True])
def test_training_layer_grads_agree_bit_for_bit(N, channels_last):
    """MBNConv2d / XNORConv2d: every parameter's and the input's gradient is identical on every path."""
    from bitkern.nn.binary import MBNConv2d, XNORConv2d
    torch.manual_seed(0)
    layers = [MBNConv2d(5, 7, 3, padding=1, M=3, N=N), XNORConv2d(5, 7, 3, stride=2, padding=1)]
    x = torch.rand(2, 5, 6, 6, generator=torch.Generator().manual_seed(1)) * 2 - 0.5
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    for layer in layers:
        ref = None
        for name, isa in _targets():
            def grads():
                layer.zero_grad()
                xx = x.clone().requires_grad_()
                layer(xx).square().sum().backward()
                return [xx.grad.clone()] + [p.grad.clone() for p in layer.parameters() if p.grad is not None]
            got = _run_on(name, isa, grads)
            if ref is None:
                ref = got
                assert len(got) >= 2
                continue
            for a, b in zip(ref, got):
                assert torch.equal(a, b), (type(layer).__name__, name, isa)


def _float_path(monkeypatch):
    """Make the packed op save x / out (the float path) instead of window bits."""
    monkeypatch.setattr(ag, "_bits_backend", lambda t: None)


@needs_cpp
@pytest.mark.parametrize("sign_mode", [False, True], ids=["hv", "sign"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "cl"])
def test_window_bits_replace_saved_activations(monkeypatch, sign_mode, channels_last):
    """On a backend with STE kernels, a packed conv whose only gradient is the input's saves bits of its
    windows and clamp mask (1/32 of x and out) instead of x and out, and the gradients (x, bias,
    residual) equal the float path's bit for bit on every ISA; x + v exactly on the window edges."""
    shape = SHAPES[0] if sign_mode else SHAPES[3]
    B, C, H, W, Co, k, s, p, M, N = shape
    x, w, alpha, v, beta, bias = _layer_args(shape, 21, sign_mode)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    w_packed = pack_bases(w)
    oh, ow = (H + 2 * p - k) // s + 1, (W + 2 * p - k) // s + 1
    residual = torch.randn(B, Co, oh, ow, generator=torch.Generator().manual_seed(5))
    run = lambda: _packed_grads(x, w_packed, C, k, alpha, v, beta, s, p, bias, (-1.0, 1.0), residual)  # noqa: E731
    for isa in _CPP.isa_supported():
        with_bits = _run_on("cpp", isa, run)
        xx = x.clone().requires_grad_()
        with dispatch.use_backend("cpp"):
            out = ops.mbn_conv2d_packed(xx, w_packed, C, k, alpha, v, beta, s, p, clamp=(-1.0, 1.0))
        saved = [t for t in out.grad_fn.saved_tensors if t is not None]
        assert all(t.numel() < x.numel() for t in saved) and any(t.dtype == torch.int64 and t.dim() == 2
                                                                  for t in saved)
        with monkeypatch.context() as m:
            _float_path(m)
            floats = _run_on("cpp", isa, run)
        for a, b in zip(with_bits[2:], floats[2:]):
            assert torch.equal(a.contiguous().view(torch.int32), b.contiguous().view(torch.int32)), isa


@needs_cpp
def test_window_bits_only_when_input_gradient_alone(monkeypatch):
    """alpha / beta / v needing gradients (pair counts read x): x is saved, as before."""
    x, w, alpha, v, beta, _ = _layer_args(SHAPES[0], 22, False)
    xx, a = x.clone().requires_grad_(), alpha.clone().requires_grad_()
    with dispatch.use_backend("cpp"):
        out = ops.mbn_conv2d_packed(xx, pack_bases(w), 3, 3, a, v, beta, 1, 1)
    assert any(t is not None and t.shape == x.shape for t in out.grad_fn.saved_tensors)


@needs_cpp
def test_ste_mode_changed_between_forward_and_backward_raises():
    x, w, alpha, v, beta, _ = _layer_args(SHAPES[0], 23, True)
    xx = x.clone().requires_grad_()
    with dispatch.use_backend("cpp"):
        out = ops.mbn_conv2d_packed(xx, pack_bases(w), 3, 3, alpha, v, beta, 1, 1)
    with ops.ste_mode("identity"), pytest.raises(RuntimeError, match="same mode"):
        out.sum().backward()


def test_frozen_stem_channels_last_under_autograd_is_bit_identical(monkeypatch):
    """An attack step's stem output goes channels_last (ChannelsLastStem): the input gradient is bit for
    bit the one of the plain NCHW stem."""
    from bitkern.models import create
    from bitkern.nn.chain import ChannelsLastStem
    torch.manual_seed(0)
    model = create("resnet20", "xnor").eval()
    with torch.no_grad():
        model(torch.rand(4, 3, 32, 32))
    frozen = bitkern.freeze(model)
    assert isinstance(frozen.net.stem, ChannelsLastStem)
    x = torch.rand(6, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    y = torch.arange(6) % 10

    def input_grad():
        xx = x.clone().requires_grad_()
        torch.nn.functional.cross_entropy(frozen(xx), y).backward()
        return xx.grad

    assert frozen.net.stem._eager_eval_autograd(x.clone().requires_grad_())
    cl = input_grad()
    with monkeypatch.context() as m:
        m.setattr(ChannelsLastStem, "_eager_eval_autograd", lambda self, t: False)
        nchw = input_grad()
    assert torch.equal(cl, nchw)


def test_eager_autograd_function_equals_the_op_path(monkeypatch):
    """Plain eager autograd runs the ops' autograd formula through a torch.autograd.Function (no
    dispatcher round trip); every gradient equals the registered custom-op path's bit for bit."""
    from bitkern.ops import eager
    x, w, alpha, v, beta, bias = _layer_args(SHAPES[0], 24, False)
    w_packed = pack_bases(w)

    def grads():
        xx, ww, aa, bb = (t.clone().requires_grad_() for t in (x, w, alpha, bias))
        packed = ops.mbn_conv2d_packed(xx, w_packed, 3, 3, alpha, v, beta, 1, 1, bias=bb, clamp=(-1.0, 1.0))
        trained = ops.mbn_conv2d(xx, ww, aa, v, beta, 1, 1)
        (packed.square().sum() + trained.square().sum()).backward()
        return packed.grad_fn, [xx.grad, ww.grad, aa.grad, bb.grad]

    node, via_function = grads()
    assert type(node).__name__.startswith("mbn_conv2d_packed_eager_autograd")
    monkeypatch.setattr(eager, "_AUTOGRAD_FUNCTIONS", {})
    node, via_op = grads()
    assert "eager_autograd" not in type(node).__name__
    for a, b in zip(via_function, via_op):
        assert torch.equal(a, b)


@needs_cpp
def test_no_window_bits_where_the_producer_clamp_keeps_x_inside():
    """XNOR after a Hardtanh-clamped packed conv: |x| <= 1 holds everywhere, so the consumer saves no
    window bits and grad_x = G * beta (bit for bit the float path's); an in-place change of x after the
    producer ran (version counter) brings the bits back."""
    gen = torch.Generator().manual_seed(25)
    x0 = torch.randn(2, 8, 6, 6, generator=gen)
    w1, w2 = (pack_bases(torch.randn(1, 8, 8, 3, 3, generator=gen)) for _ in range(2))
    alpha = torch.rand(1, 8, generator=gen) + 0.1

    def run(modify):
        xx = x0.clone().requires_grad_()
        with dispatch.use_backend("cpp"):
            h = ops.mbn_conv2d_packed(xx, w1, 8, 3, alpha, None, None, 1, 1, clamp=(-1.0, 1.0))
            if modify:
                h.mul_(1.0)  # an in-place write after the producer ran: its range is no longer known
            out = ops.mbn_conv2d_packed(h, w2, 8, 3, alpha, None, None, 1, 1)
        saved = [t for t in out.grad_fn.saved_tensors if t is not None]
        out.backward(torch.randn(out.shape, generator=torch.Generator().manual_seed(1)))
        return xx.grad, any(t.dtype == torch.int64 and t.dim() == 2 for t in saved)

    grad_everywhere, bits = run(False)
    assert not bits
    grad_bits, bits = run(True)
    assert bits and torch.equal(grad_everywhere, grad_bits)
    with pytest.MonkeyPatch.context() as m:
        _float_path(m)
        grad_float, _ = run(False)
    assert torch.equal(grad_everywhere, grad_float)


@pytest.mark.parametrize("name,isa", _targets())
def test_outputs_can_be_written_in_place_under_autograd(name, isa):
    """A packed conv's output is no view (cpp outputs used to be permuted views of a pool block, which
    autograd refuses to let a caller modify in place, e.g. nn.ReLU(inplace=True) in an attack step)."""
    x0 = torch.randn(2, 16, 48, 48, generator=torch.Generator().manual_seed(26))  # output from the pool
    w = pack_bases(torch.randn(1, 16, 16, 3, 3, generator=torch.Generator().manual_seed(27)))
    alpha = torch.rand(1, 16, generator=torch.Generator().manual_seed(28)) + 0.1

    def step():
        x = x0.clone().requires_grad_()
        out = ops.mbn_conv2d_packed(x, w, 16, 3, alpha, None, None, 1, 1)
        assert not out._is_view()
        out.relu_().sum().backward()
        return x.grad

    assert torch.equal(_run_on(name, isa, step), _run_on("torch", None, step))
