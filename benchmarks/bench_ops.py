"""Op-level speed: packed binary / multi-base convs (cpp backend) vs torch fp32 conv2d and vs the
pure-torch float emulation (torch backend). 3x3 convs, stride 1, padding 1, 2 threads.

    pytest benchmarks/bench_ops.py --benchmark-only -q

Shapes (C -> C at HxW): 16@32x32, 32@16x16, 64@8x8 (CIFAR ResNet stages), 256@14x14; batch 128 and 1.
Per shape: torch fp32 conv2d (NCHW and channels_last), bitkern.ops.binary_conv2d (cpp), and
bitkern.ops.mbn_conv2d for MBN 1x1, 3x1, 3x3 (M weight x N activation bases) on cpp and on torch.
The session-finish hook in benchmarks/conftest.py prints the ratio table and writes
benchmarks/results/ops.md + ops.json. Ratios only: nothing here asserts a time.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from bitkern import dispatch, ops

THREADS = 2
SHAPES = [(16, 32), (32, 16), (64, 8), (256, 14)]  # (channels, spatial size)
BATCHES = [128, 1]
MBN_CONFIGS = [(1, 1), (3, 1), (3, 3)]  # (M, N)


def _rounds(channels: int, batch: int, slow: bool = False) -> int:
    big = batch * channels * channels >= 128 * 256 * 256
    if big:
        return 2 if slow else 3
    return 30 if batch > 1 else 50


def _cpp_or_skip():
    if not dispatch.get("cpp").available:
        pytest.skip(f"cpp backend unavailable: {dispatch.get('cpp').reason}")


@pytest.fixture(scope="module", autouse=True)
def _threads():
    previous = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    yield
    torch.set_num_threads(previous)


def _inputs(channels: int, size: int, batch: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, channels, size, size, generator=gen)
    w = torch.randn(channels, channels, 3, 3, generator=gen)
    return x, w


def _run(benchmark, record_op_timing, key, fn, rounds):
    with torch.no_grad():
        benchmark.pedantic(fn, rounds=rounds, iterations=1, warmup_rounds=1)
    record_op_timing(key, benchmark)


PARAMS = [pytest.param(c, s, b, id=f"{c}@{s}x{s}-b{b}") for c, s in SHAPES for b in BATCHES]


@pytest.mark.parametrize("channels,size,batch", PARAMS)
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_torch_fp32_conv(benchmark, record_op_timing, channels, size, batch, layout):
    x, w = _inputs(channels, size, batch)
    if layout == "channels_last":
        x, w = x.contiguous(memory_format=torch.channels_last), w.contiguous(memory_format=torch.channels_last)
    benchmark.group = f"{channels}@{size}-b{batch}"
    _run(benchmark, record_op_timing, (channels, size, batch, f"fp32_{layout}"),
         lambda: F.conv2d(x, w, padding=1), _rounds(channels, batch))


@pytest.mark.parametrize("channels,size,batch", PARAMS)
def test_binary_conv2d_cpp(benchmark, record_op_timing, channels, size, batch):
    _cpp_or_skip()
    x, w = _inputs(channels, size, batch)
    benchmark.group = f"{channels}@{size}-b{batch}"
    with dispatch.use_backend("cpp"):
        _run(benchmark, record_op_timing, (channels, size, batch, "binary_cpp"),
             lambda: ops.binary_conv2d(x, w, stride=1, padding=1), _rounds(channels, batch))


def _mbn_args(channels, size, batch, num_w, num_a):
    x, _ = _inputs(channels, size, batch)
    gen = torch.Generator().manual_seed(1)
    w_bases = torch.randn(num_w, channels, channels, 3, 3, generator=gen)
    alpha = torch.rand(num_w, channels, generator=gen)
    v = None if num_a == 1 else torch.linspace(-0.5, 0.5, num_a)
    beta = torch.rand(num_a, generator=gen) + 0.5
    return x, w_bases, alpha, v, beta


@pytest.mark.parametrize("channels,size,batch", PARAMS)
@pytest.mark.parametrize("num_w,num_a", MBN_CONFIGS, ids=[f"mbn{m}x{n}" for m, n in MBN_CONFIGS])
@pytest.mark.parametrize("backend", ["cpp", "torch"])
def test_mbn_conv2d(benchmark, record_op_timing, channels, size, batch, num_w, num_a, backend):
    if backend == "cpp":
        _cpp_or_skip()
    x, w_bases, alpha, v, beta = _mbn_args(channels, size, batch, num_w, num_a)
    benchmark.group = f"{channels}@{size}-b{batch}"
    with dispatch.use_backend(backend):
        _run(benchmark, record_op_timing, (channels, size, batch, f"mbn{num_w}x{num_a}_{backend}"),
             lambda: ops.mbn_conv2d(x, w_bases, alpha, v, beta, stride=1, padding=1),
             _rounds(channels, batch, slow=backend == "torch" and num_w * num_a > 1))
