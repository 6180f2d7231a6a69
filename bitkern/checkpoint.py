"""Checkpoints without pickle: tensors in safetensors, everything else in JSON.

A checkpoint directory holds

* ``checkpoint-eNNNN.safetensors``: model state (``model/<name>``), optimizer state tensors
  (``optim/<param index>/<key>``), the torch CPU RNG state (``rng/torch``, uint8) and extra tensors
  (``extra/<name>``, e.g. a recipe's persistent perturbation);
* ``checkpoint.json``: the commit marker, written last. It names the weights file and its sha256,
  and holds arch, quant spec, recipe + args, epoch, optimizer param groups and non-tensor state,
  numpy / python RNG states, metrics.

Both are written atomically (temp file + os.replace). Because the weights file name carries the
epoch and old files are deleted only after the JSON points to the new one, a crash at any moment
leaves a consistent (weights, JSON) pair on disk.

Single-file model weights (``save_model`` / ``load_model``) are a safetensors file plus
``<name>.json`` next to it with arch / quant / num_classes / in_channels, enough to rebuild the model
with ``bitkern.models.create``.
"""
from __future__ import annotations

import hashlib
import json
import os
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from ._io import atomic_path, atomic_write_json

__all__ = [
    "CheckpointError",
    "Checkpoint",
    "save_checkpoint",
    "load_checkpoint",
    "has_checkpoint",
    "capture_rng",
    "restore_rng",
    "save_model",
    "load_model",
    "read_model_meta",
    "model_meta",
    "FORMAT_VERSION",
]

FORMAT_VERSION = 1
JSON_NAME = "checkpoint.json"


class CheckpointError(ValueError):
    """A checkpoint is missing, inconsistent or does not match the model / optimizer given."""


@dataclass
class Checkpoint:
    path: Path
    state: dict[str, Any]
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)

    def extra(self, prefix: str = "") -> dict[str, torch.Tensor]:
        """Extra tensors saved with ``tensors=``, keys without the ``extra/`` prefix."""
        p = "extra/" + prefix
        return {k[len("extra/"):]: v for k, v in self.tensors.items() if k.startswith(p)}


def _plain(t: torch.Tensor) -> torch.Tensor:
    # safetensors refuses shared / non-contiguous storage: give every entry its own copy
    return t.detach().to("cpu").contiguous().clone()


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# -------------------------------------------------------------------------------------------- RNG
def capture_rng() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Global RNG states: torch CPU as a uint8 tensor, numpy and python as JSON-able lists."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    py = random.getstate()
    state = {
        "numpy": [kind, keys.tolist(), int(pos), int(has_gauss), float(cached)],
        "python": [py[0], list(py[1]), py[2]],
    }
    return {"rng/torch": torch.get_rng_state().clone()}, state


def restore_rng(tensors: dict[str, torch.Tensor], state: dict[str, Any]) -> None:
    if "rng/torch" in tensors:
        torch.set_rng_state(tensors["rng/torch"].to(torch.uint8))
    if "numpy" in state:
        kind, keys, pos, has_gauss, cached = state["numpy"]
        np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    if "python" in state:
        v, internal, gauss = state["python"]
        random.setstate((v, tuple(internal), gauss))


# -------------------------------------------------------------------------------------- optimizer
def _optimizer_split(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    sd = opt.state_dict()
    tensors, scalars = {}, {}
    for idx, st in sd["state"].items():
        for key, val in st.items():
            if isinstance(val, torch.Tensor):
                tensors[f"optim/{idx}/{key}"] = _plain(val)
            else:
                scalars.setdefault(str(idx), {})[key] = val
    return tensors, {"type": type(opt).__name__, "param_groups": sd["param_groups"], "scalars": scalars}


def _optimizer_load(opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    if meta.get("type") != type(opt).__name__:
        raise CheckpointError(f"checkpoint optimizer is {meta.get('type')}, got {type(opt).__name__}")
    state: dict[int, dict[str, Any]] = {}
    for key, val in tensors.items():
        if key.startswith("optim/"):
            _, idx, name = key.split("/", 2)
            state.setdefault(int(idx), {})[name] = val
    for idx, kv in meta.get("scalars", {}).items():
        state.setdefault(int(idx), {}).update(kv)
    groups = meta["param_groups"]
    for g in groups:
        if "betas" in g and isinstance(g["betas"], list):
            g["betas"] = tuple(g["betas"])
    try:
        opt.load_state_dict({"state": state, "param_groups": groups})
    except (ValueError, KeyError) as e:
        raise CheckpointError(f"optimizer state does not fit this optimizer: {e}") from None


# ------------------------------------------------------------------------------------- checkpoint
def has_checkpoint(directory: str | os.PathLike) -> bool:
    return (Path(directory) / JSON_NAME).is_file()


def save_checkpoint(directory: str | os.PathLike, *, model: torch.nn.Module,
                    optimizer: torch.optim.Optimizer | None = None, state: dict[str, Any] | None = None,
                    tensors: dict[str, torch.Tensor] | None = None, rng: bool = True) -> Path:
    """Write model / optimizer / RNG / extra tensors + JSON state; returns the JSON path."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = dict(state or {})
    out: dict[str, torch.Tensor] = {f"model/{k}": _plain(v) for k, v in model.state_dict().items()}
    if optimizer is not None:
        otensors, ometa = _optimizer_split(optimizer)
        out.update(otensors)
        state["optimizer"] = ometa
    if rng:
        rtensors, rstate = capture_rng()
        out.update(rtensors)
        state["rng"] = rstate
    for k, v in (tensors or {}).items():
        if not isinstance(v, torch.Tensor):
            raise TypeError(f"extra tensor {k!r} must be a torch.Tensor, got {type(v).__name__}")
        out[f"extra/{k}"] = _plain(v)

    # a fresh file name per save: the JSON keeps pointing at the previous, intact file until replaced
    existing = sorted(directory.glob("checkpoint-*.safetensors"))
    serial = 1 + max((int(p.stem.split("-")[-1]) for p in existing if p.stem.split("-")[-1].isdigit()),
                     default=0)
    wname = f"checkpoint-{serial:06d}.safetensors"
    with atomic_path(directory / wname) as tmp:
        save_file(out, str(tmp), metadata={"format": "pt", "bitkern": "checkpoint"})
    state.update({"format_version": FORMAT_VERSION, "weights": wname,
                  "weights_sha256": _sha256(directory / wname)})
    json_path = directory / JSON_NAME
    atomic_write_json(json_path, state)
    for p in existing:  # only now is the old pair unreferenced
        if p.name != wname:
            p.unlink(missing_ok=True)
    return json_path


def load_checkpoint(directory: str | os.PathLike, *, model: torch.nn.Module | None = None,
                    optimizer: torch.optim.Optimizer | None = None, rng: bool = False,
                    strict: bool = True) -> Checkpoint:
    """Read a checkpoint; optionally load it into ``model`` / ``optimizer`` and restore RNG states."""
    directory = Path(directory)
    json_path = directory / JSON_NAME
    if not json_path.is_file():
        raise CheckpointError(f"no checkpoint in {directory} (missing {JSON_NAME})")
    try:
        state = json.loads(json_path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{json_path}: unreadable checkpoint JSON ({e})") from None
    if state.get("format_version") != FORMAT_VERSION or "weights" not in state:
        raise CheckpointError(f"{json_path}: not a bitkern checkpoint (format_version "
                              f"{state.get('format_version')!r}, expected {FORMAT_VERSION})")
    wpath = directory / state["weights"]
    if not wpath.is_file():
        raise CheckpointError(f"{json_path} names {wpath.name}, which is missing")
    if _sha256(wpath) != state.get("weights_sha256"):
        raise CheckpointError(f"{wpath}: sha256 does not match {json_path} (corrupt or mixed checkpoint)")
    tensors = load_file(str(wpath))
    if model is not None:
        msd = {k[len("model/"):]: v for k, v in tensors.items() if k.startswith("model/")}
        try:
            model.load_state_dict(msd, strict=strict)
        except RuntimeError as e:
            raise CheckpointError(f"{wpath}: model weights do not fit this model: {e}") from None
    if optimizer is not None:
        if "optimizer" not in state:
            raise CheckpointError(f"{json_path}: checkpoint has no optimizer state")
        _optimizer_load(optimizer, tensors, state["optimizer"])
    if rng:
        restore_rng(tensors, state.get("rng", {}))
    return Checkpoint(path=json_path, state=state, tensors=tensors)


# ------------------------------------------------------------------------------ single model file
def model_meta(model: torch.nn.Module, **extra: Any) -> dict[str, Any]:
    """arch / quant / num_classes / in_channels as far as the model exposes them, plus ``extra``."""
    meta: dict[str, Any] = {}
    for key in ("arch", "quant", "num_classes", "in_channels"):
        val = getattr(model, key, None)
        if isinstance(val, (str, int, float, bool)):
            meta[key] = val
    meta.update(extra)
    return meta


def _meta_path(path: Path) -> Path:
    return path.with_suffix(".json")


def save_model(path: str | os.PathLike, model: torch.nn.Module, meta: dict[str, Any] | None = None) -> Path:
    """Save model weights to ``path`` (safetensors) and its metadata to ``path`` with .json suffix."""
    path = Path(path)
    meta = {**model_meta(model), **(meta or {})}
    tensors = {k: _plain(v) for k, v in model.state_dict().items()}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={"format": "pt", "bitkern": "model",
                                               "meta": json.dumps(meta)})
    atomic_write_json(_meta_path(path), {**meta, "weights": path.name, "weights_sha256": _sha256(path)})
    return path


def read_model_meta(path: str | os.PathLike) -> dict[str, Any]:
    path = Path(path)
    mp = _meta_path(path)
    if not mp.is_file():
        raise CheckpointError(f"missing model metadata {mp} next to {path}")
    try:
        return json.loads(mp.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{mp}: unreadable JSON ({e})") from None


def load_model(path: str | os.PathLike, model: torch.nn.Module | None = None, strict: bool = True):
    """Load weights saved by save_model. Without ``model`` the model is rebuilt from the metadata
    with ``bitkern.models.create(arch, quant, num_classes, in_channels)``."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"model file not found: {path}")
    meta = read_model_meta(path)
    if model is None:
        from . import models  # issue-3 module; imported lazily so checkpoints work without it

        missing = [k for k in ("arch", "quant") if k not in meta]
        if missing:
            raise CheckpointError(f"{path}: metadata lacks {missing}; pass the model explicitly")
        model = models.create(meta["arch"], meta["quant"], num_classes=meta.get("num_classes", 10),
                              in_channels=meta.get("in_channels", 3))
    try:
        model.load_state_dict(load_file(str(path)), strict=strict)
    except RuntimeError as e:
        raise CheckpointError(f"{path}: weights do not fit the model: {e}") from None
    return model
