"""CIFAR-10 / CIFAR-100 python batches, read with a restricted, size-checked unpickler.

The official files are Python 2 ``cPickle`` protocol 2 dicts with bytes keys (b'data', b'labels' or
b'fine_labels', ...) whose b'data' is a numpy array pickled by Python 2 numpy:
``numpy.core.multiarray._reconstruct(numpy.ndarray, (0,), 'b')`` followed by BUILD with the state
``(1, shape, numpy.dtype('u1', 0, 1), is_fortran, raw_bytes)``. Python 3 pickles of protocols 2-5 of
the same content add ``_codecs.encode`` and ``bytes()`` (bytes under protocol 2), ``numpy._core`` module names
(numpy 2) and ``numpy._core.numeric._frombuffer`` (protocol 5).

Safety: the file size is checked against the byte ceiling, the opcode stream is scanned
(pickletools) before anything is built, so that no length prefix can promise more bytes than the
file holds (CPython's unpickler would otherwise allocate the promised size up front); then the
unpickler resolves only the globals above, each replaced by a checking stand-in: dtypes are plain
bool/int/float codes, every array's shape x itemsize is compared with the bytes actually present
in the pickle (and the ceiling) before numpy allocates anything, and nothing else is callable - a
pickle asking for os.system or builtins.eval is refused before the call is made.
"""
from __future__ import annotations

import io
import os
import pickle
import pickletools
import struct
from pathlib import Path

import numpy as np
import torch

from .._checks import is_int
from ._common import DataError, byte_limit, check_split, fmt_bytes

CIFAR_ROW_BYTES = 3 * 32 * 32
# Rows per file in the official datasets; upper bounds (subsets accepted, more rows refused).
CIFAR10_BATCH_ROWS = 10000
CIFAR100_ROWS = {"train": 50000, "test": 10000}

_MAX_NDIM = 32
_SAFE_DTYPE_CODES = frozenset({"b1", "i1", "u1", "i2", "u2", "i4", "u4", "i8", "u8", "f2", "f4", "f8"})
# ndarray.__reduce__ passes the 1-char typecode 'b' to _reconstruct (the shape there is (0,))
_SAFE_TYPECODES = frozenset({"b", "B", "?", "h", "H", "i", "I", "l", "L", "q", "Q", "e", "f", "d"})
_BYTE_ORDERS = frozenset({"<", ">", "|", "="})

try:  # numpy >= 2
    from numpy._core.multiarray import _reconstruct as _np_reconstruct
except ImportError:  # pragma: no cover - numpy 1.x
    from numpy.core.multiarray import _reconstruct as _np_reconstruct


def _str(x, what: str) -> str:
    if isinstance(x, bytes):  # Python 2 str unpickled with encoding='bytes'
        return x.decode("latin1")
    if isinstance(x, str):
        return x
    raise pickle.UnpicklingError(f"{what} must be a string, got {type(x).__name__}")


def _int(x, what: str) -> int:
    if not is_int(x):
        raise pickle.UnpicklingError(f"{what} must be an int, got {type(x).__name__}")
    return int(x)


class _DtypeSpec:
    """Stand-in for ``numpy.dtype(code, align, copy)`` in a pickle: a plain numeric code only; its
    BUILD state may only set the byte order. Turned into a real dtype by :meth:`dtype`."""

    __slots__ = ("code", "byteorder")

    def __init__(self, code, align=False, copy=False):
        code = _str(code, "dtype code")
        if code not in _SAFE_DTYPE_CODES:
            raise pickle.UnpicklingError(f"refusing dtype {code!r} (only bool/int/float arrays are allowed)")
        self.code = code
        self.byteorder = "|" if code in ("b1", "i1", "u1") else "="

    def __setstate__(self, state):
        # numpy's dtype state: (version, byteorder, subarray, names, fields, elsize, alignment, flags[, metadata])
        if not isinstance(state, tuple) or len(state) not in (8, 9) or state[0] not in (3, 4):
            raise pickle.UnpicklingError("malformed numpy dtype state")
        order = _str(state[1], "dtype byte order")
        if order not in _BYTE_ORDERS or any(s is not None for s in state[2:5]) or state[5:7] != (-1, -1) \
                or (len(state) == 9 and state[8] is not None):
            raise pickle.UnpicklingError("refusing a structured, sub-array or sized numpy dtype state")
        _int(state[7], "dtype flags")
        self.byteorder = order

    def dtype(self) -> np.dtype:
        return np.dtype(self.code).newbyteorder(self.byteorder) if self.byteorder in "<>" else np.dtype(self.code)


def _as_dtype(d) -> np.dtype:
    if isinstance(d, _DtypeSpec):
        return d.dtype()
    raise pickle.UnpicklingError(f"expected a numpy dtype in the array state, got {type(d).__name__}")


def _shape(shape, what: str) -> tuple[int, ...]:
    if isinstance(shape, (int, np.integer)) and not isinstance(shape, bool):
        shape = (shape,)
    if not isinstance(shape, (tuple, list)) or len(shape) > _MAX_NDIM:
        raise pickle.UnpicklingError(f"{what} must be a tuple of at most {_MAX_NDIM} ints")
    dims = tuple(_int(d, f"{what} entry") for d in shape)
    if any(d < 0 for d in dims):
        raise pickle.UnpicklingError(f"{what} {dims} has a negative dimension")
    return dims


def _nbytes(dims, itemsize: int) -> int:
    n = itemsize
    for d in dims:  # Python ints: exact, no overflow
        n *= d
    return n


def _raw(data, what: str) -> bytes | bytearray:
    if isinstance(data, str):  # Python 2 str unpickled with encoding='latin1'
        return data.encode("latin1")
    if isinstance(data, (bytes, bytearray)):
        return data
    if isinstance(data, pickle.PickleBuffer):
        return bytes(data)
    raise pickle.UnpicklingError(f"{what} must be bytes, got {type(data).__name__} (object arrays are refused)")


class _GuardedArray(np.ndarray):
    """What the restricted ``_reconstruct`` returns: its ``__setstate__`` (BUILD) checks the state's
    shape and dtype against the raw bytes actually present, and the ceiling, before numpy allocates."""

    def __setstate__(self, state):
        if not isinstance(state, tuple) or len(state) not in (4, 5):
            raise pickle.UnpicklingError("malformed numpy array state")
        if len(state) == 5:
            if state[0] != 1:
                raise pickle.UnpicklingError(f"unknown numpy array state version {state[0]!r}")
            state = state[1:]
        shape, dtype, fortran, raw = state
        dims = _shape(shape, "array shape")
        dtype = _as_dtype(dtype)
        raw = _array_bytes(dims, dtype, raw, getattr(self, "_bk_limit", None) or byte_limit(), "array data")
        if not isinstance(fortran, (bool, int, np.bool_)):
            raise pickle.UnpicklingError("malformed numpy array state (fortran flag)")
        super().__setstate__((1, dims, dtype, bool(fortran), bytes(raw)))


def _array_bytes(dims, dtype, raw, limit: int, what: str):
    """The raw bytes of an array of shape dims, checked against the ceiling before and its size after."""
    need = _nbytes(dims, dtype.itemsize)
    if need > limit:
        raise pickle.UnpicklingError(f"array of shape {dims} ({dtype}) would need {fmt_bytes(need)}, more "
                                     f"than the {fmt_bytes(limit)} ceiling")
    raw = _raw(raw, what)
    if len(raw) != need:
        raise pickle.UnpicklingError(f"array of shape {dims} ({dtype}) needs {need} data bytes, "
                                     f"the pickle holds {len(raw)}")
    return raw


def _make_reconstruct(limit: int):
    def _reconstruct(subtype, shape, typecode):
        if subtype is not np.ndarray:
            raise pickle.UnpicklingError("_reconstruct: only numpy.ndarray is allowed")
        dims = _shape(shape, "_reconstruct shape")
        if _nbytes(dims, 1) != 0:  # numpy always pickles (0,) here; the real shape comes with BUILD
            raise pickle.UnpicklingError(f"refusing to allocate an array of shape {dims} in _reconstruct "
                                         "(numpy pickles pass an empty shape here)")
        if isinstance(typecode, _DtypeSpec):
            dtype = typecode.dtype()
        else:
            code = _str(typecode, "typecode")
            if code not in _SAFE_TYPECODES:
                raise pickle.UnpicklingError(f"refusing typecode {code!r}")
            dtype = np.dtype(code)
        arr = _np_reconstruct(_GuardedArray, dims, dtype)
        arr._bk_limit = limit
        return arr
    return _reconstruct


def _make_frombuffer(limit: int):
    def _frombuffer(buf, dtype, shape, order):  # protocol 5 (numpy._core.numeric._frombuffer)
        dims = _shape(shape, "array shape")
        dtype = _as_dtype(dtype)
        raw = _array_bytes(dims, dtype, buf, limit, "array buffer")
        order = _str(order, "array order")
        if order not in ("C", "F"):
            raise pickle.UnpicklingError(f"bad array order {order!r}")
        return np.frombuffer(raw, dtype=dtype).reshape(dims, order=order)
    return _frombuffer


def _scalar(dtype, data):  # numpy scalars, e.g. a list of numpy ints as labels
    dtype = _as_dtype(dtype)
    raw = _raw(data, "scalar data")
    if len(raw) != dtype.itemsize:
        raise pickle.UnpicklingError(f"numpy scalar of {dtype} needs {dtype.itemsize} bytes, got {len(raw)}")
    return np.frombuffer(raw, dtype=dtype)[0]


def _codecs_encode(obj, encoding="utf-8", errors="strict"):  # how Python 3 protocol 2 writes bytes
    if not isinstance(obj, str) or encoding not in ("latin1", "latin-1") or errors != "strict":
        raise pickle.UnpicklingError("_codecs.encode is only allowed as (str, 'latin1')")
    return obj.encode("latin1")


def _empty_bytes(*args):  # Python 3 protocol 2 writes b'' as REDUCE(bytes, ())
    if args:
        raise pickle.UnpicklingError("bytes(...) is only allowed without arguments")
    return b""


_ALLOWED_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"): "reconstruct",
    ("numpy._core.multiarray", "_reconstruct"): "reconstruct",
    ("numpy.core.multiarray", "scalar"): "scalar",
    ("numpy._core.multiarray", "scalar"): "scalar",
    ("numpy.core.numeric", "_frombuffer"): "frombuffer",
    ("numpy._core.numeric", "_frombuffer"): "frombuffer",
    ("numpy", "ndarray"): "ndarray",
    ("numpy", "dtype"): "dtype",
    ("_codecs", "encode"): "encode",
    ("__builtin__", "bytes"): "bytes",  # b'' under protocol 2 (Python 3): bytes()
    ("builtins", "bytes"): "bytes",
}

# opcodes that only matter for classes/extension registries a CIFAR batch never uses
_REFUSED_OPCODES = frozenset({"PERSID", "BINPERSID", "EXT1", "EXT2", "EXT4", "INST", "OBJ", "NEWOBJ",
                              "NEWOBJ_EX", "NEXT_BUFFER", "READONLY_BUFFER"})


def _scan_pickle(raw: bytes, path) -> None:
    """Walk the opcode stream without building anything: every length prefix must fit in the file
    (pickletools reads exactly what is there), only known opcodes, one STOP at the very end."""
    stream = io.BytesIO(raw)
    stop_at = None
    try:
        for op, arg, pos in pickletools.genops(stream):
            if op.name in _REFUSED_OPCODES:
                raise DataError(f"{path}: unsafe or malformed pickle (refusing opcode {op.name} at byte {pos})")
            if op.name == "FRAME" and arg > len(raw) - stream.tell():
                raise DataError(f"{path}: malformed pickle (frame of {arg} bytes at byte {pos} runs past "
                                "the end of the file)")
            if op.name == "GLOBAL":
                module, _, name = str(arg).partition(" ")
                if (module, name) not in _ALLOWED_GLOBALS:
                    raise DataError(f"{path}: unsafe or malformed pickle (refusing to load global "
                                    f"{module}.{name}; only numpy array reconstruction is allowed)")
            if op.name == "STOP":
                stop_at = stream.tell()
    except ValueError as e:  # truncated argument, unknown opcode, missing STOP
        if isinstance(e, DataError):
            raise
        raise DataError(f"{path}: malformed or truncated pickle ({e})") from None
    if stop_at != len(raw):
        raise DataError(f"{path}: malformed pickle ({len(raw) - (stop_at or 0)} trailing bytes after STOP)")


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickler for CIFAR batches: dicts, lists, tuples, bytes, str, numbers and plain numeric numpy
    arrays only.

    find_class is the only way a pickle reaches code; it resolves exactly the globals a numpy array
    pickle needs (under numpy 1.x and 2.x module names), each replaced by a checking stand-in, and
    refuses everything else (os.system, builtins.eval, ...). The constructor reads the pickle (up to
    the byte ceiling) and scans its opcodes first, so no length prefix can make the unpickler
    allocate more than the file holds. :func:`read_cifar_batch` is the convenient entry point.
    """

    _ALLOWED = _ALLOWED_GLOBALS

    def __init__(self, file, *, max_bytes: int | None = None, name=None, **kwargs):
        """Reads the whole pickle from ``file`` (at most max_bytes, DataError beyond), scans its
        opcodes (DataError naming ``name`` or file.name if malformed or asking for a refused
        global), then unpickles from that copy. encoding defaults to 'bytes' (Python 2 str -> bytes)."""
        kwargs.setdefault("encoding", "bytes")
        self.max_bytes = byte_limit(max_bytes)
        name = name if name is not None else getattr(file, "name", "<pickle>")
        chunks, total = [], 0
        while total <= self.max_bytes:
            chunk = file.read(min(1 << 20, self.max_bytes + 1 - total))
            if not chunk:
                break
            chunks.append(chunk)
            total += len(chunk)
        if total > self.max_bytes:
            raise DataError(f"{name}: pickle is larger than the {fmt_bytes(self.max_bytes)} ceiling "
                            "(set $BITKERN_DATA_MAX_BYTES to raise it)")
        raw = b"".join(chunks)
        del chunks
        _scan_pickle(raw, name)
        super().__init__(io.BytesIO(raw), **kwargs)

    def find_class(self, module, name):
        kind = self._ALLOWED.get((module, name))
        if kind is None:
            raise pickle.UnpicklingError(f"refusing to load global {module}.{name} "
                                         "(only numpy array reconstruction is allowed)")
        if kind == "reconstruct":
            return _make_reconstruct(self.max_bytes)
        if kind == "frombuffer":
            return _make_frombuffer(self.max_bytes)
        return {"scalar": _scalar, "ndarray": np.ndarray, "dtype": _DtypeSpec, "encode": _codecs_encode,
                "bytes": _empty_bytes}[kind]

    def persistent_load(self, pid):
        raise pickle.UnpicklingError("refusing a persistent id")


def read_cifar_batch(path: str | os.PathLike, *, max_bytes: int | None = None) -> dict:
    """Read one CIFAR python batch with the restricted unpickler; keys are decoded to str and numpy
    arrays are plain ndarrays. Raises DataError naming the file for anything unsafe or malformed."""
    path = Path(path)
    limit = byte_limit(max_bytes)
    if not path.is_file():
        raise DataError(f"missing CIFAR batch file {path}")
    try:
        size = path.stat().st_size
        if size > limit:
            raise DataError(f"{path}: CIFAR batch file is {fmt_bytes(size)}, more than the "
                            f"{fmt_bytes(limit)} ceiling (set $BITKERN_DATA_MAX_BYTES to raise it)")
        with open(path, "rb") as f:
            unpickler = RestrictedUnpickler(f, max_bytes=limit, name=path, encoding="bytes")
    except OSError as e:
        raise DataError(f"{path}: cannot read CIFAR batch ({e.strerror or e})") from None
    try:
        obj = unpickler.load()
    except pickle.UnpicklingError as e:
        raise DataError(f"{path}: unsafe or malformed pickle ({e})") from None
    except (EOFError, ValueError, TypeError, struct.error, IndexError, KeyError, AttributeError,
            OverflowError, RecursionError, MemoryError) as e:
        raise DataError(f"{path}: malformed or truncated CIFAR batch ({type(e).__name__}: {e})") from None
    if not isinstance(obj, dict):
        raise DataError(f"{path}: expected a dict in the CIFAR batch, got {type(obj).__name__}")
    out = {}
    for k, v in obj.items():
        if isinstance(k, bytes):
            k = k.decode("latin1")
        if not isinstance(k, str):
            raise DataError(f"{path}: CIFAR batch keys must be strings, got {type(k).__name__}")
        out[k] = v.view(np.ndarray) if isinstance(v, np.ndarray) else v
    return out


def _labels(path: Path, labels, key: str, rows: int) -> np.ndarray:
    if isinstance(labels, np.ndarray):
        if labels.ndim != 1 or labels.dtype.kind not in "iu":
            raise DataError(f"{path}: {key!r} must be a list of ints, got an array {labels.dtype} {labels.shape}")
        out = labels.astype(np.int64)
    elif isinstance(labels, (list, tuple)):
        if not all(isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_)) for v in labels):
            bad = next(v for v in labels if not isinstance(v, (int, np.integer)) or isinstance(v, (bool, np.bool_)))
            raise DataError(f"{path}: {key!r} must be a list of ints, found {type(bad).__name__} {bad!r:.40}")
        try:
            out = np.array(labels, dtype=np.int64)
        except OverflowError:
            raise DataError(f"{path}: {key!r} holds an int out of range") from None
    else:
        raise DataError(f"{path}: {key!r} must be a list of ints, got {type(labels).__name__}")
    if out.shape[0] != rows:
        raise DataError(f"{path}: {rows} images but {out.shape[0]} labels")
    return out


def cifar_arrays(path: Path, label_key: str, num_classes: int, max_rows: int, max_bytes: int | None = None):
    """(data uint8 [n, 3, 32, 32], labels int64 [n]) of one batch file, every field checked."""
    d = read_cifar_batch(path, max_bytes=max_bytes)
    if "data" not in d or label_key not in d:
        raise DataError(f"{path}: CIFAR batch lacks 'data' or {label_key!r} (keys: {sorted(d)})")
    data = d["data"]
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 \
            or data.shape[1] != CIFAR_ROW_BYTES:
        shape = getattr(data, "shape", None)
        dt = getattr(data, "dtype", "")
        raise DataError(f"{path}: 'data' must be uint8 [n, {CIFAR_ROW_BYTES}], got {type(data).__name__} "
                        f"{dt} {shape}")
    if data.shape[0] > max_rows:
        raise DataError(f"{path}: {data.shape[0]} rows, expected at most {max_rows}")
    labels = _labels(path, d[label_key], label_key, data.shape[0])
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        bad = int(labels.min()) if labels.min() < 0 else int(labels.max())
        raise DataError(f"{path}: label {bad} in {label_key!r} out of range (expected 0..{num_classes - 1})")
    return np.ascontiguousarray(data).reshape(-1, 3, 32, 32), labels


def _tensors(where, parts, num_classes, split):
    data = np.concatenate([p[0] for p in parts])
    labels = np.concatenate([p[1] for p in parts])
    check_split(where, labels, num_classes, split=split)
    return torch.from_numpy(data.astype(np.float32) / 255.0), torch.from_numpy(labels)


def _sub(root: Path, name: str) -> Path:
    return root / name if (root / name).is_dir() else root


def load_cifar10(root: Path, split: str, max_bytes: int | None = None):
    d = _sub(root, "cifar-10-batches-py")
    files = [d / f"data_batch_{i}" for i in range(1, 6)] if split == "train" else [d / "test_batch"]
    parts = [cifar_arrays(f, "labels", 10, CIFAR10_BATCH_ROWS, max_bytes) for f in files]
    return _tensors(files[0] if len(files) == 1 else d, parts, 10, split)


def load_cifar100(root: Path, split: str, max_bytes: int | None = None):
    f = _sub(root, "cifar-100-python") / split
    return _tensors(f, [cifar_arrays(f, "fine_labels", 100, CIFAR100_ROWS[split], max_bytes)], 100, split)
