"""torch.distributed helpers: who am I, which examples are mine, gather + exact merge, rank-0-only writes.

bitkern runs on the stock engine: processes started by ``torchrun`` (or ``torch.multiprocessing``) with a
``torch.distributed`` process group (gloo on CPU, NCCL on GPU) and ``DistributedDataParallel`` for
training. This module only holds the small pieces the layers above share; it imports nothing from
bitkern but ``_checks`` / ``_io`` (layer 0).

Without a process group (a plain ``python -m bitkern ...``) every helper degrades to the single process:
``world_size() == 1``, ``rank() == 0``, gathers return ``[obj]``.

* ``init_from_env(device)``: start the default process group when the launcher set ``WORLD_SIZE > 1``
  (``torchrun`` sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT); gloo for CPU, NCCL for CUDA.
* ``shard_range`` / ``shard_batches``: contiguous, balanced, disjoint splits by global index (never
  padded, so no example is seen twice, unlike ``DistributedSampler(drop_last=False)``).
* ``gather_indexed``: every rank's (global indices, per-example arrays) gathered and merged by index, with
  a check that the indices cover ``0 .. n-1`` exactly once (a gap or a duplicate is an error).
* ``is_main`` / ``barrier`` / ``broadcast_object`` / ``all_gather_object`` / ``all_reduce_sum``.
"""
from __future__ import annotations

import os
from datetime import timedelta
from typing import Any, Sequence

import numpy as np
import torch
import torch.distributed as dist

from ._checks import is_int

__all__ = ["ShardError", "active", "all_gather_object", "all_reduce_sum", "all_reduce_tensor", "barrier",
           "broadcast_object", "broadcast_tensors", "local_device",
           "env_world_size", "gather_indexed", "init_from_env", "is_initialized", "is_main", "merge_indexed",
           "rank", "shard_batches", "shard_range", "world_size"]


class ShardError(RuntimeError):
    """Merged shards do not cover the examples exactly once (a gap, a duplicate or a foreign index)."""


# ------------------------------------------------------------------------------------------ identity
def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    return dist.get_world_size() if is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if is_initialized() else 0


def is_main() -> bool:
    """Rank 0 (or the single process): the one that writes files and prints."""
    return rank() == 0


def env_world_size() -> int:
    """WORLD_SIZE as the launcher (torchrun) set it; 1 when absent or malformed."""
    try:
        return max(1, int(os.environ.get("WORLD_SIZE", "1")))
    except ValueError:
        return 1


def active(flag: bool | None = None) -> bool:
    """Whether a caller should run sharded: flag None -> a process group of more than one process is
    initialized; False -> never; True -> required (RuntimeError without a process group)."""
    if flag is None:
        return is_initialized() and world_size() > 1
    if flag and not is_initialized():
        raise RuntimeError("distributed=True but no torch.distributed process group is initialized "
                           "(launch with torchrun, or call torch.distributed.init_process_group first)")
    return bool(flag) and world_size() > 1


def init_from_env(device: str | torch.device = "cpu", timeout_s: float = 1800.0) -> bool:
    """Start the default process group from the launcher's environment when WORLD_SIZE > 1.

    gloo for a CPU device, NCCL for CUDA (each process then uses cuda:LOCAL_RANK). Returns True when a
    group of more than one process is (now) initialized. Idempotent; a no-op for WORLD_SIZE 1."""
    if is_initialized():
        return world_size() > 1
    if env_world_size() <= 1 or not dist.is_available():
        return False
    dev = torch.device(device)
    backend = "nccl" if dev.type == "cuda" else "gloo"
    if dev.type == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend=backend, timeout=timedelta(seconds=timeout_s))
    return world_size() > 1


def local_device(device: str | torch.device) -> torch.device:
    """The device this rank should use: cuda -> cuda:LOCAL_RANK under a process group, else ``device``."""
    dev = torch.device(device)
    if dev.type == "cuda" and is_initialized() and dev.index is None:
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", torch.cuda.current_device())))
    return dev


# ----------------------------------------------------------------------------------------- sharding
def _check_shard_args(n, rank_, world):
    if not (is_int(n) and n >= 0):
        raise ValueError(f"n must be an int >= 0, got {n!r}")
    if not (is_int(world) and world >= 1):
        raise ValueError(f"world size must be an int >= 1, got {world!r}")
    if not (is_int(rank_) and 0 <= rank_ < world):
        raise ValueError(f"rank must be an int in 0..{world - 1}, got {rank_!r}")


def shard_range(n: int, rank_: int | None = None, world: int | None = None) -> tuple[int, int]:
    """[start, stop) of rank's contiguous share of n items: sizes differ by at most one, the first
    ``n % world`` ranks get one more; shares are disjoint and cover 0..n-1 (some may be empty)."""
    rank_ = rank() if rank_ is None else rank_
    world = world_size() if world is None else world
    _check_shard_args(n, rank_, world)
    base, extra = divmod(n, world)
    start = rank_ * base + min(rank_, extra)
    return start, start + base + (1 if rank_ < extra else 0)


def shard_batches(n: int, batch_size: int, rank_: int | None = None, world: int | None = None
                  ) -> tuple[int, int]:
    """[first, stop) global batch indices of rank's share when n items are cut into batches of
    ``batch_size`` (the last may be smaller): whole batches only, so a batch keeps its global index."""
    if not (is_int(batch_size) and batch_size >= 1):
        raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
    return shard_range(-(-n // batch_size), rank_, world)


# ------------------------------------------------------------------------------------ collectives
def barrier() -> None:
    if is_initialized() and world_size() > 1:
        dist.barrier()


def all_gather_object(obj: Any) -> list:
    """Every rank's picklable ``obj`` in rank order (``[obj]`` without a process group)."""
    if not is_initialized() or world_size() == 1:
        return [obj]
    out = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """``obj`` from rank ``src`` on every rank."""
    if not is_initialized() or world_size() == 1:
        return obj
    box = [obj if rank() == src else None]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_reduce_sum(values: Sequence[float], device: str | torch.device = "cpu") -> list[float]:
    """Sum of float64 ``values`` over ranks (the values themselves without a process group)."""
    if not is_initialized() or world_size() == 1:
        return [float(v) for v in values]
    t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return [float(v) for v in t.cpu()]


def all_reduce_tensor(t: torch.Tensor) -> torch.Tensor:
    """In-place sum of ``t`` over ranks (``t`` unchanged without a process group)."""
    if is_initialized() and world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def broadcast_tensors(tensors: Sequence[torch.Tensor], src: int = 0) -> None:
    """Overwrite ``tensors`` in place with rank ``src``'s values (e.g. BatchNorm running statistics)."""
    if is_initialized() and world_size() > 1:
        for t in tensors:
            dist.broadcast(t, src=src)


# ------------------------------------------------------------------------------------------ merging
def merge_indexed(parts: Sequence[tuple[np.ndarray, dict]], n: int, axis: int = -1) -> dict:
    """Merge per-shard (global indices int [k], {name: array with k entries along ``axis``}) by index.

    The indices of all parts together must be exactly 0..n-1, each once: a duplicate, a gap or an index
    outside the range raises ShardError (naming the first offenders). Returns {name: array of n entries
    along ``axis``} in global index order."""
    if not (is_int(n) and n >= 0):
        raise ValueError(f"n must be an int >= 0, got {n!r}")
    parts = list(parts)
    if not parts:
        raise ShardError("merge: no shards")
    idx = np.concatenate([np.asarray(p[0], dtype=np.int64).reshape(-1) for p in parts])
    outside = idx[(idx < 0) | (idx >= n)]
    if outside.size:
        raise ShardError(f"merge: index {int(outside[0])} outside 0..{n - 1} ({outside.size} such)")
    counts = np.bincount(idx, minlength=n)
    if (counts > 1).any():
        dup = np.flatnonzero(counts > 1)
        raise ShardError(f"merge: {dup.size} example(s) in more than one shard, first {dup[:5].tolist()}")
    if (counts == 0).any():
        gap = np.flatnonzero(counts == 0)
        raise ShardError(f"merge: {gap.size} example(s) in no shard, first {gap[:5].tolist()}")
    names = list(parts[0][1])
    for i, (ix, arrays) in enumerate(parts):
        if list(arrays) != names:
            raise ShardError(f"merge: shard {i} has fields {sorted(arrays)}, shard 0 {sorted(names)}")
        for k, a in arrays.items():
            if np.asarray(a).shape[axis] != len(np.asarray(ix).reshape(-1)):
                raise ShardError(f"merge: shard {i} field {k!r} has {np.asarray(a).shape[axis]} entries "
                                 f"along axis {axis} for {len(ix)} indices")
    order = np.argsort(idx, kind="stable")
    return {k: np.take(np.concatenate([np.asarray(p[1][k]) for p in parts], axis=axis), order, axis=axis)
            for k in names}


def gather_indexed(indices, arrays: dict, n: int, axis: int = -1) -> dict:
    """All ranks' (indices, arrays) gathered and merged by global index (see merge_indexed); the same
    merged dict on every rank."""
    local = (np.asarray(indices, dtype=np.int64), {k: np.asarray(v) for k, v in arrays.items()})
    return merge_indexed(all_gather_object(local), n, axis=axis)
