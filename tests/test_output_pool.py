"""The cpp backend's output pool: large outputs are blocks that stay mapped after their tensors die and
come back for the next output of the same size (no page faults on rewrite)."""
import gc
import io
import threading

import pytest
import torch

from bitkern import _C, ops
from bitkern.backends import cpp

pytestmark = pytest.mark.skipif(not cpp.backend.available, reason=f"cpp backend: {cpp.backend.reason}")
BIG = (16, 16, 32, 32)  # a binary_conv2d output of 1 MiB: pooled (>= 256 KiB)


@pytest.fixture
def pool():
    previous = cpp.output_pool_limit()
    _C.pool_clear()
    yield
    cpp.output_pool_limit(previous)


def _binary(x):
    w = torch.randn(x.shape[1], x.shape[1], 3, 3, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return ops.binary_conv2d(x, w, padding=1)


def test_freed_outputs_are_reused(pool):
    x = torch.randn(BIG)
    first = _binary(x)
    expected = first.clone()
    ptr = first.data_ptr()
    assert _C.pool_cached_bytes() == 0
    del first
    gc.collect()
    assert _C.pool_cached_bytes() >= x.numel() * 4
    again = _binary(x)
    assert again.data_ptr() == ptr and torch.equal(again, expected)
    assert _C.pool_cached_bytes() == 0


def test_live_outputs_survive_clear_and_limit_zero(pool):
    x = torch.randn(BIG)
    out = _binary(x)
    expected = out.clone()
    _C.pool_clear()
    cpp.output_pool_limit(0)  # disables the pool: new outputs come from torch
    assert torch.equal(out, expected)
    plain = _binary(x)
    assert torch.equal(plain, expected)
    del out
    gc.collect()
    assert _C.pool_cached_bytes() == 0


def test_limit_bounds_the_cache(pool):
    cpp.output_pool_limit(1.5)  # MiB: one 1 MiB block fits, two do not
    x = torch.randn(BIG)
    outs = [_binary(x) for _ in range(3)]
    del outs
    gc.collect()
    assert 0 < _C.pool_cached_bytes() <= 1.5 * (1 << 20)


def test_the_blocks_returned_longest_ago_are_evicted_first(pool):
    """Sizes a workload stopped using go before the one it uses: a pool full of old smaller blocks
    still caches the current, larger size (the largest block used to go first, so every output of the
    current size was a fresh allocation: page faults on each write)."""
    cpp.output_pool_limit(3.5)  # MiB
    old = [cpp._empty((1 << 18,), torch.float32) for _ in range(3)]  # 1 MiB each, no longer used
    del old
    gc.collect()
    assert _C.pool_cached_bytes() == 3 << 20
    current = cpp._empty((2, 1 << 18), torch.float32)  # 2 MiB
    ptr = current.data_ptr()
    del current
    gc.collect()
    assert _C.pool_cached_bytes() == 3 << 20  # the two oldest 1 MiB blocks went, not the 2 MiB one
    again = cpp._empty((2, 1 << 18), torch.float32)
    assert again.data_ptr() == ptr and _C.pool_cached_bytes() == 1 << 20


def test_pooled_tensors_behave_like_torch_tensors(pool):
    x = torch.randn(BIG)
    out = _binary(x)
    assert out.device.type == "cpu" and out.dtype == torch.int32
    assert out.is_contiguous(memory_format=torch.channels_last)
    buf = io.BytesIO()
    torch.save(out, buf)
    buf.seek(0)
    assert torch.equal(torch.load(buf, weights_only=True), out)
    assert torch.equal((out * 2).float().sum(), out.float().sum() * 2)


def test_blocks_come_back_from_other_threads(pool):
    x = torch.randn(BIG)
    outs = [_binary(x) for _ in range(4)]
    t = threading.Thread(target=outs.clear)
    t.start()
    t.join()
    gc.collect()
    assert _C.pool_cached_bytes() >= 4 * x.numel() * 4


def test_unconsumed_capsule_gives_its_block_back(pool):
    capsule = _C.pooled_empty(1 << 18, 0, 32)
    del capsule
    assert _C.pool_cached_bytes() == 1 << 20


def test_limit_argument_and_env_are_checked(pool, monkeypatch):
    with pytest.raises(ValueError, match="megabytes"):
        cpp.output_pool_limit(-1)
    monkeypatch.setenv("BITKERN_OUTPUT_POOL_MB", "lots")
    with pytest.raises(ValueError, match="BITKERN_OUTPUT_POOL_MB"):
        cpp._pool_limit_from_env()
    monkeypatch.setenv("BITKERN_OUTPUT_POOL_MB", "64")
    cpp._pool_limit_from_env()
    assert cpp.output_pool_limit() == 64


def test_forked_child_computes_with_both_pools(pool):
    """After fork() the child gets a fresh thread pool and a usable output pool (its mutex reset)."""
    import os
    x = torch.randn(BIG)
    expected = _binary(x)
    _binary(x)  # dies at once: leaves a cached block behind for the child to inherit
    pid = os.fork()
    if pid == 0:  # child: exit status 0 only if the result is right
        ok = False
        try:
            torch.set_num_threads(1)  # torch's OpenMP pool does not survive fork(); bitkern's own does
            os.environ["BITKERN_NUM_THREADS"] = "2"
            ok = torch.equal(_binary(x), expected)
        finally:
            os._exit(0 if ok else 1)
    _, status = os.waitpid(pid, 0)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0


def test_pooled_empty_checks_its_arguments():
    with pytest.raises(ValueError, match="pooled_empty"):
        _C.pooled_empty(-1, 0, 32)
    with pytest.raises(ValueError, match="pooled_empty"):
        _C.pooled_empty(4, 0, 12)
