"""Chained inference (bitkern.nn.chain, csrc/cpu/common/chain.h): frozen blocks run as one chain of packed
convs with bit planes handed between them, bit-identical to running them layer by layer."""
import copy
import io
import math

import pytest
import torch

from bitkern import dispatch
from bitkern.backends import cpp
from bitkern.backends.base import ChainConv
from bitkern.freeze import FrozenModel, freeze, load_frozen
from bitkern.models import create
from bitkern.nn.chain import ChainedSequential, use_chains
from bitkern.nn.packed import pack_bases

needs_cpp = pytest.mark.skipif(not cpp.backend.available, reason="cpp backend not built")
pytestmark = needs_cpp
ISAS = [pytest.param(isa, marks=[] if cpp.backend.available and isa in cpp.backend.isa_supported()
                     else pytest.mark.skip(reason=f"no {isa}")) for isa in ("avx512", "avx2", "scalar")]


def _model(arch: str, quant: str, seed: int = 0) -> torch.nn.Module:
    """A model with BN statistics and affine terms away from the defaults, so thresholds matter."""
    torch.manual_seed(seed)
    model = create(arch, quant, num_classes=10)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5), m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5), m.bias.uniform_(-0.3, 0.3)
    return model.eval()


def _both(frozen, x, features=False):
    """(chained, layer by layer) outputs of the frozen model."""
    fn = frozen.forward_features if features else frozen
    with torch.no_grad():
        chained = fn(x)
        with use_chains(False):
            layered = fn(x)
    return chained, layered


@pytest.fixture
def isa(request):
    dispatch.set_isa(request.param)
    yield request.param
    dispatch.set_isa(None)


@pytest.fixture
def count_runs(monkeypatch):
    """How many times a chain ran (so a test knows the chained path was taken)."""
    calls = []
    original = cpp.CppChain.run

    def run(self, x):
        calls.append(x.shape[0])
        return original(self, x)
    monkeypatch.setattr(cpp.CppChain, "run", run)
    return calls


@pytest.mark.parametrize("isa", ISAS, indirect=True)
@pytest.mark.parametrize("quant", ["xnor", "mbn3x1", "mbn2x3"])
@pytest.mark.parametrize("threads", ["1", "2"])
def test_resnet20_chain_equals_layer_by_layer(isa, quant, threads, monkeypatch, count_runs):
    monkeypatch.setenv("BITKERN_NUM_THREADS", threads)
    frozen = freeze(_model("resnet20", quant))
    for batch, size in ((1, 16), (3, 17), (4, 16), (9, 12)):  # row-split and image-split runs, odd sizes
        x = torch.rand(batch, 3, size, size)
        chained, layered = _both(frozen, x)
        assert torch.equal(chained, layered), (batch, size)
        chained, layered = _both(frozen, x, features=True)
        assert torch.equal(chained, layered)
    assert len(count_runs) == 8


@pytest.mark.parametrize("quant", ["xnor", "mbn3x1"])
def test_resnet18_option_b_chain_equals_layer_by_layer(quant, count_runs):
    frozen = freeze(_model("resnet18", quant))
    assert isinstance(frozen.net.layers, ChainedSequential)
    for batch in (1, 4):
        chained, layered = _both(frozen, torch.rand(batch, 3, 40, 40))
        assert torch.equal(chained, layered)
    assert count_runs == [1, 4]


@pytest.mark.parametrize("quant", ["xnor", "mbn3x1"])
def test_thousand_inputs_same_predictions_as_layer_by_layer(quant):
    frozen = freeze(_model("resnet20", quant, seed=1))
    model = _model("resnet20", quant, seed=1)
    torch.manual_seed(5)
    x = torch.rand(1000, 3, 32, 32)
    chained, layered = _both(frozen, x)
    assert torch.equal(chained, layered)
    with torch.no_grad():
        original = model(x)
    assert torch.equal(chained.argmax(1), original.argmax(1))
    torch.testing.assert_close(chained, original, rtol=1e-4, atol=1e-4)  # the documented frozen tolerance


def _sequential_reference(x, convs):
    """The chain's convs one by one through bitkern.ops (the layer-by-layer path)."""
    from bitkern import ops
    bufs = {0: x}
    for c in convs:
        residual = None
        if c.residual is not None:
            src = bufs[c.residual][:, :, ::c.res_stride, ::c.res_stride]
            co = c.w_packed.shape[1]
            residual = torch.nn.functional.pad(src, (0, 0, 0, 0, c.res_offset, co - c.res_offset - src.shape[1]))
        bufs[c.dst] = ops.mbn_conv2d_packed(bufs[c.src], c.w_packed, bufs[c.src].shape[1], c.kernel_size, c.alpha2d,
                                            c.v, c.beta, c.stride, c.padding, bias=c.bias, clamp=c.clamp,
                                            residual=residual)
    return bufs, bufs[max(bufs)]


def _conv(src, dst, cin, cout, k, stride, pad, v=None, residual=None, res_stride=1, res_offset=0, bias=None,
          clamp=None, m=1, integer=True):
    w = torch.randn(m, cout, cin, k, k)
    w_packed = pack_bases(w)
    # alpha 1 / beta 1 / integer bias: outputs are integers, so many land exactly on a threshold
    alpha = torch.ones(m, cout) if integer else torch.rand(m, cout) + 0.5
    n = 1 if v is None else v.numel()
    return ChainConv(src, dst, residual, res_stride, res_offset, w_packed, cin, (k, k), (stride, stride), (pad, pad),
                     alpha, v, torch.ones(n), bias, clamp)


@pytest.mark.parametrize("isa", ISAS, indirect=True)
@pytest.mark.parametrize("channels", [8, 16, 32, 64, 96])
def test_handoff_bits_exact_on_threshold_values(isa, channels):
    """Integer conv outputs: many equal the thresholds (0 in sign mode; fl32(y + v) == 0.5 in H_v mode,
    v = 0.5 / -0.5 / 0), so one wrong bit in a hand-off shows in the output. Lane 16 / lane 32 / word
    (folded for C <= 32 on AVX2 / scalar) engines, stride 2, option-A residual with a channel offset."""
    torch.manual_seed(channels)
    c2 = 2 * channels
    v3 = torch.tensor([0.5, -0.5, 0.0])
    convs = [
        _conv(0, 1, channels, channels, 3, 1, 1, bias=torch.zeros(channels)),               # sign mode
        _conv(1, 2, channels, channels, 3, 1, 1, v=v3, residual=0, m=2),                    # H_v, N = 3
        _conv(2, 3, channels, c2, 3, 2, 1, v=torch.tensor([0.5]), residual=2, res_stride=2,
              res_offset=channels // 2, clamp=(-4.0, 4.0)),
        _conv(3, 4, c2, c2, 1, 1, 0, residual=3, integer=False),
    ]
    x = torch.randint(-2, 3, (3, channels, 9, 9)).float()
    chain = cpp.backend.build_chain([(channels, 9, 9), (channels, 9, 9), (channels, 9, 9), (c2, 5, 5),
                                     (c2, 5, 5)], convs)
    bufs, expected = _sequential_reference(x, convs)
    assert (bufs[1] == 0).any() and (bufs[2] == 0).any()  # thresholds are hit
    for layout in (torch.contiguous_format, torch.channels_last):
        got = chain.run(x.contiguous(memory_format=layout))
        assert got.is_contiguous(memory_format=torch.channels_last)
        assert torch.equal(got, expected)


def test_chain_rejects_what_does_not_fit():
    conv = _conv(0, 1, 16, 16, 3, 1, 1)
    with pytest.raises(ValueError, match="dst buffer shape"):
        cpp.backend.build_chain([(16, 8, 8), (16, 7, 7)], [conv])
    with pytest.raises(ValueError, match="src must be"):
        cpp.backend.build_chain([(16, 8, 8), (16, 8, 8), (16, 8, 8)], [_conv(1, 2, 16, 16, 3, 1, 1)])
    with pytest.raises(ValueError, match="residual"):
        cpp.backend.build_chain([(16, 8, 8), (16, 8, 8)], [_conv(0, 1, 16, 16, 3, 1, 1, residual=0, res_offset=4)])
    with pytest.raises(ValueError, match="input channels"):
        cpp.backend.build_chain([(8, 8, 8), (16, 8, 8)], [conv])
    chain = cpp.backend.build_chain([(16, 8, 8), (16, 8, 8), (16, 8, 8)], [conv])
    with pytest.raises(ValueError, match="buffer 2 is never written"):
        chain.run(torch.rand(1, 16, 8, 8))


def test_nan_and_inf_inputs_raise_like_layer_by_layer():
    frozen = freeze(_model("resnet20", "xnor"))
    x = torch.rand(4, 3, 16, 16)
    x[1, 0, 3, 3] = float("nan")
    for enabled in (True, False):
        with use_chains(enabled), torch.no_grad(), pytest.raises(ValueError, match="contains NaN"):
            frozen(x)
    frozen.net.stem[0].weight.data[0, 0, 0, 0] = float("inf")  # an infinite residual reaches block 0
    x = torch.rand(2, 3, 16, 16)
    messages = []
    for enabled in (True, False):
        with use_chains(enabled), torch.no_grad(), pytest.raises(ValueError) as err:
            frozen(x)
        messages.append(str(err.value).split(" (")[0])
    assert messages[0] == messages[1]


def test_autograd_compile_and_export_take_the_layer_path(count_runs):
    frozen = freeze(_model("resnet20", "mbn3x1"))
    x = torch.rand(2, 3, 16, 16)
    with torch.no_grad():
        expected = frozen(x)
    assert count_runs == [2]
    xg = x.clone().requires_grad_()
    out = frozen(xg)
    out.sum().backward()
    assert torch.equal(out.detach(), expected) and xg.grad is not None and count_runs == [2]
    compiled = torch.compile(frozen, backend="aot_eager")
    with torch.no_grad():
        assert torch.equal(compiled(x), expected)
    exported = torch.export.export(frozen, (x,))
    with torch.no_grad():
        assert torch.equal(exported.module()(x), expected)
    assert count_runs == [2]


def test_chain_rebuilt_when_weights_isa_or_shape_change(count_runs):
    frozen = freeze(_model("resnet20", "xnor"))
    x = torch.rand(2, 3, 16, 16)
    with torch.no_grad():
        first = frozen(x)
        layers = frozen.net.layers
        assert len(layers._chains) == 1
        conv = layers[0].conv1
        conv.alpha.mul_(-1)  # in place: version bump
        chained, layered = _both(frozen, x)
        assert torch.equal(chained, layered) and not torch.equal(chained, first)
        conv.clamp = (-0.5, 0.5)
        chained, layered = _both(frozen, x)
        assert torch.equal(chained, layered)
        frozen(torch.rand(2, 3, 20, 20))
        assert len(layers._chains) == 2
        if "avx2" in cpp.backend.isa_supported():
            dispatch.set_isa("avx2")
            try:
                chained, layered = _both(frozen, x)
            finally:
                dispatch.set_isa(None)
            assert torch.equal(chained, layered) and len(layers._chains) == 3


def test_copies_pickles_and_files_keep_chaining(tmp_path, count_runs):
    frozen = freeze(_model("resnet20", "mbn3x1"))
    x = torch.rand(3, 3, 16, 16)
    with torch.no_grad():
        expected = frozen(x)
        twin = copy.deepcopy(frozen)
        assert torch.equal(twin(x), expected)
        buf = io.BytesIO()
        torch.save(frozen, buf)
        buf.seek(0)
        assert torch.equal(torch.load(buf, weights_only=False)(x), expected)
        frozen.save(tmp_path / "m.safetensors")
        loaded = load_frozen(tmp_path / "m.safetensors")
        assert isinstance(loaded.net.layers, ChainedSequential)
        assert torch.equal(loaded(x), expected)
    assert len(count_runs) == 4


def test_handoffs_describe_the_data_path():
    frozen = freeze(_model("resnet20", "xnor"))
    found = frozen.handoffs()
    assert len(found) == 18
    first, second, last = found[0], found[1], found[-1]
    assert (first.producer, first.consumers, first.float_kept) == ("net.layers.0.conv1", ("net.layers.0.conv2",), False)
    assert (second.consumers, second.float_kept) == (("net.layers.1.conv1",), True)
    assert last.consumers == () and last.float_kept
    assert "bit planes only" in str(first)
    resnet18 = freeze(_model("resnet18", "xnor")).handoffs()
    block = {h.producer: h for h in resnet18}
    assert block["net.layers.1.conv2"].consumers == ("net.layers.2.shortcut.0", "net.layers.2.conv1")
    unfused = freeze(_model("resnet20", "xnor"), fuse=False)
    assert unfused.handoffs() == [] and isinstance(unfused, FrozenModel)


def test_other_backends_and_disabled_chains_run_layer_by_layer(count_runs):
    frozen = freeze(_model("resnet20", "xnor"))
    x = torch.rand(2, 3, 16, 16)
    with torch.no_grad():
        expected = frozen(x)
        with dispatch.use_backend("torch"):
            torch.testing.assert_close(frozen(x), expected, rtol=1e-5, atol=1e-5)
        with use_chains(False):
            frozen(x)
    assert count_runs == [2]
    with pytest.raises(TypeError, match="enabled"):
        with use_chains(1):
            pass
    assert math.isfinite(float(expected.sum()))


@pytest.mark.slow
@pytest.mark.parametrize("quant", ["xnor", "mbn3x1"])
def test_resnet18_224_thousand_inputs_identical(quant):
    """Issue 13's check at full size: 1,000 random 224x224 images (batches of 50 and single images)."""
    frozen = freeze(_model("resnet18", quant, seed=2))
    gen = torch.Generator().manual_seed(7)
    for batch in [50] * 19 + [1] * 50:
        chained, layered = _both(frozen, torch.rand(batch, 3, 224, 224, generator=gen))
        assert torch.equal(chained, layered)


def test_concurrent_callers_share_a_chain(count_runs):
    """Python threads running one frozen model at once (the chain serializes its runs) get the same
    results as one after the other."""
    import threading

    frozen = freeze(_model("resnet20", "mbn3x1"))
    xs = [torch.rand(b, 3, 16, 16, generator=torch.Generator().manual_seed(b)) for b in (1, 2, 4, 5)]
    with torch.no_grad():
        expected = [frozen(x) for x in xs]
    got = [None] * len(xs)

    def work(i):
        with torch.no_grad():
            for _ in range(5):
                got[i] = frozen(xs[i])
    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(xs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(torch.equal(a, b) for a, b in zip(got, expected))
    assert len(count_runs) == 4 + 4 * 5
