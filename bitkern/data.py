"""Datasets as in-memory tensors: ``load_dataset(name, data_dir, split) -> (x, y)``.

x is float32 [n, C, H, W] in [0, 1], y is int64 [n]. Nothing is downloaded: digits ships with
scikit-learn, the others are read from files the user already has. Files are parsed defensively
(magic numbers, sizes) and CIFAR pickles go through an unpickler that only knows the three numpy
globals a CIFAR batch needs, so a hostile pickle cannot run code.
"""
from __future__ import annotations

import gzip
import os
import pickle
import struct
from pathlib import Path

import numpy as np
import torch

__all__ = [
    "DATASETS",
    "DataError",
    "load_dataset",
    "dataset_info",
    "read_idx",
    "read_cifar_batch",
    "RestrictedUnpickler",
    "DEFAULT_DATA_DIRS",
]

DATASETS = ("digits", "mnist", "fashion-mnist", "cifar10", "cifar100", "imagefolder")
_ALIASES = {"fashion_mnist": "fashion-mnist", "fashionmnist": "fashion-mnist", "cifar-10": "cifar10",
            "cifar-100": "cifar100", "image-folder": "imagefolder", "folder": "imagefolder"}

# Where distributions put the datasets (Debian: apt-get install dataset-fashion-mnist).
DEFAULT_DATA_DIRS = {"fashion-mnist": ("/usr/share/datasets/fashion-mnist",)}

# (channels, height, width, classes)
_INFO = {"digits": (1, 8, 8, 10), "mnist": (1, 28, 28, 10), "fashion-mnist": (1, 28, 28, 10),
         "cifar10": (3, 32, 32, 10), "cifar100": (3, 32, 32, 100)}

DIGITS_SEED = 0          # fixed seed of the stratified 80/20 digits split
DIGITS_TEST_FRACTION = 0.2


class DataError(ValueError):
    """A dataset could not be found or a file in it is malformed (the message names the file)."""


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
                 *, image_size: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """Load a dataset split as tensors (x float32 [n, C, H, W] in [0, 1], y int64 [n]).

    name: digits (default, scikit-learn's bundled 8x8 digits, stratified 80/20 split with seed 0),
    mnist, fashion-mnist (IDX files, gzipped or not), cifar10, cifar100 (python batches),
    imagefolder (root/<class>/*.png|jpg, or root/{train,test|val}/<class>/..., resized to
    image_size x image_size RGB).
    """
    key = canonical_name(name)
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    if key == "digits":
        return _load_digits(split)
    root = _resolve_dir(key, data_dir)
    if key in ("mnist", "fashion-mnist"):
        return _load_idx_pair(root, split, key)
    if key == "cifar10":
        return _load_cifar10(root, split)
    if key == "cifar100":
        return _load_cifar100(root, split)
    return _load_imagefolder(root, split, image_size)


# ----------------------------------------------------------------------------------------- digits
def _load_digits(split: str):
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    bunch = load_digits()
    x = bunch.images.astype(np.float32) / 16.0
    y = bunch.target.astype(np.int64)
    idx = np.arange(len(y))
    tr, te = train_test_split(idx, test_size=DIGITS_TEST_FRACTION, stratify=y, random_state=DIGITS_SEED)
    sel = np.sort(tr if split == "train" else te)
    return torch.from_numpy(np.ascontiguousarray(x[sel, None])), torch.from_numpy(y[sel])


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


# -------------------------------------------------------------------------------------------- IDX
_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: np.dtype(">i2"), 0x0C: np.dtype(">i4"),
               0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}


def read_idx(path: str | os.PathLike, expect_ndim: int | None = None) -> np.ndarray:
    """Read one IDX file (optionally .gz): magic 0x0000 TT DD, DD big-endian uint32 dims, data."""
    path = Path(path)
    try:
        raw = path.read_bytes()
        if raw[:2] == b"\x1f\x8b":
            raw = gzip.decompress(raw)
    except (OSError, EOFError, gzip.BadGzipFile) as e:
        raise DataError(f"{path}: cannot read IDX file ({e})") from None
    if len(raw) < 4:
        raise DataError(f"{path}: truncated IDX file ({len(raw)} bytes, header needs 4)")
    zero, dtype_code, ndim = struct.unpack(">HBB", raw[:4])
    if zero != 0 or dtype_code not in _IDX_DTYPES or ndim == 0:
        raise DataError(f"{path}: bad IDX magic number 0x{raw[:4].hex()} (expected 0x0000TTDD, "
                        f"TT a type code in {sorted(hex(k) for k in _IDX_DTYPES)}, DD >= 1 dims)")
    if expect_ndim is not None and ndim != expect_ndim:
        raise DataError(f"{path}: IDX file has {ndim} dims, expected {expect_ndim}")
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"{path}: truncated IDX header ({len(raw)} bytes, need {header})")
    dims = struct.unpack(f">{ndim}I", raw[4:header])
    dtype = np.dtype(_IDX_DTYPES[dtype_code])
    need = int(np.prod(dims, dtype=np.int64)) * dtype.itemsize
    have = len(raw) - header
    if have != need:
        raise DataError(f"{path}: IDX data size {have} bytes does not match dims {list(dims)} "
                        f"({need} bytes expected){' - file truncated' if have < need else ''}")
    return np.frombuffer(raw, dtype=dtype, offset=header).reshape(dims)


def _find_file(root: Path, stem: str) -> Path:
    names = (stem, stem + ".gz")
    for d in (root, root / "raw"):
        for n in names:
            if (d / n).is_file():
                return d / n
    for n in names:  # e.g. root/FashionMNIST/raw/<file>
        hits = sorted(root.glob(f"*/{n}")) + sorted(root.glob(f"*/*/{n}"))
        if hits:
            return hits[0]
    raise DataError(f"{root}: missing {stem}[.gz]")


def _load_idx_pair(root: Path, split: str, key: str):
    prefix = "train" if split == "train" else "t10k"
    ipath = _find_file(root, f"{prefix}-images-idx3-ubyte")
    lpath = _find_file(root, f"{prefix}-labels-idx1-ubyte")
    images = read_idx(ipath, expect_ndim=3)
    labels = read_idx(lpath, expect_ndim=1)
    if images.dtype != np.uint8 or labels.dtype != np.uint8:
        raise DataError(f"{ipath}: expected unsigned-byte IDX images and labels for {key}")
    if images.shape[0] != labels.shape[0]:
        raise DataError(f"{ipath}: {images.shape[0]} images but {lpath} has {labels.shape[0]} labels")
    if labels.size and labels.max() > 9:
        raise DataError(f"{lpath}: label {int(labels.max())} out of range 0..9")
    x = torch.from_numpy(images.astype(np.float32) / 255.0).unsqueeze(1)
    return x.contiguous(), torch.from_numpy(labels.astype(np.int64))


# ------------------------------------------------------------------------------------ CIFAR pickle
def _numpy_reconstruct():
    try:
        from numpy._core.multiarray import _reconstruct  # numpy >= 2
    except ImportError:  # pragma: no cover - numpy 1.x
        from numpy.core.multiarray import _reconstruct
    return _reconstruct


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickler for CIFAR batches: dicts, lists, bytes, str, ints and numpy arrays only.

    find_class is the only way a pickle reaches code; it resolves exactly the numpy globals needed to
    rebuild an ndarray and refuses everything else (os.system, builtins.eval, ...).
    """

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
    }

    def find_class(self, module, name):
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load global {module}.{name} "
                                         "(only numpy array reconstruction is allowed)")
        if name == "_reconstruct":
            return _numpy_reconstruct()
        return np.ndarray if name == "ndarray" else np.dtype


def read_cifar_batch(path: str | os.PathLike) -> dict:
    """Read one CIFAR python batch with the restricted unpickler; keys are decoded to str."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"missing CIFAR batch file {path}")
    try:
        with open(path, "rb") as f:
            obj = RestrictedUnpickler(f, encoding="bytes").load()
    except pickle.UnpicklingError as e:
        raise DataError(f"{path}: unsafe or malformed pickle ({e})") from None
    except (EOFError, ValueError, TypeError, struct.error, IndexError, KeyError, AttributeError) as e:
        raise DataError(f"{path}: malformed or truncated CIFAR batch ({type(e).__name__}: {e})") from None
    if not isinstance(obj, dict):
        raise DataError(f"{path}: expected a dict in the CIFAR batch, got {type(obj).__name__}")
    return {(k.decode("latin1") if isinstance(k, bytes) else k): v for k, v in obj.items()}


def _cifar_arrays(path: Path, label_key: str, num_classes: int):
    d = read_cifar_batch(path)
    if "data" not in d or label_key not in d:
        raise DataError(f"{path}: CIFAR batch lacks 'data' or {label_key!r} (keys: {sorted(d)})")
    data, labels = d["data"], d[label_key]
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        shape = getattr(data, "shape", None)
        raise DataError(f"{path}: 'data' must be uint8 [n, 3072], got {type(data).__name__} {shape}")
    labels = np.asarray(labels, dtype=np.int64).reshape(-1)
    if labels.shape[0] != data.shape[0]:
        raise DataError(f"{path}: {data.shape[0]} images but {labels.shape[0]} labels")
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise DataError(f"{path}: labels outside 0..{num_classes - 1}")
    return data.reshape(-1, 3, 32, 32), labels


def _cifar_tensors(parts):
    data = np.concatenate([p[0] for p in parts])
    labels = np.concatenate([p[1] for p in parts])
    return torch.from_numpy(data.astype(np.float32) / 255.0), torch.from_numpy(labels)


def _sub(root: Path, name: str) -> Path:
    return root / name if (root / name).is_dir() else root


def _load_cifar10(root: Path, split: str):
    d = _sub(root, "cifar-10-batches-py")
    files = [d / f"data_batch_{i}" for i in range(1, 6)] if split == "train" else [d / "test_batch"]
    return _cifar_tensors([_cifar_arrays(f, "labels", 10) for f in files])


def _load_cifar100(root: Path, split: str):
    d = _sub(root, "cifar-100-python")
    return _cifar_tensors([_cifar_arrays(d / split, "fine_labels", 100)])


# ------------------------------------------------------------------------------------ image folder
_IMAGE_EXT = {".png", ".jpg", ".jpeg", ".bmp", ".ppm", ".webp"}


def _class_dirs(root: Path) -> list[Path]:
    return sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))


def _load_imagefolder(root: Path, split: str, image_size: int):
    from PIL import Image, UnidentifiedImageError

    if not isinstance(image_size, int) or image_size < 1:
        raise ValueError(f"image_size must be a positive int, got {image_size!r}")
    names = ("train",) if split == "train" else ("test", "val")
    split_root = next((root / n for n in names if (root / n).is_dir()), None)
    base = split_root or root
    classes = _class_dirs(base)
    if not classes:
        raise DataError(f"{base}: no class sub-directories (expected root/<class>/*.png|jpg)")
    files, labels = [], []
    for label, cdir in enumerate(classes):
        for f in sorted(cdir.iterdir()):
            if f.suffix.lower() in _IMAGE_EXT and f.is_file():
                files.append(f)
                labels.append(label)
    if not files:
        raise DataError(f"{base}: no image files (*.png, *.jpg, ...) in the class directories")
    labels = np.asarray(labels, dtype=np.int64)
    if split_root is None:  # one folder for both splits: deterministic stratified 80/20 split
        rng = np.random.default_rng(DIGITS_SEED)
        keep = []
        for c in range(len(classes)):
            idx = np.flatnonzero(labels == c)
            idx = idx[rng.permutation(len(idx))]
            n_test = int(round(len(idx) * DIGITS_TEST_FRACTION))
            keep.extend(idx[n_test:] if split == "train" else idx[:n_test])
        keep = np.sort(np.asarray(keep, dtype=np.int64))
        files, labels = [files[i] for i in keep], labels[keep]
    x = np.empty((len(files), 3, image_size, image_size), dtype=np.float32)
    for i, f in enumerate(files):
        try:
            with Image.open(f) as im:
                im = im.convert("RGB").resize((image_size, image_size), Image.BILINEAR)
                x[i] = np.asarray(im, dtype=np.float32).transpose(2, 0, 1) / 255.0
        except (UnidentifiedImageError, OSError, ValueError) as e:
            raise DataError(f"{f}: cannot decode image ({e})") from None
    return torch.from_numpy(x), torch.from_numpy(labels)


def imagefolder_classes(data_dir: str | os.PathLike) -> list[str]:
    """Class names of an image folder dataset, in label order."""
    root = Path(data_dir)
    base = root / "train" if (root / "train").is_dir() else root
    return [p.name for p in _class_dirs(base)]
