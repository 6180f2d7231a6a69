"""IDX files (MNIST, Fashion-MNIST), raw or gzipped, read with every size checked before reading.

An IDX file is ``0x00 0x00 TT DD``, DD big-endian uint32 dimensions, then exactly
prod(dims) * itemsize(TT) bytes. The header therefore says how many bytes must follow: the reader
checks that count against the dataset's known shape and the byte ceiling *before* it reads or
decompresses the data, then decompresses a gzip stream incrementally into a buffer of exactly that
size and stops with an error as soon as the stream holds more (so a small .gz that inflates to GBs
costs one buffer of the header's size, not GBs).
"""
from __future__ import annotations

import gzip
import os
import struct
import zlib
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from ._common import DataError, byte_limit, check_split, fmt_bytes

IDX_DTYPES = {0x08: np.dtype(np.uint8), 0x09: np.dtype(np.int8), 0x0B: np.dtype(">i2"),
              0x0C: np.dtype(">i4"), 0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}
_IDX_TYPE_NAMES = {0x08: "ubyte", 0x09: "byte", 0x0B: "int16", 0x0C: "int32", 0x0D: "float32", 0x0E: "float64"}

# Known MNIST / Fashion-MNIST shapes. Rows are upper bounds (a subset of the official files is
# accepted, more rows than the official split is not); the image size is exact.
MNIST_IMAGE_SHAPE = (28, 28)
MNIST_ROWS = {"train": 60000, "test": 10000}
MNIST_CLASSES = 10

_CHUNK = 1 << 20  # decompression step (bytes)


def _dims(dims) -> str:
    return str(list(dims)) if len(dims) <= 8 else f"[{', '.join(map(str, dims[:8]))}, ... ({len(dims)} dims)]"


def _read_exact(stream, n: int, path: Path, what: str) -> bytes:
    data = stream.read(n)
    if len(data) != n:
        raise DataError(f"{path}: truncated IDX file: {what} needs {n} bytes, found {len(data)}")
    return data


def _open_stream(f):
    head = f.read(2)
    f.seek(0)
    if head == b"\x1f\x8b":
        return gzip.GzipFile(fileobj=f, mode="rb"), True
    return f, False


def read_idx(path: str | os.PathLike, expect_ndim: int | None = None, *, expect_dtype=None,
             expect_shape: Sequence[int | None] | None = None, max_rows: int | None = None,
             max_bytes: int | None = None,
             header_check: Callable[[tuple[int, ...]], None] | None = None) -> np.ndarray:
    """Read one IDX file (optionally gzipped; detected by its magic bytes, not its name).

    expect_ndim / expect_dtype / expect_shape (None = any size on that axis) / max_rows (first axis)
    are checked against the header before any data is read; so is the byte ceiling (max_bytes,
    default :func:`byte_limit`). header_check(dims) may raise DataError for further header checks.
    Raises DataError naming the file for anything malformed: bad magic, unknown type code, a
    truncated file, trailing bytes, a header claiming more than the ceiling.
    """
    path = Path(path)
    limit = byte_limit(max_bytes)
    try:
        f = open(path, "rb")
    except OSError as e:
        raise DataError(f"{path}: cannot open IDX file ({e.strerror or e})") from None
    with f:
        try:
            stream, gz = _open_stream(f)
            return _read_idx_stream(stream, gz, f, path, limit, expect_ndim, expect_dtype, expect_shape,
                                    max_rows, header_check)
        except (OSError, EOFError, zlib.error) as e:  # gzip.BadGzipFile is an OSError
            kind = "gzip stream" if isinstance(e, (EOFError, zlib.error, gzip.BadGzipFile)) else "file"
            raise DataError(f"{path}: cannot read IDX {kind} ({type(e).__name__}: {e}) - "
                            "file truncated or corrupt") from None


def _read_idx_stream(stream, gz, raw_file, path, limit, expect_ndim, expect_dtype, expect_shape,
                     max_rows, header_check):
    magic = stream.read(4)
    if len(magic) < 4:
        raise DataError(f"{path}: truncated IDX file ({len(magic)} bytes, the magic number needs 4)")
    zero, code, ndim = struct.unpack(">HBB", magic)
    if zero != 0 or code not in IDX_DTYPES or ndim == 0:
        raise DataError(f"{path}: bad IDX magic number 0x{magic.hex()} (expected 0x0000TTDD, "
                        f"TT a type code in {sorted(hex(k) for k in IDX_DTYPES)}, DD >= 1 dims)")
    dtype = IDX_DTYPES[code]
    if expect_ndim is not None and ndim != expect_ndim:
        raise DataError(f"{path}: IDX file has {ndim} dims, expected {expect_ndim}")
    if expect_dtype is not None and dtype != np.dtype(expect_dtype):
        want = next((f"0x{k:02x} ({_IDX_TYPE_NAMES[k]})" for k, v in IDX_DTYPES.items()
                     if v == np.dtype(expect_dtype)), str(np.dtype(expect_dtype)))
        raise DataError(f"{path}: IDX type code 0x{code:02x} ({_IDX_TYPE_NAMES[code]}), expected {want}")
    dims = struct.unpack(f">{ndim}I", _read_exact(stream, 4 * ndim, path, f"the header of {ndim} dims"))
    if expect_shape is not None:
        if len(expect_shape) != ndim or any(e is not None and e != d for e, d in zip(expect_shape, dims)):
            want = "x".join("N" if e is None else str(e) for e in expect_shape)
            raise DataError(f"{path}: IDX dims {_dims(dims)}, expected {want}")
    if max_rows is not None and dims[0] > max_rows:
        raise DataError(f"{path}: IDX header claims {dims[0]} rows, expected at most {max_rows}")
    need = dtype.itemsize
    for d in dims:  # Python ints: no overflow, however absurd the header
        need *= d
    if need > limit:
        raise DataError(f"{path}: IDX header dims {_dims(dims)} claim {fmt_bytes(need)} of data, more than "
                        f"the {fmt_bytes(limit)} ceiling (set $BITKERN_DATA_MAX_BYTES to raise it)")
    if header_check is not None:
        header_check(dims)
    header = 4 + 4 * ndim
    if not gz:  # the file size says it all: no read needed to spot truncation or trailing bytes
        have = os.fstat(raw_file.fileno()).st_size - header
        if have != need:
            raise DataError(f"{path}: IDX data size {have} bytes does not match dims {_dims(dims)} "
                            f"({need} bytes expected) - "
                            f"{'file truncated' if have < need else 'trailing bytes after the data'}")
    try:
        buf = np.empty(need, dtype=np.uint8)
    except MemoryError:
        raise DataError(f"{path}: not enough memory for the {fmt_bytes(need)} its header claims") from None
    view = memoryview(buf)
    got = 0
    while got < need:
        n = stream.readinto(view[got:got + _CHUNK])
        if not n:
            raise DataError(f"{path}: truncated IDX file: dims {_dims(dims)} need {need} data bytes, "
                            f"the {'gzip stream' if gz else 'file'} ends after {got}")
        got += n
    if stream.read(1):
        raise DataError(f"{path}: IDX {'gzip stream' if gz else 'file'} has more data than its header's "
                        f"dims {_dims(dims)} allow ({need} bytes expected) - trailing bytes or a "
                        "decompression bomb")
    return buf.view(dtype).reshape(dims)


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


def load_idx_pair(root: Path, split: str, key: str, max_bytes: int | None = None):
    prefix = "train" if split == "train" else "t10k"
    ipath = _find_file(root, f"{prefix}-images-idx3-ubyte")
    lpath = _find_file(root, f"{prefix}-labels-idx1-ubyte")
    rows = MNIST_ROWS[split]
    labels = read_idx(lpath, expect_ndim=1, expect_dtype=np.uint8, max_rows=rows, max_bytes=max_bytes)

    def same_count(dims):
        if dims[0] != labels.shape[0]:
            raise DataError(f"{ipath}: {dims[0]} images but {lpath} has {labels.shape[0]} labels")

    images = read_idx(ipath, expect_ndim=3, expect_dtype=np.uint8, expect_shape=(None, *MNIST_IMAGE_SHAPE),
                      max_rows=rows, max_bytes=max_bytes, header_check=same_count)
    labels = labels.astype(np.int64)
    check_split(lpath, labels, MNIST_CLASSES, split=split)
    x = torch.from_numpy(images.astype(np.float32) / 255.0).unsqueeze(1)
    return x.contiguous(), torch.from_numpy(labels)
