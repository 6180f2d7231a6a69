"""GPU backends (cuda, triton) on a real CUDA device: exact against the CPU backend, opcheck, gradients.

Skipped (with the reason) where torch sees no CUDA device. Each backend that is not available on the
GPU machine is skipped with its own reason (bitkern.dispatch.backends_status()).
"""
import os

import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip(f"no CUDA device (torch {torch.__version__}, CUDA {torch.version.cuda})",
                allow_module_level=True)
if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
    pytest.skip("TRITON_INTERPRET is set: the triton kernels would not run on the GPU",
                allow_module_level=True)

from bitkern import dispatch, ops  # noqa: E402

pytestmark = pytest.mark.cuda
GPU_BACKENDS = ("cuda", "triton")
CPU = torch.device("cpu")
DEV = torch.device("cuda")


def _backend(name):
    backend = dispatch.get(name)
    if not backend.available:
        pytest.skip(f"{name} backend unavailable: {backend.reason}")
    return backend


def _cpu_backend():
    return dispatch.backend_for(CPU)  # cpp when built, else torch


# (B, C, H, W, Co, K, stride, padding, M, N); N = 0: mode "sign"
CASES = [
    (1, 1, 9, 7, 3, 1, 1, 0, 1, 0),
    (2, 63, 11, 13, 17, 3, 2, 1, 2, 2),
    (3, 65, 10, 9, 9, 5, 3, 2, 3, 1),
    (1, 130, 8, 12, 33, 3, 1, 2, 1, 3),
    (4, 64, 14, 14, 64, 3, 1, 1, 2, 2),
    (2, 256, 7, 7, 40, 3, (2, 1), (0, 1), 3, 3),
    (1, 1100, 6, 5, 8, 3, 1, 1, 1, 1),  # 18 words per pixel: several weight staging rounds
    (8, 96, 16, 16, 24, (3, 1), 1, (1, 0), 2, 0),
]


def _case(case, seed):
    B, C, H, W, Co, K, stride, padding, M, N = case
    ks = (K, K) if isinstance(K, int) else K
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, C, H, W, generator=g)
    x.view(-1)[::7] = 0.0
    w = torch.randn(M, Co, C, *ks, generator=g)
    alpha = torch.rand(M, Co, generator=g) + 0.1
    v = None if N == 0 else torch.linspace(-0.3, 0.7, N)
    beta = torch.rand(max(N, 1), generator=g) + 0.1
    return x, w, alpha, v, beta, ks, stride, padding


def _to(t, device):
    return None if t is None else t.to(device)


@pytest.mark.parametrize("name", GPU_BACKENDS)
@pytest.mark.parametrize("C", [1, 63, 64, 65, 130, 1000])
def test_pack_signs_equals_cpu(name, C):
    gpu = _backend(name)
    x = torch.randn(3, C, 5, 7)
    x.view(-1)[::5] = -0.0
    cpu = _cpu_backend()
    assert torch.equal(gpu.pack_signs(x.to(DEV)).cpu(), cpu.pack_signs(x))
    assert torch.equal(gpu.pack_signs(x.to(DEV), "hv", 0.3).cpu(), cpu.pack_signs(x, "hv", 0.3))


@pytest.mark.parametrize("name", GPU_BACKENDS)
@pytest.mark.parametrize("index", range(len(CASES)))
def test_mbn_conv_equals_cpu(name, index):
    gpu = _backend(name)
    cpu = _cpu_backend()
    x, w, alpha, v, beta, ks, stride, padding = _case(CASES[index], seed=index)
    wp = cpu.pack_signs(w.flatten(0, 1)).unflatten(0, w.shape[:2])
    C = x.shape[1]
    ref_out, ref_pairs = cpu.mbn_conv2d_packed(x, wp, C, ks, alpha, v, beta, stride, padding, want_pairs=True)
    out, pairs = gpu.mbn_conv2d_packed(x.to(DEV), wp.to(DEV), C, ks, alpha.to(DEV), _to(v, DEV), beta.to(DEV),
                                       stride, padding, want_pairs=True)
    assert torch.equal(pairs.cpu(), ref_pairs)  # exact integer counts
    torch.testing.assert_close(out.cpu(), ref_out, rtol=2e-6, atol=1e-5)
    none_out, pairs_only = gpu.mbn_conv2d_packed(x.to(DEV), wp.to(DEV), C, ks, None, _to(v, DEV), None, stride,
                                                 padding, want_pairs=True)
    assert none_out is None and torch.equal(pairs_only, pairs)


@pytest.mark.parametrize("name", GPU_BACKENDS)
def test_opcheck_bitkern_ops_on_cuda(name):
    _backend(name)
    x, w, alpha, v, beta, ks, stride, padding = _case(CASES[1], seed=1)
    x, w, alpha, v, beta = (t.to(DEV) for t in (x, w, alpha, v, beta))
    x.requires_grad_()
    with dispatch.use_backend(name):
        w_packed = ops.pack_signs(w.flatten(0, 1)).unflatten(0, w.shape[:2])
        cases = [
            (torch.ops.bitkern.pack_signs.default, (x.detach(),)),
            (torch.ops.bitkern.binary_conv2d.default, (x.detach(), w[0], [2, 2], [1, 1])),
            (torch.ops.bitkern.mbn_conv2d.default, (x, w, alpha, v, beta, [2, 2], [1, 1])),
            (torch.ops.bitkern.mbn_conv2d_packed.default,
             (x, w_packed, w.shape[2], list(ks), alpha, v, beta, [2, 2], [1, 1])),
        ]
        for op, args in cases:
            # test_aot_dispatch_dynamic compares gradients by finite differences; STE grads are not those
            torch.library.opcheck(op, args, test_utils=("test_schema", "test_autograd_registration",
                                                        "test_faketensor"))


@pytest.mark.parametrize("name", GPU_BACKENDS)
def test_gradients_equal_cpu(name):
    _backend(name)
    x, w, alpha, v, beta, ks, stride, padding = _case(CASES[2], seed=2)
    alpha = alpha[:, 0].contiguous()

    def run(device, backend):
        leaves = [t.to(device).requires_grad_() for t in (x, alpha, v, beta)]
        with dispatch.use_backend(backend):
            out = ops.mbn_conv2d(leaves[0], w.to(device), leaves[1], leaves[2], leaves[3], stride, padding)
            grads = torch.autograd.grad((out * torch.linspace(-1, 1, out.numel(), device=device).view_as(out)).sum(),
                                        leaves)
        return out.detach().cpu(), [g.cpu() for g in grads]

    out_gpu, grads_gpu = run(DEV, name)
    out_cpu, grads_cpu = run(CPU, None)
    torch.testing.assert_close(out_gpu, out_cpu, rtol=2e-6, atol=1e-5)
    for g_gpu, g_cpu in zip(grads_gpu, grads_cpu):
        torch.testing.assert_close(g_gpu, g_cpu, rtol=1e-4, atol=1e-4)


def test_dispatcher_picks_a_gpu_backend_for_cuda_tensors():
    status = dispatch.backends_status()
    chosen = dispatch.backend_for(DEV)
    if status["cuda"][0]:
        assert chosen.name == "cuda"
    elif status["triton"][0]:
        assert chosen.name == "triton"
    else:
        pytest.skip(f"no GPU backend available: {status}")
