"""Triton backend in the Triton interpreter (TRITON_INTERPRET=1, CPU tensors) against python_ref and
the torch backend.

Pair counts must equal python_ref exactly; `out` must equal the torch backend BIT FOR BIT (torch.equal):
both sum the base pairs n-outer, m-inner as fl32(alpha * beta) * count, every product and sum rounded to
float32 (docs/architecture.md). The interpreter is slow, so the sweep is small but covers the awkward
cases: C = 1, 63, 64, 65, 130 (partial and multiple words), strides 1/2/3, paddings 0/1/2, kernels
1/3/5, batch 1, H != W, M, N up to 3, modes "sign" and "hv", plus a few random shapes with signed alphas.
A last test compiles the kernels for sm_80 / sm_90 without a GPU.
"""
import os

import pytest
import torch  # does not import triton

if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
    # Setting TRITON_INTERPRET here would leak into the session and turn the GPU triton backend of
    # tests/test_gpu.py into the interpreter; on a CUDA machine the real kernels are tested there.
    pytest.skip("CUDA device present: triton kernels are tested on the GPU by tests/test_gpu.py "
                "(run this file alone with TRITON_INTERPRET=1 for the interpreter)", allow_module_level=True)
os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported (kernels decorate at import)

import subprocess  # noqa: E402
import sys  # noqa: E402
import textwrap  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

pytest.importorskip("triton")

from bitkern.backends.torch_backend import backend as torch_backend  # noqa: E402
from bitkern.backends.triton_backend import TritonBackend  # noqa: E402
from python_ref import ops_ref  # noqa: E402

from conformance import awkward_randn  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tb():
    # A fresh object: another test module may have built the shared one before the env var was set.
    backend = TritonBackend()
    if not backend.available or not backend.interpret:
        pytest.skip(f"triton interpreter not usable here: {backend.reason}")
    return backend


def _inputs(seed, shape):
    """Random floats with exact zeros, -0.0 and values right at the hv threshold mixed in."""
    return awkward_randn(shape, torch.Generator().manual_seed(seed))


def _pack_weights_ref(w):
    """float [M, Co, C, KH, KW] -> int64 [M, Co, KH, KW, Kw] with the numpy reference packer."""
    M, Co = w.shape[:2]
    packed = ops_ref.pack_signs_ref(w.reshape(M * Co, *w.shape[2:]).numpy())
    return torch.from_numpy(packed).reshape(M, Co, *packed.shape[1:])


@pytest.mark.parametrize("C", [1, 63, 64, 65, 130])
def test_pack_signs_sign_matches_reference(tb, C):
    x = _inputs(C, (2, C, 3, 5))
    got = tb.pack_signs(x)
    assert got.dtype == torch.int64 and got.shape == (2, 3, 5, -(-C // 64))
    assert np.array_equal(got.numpy(), ops_ref.pack_signs_ref(x.numpy()))


@pytest.mark.parametrize("C,v", [(65, 0.3), (130, -0.25), (7, 0.0)])
def test_pack_signs_hv_matches_reference(tb, C, v):
    x = _inputs(C + 1, (1, C, 4, 3))
    signs = ops_ref.hv_sign(x.numpy(), v)  # +-1 of H_v(x), fl32(x + v)
    expected = ops_ref.pack_signs_ref(signs.astype(np.float32))
    assert np.array_equal(tb.pack_signs(x, "hv", v).numpy(), expected)


def test_pack_signs_weights_5d(tb):
    w = _inputs(5, (2, 3, 65, 3, 3))
    assert torch.equal(tb.pack_signs(w), _pack_weights_ref(w))


def test_pack_signs_float64_tiny_negative_is_minus(tb):
    x = torch.tensor([-1e-50, 0.0, -0.0, 1e-300], dtype=torch.float64).reshape(1, 4, 1, 1)
    assert tb.pack_signs(x).item() == 0b1110


# (B, C, H, W, Co, K, stride, padding, M, N): N = 0 means mode "sign" (v=None)
CASES = [
    (1, 1, 4, 6, 3, 1, 1, 0, 1, 0),
    (2, 63, 5, 7, 5, 3, 2, 1, 2, 2),
    (1, 65, 7, 6, 4, 5, 3, 2, 3, 0),
    (1, 130, 4, 5, 3, 3, 1, 2, 1, 3),
    (2, 64, 6, 4, 17, 3, (2, 1), (0, 1), 2, 1),
    (1, 9, 6, 9, 2, 5, 1, 0, 1, 2),
    (1, 33, 5, 3, 2, (3, 1), (1, 2), (2, 0), 3, 3),
]


def _case_tensors(case, seed):
    B, C, H, W, Co, K, stride, padding, M, N = case
    KH, KW = (K, K) if isinstance(K, int) else K
    x = _inputs(seed, (B, C, H, W))
    w = _inputs(seed + 1, (M, Co, C, KH, KW))
    g = torch.Generator().manual_seed(seed + 2)
    alpha = torch.rand(M, Co, generator=g) + 0.1
    v = None if N == 0 else torch.linspace(-0.4, 0.6, N)
    beta = torch.rand(max(N, 1), generator=g) + 0.1
    return x, w, alpha, v, beta, (KH, KW), stride, padding


@pytest.mark.parametrize("index", range(len(CASES)), ids=[f"case{i}" for i in range(len(CASES))])
def test_mbn_conv_matches_reference(tb, index):
    x, w, alpha, v, beta, ks, stride, padding = _case_tensors(CASES[index], seed=100 + 7 * index)
    wp = _pack_weights_ref(w)
    C = x.shape[1]
    out, pairs = tb.mbn_conv2d_packed(x, wp, C, ks, alpha, v, beta, stride, padding, want_pairs=True)
    vn = None if v is None else v.numpy()
    ref_pairs = ops_ref.mbn_pairs_ref(x.numpy(), w.numpy(), vn, stride, padding)
    assert pairs.dtype == torch.int32 and tuple(pairs.shape) == ref_pairs.shape
    assert np.array_equal(pairs.numpy(), ref_pairs)  # exact
    ref_out = ops_ref.mbn_conv2d_ref(x.numpy(), w.numpy(), alpha.numpy(), vn, beta.numpy(), stride, padding)
    assert out.dtype == torch.float32 and tuple(out.shape) == ref_out.shape
    scale = np.abs(ref_out).max() + 1.0
    np.testing.assert_allclose(out.numpy(), ref_out, rtol=1e-5, atol=1e-6 * scale)  # float64 reference
    # the documented float32 order (n outer, m inner): bit for bit the torch backend
    torch_out, torch_pairs = torch_backend.mbn_conv2d_packed(x, wp, C, ks, alpha, v, beta, stride, padding,
                                                             want_pairs=True)
    assert torch.equal(out, torch_out) and torch.equal(pairs, torch_pairs)
    # out without pairs is the same computation, bit for bit; pairs without out likewise
    out_only, none_pairs = tb.mbn_conv2d_packed(x, wp, C, ks, alpha, v, beta, stride, padding)
    assert none_pairs is None and torch.equal(out_only, out)
    none_out, pairs_only = tb.mbn_conv2d_packed(x, wp, C, ks, None, v, None, stride, padding, want_pairs=True)
    assert none_out is None and torch.equal(pairs_only, pairs)


def _random_case(seed):
    rng = np.random.default_rng(seed)
    B, C = int(rng.integers(1, 3)), int(rng.choice([1, 5, 17, 31, 33, 65, 70]))
    KH, KW = (int(k) for k in rng.choice([1, 3, 5], size=2))
    stride = tuple(int(s) for s in rng.integers(1, 4, size=2))
    padding = tuple(int(p) for p in rng.integers(0, 3, size=2))
    H = int(rng.integers(max(1, KH - 2 * padding[0]), 8))
    W = int(rng.integers(max(1, KW - 2 * padding[1]), 8))
    Co, M, N = int(rng.integers(1, 10)), int(rng.integers(1, 4)), int(rng.integers(0, 4))
    return B, C, H, W, Co, (KH, KW), stride, padding, M, N


@pytest.mark.parametrize("seed", range(6))
def test_mbn_conv_random_shapes_bit_exact_vs_torch(tb, seed):
    """Random shapes, signed alphas and betas: Triton == torch backend bit for bit (out and pairs)."""
    case = _random_case(seed)
    x, w, alpha, v, beta, ks, stride, padding = _case_tensors(case, seed=500 + seed)
    g = torch.Generator().manual_seed(900 + seed)
    alpha = alpha * torch.where(torch.rand(alpha.shape, generator=g) < 0.3, -1.0, 1.0)
    beta = beta * torch.where(torch.rand(beta.shape, generator=g) < 0.3, -1.0, 1.0)
    wp = _pack_weights_ref(w)
    C = x.shape[1]
    got = tb.mbn_conv2d_packed(x, wp, C, ks, alpha, v, beta, stride, padding, want_pairs=True)
    want = torch_backend.mbn_conv2d_packed(x, wp, C, ks, alpha, v, beta, stride, padding, want_pairs=True)
    assert torch.equal(got[1], want[1]), case
    assert torch.equal(got[0], want[0]), case


def test_binary_conv_via_pairs(tb):
    x = _inputs(11, (1, 65, 5, 4))
    w = _inputs(12, (1, 3, 65, 3, 3))
    _, pairs = tb.mbn_conv2d_packed(x, _pack_weights_ref(w), 65, (3, 3), None, None, None, 2, 1,
                                    want_pairs=True)
    expected = ops_ref.binary_conv2d_ref(x.numpy(), w[0].numpy(), 2, 1)
    assert np.array_equal(pairs[0, 0].numpy(), expected)


def test_bad_arguments_raise_clear_errors(tb):
    x = torch.randn(1, 5, 4, 4)
    wp = tb.pack_signs(torch.randn(2, 3, 5, 3, 3))
    alpha = torch.ones(2, 3)
    with pytest.raises(ValueError, match="in_channels"):
        tb.mbn_conv2d_packed(x, wp, 6, (3, 3), alpha, None, None, 1, 1)
    with pytest.raises(ValueError, match="alpha2d"):
        tb.mbn_conv2d_packed(x, wp, 5, (3, 3), torch.ones(3, 2), None, None, 1, 1)
    with pytest.raises(TypeError, match="w_packed"):
        tb.mbn_conv2d_packed(x, wp.to(torch.int32), 5, (3, 3), alpha, None, None, 1, 1)
    with pytest.raises(ValueError, match="beta"):
        tb.mbn_conv2d_packed(x, wp, 5, (3, 3), alpha, torch.zeros(2), torch.ones(3), 1, 1)
    with pytest.raises(ValueError, match="stride"):
        tb.mbn_conv2d_packed(x, wp, 5, (3, 3), alpha, None, None, 0, 1)
    with pytest.raises(ValueError, match="mode"):
        tb.pack_signs(x, "relu")
    with pytest.raises(TypeError, match="floating-point"):
        tb.pack_signs(x.to(torch.int64))


_AOT_SCRIPT = textwrap.dedent("""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from bitkern.backends import triton_kernels as k

    def signature(fn, ptrs, consts):
        return {a: "constexpr" if a in consts else ptrs.get(a, "i32") for a in fn.arg_names}

    for cc in (80, 90):
        consts = dict(MODE=1, BLOCK_P=32)
        src = ASTSource(fn=k.pack_signs_kernel, constexprs=consts, signature=signature(
            k.pack_signs_kernel, {"x_ptr": "*fp32", "v_ptr": "*fp32", "out_ptr": "*i64"}, consts))
        assert "cubin" in triton.compile(src, target=GPUTarget("cuda", cc, 32)).asm
        cfg = k.autotune_configs()[0]
        consts = dict(WANT_OUT=True, WANT_PAIRS=True, **cfg.kwargs)
        ptrs = {"xp_ptr": "*i64", "w_ptr": "*i64", "alpha_ptr": "*fp32", "beta_ptr": "*fp32",
                "out_ptr": "*fp32", "pairs_ptr": "*i32"}
        src = ASTSource(fn=k.mbn_conv_kernel, constexprs=consts,
                        signature=signature(k.mbn_conv_kernel, ptrs, consts))
        compiled = triton.compile(src, target=GPUTarget("cuda", cc, 32))
        assert "cubin" in compiled.asm
        assert "popc.b64" in compiled.asm["ptx"], "SWAR popcount was not lowered to popc.b64"
        # the epilogue product is an explicitly rounded multiply, so no FMA can merge it with the sum
        assert "mul.rn.f32" in compiled.asm["ptx"], "rounded epilogue multiply missing"
        assert "fma.rn.f32" not in compiled.asm["ptx"], "an FMA crept into the float epilogue"
    print("AOT-OK")
""")


def test_kernels_compile_for_sm80_sm90():
    """Ahead-of-time compile (no GPU needed): the GPU code path type-checks and lowers to popc.b64."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    proc = subprocess.run([sys.executable, "-c", _AOT_SCRIPT], env=env, capture_output=True, text=True,
                          timeout=300, cwd=ROOT)
    if proc.returncode != 0 and "ptxas" in proc.stderr and "not found" in proc.stderr:
        pytest.skip(f"no ptxas for triton here: {proc.stderr[-300:]}")
    assert proc.returncode == 0 and "AOT-OK" in proc.stdout, proc.stderr[-3000:]


def test_ops_through_dispatcher_forced_to_triton():
    """bitkern.ops on the triton backend (interpreter): values and STE gradients as on the torch backend."""
    from bitkern import dispatch, ops

    if not getattr(dispatch.get("triton"), "interpret", False):
        pytest.skip("the dispatcher's triton backend was created outside the interpreter in this process")
    torch.manual_seed(3)
    x = torch.randn(1, 65, 5, 6, requires_grad=True)
    w = torch.randn(2, 4, 65, 3, 3)
    alpha = (torch.rand(2) + 0.1).requires_grad_()
    v = torch.tensor([0.1, 0.4], requires_grad=True)
    beta = (torch.rand(2) + 0.1).requires_grad_()
    results = {}
    for name in ("triton", "torch"):
        with dispatch.use_backend(name):
            out = ops.mbn_conv2d(x, w, alpha, v, beta, stride=2, padding=1)
            grads = torch.autograd.grad(out.sum(), (x, alpha, v, beta))
            binary = ops.binary_conv2d(x.detach(), w[0], stride=1, padding=2)
        results[name] = (out.detach(), grads, binary)
    (o1, g1, b1), (o2, g2, b2) = results["triton"], results["torch"]
    assert torch.equal(o1, o2)  # forward: bit for bit (same summation order and rounding)
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-4)
    assert torch.equal(b1, b2)


def test_frozen_model_runs_layer_by_layer_on_triton():
    """A frozen ResNet on the triton backend (no chains: Capabilities.bitplane_output is the CPU's) runs
    layer by layer and gives the cpp backend's chained logits bit for bit."""
    from bitkern import dispatch
    from bitkern.freeze import freeze
    from bitkern.models import create

    if not getattr(dispatch.get("triton"), "interpret", False) or not dispatch.get("cpp").available:
        pytest.skip("needs the dispatcher's triton backend in the interpreter and the cpp backend")
    assert not dispatch.get("triton").capabilities.bitplane_output
    torch.manual_seed(0)
    frozen = freeze(create("resnet20", "mbn2x2").eval())
    x = torch.rand(2, 3, 8, 8)
    with torch.no_grad():
        with dispatch.use_backend("cpp"):
            chained = frozen(x)
        with dispatch.use_backend("triton"):
            layered = frozen(x)
    assert torch.equal(layered, chained)
