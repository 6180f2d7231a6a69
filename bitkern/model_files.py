"""Model files you can trust: hashed safetensors, checked against what their metadata implies.

Every safetensors file bitkern writes (frozen models, ``save_model`` weights, training checkpoints) carries
``bitkern_sha256`` in its header ``__metadata__``: a sha256 over

* the tag ``b"bitkern-content-sha256-v1\\0"``,
* the other ``__metadata__`` entries as canonical JSON (sorted keys, no spaces), length-prefixed,
* for every tensor in sorted name order: the canonical JSON ``[name, dtype, shape]`` (length-prefixed)
  followed by the tensor's raw little-endian data bytes.

So the description (architecture, quant spec, ...) and every byte of every tensor are covered. Loading
checks, in this order and before any tensor is materialised: the header layout (names, dtypes, shapes and
data offsets consistent with the file size), the metadata (types and bounds, so absurd values are refused
by a bound check and not by an allocation), the set of tensor names / dtypes / shapes against the state the
architecture implies (built on the ``meta`` device, which allocates nothing), the content hash; then, on
the loaded tensors, finite floats and zero unused high bits in the last word of packed weights.

Every problem raises :class:`ModelFileError` (a :class:`CheckpointError`, so a ``ValueError``) with one
line naming the file.
"""
from __future__ import annotations

import functools
import hashlib
import json
import math
import os
import re
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping

import torch
from torch.overrides import TorchFunctionMode

from ._checks import is_int
from ._io import atomic_path

__all__ = [
    "CheckpointError", "ModelFileError", "HASH_KEY", "MAX_NUM_CLASSES", "MAX_IN_CHANNELS", "TensorSpec",
    "Header", "read_header", "read_json", "write_safetensors", "load_verified", "content_sha256",
    "check_model_meta", "expected_state", "spec_of_module", "contained_file", "is_sha256",
]


class CheckpointError(ValueError):
    """A checkpoint is missing, inconsistent or does not match the model / optimizer given."""


class ModelFileError(CheckpointError):
    """A model file or checkpoint is corrupt, truncated, tampered with, from an unsupported format
    version, or does not match what its own metadata implies."""


HASH_KEY = "bitkern_sha256"
_HASH_TAG = b"bitkern-content-sha256-v1\0"
MAX_HEADER_BYTES = 64 << 20   # safetensors itself allows 100 MB
MAX_JSON_BYTES = 64 << 20
MAX_NUM_CLASSES = 100_000
MAX_IN_CHANNELS = 1024
MAX_DIMS = 8
_HEX64 = re.compile(r"[0-9a-f]{64}")

_DTYPES: dict[str, tuple[torch.dtype, int]] = {
    "F64": (torch.float64, 8), "F32": (torch.float32, 4), "F16": (torch.float16, 2),
    "BF16": (torch.bfloat16, 2), "I64": (torch.int64, 8), "I32": (torch.int32, 4), "I16": (torch.int16, 2),
    "I8": (torch.int8, 1), "U8": (torch.uint8, 1), "BOOL": (torch.bool, 1),
}
_DTYPE_NAMES = {dt: name for name, (dt, _) in _DTYPES.items()}


def _err(path, msg: str) -> ModelFileError:
    return ModelFileError(f"{path}: {msg}")


def is_sha256(value) -> bool:
    return isinstance(value, str) and _HEX64.fullmatch(value) is not None


# ------------------------------------------------------------------------------------------- JSON
def _no_duplicates(pairs):
    out = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"duplicate key {key!r}")
        out[key] = value
    return out


def _loads(text: str):
    return json.loads(text, object_pairs_hook=_no_duplicates)


def read_json(path: Path, what: str = "JSON") -> Any:
    """A JSON file (UTF-8, at most 64 MiB, no duplicate keys) or ModelFileError naming it."""
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size > MAX_JSON_BYTES:
                raise _err(path, f"{what} is {size} bytes (limit {MAX_JSON_BYTES}); refusing to read it")
            raw = f.read()
    except OSError as e:
        raise _err(path, f"cannot read {what} ({e.strerror or e})") from None
    try:
        return _loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise _err(path, f"unreadable {what}: not UTF-8 text") from None
    except RecursionError:
        raise _err(path, f"unreadable {what}: nested too deeply") from None
    except ValueError as e:
        raise _err(path, f"unreadable {what} ({str(e).splitlines()[0]})") from None


# ------------------------------------------------------------------------------------------ paths
def contained_file(directory: Path, name, where) -> Path:
    """``directory / name`` for a plain file name that stays inside ``directory`` (symlinks resolved)."""
    if (not isinstance(name, str) or not name or name in (".", "..") or "/" in name or "\\" in name
            or "\0" in name or os.path.isabs(name) or Path(name).name != name):
        raise _err(where, f"names weights file {name!r}, which is not a plain file name inside {directory}")
    path = Path(directory) / name
    try:
        inside = path.resolve().is_relative_to(Path(directory).resolve())
    except (OSError, RuntimeError) as e:  # symlink loops
        raise _err(where, f"cannot resolve weights file {name!r} ({e})") from None
    if not inside:
        raise _err(where, f"weights file {name!r} resolves to {path.resolve()}, outside {directory}")
    return path


# ----------------------------------------------------------------------------------------- header
@dataclass(frozen=True)
class Entry:
    dtype: torch.dtype
    dtype_name: str
    shape: tuple[int, ...]
    begin: int
    end: int


@dataclass(frozen=True)
class Header:
    path: Path
    raw: bytes            # the 8-byte length and the JSON header, as in the file
    entries: dict[str, Entry]
    metadata: dict[str, str]
    size: int             # file size

    @property
    def data_start(self) -> int:
        return len(self.raw)


def _check_entry(path, name, info) -> Entry:
    if not isinstance(name, str) or not name:
        raise _err(path, f"header holds a tensor with an invalid name {name!r}")
    if not isinstance(info, dict) or set(info) != {"dtype", "shape", "data_offsets"}:
        raise _err(path, f"header entry for tensor {name!r} is malformed")
    dtype_name, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
    if dtype_name not in _DTYPES:
        raise _err(path, f"tensor {name!r} has unsupported dtype {dtype_name!r}")
    if (not isinstance(shape, list) or len(shape) > MAX_DIMS
            or not all(is_int(d) and 0 <= d < 1 << 48 for d in shape)):
        raise _err(path, f"tensor {name!r} has an invalid shape {shape!r}")
    if (not isinstance(offsets, list) or len(offsets) != 2 or not all(is_int(o) for o in offsets)
            or not 0 <= offsets[0] <= offsets[1]):
        raise _err(path, f"tensor {name!r} has invalid data offsets {offsets!r}")
    dtype, itemsize = _DTYPES[dtype_name]
    if offsets[1] - offsets[0] != math.prod(shape) * itemsize:
        raise _err(path, f"tensor {name!r}: {offsets[1] - offsets[0]} data bytes do not fit {dtype_name} "
                         f"{tuple(shape)}")
    return Entry(dtype, dtype_name, tuple(shape), offsets[0], offsets[1])


def read_header(path: str | os.PathLike) -> Header:
    """Parse and check a safetensors header without reading tensor data."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            st = os.fstat(f.fileno())
            if not stat.S_ISREG(st.st_mode):
                raise _err(path, "not a regular file")
            size = st.st_size
            head = f.read(8)
            if len(head) < 8:
                raise _err(path, f"truncated: {size} bytes is too short for a safetensors file")
            n = int.from_bytes(head, "little")
            if n < 2 or n > MAX_HEADER_BYTES or 8 + n > size:
                raise _err(path, f"not a safetensors file or truncated (header length {n}, file size {size})")
            raw = f.read(n)
    except IsADirectoryError:
        raise _err(path, "is a directory, not a model file") from None
    except OSError as e:
        raise _err(path, f"cannot read ({e.strerror or e})") from None
    if len(raw) != n:
        raise _err(path, "truncated inside the safetensors header")
    try:
        obj = _loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise _err(path, "corrupt safetensors header (not valid UTF-8 JSON: bad UTF-8)") from None
    except RecursionError:
        raise _err(path, "corrupt safetensors header (not valid UTF-8 JSON: nested too deeply)") from None
    except ValueError as e:
        raise _err(path, f"corrupt safetensors header (not valid UTF-8 JSON: {str(e).splitlines()[0]})") \
            from None
    if not isinstance(obj, dict):
        raise _err(path, "corrupt safetensors header (not a JSON object)")
    metadata = obj.pop("__metadata__", {})
    if not isinstance(metadata, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                                 for k, v in metadata.items()):
        raise _err(path, "corrupt safetensors header (__metadata__ must map strings to strings)")
    entries = {name: _check_entry(path, name, info) for name, info in obj.items()}
    data_len = size - 8 - n
    pos = 0
    for name, e in sorted(entries.items(), key=lambda kv: (kv[1].begin, kv[1].end)):
        if e.begin != pos:
            raise _err(path, f"tensor {name!r} data at bytes {e.begin}..{e.end} overlaps or leaves a gap "
                             f"(expected to start at {pos})")
        pos = e.end
    if pos != data_len:
        what = "truncated" if pos > data_len else "has trailing bytes"
        raise _err(path, f"{what}: the header describes {pos} data bytes, the file holds {data_len}")
    return Header(path, head + raw, entries, metadata, size)


# ------------------------------------------------------------------------------------------- hash
def _hash_start(metadata: Mapping[str, str]):
    h = hashlib.sha256(_HASH_TAG)
    meta = json.dumps({k: v for k, v in metadata.items() if k != HASH_KEY}, sort_keys=True,
                      separators=(",", ":"), ensure_ascii=True).encode()
    h.update(len(meta).to_bytes(8, "little"))
    h.update(meta)
    return h


def _hash_record(h, name: str, dtype_name: str, shape: Iterable[int]) -> None:
    rec = json.dumps([name, dtype_name, list(shape)], separators=(",", ":"), ensure_ascii=True).encode()
    h.update(len(rec).to_bytes(8, "little"))
    h.update(rec)


def _raw_bytes(t: torch.Tensor):
    return t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()


def content_sha256(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str]) -> str:
    """The content hash of in-memory tensors + header metadata (see the module docstring)."""
    h = _hash_start(metadata)
    for name in sorted(tensors):
        t = tensors[name]
        _hash_record(h, name, _DTYPE_NAMES[t.dtype], t.shape)
        h.update(_raw_bytes(t))
    return h.hexdigest()


def _data_sha256(header: Header, data: memoryview) -> str:
    h = _hash_start(header.metadata)
    base = header.data_start
    for name in sorted(header.entries):
        e = header.entries[name]
        _hash_record(h, name, e.dtype_name, e.shape)
        h.update(data[base + e.begin:base + e.end])
    return h.hexdigest()


def write_safetensors(path: str | os.PathLike, tensors: Mapping[str, torch.Tensor],
                      metadata: Mapping[str, str]) -> str:
    """Write ``tensors`` atomically with ``metadata`` + their content hash; returns the hash. The file is
    read back and verified before it replaces ``path``."""
    from safetensors.torch import save_file

    metadata = dict(metadata)
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
        raise TypeError("metadata: expected a dict of str to str")
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
    for k, v in tensors.items():
        if v.dtype not in _DTYPE_NAMES:
            raise TypeError(f"tensor {k!r}: dtype {v.dtype} cannot be stored")
    digest = content_sha256(tensors, metadata)
    metadata[HASH_KEY] = digest
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)
        header = read_header(tmp)
        if _data_sha256(header, memoryview(tmp.read_bytes())) != digest:
            raise RuntimeError(f"{path}: the file written does not hash to its content hash")
    return digest


# ------------------------------------------------------------------------------------------ specs
@dataclass(frozen=True)
class TensorSpec:
    dtype: torch.dtype
    shape: tuple[int, ...]
    packed_channels: int | None = None  # int64 sign words packing this many channels (last dim)


def spec_of_module(module: torch.nn.Module) -> dict[str, TensorSpec]:
    """Names / dtypes / shapes of ``module.state_dict()`` (works on meta tensors)."""
    packed = {}
    for prefix, sub in module.named_modules():
        w = getattr(sub, "w_packed", None)
        if getattr(sub, "bops_layer", False) and isinstance(w, torch.Tensor):
            packed[f"{prefix}.w_packed" if prefix else "w_packed"] = int(sub.in_channels)
    return {k: TensorSpec(v.dtype, tuple(v.shape), packed.get(k)) for k, v in module.state_dict().items()}


_KEEP_ON_CPU = {torch.tensor, torch.as_tensor, torch.asarray, torch.scalar_tensor}


class _MetaConstructors(TorchFunctionMode):
    """Factory functions without an explicit device allocate on ``meta`` (nothing); tensors built from
    Python data (torch.tensor / as_tensor, e.g. normalisation constants) stay real so that models can
    check their values."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        from torch.utils._device import _device_constructors

        kwargs = kwargs or {}
        if func in _device_constructors() and func not in _KEEP_ON_CPU and kwargs.get("device") is None:
            kwargs["device"] = "meta"
        return func(*args, **kwargs)


@functools.lru_cache(maxsize=64)
def _expected_state_cached(arch, quant, num_classes, in_channels, transform):
    from .models import create

    with torch.random.fork_rng(devices=[]), _MetaConstructors():
        model = create(arch, quant, num_classes=num_classes, in_channels=in_channels)
        if transform is not None:
            model = transform(model)
        return tuple(spec_of_module(model).items())


def expected_state(path, meta: Mapping[str, Any], *, transform=None) -> dict[str, TensorSpec]:
    """The state (names -> TensorSpec) that checked ``meta`` implies, built without allocating.
    transform: None (the trained model) or a module-level function model -> model applied after building
    it (bitkern.freeze passes its freezing function; it must be hashable: results are cached by it)."""
    try:
        items = _expected_state_cached(meta["arch"], meta["quant"], meta["num_classes"], meta["in_channels"],
                                       transform)
    except (ValueError, TypeError, RuntimeError) as e:
        raise _err(path, f"metadata does not describe a model bitkern can build ({str(e).splitlines()[0]})") \
            from None
    return dict(items)


def check_model_meta(path, meta, *, required=("arch", "quant", "num_classes", "in_channels"),
                     known: bool = True) -> dict:
    """Type- and range-check the model description in ``meta`` (before anything is built from it).
    known: arch must be one of bitkern.models.ARCHS and quant a valid spec (else: strings only)."""
    from .models import ARCHS, parse_quant

    if not isinstance(meta, dict):
        raise _err(path, f"model metadata is not a JSON object (got {type(meta).__name__})")
    missing = [k for k in required if k not in meta]
    if missing:
        raise _err(path, f"metadata lacks {missing}; cannot rebuild the model")
    for key in ("arch", "quant"):
        if key in meta and (not isinstance(meta[key], str) or not 0 < len(meta[key]) <= 64):
            raise _err(path, f"metadata {key} must be a short string, got {meta[key]!r:.80}")
    if known and "arch" in meta and meta["arch"].lower() not in ARCHS:
        raise _err(path, f"metadata arch {meta['arch']!r} is not one of {', '.join(ARCHS)}")
    if known and "quant" in meta:
        try:
            parse_quant(meta["quant"])
        except (ValueError, TypeError) as e:
            raise _err(path, f"metadata quant {meta['quant']!r} is invalid ({str(e).split(';')[0]})") from None
    for key, hi in (("num_classes", MAX_NUM_CLASSES), ("in_channels", MAX_IN_CHANNELS)):
        if key in meta:
            v = meta[key]
            if not is_int(v):
                raise _err(path, f"metadata {key} must be an int, got {type(v).__name__} {v!r}")
            if not 1 <= v <= hi:
                raise _err(path, f"metadata {key} = {v} is out of range (1..{hi})")
    return meta


def check_entries(header: Header, expected: Mapping[str, TensorSpec], *, strict: bool = True,
                  only: Iterable[str] | None = None) -> None:
    """Names / dtypes / shapes in ``header`` exactly as ``expected`` (``only``: restrict to these names)."""
    path = header.path
    names = set(header.entries) if only is None else set(only)
    if strict:
        missing = sorted(set(expected) - names)
        extra = sorted(names - set(expected))
        if missing or extra:
            parts = []
            if missing:
                parts.append(f"missing {len(missing)} tensor(s) {_few(missing)}")
            if extra:
                parts.append(f"{len(extra)} unexpected tensor(s) {_few(extra)}")
            raise _err(path, "tensors do not fit the model: " + ", ".join(parts))
    for name in sorted(names & set(expected)):
        e, s = header.entries[name], expected[name]
        if e.dtype != s.dtype:
            raise _err(path, f"tensor {name!r} is stored as {e.dtype_name}, expected {_DTYPE_NAMES[s.dtype]} "
                             f"(no conversion is done)")
        if e.shape != s.shape:
            raise _err(path, f"tensor {name!r} has shape {list(e.shape)}, expected {list(s.shape)}")


def _few(names: list[str], n: int = 3) -> str:
    return ", ".join(repr(x) for x in names[:n]) + (", ..." if len(names) > n else "")


def check_values(path, tensors: Mapping[str, torch.Tensor], expected: Mapping[str, TensorSpec] | None = None,
                 ) -> None:
    """Finite floats; packed sign words without bits set beyond their channel count."""
    for name in sorted(tensors):
        t = tensors[name]
        if t.is_floating_point() and t.numel() and not bool(torch.isfinite(t).all()):
            raise _err(path, f"tensor {name!r} holds NaN or Inf values")
        spec = None if expected is None else expected.get(name)
        if spec is not None and spec.packed_channels is not None and t.numel():
            words = t.shape[-1]
            used = spec.packed_channels - 64 * (words - 1)
            if t.dtype != torch.int64 or not 1 <= used <= 64:
                raise _err(path, f"tensor {name!r}: {words} words cannot pack {spec.packed_channels} channels")
            if used < 64 and bool((t[..., -1] & -(1 << used)).ne(0).any()):
                raise _err(path, f"tensor {name!r}: packed sign words have bits set beyond channel "
                                 f"{spec.packed_channels} (unused high bits must be zero)")


# ------------------------------------------------------------------------------------------- load
def load_verified(header: Header, *, whole_sha256: str | None = None, require_hash: bool = True,
                  expected: Mapping[str, TensorSpec] | None = None) -> dict[str, torch.Tensor]:
    """Read the file of ``header`` once, verify the hash(es), deserialize and check the values.

    whole_sha256: sha256 of the whole file (from a JSON sidecar), checked when given.
    require_hash: the header must carry ``bitkern_sha256`` and it must match.
    """
    from safetensors.torch import load as st_load

    path = header.path
    digest = header.metadata.get(HASH_KEY)
    if require_hash and digest is None:
        raise _err(path, f"has no content hash ({HASH_KEY} missing from the safetensors header); "
                         f"refusing to load unverified weights")
    if digest is not None and not is_sha256(digest):
        raise _err(path, f"content hash {HASH_KEY} is malformed")
    try:
        with open(path, "rb") as f:
            data = f.read(header.size + 1)
    except OSError as e:
        raise _err(path, f"cannot read ({e.strerror or e})") from None
    if len(data) != header.size or data[:header.data_start] != header.raw:
        raise _err(path, "changed while it was being read")
    if whole_sha256 is not None and hashlib.sha256(data).hexdigest() != whole_sha256:
        raise _err(path, "sha256 of the file does not match its JSON (corrupt, modified or mixed files)")
    if digest is not None and _data_sha256(header, memoryview(data)) != digest:
        raise _err(path, f"content sha256 mismatch: the data does not match {HASH_KEY} in its header "
                         f"(corrupt or modified file)")
    try:
        tensors = st_load(data)
    except Exception as e:  # noqa: BLE001 - safetensors raises its own error types
        raise _err(path, f"corrupt safetensors data ({str(e).splitlines()[0] if str(e) else type(e).__name__})") \
            from None
    check_values(path, tensors, expected)
    return tensors


# ------------------------------------------------------------------------------ frozen file format
# The frozen format (v3): safetensors written by bitkern.model_files.write_safetensors, whose header
# metadata holds the model description as JSON under "bitkern" (format, version, fused, arch, quant,
# num_classes, in_channels) next to the content hash. These two functions are the whole format.
FROZEN_FORMAT = "bitkern-frozen"
FROZEN_FORMAT_VERSION = 3  # v2: BatchNorm / activation folding (meta "fused"); v3: content hash (bitkern_sha256)
# in the header. v1 / v2 files carry no hash and are refused with a message telling how to re-create them.


def frozen_header(meta: dict) -> dict[str, str]:
    """The safetensors header metadata of a frozen model described by `meta` (bitkern_sha256 is added by
    write_safetensors)."""
    meta = {**meta, "format": FROZEN_FORMAT, "version": FROZEN_FORMAT_VERSION}
    meta["fused"] = bool(meta.get("fused", False))
    try:
        text = json.dumps(meta, sort_keys=True, allow_nan=False)
    except (TypeError, ValueError) as e:
        raise TypeError(f"meta: cannot be stored as JSON ({e})") from None
    return {"bitkern": text}


def read_frozen_meta(header) -> dict:
    """The checked model description of a frozen file (from its header; nothing is allocated)."""
    path = header.path
    if "bitkern" not in header.metadata:
        raise ModelFileError(f"{path}: has no bitkern metadata; expected a file written by FrozenModel.save()")
    try:
        meta = json.loads(header.metadata["bitkern"])
    except (ValueError, RecursionError):
        raise ModelFileError(f"{path}: bitkern metadata is not valid JSON") from None
    if not isinstance(meta, dict) or meta.get("format") != FROZEN_FORMAT:
        got = meta.get("format") if isinstance(meta, dict) else meta
        raise ModelFileError(f"{path}: holds format {got!r}; expected {FROZEN_FORMAT!r}")
    version = meta.get("version")
    if version in (1, 2) and not isinstance(version, bool):
        raise ModelFileError(
            f"{path}: frozen format v{version} (written by an older bitkern) carries no content hash and is "
            f"refused; re-create it from the trained model: "
            f"bitkern.freeze(bitkern.checkpoint.load_model('model.safetensors')).save('{path.name}')")
    if version != FROZEN_FORMAT_VERSION or isinstance(version, bool):
        raise ModelFileError(f"{path}: unsupported frozen format version {version!r}; expected {FROZEN_FORMAT_VERSION}")
    if not isinstance(meta.get("fused"), bool):
        raise ModelFileError(f"{path}: metadata fused must be true or false, got {meta.get('fused')!r}")
    return check_model_meta(path, meta)
