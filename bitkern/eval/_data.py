"""Batches from a torch Dataset or an (x, y) tensor pair, validated; ``tensor_pair`` for the callers
(training, clean accuracy) that need the whole pair as tensors."""
from __future__ import annotations

import torch
from torch.utils.data import DataLoader, Dataset, Subset

from ..attacks._validate import check_inputs


def tensor_pair(data, what: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(x float [n, C, H, W], y int64 [n]) from an (x, y) pair or a TensorDataset; ValueError/TypeError
    naming ``what`` otherwise."""
    if isinstance(data, (tuple, list)) and len(data) == 2:
        x, y = data
    elif hasattr(data, "tensors") and len(data.tensors) == 2:  # TensorDataset
        x, y = data.tensors
    else:
        raise TypeError(f"{what} must be an (x, y) tensor pair or a TensorDataset, got {type(data).__name__}")
    if not isinstance(x, torch.Tensor) or x.dim() != 4 or not x.is_floating_point():
        raise ValueError(f"{what}: x must be a float tensor [n, C, H, W], got "
                         f"{getattr(x, 'dtype', type(x).__name__)} {tuple(getattr(x, 'shape', ()))}")
    if not isinstance(y, torch.Tensor) or y.dim() != 1 or y.shape[0] != x.shape[0]:
        raise ValueError(f"{what}: y must be an int64 tensor [n] matching x ({x.shape[0]}), got "
                         f"{tuple(getattr(y, 'shape', ()))}")
    if x.shape[0] == 0:
        raise ValueError(f"{what} is empty")
    return x, y.long()


def data_size(data) -> int:
    if _is_pair(data):
        return int(data[0].shape[0])
    if isinstance(data, torch.Tensor):
        raise TypeError(f"data must be a torch Dataset or an (x, y) tensor pair, got a bare tensor of shape "
                        f"{tuple(data.shape)} (labels missing)")
    if isinstance(data, Dataset) or (hasattr(data, "__len__") and hasattr(data, "__getitem__")):
        return len(data)
    raise TypeError(f"data must be a torch Dataset or an (x, y) tensor pair, got {type(data).__name__}")


def _is_pair(data) -> bool:
    return (isinstance(data, (tuple, list)) and len(data) == 2
            and all(isinstance(t, torch.Tensor) for t in data))


def iter_batches(data, batch_size: int, device):
    """Yield validated (x [b, ...] float in [0, 1], y int64 [b]) on ``device``."""
    n = data_size(data)
    if n == 0:
        raise ValueError("data is empty: nothing to evaluate")
    if _is_pair(data):
        x, y = data
        if y.shape[:1] != x.shape[:1]:
            raise ValueError(f"data: x has {x.shape[0]} examples but y has shape {tuple(y.shape)}")
        batches = ((x[i:i + batch_size], y[i:i + batch_size]) for i in range(0, n, batch_size))
    else:
        batches = iter(DataLoader(data, batch_size=batch_size, shuffle=False))
    for batch in batches:
        if not isinstance(batch, (tuple, list)) or len(batch) < 2:
            raise ValueError("data: every item must be an (image, label) pair")
        xb, yb = batch[0], batch[1]
        if not isinstance(yb, torch.Tensor):
            yb = torch.as_tensor(yb)
        xb, yb = check_inputs(xb, yb, "data images", "data labels")
        yield xb.to(device), yb.to(device)


def take(data, indices, device):
    """Validated (x, y) of the examples at ``indices`` (in that order) on ``device``."""
    indices = [int(i) for i in indices]
    if _is_pair(data):
        idx = torch.as_tensor(indices, dtype=torch.long)
        xb, yb = data[0][idx], data[1][idx]
    else:
        items = [data[i] for i in indices]
        xb = torch.stack([torch.as_tensor(item[0]) for item in items])
        yb = torch.as_tensor([int(item[1]) for item in items])
    xb, yb = check_inputs(xb, yb, "data images", "data labels")
    return xb.to(device), yb.to(device)


def num_batches(data, batch_size: int) -> int:
    return -(-data_size(data) // batch_size)


def subset(data, start: int, stop: int):
    """Examples start..stop-1 of data (an (x, y) tensor pair or a Dataset), in order (a shard)."""
    if _is_pair(data):
        return data[0][start:stop], data[1][start:stop]
    return Subset(data, range(start, stop))
