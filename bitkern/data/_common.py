"""Shared pieces of the dataset readers: the error type, the size limits and the split checks."""
from __future__ import annotations

import os

import numpy as np

from .._checks import int_in

# Ceiling on the bytes any one reader may decompress, unpickle or allocate for a dataset (one IDX
# file, one CIFAR batch file, one image-folder tensor). The largest real file bitkern reads is the
# CIFAR-100 train batch (~155 MB unpickled) and the largest tensor the float32 copy of MNIST train
# (~188 MB), so 2 GiB leaves ample room while refusing anything that would exhaust a laptop.
# Override per call (``max_bytes=``) or per process with the BITKERN_DATA_MAX_BYTES environment
# variable (a plain byte count, e.g. 8589934592 for a large image folder).
MAX_DATA_BYTES = 2 << 30
MAX_DATA_BYTES_ENV = "BITKERN_DATA_MAX_BYTES"

# Ceiling on the pixels of one image in an image folder, checked against the header before PIL
# decodes it (PIL's own default warns above ~89 M pixels; 8192 x 8192 = 64 M pixels is already a
# 200 MB RGB buffer for an image that is then resized to 32 x 32).
MAX_IMAGE_PIXELS = 8192 * 8192


class DataError(ValueError):
    """A dataset could not be found or a file in it is malformed (the message names the file)."""


def byte_limit(max_bytes: int | None = None) -> int:
    """The decompression/allocation ceiling in bytes: the argument, else $BITKERN_DATA_MAX_BYTES,
    else MAX_DATA_BYTES."""
    if max_bytes is None:
        env = os.environ.get(MAX_DATA_BYTES_ENV, "").strip()
        if not env:
            return MAX_DATA_BYTES
        try:
            max_bytes = int(env.replace("_", ""))
        except ValueError:
            raise DataError(f"${MAX_DATA_BYTES_ENV}={env!r}: expected a positive byte count") from None
    if not int_in(max_bytes, 1):
        raise DataError(f"max_bytes must be a positive int (bytes), got {max_bytes!r}")
    return max_bytes


def fmt_bytes(n: int) -> str:
    if n >= 1 << 70:  # an absurd header: no float, no 400-digit number in the message
        return f"about 2^{n.bit_length() - 1} bytes"
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= size:
            return f"{n} bytes ({n / size:.1f} {unit})"
    return f"{n} bytes"


def check_split(where, labels: np.ndarray, num_classes: int | None, *, split: str,
                require_all_classes: bool = True, class_names=None) -> None:
    """One split's labels: non-empty, int, in 0..num_classes-1 and (when the dataset defines its
    classes) every class present. ``where`` names the file or directory in the message."""
    n = int(labels.shape[0])
    if n == 0:
        raise DataError(f"{where}: the {split} split is empty (0 examples; expected at least one per class)")
    if num_classes is None:
        return
    lo, hi = int(labels.min()), int(labels.max())
    if lo < 0 or hi >= num_classes:
        bad = lo if lo < 0 else hi
        raise DataError(f"{where}: label {bad} out of range (expected 0..{num_classes - 1})")
    if require_all_classes:
        counts = np.bincount(labels, minlength=num_classes)
        missing = np.flatnonzero(counts == 0)
        if missing.size:
            names = [class_names[i] if class_names else int(i) for i in missing[:10]]
            more = f" and {missing.size - 10} more" if missing.size > 10 else ""
            raise DataError(f"{where}: the {split} split has no examples of class(es) "
                            f"{', '.join(map(str, names))}{more} (expected all {num_classes} classes)")


def balanced_subset(y, n: int):
    """Indices (int64, ascending) of a fixed class-balanced subset of ``n`` examples with labels ``y``:
    the first ``n // C`` examples of every class in file order, and one more for the first ``n % C``
    classes (C: the classes present). Independent of any seed, so every run of a study trains on the same
    examples. ValueError if a class has too few examples or n exceeds len(y)."""
    import torch

    y = torch.as_tensor(y)
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise ValueError(f"subset size must be an integer >= 1, got {n!r}")
    if n > y.numel():
        raise ValueError(f"subset of {n} examples requested but the split has only {y.numel()}")
    classes = torch.unique(y).tolist()
    per, extra = divmod(n, len(classes))
    picked = []
    for i, c in enumerate(classes):
        want = per + (1 if i < extra else 0)
        idx = torch.nonzero(y == c).flatten()[:want]
        if idx.numel() < want:
            raise ValueError(f"class {c} has {idx.numel()} examples, fewer than the {want} a balanced subset "
                             f"of {n} needs")
        picked.append(idx)
    return torch.sort(torch.cat(picked)).values
