"""The non-finite policy and the sign rule (bitkern.ops docstring), identical on every backend.

Every case runs on the torch backend and on the cpp backend on each ISA path this CPU has (avx512 /
avx2 / scalar, forced with set_isa); channel counts 3, 16, 32, 64, 130 reach the lane16 / lane32 / word
engines on AVX-512. Each backend must give the same exception (type and message) or the same output
(bit for bit, NaN equal to NaN). The triton backend runs a small sample in a subprocess
(TRITON_INTERPRET=1).
"""
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from bitkern import dispatch, ops
from python_ref import ops_ref

ROOT = Path(__file__).resolve().parents[1]
CHANNELS = (3, 16, 32, 64, 130)
NAN, INF = math.nan, math.inf


def _paths():
    paths = [("torch", None)]
    cpp = dispatch.get("cpp")
    if cpp.available:
        paths += [("cpp", isa) for isa in cpp.isa_supported()]
    return paths


PATHS = _paths()


def _outcome(fn):
    try:
        return ("ok", fn())
    except (ValueError, TypeError, RuntimeError) as exc:
        return ("raise", type(exc), str(exc))


def _same(a, b) -> bool:
    if a[0] != b[0]:
        return False
    if a[0] == "raise":
        return a[1:] == b[1:]
    x, y = a[1], b[1]
    if x.dtype != y.dtype or x.shape != y.shape:
        return False
    if x.dtype.is_floating_point:
        nan = torch.isnan(x)
        return torch.equal(nan, torch.isnan(y)) and torch.equal(x[~nan].view(torch.int32),
                                                                 y[~nan].view(torch.int32))
    return torch.equal(x, y)


def outcome_everywhere(fn):
    """fn() on every backend / ISA path; asserts they agree and returns the torch backend's outcome."""
    results = {}
    for name, isa in PATHS:
        dispatch.set_isa(isa) if isa else None
        try:
            with dispatch.use_backend(name):
                results[(name, isa)] = _outcome(fn)
        finally:
            if isa:
                dispatch.set_isa(None)
    reference = results[("torch", None)]
    for path, got in results.items():
        assert _same(got, reference), f"{path}: {got[:3] if got[0] == 'raise' else got[1]} != " \
                                      f"{reference[:3] if reference[0] == 'raise' else reference[1]}"
    return reference


def _layer(channels, *, hv=False, batch=2, size=5, out_channels=5, bases=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, channels, size, size, generator=g)
    w_bases = torch.randn(bases, out_channels, channels, 3, 3, generator=g)
    w_packed = ops.pack_signs(w_bases.flatten(0, 1)).unflatten(0, (bases, out_channels))
    alpha = torch.rand(bases, out_channels, generator=g) + 0.1
    v = torch.tensor([-0.3, 0.2]) if hv else None
    beta = torch.tensor([0.7, 0.4]) if hv else torch.tensor([0.9])
    bias = torch.randn(out_channels, generator=g)
    residual = torch.randn(batch, out_channels, size, size, generator=g)
    return dict(x=x, w_bases=w_bases, w_packed=w_packed, alpha=alpha, v=v, beta=beta, bias=bias,
                residual=residual)


def _packed_call(t, clamp=(-1.0, 1.0)):
    return lambda: ops.mbn_conv2d_packed(t["x"], t["w_packed"], t["x"].shape[1], 3, t["alpha"], t["v"],
                                         t["beta"], padding=1, bias=t["bias"], clamp=clamp,
                                         residual=t["residual"])


def _poison(t, value, index):
    t = t.clone()
    t.view(-1)[index % t.numel()] = value
    return t


class TestParameters:
    """alpha, v, beta, bias, residual: NaN and +-inf raise ValueError naming the argument."""

    @pytest.mark.parametrize("channels", CHANNELS)
    @pytest.mark.parametrize("name", ["alpha", "v", "beta", "bias", "residual"])
    @pytest.mark.parametrize("value", [NAN, INF, -INF], ids=["nan", "inf", "-inf"])
    def test_nonfinite_parameter_raises(self, channels, name, value):
        t = _layer(channels, hv=True)
        t[name] = _poison(t[name], value, 7 * channels + 3)
        got = outcome_everywhere(_packed_call(t))
        assert got[0] == "raise" and got[1] is ValueError and got[2].startswith(f"{name}: contains NaN or Inf")

    @pytest.mark.parametrize("where", [0, -1, 37], ids=["first", "last", "middle"])
    def test_residual_position_and_no_clamp(self, where):
        for channels in (16, 64):
            t = _layer(channels, batch=3)
            t["residual"] = _poison(t["residual"], NAN, where)
            got = outcome_everywhere(_packed_call(t, clamp=None))
            assert got[0] == "raise" and got[2].startswith("residual: contains NaN or Inf")

    def test_large_batch_residual_raises(self):
        # Enough images for the cpp engine's one-pass (pack + GEMM per image) schedule.
        t = _layer(16, batch=20, size=8)
        t["residual"] = _poison(t["residual"], -INF, 20 * 5 * 64 - 1)
        got = outcome_everywhere(_packed_call(t))
        assert got[0] == "raise" and got[2].startswith("residual: contains NaN or Inf")

    @pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16])
    def test_residual_other_dtypes(self, dtype):
        t = _layer(16)
        t["residual"] = _poison(t["residual"].to(dtype), INF, 11)
        got = outcome_everywhere(_packed_call(t))
        assert got[0] == "raise" and f"dtype {dtype}" in got[2]

    def test_float64_beyond_float32_range_raises(self):
        t = _layer(16)
        t["residual"] = _poison(t["residual"].double(), 1e300, 5)
        assert outcome_everywhere(_packed_call(t))[2].startswith("residual: contains NaN or Inf")
        t = _layer(16)
        t["alpha"] = _poison(t["alpha"].double(), -1e300, 1)
        assert outcome_everywhere(_packed_call(t))[2].startswith("alpha: contains NaN or Inf")

    @pytest.mark.parametrize("clamp", [(NAN, 1.0), (0.0, NAN), (NAN, NAN), (1.0, 1.0), (INF, INF)])
    def test_bad_clamp_raises(self, clamp):
        got = outcome_everywhere(_packed_call(_layer(16), clamp=clamp))
        assert got[0] == "raise" and got[1] is ValueError and got[2].startswith("clamp:")

    @pytest.mark.parametrize("clamp", [(0.0, INF), (-INF, 0.5), (-INF, INF)])
    def test_infinite_clamp_bound_is_no_bound(self, clamp):
        for channels in CHANNELS:
            assert outcome_everywhere(_packed_call(_layer(channels), clamp=clamp))[0] == "ok"

    def test_first_bad_argument_is_named_everywhere(self):
        t = _layer(16, hv=True)
        t["x"] = _poison(t["x"], NAN, 3)
        t["residual"] = _poison(t["residual"], NAN, 3)
        assert outcome_everywhere(_packed_call(t))[2].startswith("x: contains NaN")
        t["bias"] = _poison(t["bias"], INF, 0)
        assert outcome_everywhere(_packed_call(t))[2].startswith("bias: contains NaN or Inf")


class TestBinarizedInputs:
    """x, w, w_bases: NaN raises; +-inf binarizes by sign."""

    @pytest.mark.parametrize("channels", CHANNELS)
    @pytest.mark.parametrize("op", ["packed", "mbn", "binary", "pack"])
    def test_nan_raises(self, channels, op):
        t = _layer(channels, hv=op == "mbn")
        x = _poison(t["x"], NAN, 5 * channels + 1)
        calls = {
            "packed": lambda: ops.mbn_conv2d_packed(x, t["w_packed"], channels, 3, t["alpha"], padding=1,
                                                    residual=t["residual"]),
            "mbn": lambda: ops.mbn_conv2d(x, t["w_bases"], t["alpha"], t["v"], t["beta"], padding=1),
            "binary": lambda: ops.binary_conv2d(x, t["w_bases"][0], padding=1),
            "pack": lambda: ops.pack_signs(x),
        }
        got = outcome_everywhere(calls[op])
        assert got[0] == "raise" and got[1] is ValueError and got[2].startswith("x: contains NaN")

    @pytest.mark.parametrize("channels", CHANNELS)
    @pytest.mark.parametrize("name", ["w", "w_bases"])
    def test_nan_weight_raises(self, channels, name):
        t = _layer(channels)
        w_bases = _poison(t["w_bases"], NAN, 3 * channels)
        if name == "w":
            fn = lambda: ops.binary_conv2d(t["x"], w_bases[0].contiguous(), padding=1)  # noqa: E731
        else:
            fn = lambda: ops.mbn_conv2d(t["x"], w_bases, t["alpha"], padding=1)  # noqa: E731
        got = outcome_everywhere(fn)
        assert got[0] == "raise" and got[2].startswith(f"{name}: contains NaN")

    @pytest.mark.parametrize("channels", CHANNELS)
    @pytest.mark.parametrize("value", [INF, -INF], ids=["inf", "-inf"])
    def test_infinite_activations_and_weights_binarize_by_sign(self, channels, value):
        t = _layer(channels, hv=True)
        g = torch.Generator().manual_seed(channels)
        mask = torch.rand(t["x"].shape, generator=g) < 0.3
        x = torch.where(mask, torch.full_like(t["x"], value), t["x"])
        w_bases = torch.where(torch.rand(t["w_bases"].shape, generator=g) < 0.3,
                              torch.full_like(t["w_bases"], value), t["w_bases"])
        got = outcome_everywhere(lambda: ops.binary_conv2d(x, w_bases[0].contiguous(), padding=1))
        expected = F.conv2d(torch.where(x >= 0, 1.0, -1.0), torch.where(w_bases[0] >= 0, 1.0, -1.0),
                            padding=1).round().to(torch.int32)
        assert got[0] == "ok" and torch.equal(got[1], expected)
        # H_v of +-inf is +-1; the float output agrees everywhere.
        assert outcome_everywhere(lambda: ops.mbn_conv2d(x, w_bases, t["alpha"], t["v"], t["beta"],
                                                          padding=1))[0] == "ok"
        t["x"] = x
        assert outcome_everywhere(_packed_call(t))[0] == "ok"


class TestOverflow:
    """Finite inputs whose arithmetic overflows: the same IEEE result everywhere; the clamp keeps NaN."""

    @pytest.mark.parametrize("channels", CHANNELS)
    @pytest.mark.parametrize("clamp", [None, (-1.0, 1.0), (0.0, INF)])
    def test_overflow_propagates_identically(self, channels, clamp):
        t = _layer(channels, size=6)
        t["alpha"] = torch.full_like(t["alpha"], 3e38)
        t["beta"] = torch.tensor([3e38])
        t["bias"] = None
        t["residual"] = None
        # A dot product of 0 (an even number of taps) times alpha * beta = inf gives NaN.
        got = outcome_everywhere(_packed_call(t, clamp=clamp))
        assert got[0] == "ok" and not torch.isfinite(got[1]).all()
        if channels % 2 == 0:
            assert torch.isnan(got[1]).any()


def _sign_values(dtype):
    tiny = {torch.float64: [-1e-50, -1e-320, -5e-324, 5e-324, 1e-50, -1e-300, 1e300, -1e300],
            torch.float32: [-1e-45, 1e-45, -1e-40, 1e-40],
            torch.float16: [-6e-8, 6e-8, -1e-5],
            torch.bfloat16: [-1e-40, 1e-40, -1e-38]}[dtype]
    return [-0.0, 0.0, -1.0, 1.0, -INF, INF] + tiny


class TestSignRule:
    """bit = x >= 0 in x's own dtype (-0.0 -> +1, every negative -> -1), as python_ref states it."""

    @pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
    @pytest.mark.parametrize("channels", CHANNELS)
    def test_pack_signs_matches_python_ref(self, dtype, channels):
        values = torch.tensor(_sign_values(dtype), dtype=torch.float64)
        idx = torch.randint(len(values), (2, channels, 3, 4), generator=torch.Generator().manual_seed(1))
        x = values[idx].to(dtype)
        ref_input = x.numpy() if dtype != torch.bfloat16 else x.float().numpy()  # bf16 widens exactly
        expected = torch.from_numpy(ops_ref.pack_signs_ref(ref_input))
        got = outcome_everywhere(lambda: ops.pack_signs(x))
        assert got[0] == "ok" and torch.equal(got[1], expected)

    @pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16])
    @pytest.mark.parametrize("channels", CHANNELS)
    def test_convolutions_use_the_rule(self, dtype, channels):
        values = torch.tensor(_sign_values(dtype), dtype=torch.float64)
        g = torch.Generator().manual_seed(channels)
        x = values[torch.randint(len(values), (2, channels, 4, 4), generator=g)].to(dtype)
        w = values[torch.randint(len(values), (2, 3, channels, 3, 3), generator=g)].to(dtype)
        sx = torch.from_numpy(ops_ref.sign(x.float().numpy() if dtype == torch.bfloat16 else x.numpy()))
        sw = torch.from_numpy(ops_ref.sign(w.float().numpy() if dtype == torch.bfloat16 else w.numpy()))
        expected = F.conv2d(sx.double(), sw[0].double(), padding=1).round().to(torch.int32)
        got = outcome_everywhere(lambda: ops.binary_conv2d(x, w[0].contiguous(), padding=1))
        assert got[0] == "ok" and torch.equal(got[1], expected)
        alpha = torch.tensor([1.0, 0.5])
        got = outcome_everywhere(lambda: ops.mbn_conv2d(x, w, alpha, padding=1))
        exp_mbn = sum(a * F.conv2d(sx.double(), sw[m].double(), padding=1) for m, a in enumerate(alpha))
        assert got[0] == "ok" and torch.equal(got[1], exp_mbn.float())

    def test_float64_tiny_negatives_are_minus_one(self):
        x = torch.tensor([-1e-50, -1e-320, -0.0, 0.0, 1e-320], dtype=torch.float64).reshape(1, 5, 1, 1)
        got = outcome_everywhere(lambda: ops.pack_signs(x))
        assert got[1].item() == 0b11100  # -0.0, 0.0 and 1e-320 are +1
        assert ops_ref.sign(np.array([-1e-50, -1e-320, -0.0])).tolist() == [-1, -1, 1]

    @pytest.mark.parametrize("dtype", [torch.float64, torch.float16])
    def test_hv_rounds_x_to_float32_first(self, dtype):
        x = torch.tensor([0.5 - 1e-12, 0.8, -INF, INF, -0.0, 0.3], dtype=torch.float64).to(dtype)
        x = x.reshape(1, 6, 1, 1).expand(1, 6, 2, 2).contiguous()
        w_bases = torch.ones(1, 1, 6, 1, 1)
        v = torch.tensor([0.0, 0.2])
        got = outcome_everywhere(lambda: ops.mbn_conv2d(x, w_bases, torch.ones(1), v, torch.ones(2)))
        expected = sum(torch.from_numpy(ops_ref.hv_sign(x.numpy(), vn)).sum(1, keepdim=True).float()
                       for vn in v.numpy())
        assert torch.equal(got[1], expected)


TRITON_SCRIPT = textwrap.dedent("""
    import math, torch
    from bitkern import dispatch, ops
    torch.manual_seed(0)
    def run(fn):
        try:
            return ("ok", fn())
        except ValueError as exc:
            return ("raise", str(exc))
    cases = []
    for C in (3, 64, 130):
        x = torch.randn(1, C, 4, 4)
        x.view(-1)[5] = math.inf
        w_bases = torch.randn(1, 3, C, 3, 3)
        wp = ops.pack_signs(w_bases.flatten(0, 1)).unflatten(0, (1, 3))
        res = torch.randn(1, 3, 4, 4)
        for bad in (None, math.nan, math.inf):
            r = res.clone()
            if bad is not None:
                r.view(-1)[7] = bad
            cases.append(lambda x=x, wp=wp, r=r, C=C: ops.mbn_conv2d_packed(
                x, wp, C, 3, torch.ones(1), padding=1, clamp=(-1.0, 1.0), residual=r))
        xn = x.clone(); xn.view(-1)[2] = math.nan
        cases.append(lambda xn=xn, w=w_bases: ops.binary_conv2d(xn, w[0], padding=1))
        x64 = torch.tensor([-1e-50, -1e-320, -0.0, 0.0] * C, dtype=torch.float64)[:C].reshape(1, C, 1, 1)
        cases.append(lambda x64=x64: ops.pack_signs(x64))
    for i, fn in enumerate(cases):
        with dispatch.use_backend("torch"):
            ref = run(fn)
        with dispatch.use_backend("triton"):
            got = run(fn)
        same = ref[0] == got[0] and (ref[1] == got[1] if ref[0] == "raise" else
                                     torch.equal(torch.nan_to_num(ref[1]), torch.nan_to_num(got[1])))
        assert same, (i, ref, got)
    print("TRITON-OK", len(cases))
""")


def test_triton_interpreter_follows_the_policy():
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, "-c", TRITON_SCRIPT], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)
    if "triton interpreter not usable" in proc.stderr or "unavailable" in proc.stderr:
        pytest.skip(proc.stderr[-300:])
    assert proc.returncode == 0 and "TRITON-OK" in proc.stdout, proc.stderr[-2000:]
