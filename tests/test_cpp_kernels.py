"""The C++ engine (bitkern._C via bitkern.backends.cpp) on every ISA path this CPU has.

pairs (exact per-(m, n) +-1 convolutions) must equal F.conv2d on +-1 float64 maps (exact here);
out must match sum_{m,n} alpha[m, co] * beta[n] * pairs within float32 accumulation error
(rtol 1e-5, atol 1e-5 * sum |alpha * beta| * KH * KW * C).
"""
import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from bitkern.backends import cpp
from python_ref import ops_ref

backend = cpp.backend
pytestmark = pytest.mark.skipif(not backend.available, reason=f"cpp backend unavailable: {backend.reason}")
ISAS = backend.isa_supported() if backend.available else []


@pytest.fixture(params=ISAS)
def isa(request):
    cpp.set_isa(request.param)
    yield request.param
    cpp.set_isa(None)


@pytest.fixture(params=[1, 2], ids=["1thread", "2threads"])
def threads(request, monkeypatch):
    monkeypatch.setenv("BITKERN_NUM_THREADS", str(request.param))
    return request.param


def with_zeros(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Puts exact +0.0 and -0.0 into x (both binarize to +1)."""
    r = torch.rand(x.shape, generator=gen)
    x = torch.where(r < 0.1, torch.zeros_like(x), x)
    return torch.where(r > 0.9, torch.full_like(x, -0.0), x)


def pm1(t: torch.Tensor) -> torch.Tensor:
    return torch.where(t >= 0, 1.0, -1.0).double()


def hv_pm1(x: torch.Tensor, v: float) -> torch.Tensor:
    return torch.where((x + torch.tensor(v, dtype=torch.float32)) >= 0.5, 1.0, -1.0).double()


def make_case(rng: random.Random, channels: int):
    kh, kw = rng.choice([1, 3, 5, 7]), rng.choice([1, 3, 5, 7])
    if rng.random() < 0.5:
        kw = kh
    ph, pw = rng.randint(0, 3), rng.randint(0, 3)
    height, width = rng.randint(max(1, kh - 2 * ph), 9), rng.randint(max(1, kw - 2 * pw), 11)
    if height == width:
        width += 1
    return dict(B=rng.choice([1, 1, 2, 3]), C=channels, H=height, W=width, Co=rng.randint(1, 19),
                kernel=(kh, kw), stride=(rng.randint(1, 3), rng.randint(1, 3)), padding=(ph, pw),
                M=rng.randint(1, 5), N=rng.randint(1, 5), hv=rng.random() < 0.6,
                per_channel=rng.random() < 0.5, channels_last=rng.random() < 0.5)


CHANNELS = [1, 3, 16, 31, 32, 33, 63, 64, 65, 130]
CASES = [make_case(random.Random(1000 + i), CHANNELS[i % len(CHANNELS)]) for i in range(30)]


def run_case(case, seed=0):
    gen = torch.Generator().manual_seed(seed)
    B, C, H, W, Co, M = case["B"], case["C"], case["H"], case["W"], case["Co"], case["M"]
    kh, kw = case["kernel"]
    x = with_zeros(torch.randn(B, C, H, W, generator=gen), gen)
    if case["channels_last"]:
        x = x.contiguous(memory_format=torch.channels_last)
    w = with_zeros(torch.randn(M, Co, C, kh, kw, generator=gen), gen)
    w_packed = torch.stack([backend.pack_signs(w[m].contiguous()) for m in range(M)])
    if case["hv"]:
        v = torch.rand(case["N"], generator=gen) * 1.5 - 0.5
        acts = [hv_pm1(x, float(vn)) for vn in v]
    else:
        v = None
        acts = [pm1(x)]
    N = len(acts)
    alpha = torch.rand(M, Co if case["per_channel"] else 1, generator=gen).expand(M, Co).contiguous() + 0.1
    beta = torch.rand(N, generator=gen) + 0.5
    out, pairs = backend.mbn_conv2d_packed(x, w_packed, C, case["kernel"], alpha, v, beta, case["stride"],
                                           case["padding"], want_pairs=True)
    ref_pairs = torch.stack([torch.stack([
        F.conv2d(a, pm1(w[m]), stride=case["stride"], padding=case["padding"]) for a in acts])
        for m in range(M)])
    ref_out = torch.einsum("mc,n,mnbchw->bchw", alpha.double(), beta.double(), ref_pairs)
    return out, pairs, ref_out, ref_pairs, (alpha.double()[:, :, None] * beta.double()).abs().sum() * kh * kw * C


@pytest.mark.parametrize("case", CASES, ids=[f"C{c['C']}k{c['kernel'][0]}x{c['kernel'][1]}" for c in CASES])
def test_mbn_conv2d_matches_reference(isa, threads, case):
    out, pairs, ref_out, ref_pairs, scale = run_case(case)
    assert pairs.dtype == torch.int32 and pairs.shape == ref_pairs.shape
    assert torch.equal(pairs.double(), ref_pairs), "per-pair +-1 conv must be exact"
    assert out.dtype == torch.float32 and out.shape == ref_out.shape
    assert out.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(out.double(), ref_out, rtol=1e-5, atol=1e-5 * float(scale))


# Cases for each kernel family (backend.engine): on AVX-512 the small-channel engines take C <= 32 where
# they need fewer popcount steps (lane16: C <= 16 and stride 1 along W, pixel pairs, so odd output
# widths leave a lone last pixel; lane32: 32-bit lanes, dense or strided units), the word engine the
# rest and every AVX2 / scalar call. Blocks of up to 24 units, several column groups (M * Co > 64),
# N > 1, the fused per-image path (B >= 16 with 2 threads), channels_last input, 1x1 and 7x7 kernels.
ENGINE_CASES = {
    "lane16": [
        dict(B=2, C=16, H=7, W=9, Co=16, kernel=(3, 3), stride=(1, 1), padding=(1, 1), M=1, N=1, hv=False),
        dict(B=17, C=3, H=6, W=31, Co=33, kernel=(3, 3), stride=(2, 1), padding=(0, 1), M=3, N=2, hv=True),
        dict(B=1, C=13, H=9, W=50, Co=5, kernel=(7, 7), stride=(1, 1), padding=(3, 3), M=2, N=3, hv=True,
             channels_last=True),
        dict(B=3, C=16, H=5, W=5, Co=70, kernel=(1, 1), stride=(1, 1), padding=(0, 0), M=1, N=1, hv=False),
        dict(B=2, C=8, H=4, W=3, Co=17, kernel=(3, 3), stride=(3, 1), padding=(2, 0), M=1, N=2, hv=True),
    ],
    "lane32": [
        dict(B=2, C=32, H=8, W=9, Co=32, kernel=(3, 3), stride=(1, 1), padding=(1, 1), M=1, N=1, hv=False),
        dict(B=16, C=24, H=5, W=13, Co=40, kernel=(3, 3), stride=(1, 2), padding=(1, 1), M=3, N=2, hv=True,
             channels_last=True),
        dict(B=1, C=29, H=11, W=30, Co=7, kernel=(5, 3), stride=(2, 3), padding=(2, 3), M=2, N=1, hv=True),
        dict(B=3, C=17, H=6, W=6, Co=16, kernel=(1, 1), stride=(1, 1), padding=(1, 0), M=4, N=1, hv=False),
    ],
    "word": [
        dict(B=2, C=16, H=9, W=9, Co=16, kernel=(3, 3), stride=(2, 2), padding=(1, 1), M=1, N=1, hv=False),
        dict(B=17, C=20, H=6, W=7, Co=37, kernel=(3, 3), stride=(1, 1), padding=(1, 1), M=2, N=2, hv=True),
        dict(B=2, C=64, H=5, W=6, Co=9, kernel=(3, 3), stride=(1, 1), padding=(1, 1), M=1, N=1, hv=False),
    ],
}


@pytest.mark.parametrize("engine,case", [(e, c) for e, cases in ENGINE_CASES.items() for c in cases],
                         ids=[f"{e}-C{c['C']}k{c['kernel'][0]}x{c['kernel'][1]}s{c['stride'][1]}"
                              for e, cases in ENGINE_CASES.items() for c in cases])
def test_each_engine_matches_reference(isa, threads, engine, case):
    case = dict(dict(per_channel=True, channels_last=False), **case)
    chosen = backend.engine(case["C"], case["kernel"], case["stride"])
    if isa != "avx512":
        assert chosen == "word"
    elif engine != "lane16" or backend.engine(16, 3, 1) == "lane16":  # lane16 needs AVX512_BITALG
        assert chosen == engine
    out, pairs, ref_out, ref_pairs, scale = run_case(case, seed=11)
    assert torch.equal(pairs.double(), ref_pairs)
    torch.testing.assert_close(out.double(), ref_out, rtol=1e-5, atol=1e-5 * float(scale))


def test_large_parallel_shape(isa, threads):
    """Enough work for the thread pool and several column blocks (M * Co > 32) and K > 31 words."""
    case = dict(B=2, C=130, H=12, W=10, Co=37, kernel=(3, 3), stride=(1, 1), padding=(1, 1), M=2, N=2,
                hv=True, per_channel=True, channels_last=False)
    out, pairs, ref_out, ref_pairs, scale = run_case(case, seed=3)
    assert torch.equal(pairs.double(), ref_pairs)
    torch.testing.assert_close(out.double(), ref_out, rtol=1e-5, atol=1e-5 * float(scale))


def test_batch_shared_between_threads(isa, threads):
    """Batches of >= 8 images per thread take the fused path: each thread packs and convolves whole
    images (an odd batch, so the split is uneven)."""
    case = dict(B=17, C=20, H=9, W=11, Co=37, kernel=(3, 3), stride=(1, 1), padding=(1, 1), M=2, N=2,
                hv=True, per_channel=True, channels_last=True)
    out, pairs, ref_out, ref_pairs, scale = run_case(case, seed=5)
    assert torch.equal(pairs.double(), ref_pairs)
    torch.testing.assert_close(out.double(), ref_out, rtol=1e-5, atol=1e-5 * float(scale))


def test_against_python_ref(isa):
    """Cross-check with the numpy loop reference (python_ref) on one multi-base case."""
    gen = torch.Generator().manual_seed(7)
    x = with_zeros(torch.randn(2, 5, 6, 7, generator=gen), gen)
    w = torch.randn(3, 4, 5, 3, 2, generator=gen)
    alpha, v, beta = torch.rand(3, 4, generator=gen), torch.tensor([-0.2, 0.3]), torch.tensor([0.7, 1.3])
    w_packed = torch.stack([backend.pack_signs(w[m].contiguous()) for m in range(3)])
    out, pairs = backend.mbn_conv2d_packed(x, w_packed, 5, (3, 2), alpha, v, beta, (2, 1), (1, 2),
                                           want_pairs=True)
    ref_pairs = ops_ref.mbn_pairs_ref(x.numpy(), w.numpy(), v.numpy(), stride=(2, 1), padding=(1, 2))
    np.testing.assert_array_equal(pairs.numpy(), ref_pairs)
    ref = ops_ref.mbn_conv2d_ref(x.numpy(), w.numpy(), alpha.numpy(), v.numpy(), beta.numpy(),
                                 stride=(2, 1), padding=(1, 2))
    np.testing.assert_allclose(out.numpy(), ref, rtol=1e-5, atol=1e-4)
    binary = backend.mbn_conv2d_packed(x, w_packed[:1], 5, (3, 2), None, None, None, 1, 0, want_pairs=True)
    np.testing.assert_array_equal(binary[1][0, 0].numpy(), ops_ref.binary_conv2d_ref(x.numpy(), w[0].numpy()))
    assert binary[0] is None


@pytest.mark.parametrize("channels", [1, 3, 63, 64, 65, 130])
@pytest.mark.parametrize("channels_last", [False, True])
def test_pack_signs(isa, threads, channels, channels_last):
    gen = torch.Generator().manual_seed(channels)
    x = with_zeros(torch.randn(3, channels, 5, 19, generator=gen), gen)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    packed = backend.pack_signs(x)
    assert packed.dtype == torch.int64 and packed.shape == (3, 5, 19, -(-channels // 64))
    np.testing.assert_array_equal(packed.numpy(), ops_ref.pack_signs_ref(x.numpy()))
    v = 0.25
    hv = backend.pack_signs(x, mode="hv", v=v)
    shifted = (x + torch.tensor(v)).numpy()  # fl32(x + v) >= 0.5  <=>  fl32(x + v) - 0.5 >= 0
    np.testing.assert_array_equal(hv.numpy(), ops_ref.pack_signs_ref(np.where(shifted >= 0.5, 1.0, -1.0)))


def test_pack_signs_hv_rounding_edge(isa):
    """x + v rounds to exactly 0.5 in float32 (bit 1) while the float64 sum is below 0.5."""
    x = torch.tensor([0.5 - 2 ** -26, 0.5 - 2 ** -23, 0.0, -0.0], dtype=torch.float32).reshape(1, 4, 1, 1)
    bits = int(backend.pack_signs(x, mode="hv", v=0.0)[0, 0, 0, 0])
    expected = sum(1 << c for c in range(4) if float(x[0, c] + torch.tensor(0.0)) >= 0.5)
    assert bits == expected
    x2 = torch.full((1, 1, 1, 1), 0.25 - 2 ** -27)
    assert int(backend.pack_signs(x2, mode="hv", v=0.25)[0, 0, 0, 0]) == int(float(x2 + 0.25) >= 0.5)


def test_non_contiguous_input_is_copied(isa):
    x = torch.randn(2, 8, 6, 10)[:, :, :, ::2]
    assert not x.is_contiguous() and not x.is_contiguous(memory_format=torch.channels_last)
    np.testing.assert_array_equal(backend.pack_signs(x).numpy(), ops_ref.pack_signs_ref(x.numpy()))


def test_bad_inputs_raise_clear_errors():
    x = torch.randn(1, 3, 4, 4)
    wp = backend.pack_signs(torch.randn(2, 3, 3, 3))[None]
    with pytest.raises(TypeError, match="x: expected a floating-point tensor"):
        backend.pack_signs(x.to(torch.int64))
    # every backend takes any floating dtype; the sign is decided in it (a float64 -1e-50 is -1)
    assert torch.equal(backend.pack_signs(x.double()), backend.pack_signs(x))
    with pytest.raises(ValueError, match="x: expected a 4-d tensor"):
        backend.pack_signs(x[0])
    with pytest.raises(ValueError, match="mode"):
        backend.pack_signs(x, mode="relu")
    with pytest.raises(ValueError, match="w_packed: expected shape"):
        backend.mbn_conv2d_packed(x, wp, 3, (5, 5), torch.ones(1, 2), None, None, 1, 1)
    with pytest.raises(ValueError, match="in_channels"):
        backend.mbn_conv2d_packed(x, wp, 4, (3, 3), torch.ones(1, 2), None, None, 1, 1)
    with pytest.raises(ValueError, match="alpha2d"):
        backend.mbn_conv2d_packed(x, wp, 3, (3, 3), torch.ones(2, 2), None, None, 1, 1)
    with pytest.raises(ValueError, match="beta"):
        backend.mbn_conv2d_packed(x, wp, 3, (3, 3), torch.ones(1, 2), torch.zeros(2), torch.ones(3), 1, 1)
    with pytest.raises(ValueError, match="larger than the padded input"):
        backend.mbn_conv2d_packed(x[:, :, :1, :1], wp, 3, (3, 3), torch.ones(1, 2), None, None, 1, 0)
    with pytest.raises(ValueError, match="stride"):
        backend.mbn_conv2d_packed(x, wp, 3, (3, 3), torch.ones(1, 2), None, None, 0, 1)
    with pytest.raises(TypeError, match="w_packed: expected dtype torch.int64"):
        backend.mbn_conv2d_packed(x, wp.int(), 3, (3, 3), torch.ones(1, 2), None, None, 1, 1)


# NaN is detected while packing x (no separate scan): every ISA path, both layouts, vector bodies and
# tails (C not a multiple of 16 / 8, W = 19: one 16-pixel block + 3 tail pixels), sign and hv modes.
NAN_MESSAGE = "x: contains NaN (shape {}, dtype torch.float32, device cpu); binarization needs ordered values"


def nan_positions(batch, channels, height, width):
    """(b, c, h, w): first and last element, the last channel of a partial channel vector, a width-tail
    pixel, the first channel of the second 64-channel word."""
    partial = channels - 1 if channels % 16 == 0 else (channels // 16) * 16
    positions = {(0, 0, 0, 0), (batch - 1, channels - 1, height - 1, width - 1),
                 (1, partial, height // 2, 3), (batch - 1, 0, 0, width - 2), (1, channels - 1, 1, 17)}
    if channels > 64:
        positions.add((0, 64, 2, 9))
    return sorted(positions)


def nan_calls(x):
    """Every entry point that packs x: pack_signs (sign, hv) and mbn_conv2d_packed (sign, hv with N = 2)."""
    channels = x.shape[1]
    wp = backend.pack_signs(torch.randn(4, channels, 3, 3, generator=torch.Generator().manual_seed(1)))[None]
    alpha = torch.ones(1, 4)
    shifts = torch.tensor([0.3, 0.7])
    return {
        "pack_sign": lambda: backend.pack_signs(x),
        "pack_hv": lambda: backend.pack_signs(x, mode="hv", v=0.25),
        "conv_sign": lambda: backend.mbn_conv2d_packed(x, wp, channels, (3, 3), alpha, None, None, 1, 1,
                                                       want_pairs=True),
        "conv_hv": lambda: backend.mbn_conv2d_packed(x, wp, channels, (3, 3), alpha, shifts, None, 1, 1),
        "pairs_only_stride2": lambda: backend.mbn_conv2d_packed(x, wp, channels, (3, 3), None, shifts, None,
                                                                2, 0, want_pairs=True),
    }


@pytest.mark.parametrize("channels", [3, 20, 64, 65, 130])
def test_nan_in_x_raises(isa, channels):
    shape = (3, channels, 5, 19)
    for b, c, h, w in nan_positions(*shape):
        for channels_last in (False, True):
            x = torch.randn(shape, generator=torch.Generator().manual_seed(channels))
            x[b, c, h, w] = float("nan")
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            for name, call in nan_calls(x).items():
                with pytest.raises(ValueError) as info:
                    call()
                assert str(info.value) == NAN_MESSAGE.format(shape), (name, (b, c, h, w), channels_last)


@pytest.mark.parametrize("shape", [(4, 130, 19, 19), (17, 130, 6, 19)], ids=["pack-then-gemm", "per-image"])
def test_nan_in_x_raises_multithreaded(isa, threads, shape):
    # Large enough for the packing step to use the thread pool; 17 images take the fused per-image path.
    for channels_last in (False, True):
        x = torch.randn(shape, generator=torch.Generator().manual_seed(0))
        x[shape[0] - 1, 129, shape[2] - 1, 18] = float("nan")
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        for call in nan_calls(x).values():
            with pytest.raises(ValueError, match="x: contains NaN"):
                call()


def test_nan_in_non_contiguous_x_names_the_given_tensor(isa):
    x = torch.randn(2, 8, 6, 10)[:, :, :, ::2]
    x[1, 7, 5, 4] = float("nan")
    with pytest.raises(ValueError) as info:
        backend.pack_signs(x)
    assert str(info.value) == NAN_MESSAGE.format((2, 8, 6, 5))


def test_nan_in_x_raises_when_the_kernel_has_nothing_to_compute(isa):
    """Co = 0: the kernel is not called, so the backend scans x itself."""
    x = torch.randn(2, 3, 4, 4)
    x[0, 1, 2, 3] = float("nan")
    empty = torch.zeros(1, 0, 3, 3, 1, dtype=torch.int64)
    with pytest.raises(ValueError, match="x: contains NaN"):
        backend.mbn_conv2d_packed(x, empty, 3, (3, 3), None, None, None, 1, 1, want_pairs=True)


@pytest.mark.parametrize("channels", [3, 20, 65])
def test_signed_zero_and_infinities_do_not_raise(isa, channels):
    shape = (3, channels, 5, 19)
    gen = torch.Generator().manual_seed(channels)
    x = torch.randn(shape, generator=gen)
    r = torch.rand(shape, generator=gen)
    x = torch.where(r < 0.1, torch.full_like(x, -0.0), x)
    x = torch.where(r > 0.9, torch.full_like(x, float("inf")), x)
    x = torch.where((r > 0.45) & (r < 0.55), torch.full_like(x, float("-inf")), x)
    x[0, 0, 0, 0], x[-1, -1, -1, -1] = float("-inf"), -0.0
    for channels_last in (False, True):
        xl = x.contiguous(memory_format=torch.channels_last) if channels_last else x.contiguous()
        np.testing.assert_array_equal(backend.pack_signs(xl).numpy(), ops_ref.pack_signs_ref(x.numpy()))
        for call in nan_calls(xl).values():
            call()


def test_ops_rely_on_the_kernel_nan_check(isa):
    """bitkern.ops skips its own scan of float32 x for this backend; the error text is unchanged."""
    from bitkern import _checks, ops
    assert backend.capabilities.checks_nan
    x = torch.randn(2, 20, 6, 7)
    x[1, 19, 5, 6] = float("nan")
    with pytest.raises(ValueError) as from_ops:
        ops.mbn_conv2d_packed(x, backend.pack_signs(torch.randn(4, 20, 3, 3))[None], 20, 3,
                              torch.ones(1), padding=1)
    with pytest.raises(ValueError) as from_checks:
        _checks.check_no_nan("x", x)
    assert str(from_ops.value) == str(from_checks.value)
    with pytest.raises(ValueError, match="x: contains NaN"):
        ops.binary_conv2d(x, torch.randn(3, 20, 3, 3), padding=1)
    w = torch.randn(3, 20, 3, 3)
    w[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="w: contains NaN"):  # weights are still checked in ops
        ops.binary_conv2d(torch.randn(2, 20, 6, 7), w, padding=1)


def test_isa_selection(monkeypatch):
    assert ISAS[-1] == "scalar" and set(ISAS) <= {"avx512", "avx2", "scalar"}
    with pytest.raises(ValueError, match="unknown ISA"):
        cpp.set_isa("sse9")
    monkeypatch.setenv("BITKERN_ISA", "neon")
    with pytest.raises(ValueError, match="BITKERN_ISA"):
        backend.pack_signs(torch.randn(1, 2, 2, 2))
    monkeypatch.setenv("BITKERN_ISA", "scalar")
    assert cpp.current_isa() == "scalar"
    monkeypatch.delenv("BITKERN_ISA")
    assert cpp.current_isa() == ISAS[0]
    missing = [i for i in ("avx512", "avx2") if i not in ISAS]
    for name in missing:
        with pytest.raises(RuntimeError, match="not supported"):
            cpp.set_isa(name)
    monkeypatch.setenv("BITKERN_NUM_THREADS", "0")
    with pytest.raises(ValueError, match="BITKERN_NUM_THREADS"):
        cpp.num_threads()
