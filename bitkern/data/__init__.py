"""Datasets as in-memory tensors: ``load_dataset(name, data_dir, split) -> (x, y)``.

x is float32 [n, C, H, W] in [0, 1], y is int64 [n]. Nothing is downloaded: digits ships with
scikit-learn, the others are read from files the user already has. Every reader is bounded and
defensive (one module per format):

* :mod:`.idx` (MNIST, Fashion-MNIST; raw or .gz): magic, type code and dims checked before any data
  is read; the header fixes the exact data size, and a gzip stream is decompressed incrementally and
  refused as soon as it holds more (no gzip bomb inflates past the header's size).
* :mod:`.cifar` (CIFAR-10/100 python batches, Python 2 cPickle or Python 3 pickles, protocols 2-5):
  the opcode stream is scanned first, then a restricted unpickler that only knows checking stand-ins
  for the numpy globals an array pickle needs; every array's size is checked before numpy allocates.
* :mod:`.imagefolder`: a pixel ceiling checked on each header before PIL decodes; decompression
  bombs, truncated and unreadable images are refused naming the file.

Limits (see :mod:`._common`): MAX_DATA_BYTES (2 GiB; per call ``max_bytes=`` or the
BITKERN_DATA_MAX_BYTES environment variable) caps what one file may decompress/unpickle and what one
image-folder tensor may allocate; MAX_IMAGE_PIXELS (8192*8192) caps one image. Known shapes are
enforced: MNIST/Fashion-MNIST 28x28 with at most 60000/10000 rows, CIFAR rows of 3072 bytes with at
most 10000 rows per batch (CIFAR-100: 50000 train). Each split must be non-empty, have as many
labels as images, labels in range and, where the dataset defines its classes, every class present.
Everything malformed raises :class:`DataError` (a ValueError) whose message names the file.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

from ._common import (MAX_DATA_BYTES, MAX_DATA_BYTES_ENV, MAX_IMAGE_PIXELS, DataError, balanced_subset,
                      byte_limit, check_split)
from .cifar import (CIFAR10_BATCH_ROWS, CIFAR100_ROWS, CIFAR_ROW_BYTES, RestrictedUnpickler,
                    read_cifar_batch)
from .digits import DIGITS_SEED, DIGITS_TEST_FRACTION
from .idx import MNIST_IMAGE_SHAPE, MNIST_ROWS, read_idx
from .imagefolder import IMAGE_EXTENSIONS, decode_image, imagefolder_classes

__all__ = [
    "DATASETS",
    "DataError",
    "load_dataset",
    "balanced_subset",
    "dataset_info",
    "canonical_name",
    "read_idx",
    "read_cifar_batch",
    "RestrictedUnpickler",
    "DEFAULT_DATA_DIRS",
    "imagefolder_classes",
    "decode_image",
    "byte_limit",
    "check_split",
    "MAX_DATA_BYTES",
    "MAX_DATA_BYTES_ENV",
    "MAX_IMAGE_PIXELS",
    "MNIST_IMAGE_SHAPE",
    "MNIST_ROWS",
    "CIFAR_ROW_BYTES",
    "CIFAR10_BATCH_ROWS",
    "CIFAR100_ROWS",
    "IMAGE_EXTENSIONS",
    "DIGITS_SEED",
    "DIGITS_TEST_FRACTION",
]

DATASETS = ("digits", "mnist", "fashion-mnist", "cifar10", "cifar100", "imagefolder")
_ALIASES = {"fashion_mnist": "fashion-mnist", "fashionmnist": "fashion-mnist", "cifar-10": "cifar10",
            "cifar-100": "cifar100", "image-folder": "imagefolder", "folder": "imagefolder"}

# Where distributions put the datasets (Debian: apt-get install dataset-fashion-mnist).
DEFAULT_DATA_DIRS = {"fashion-mnist": ("/usr/share/datasets/fashion-mnist",)}

# (channels, height, width, classes)
_INFO = {"digits": (1, 8, 8, 10), "mnist": (1, 28, 28, 10), "fashion-mnist": (1, 28, 28, 10),
         "cifar10": (3, 32, 32, 10), "cifar100": (3, 32, 32, 100)}


def canonical_name(name: str) -> str:
    if not isinstance(name, str):
        raise TypeError(f"dataset name must be a str, got {type(name).__name__}")
    key = name.strip().lower()
    key = _ALIASES.get(key, key)
    if key not in DATASETS:
        raise DataError(f"unknown dataset {name!r}; expected one of {', '.join(DATASETS)}")
    return key


def dataset_info(name: str) -> dict:
    """Static facts about a named dataset: channels, height, width, classes (None for imagefolder)."""
    key = canonical_name(name)
    if key == "imagefolder":
        return {"name": key, "channels": 3, "height": None, "width": None, "num_classes": None}
    c, h, w, k = _INFO[key]
    return {"name": key, "channels": c, "height": h, "width": w, "num_classes": k}


def load_dataset(name: str = "digits", data_dir: str | os.PathLike | None = None, split: str = "train",
                 *, image_size: int = 32, max_bytes: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Load a dataset split as tensors (x float32 [n, C, H, W] in [0, 1], y int64 [n]).

    name: digits (default, scikit-learn's bundled 8x8 digits, stratified 80/20 split with seed 0),
    mnist, fashion-mnist (IDX files, gzipped or not), cifar10, cifar100 (python batches),
    imagefolder (root/<class>/*.png|jpg, or root/{train,test|val}/<class>/..., resized to
    image_size x image_size RGB). max_bytes: the decompression/allocation ceiling (default
    $BITKERN_DATA_MAX_BYTES or MAX_DATA_BYTES). Raises DataError naming the file for anything
    missing or malformed.
    """
    key = canonical_name(name)
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    byte_limit(max_bytes)  # validate early (argument or environment variable)
    if key == "digits":
        from .digits import load_digits_split
        return load_digits_split(split)
    root = _resolve_dir(key, data_dir)
    if key in ("mnist", "fashion-mnist"):
        from .idx import load_idx_pair
        return load_idx_pair(root, split, key, max_bytes)
    if key == "cifar10":
        from .cifar import load_cifar10
        return load_cifar10(root, split, max_bytes)
    if key == "cifar100":
        from .cifar import load_cifar100
        return load_cifar100(root, split, max_bytes)
    from .imagefolder import load_imagefolder
    return load_imagefolder(root, split, image_size, max_bytes)


def _resolve_dir(key: str, data_dir) -> Path:
    if data_dir is None:
        for cand in DEFAULT_DATA_DIRS.get(key, ()):
            if Path(cand).is_dir():
                return Path(cand)
        hint = (" (or apt-get install dataset-fashion-mnist, which installs it to "
                "/usr/share/datasets/fashion-mnist)" if key == "fashion-mnist" else "")
        raise DataError(f"dataset {key!r} needs a data directory: pass data_dir / --data-dir{hint}")
    root = Path(data_dir).expanduser()
    if not root.is_dir():
        raise DataError(f"data directory for {key!r} does not exist or is not a directory: {root}")
    return root
