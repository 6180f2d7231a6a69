"""Checkpoints without pickle: tensors in safetensors, everything else in JSON; every file hashed and checked.

A checkpoint directory holds

* ``checkpoint-NNNNNN.safetensors``: model state (``model/<name>``), optimizer state tensors
  (``optim/<param index>/<key>``), the torch CPU RNG state (``rng/torch``, uint8) and extra tensors
  (``extra/<name>``, e.g. a recipe's persistent perturbation). Its header ``__metadata__`` holds
  ``bitkern: "checkpoint"``, ``bitkern_format_version: "3"``, ``bitkern_state`` (the whole training state
  below as canonical JSON: sorted keys, no spaces) and ``bitkern_sha256``, the content hash of
  bitkern.model_files, which covers every metadata entry, so the training state is hashed too;
* ``checkpoint.json``: the commit marker, written last. It holds ``format_version`` (3), the weights file
  name (a plain name inside the directory), ``weights_sha256`` (sha256 of the whole weights file) and
  ``content_sha256`` (= the header's ``bitkern_sha256``), plus a readable copy of the training state: arch,
  quant spec, num_classes, in_channels, run config (recipe + args, ...), epoch, step, history, optimizer
  param groups and non-tensor state, numpy / python RNG states, metrics. Loading requires that copy to
  equal ``bitkern_state`` (compared as canonical JSON, so ``1``, ``1.0`` and ``true`` differ): an edit of
  checkpoint.json alone is refused, and the state used is the hashed one.

Both are written atomically (temp file + os.replace). Because the weights file name carries a serial and
old files are deleted only after the JSON points to the new one, a crash at any moment leaves a consistent
(weights, JSON) pair on disk. Loading checks the JSON fields (types and ranges), the weights path, both
hashes, every tensor's name / dtype / shape against the model and optimizer given, and finite floats, all
before anything is loaded into the model; with a model given, its arch / quant / num_classes /
in_channels must equal the checkpoint's, and optimizer param groups must hold the keys of the optimizer
given, with values in range (lr >= 0, momentum / dampening in [0, 1], betas in [0, 1), eps > 0, ...).
Checkpoints of format versions 1 and 2 (training state not hashed) are refused with a message saying how
to restart; they only ever hold the state of an unfinished run.

Single-file model weights (``save_model`` / ``load_model``): a safetensors file whose header holds
``bitkern: "model"``, ``bitkern_format_version: "2"``, ``meta`` (the model description as JSON) and
``bitkern_sha256``; plus ``<name>.json`` next to it with the same description, ``format_version`` (2),
``weights`` (the file's own name), ``weights_sha256`` (whole file) and ``content_sha256``. The description
(arch / quant / num_classes / in_channels) is enough to rebuild the model with ``bitkern.models.create``.
Version-1 model files (sidecar without ``format_version``, no content hash) load when the sidecar's
``weights_sha256`` matches the whole file.

Every problem with a file raises CheckpointError (ModelFileError, its subclass, for corrupt / tampered /
inconsistent files) with one line naming the file.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ._checks import is_int
from ._io import atomic_write_json
from .model_files import _loads  # JSON without duplicate keys
from .model_files import (CheckpointError, ModelFileError, check_entries, check_model_meta, contained_file,
                          expected_state, is_sha256, load_verified, read_header, read_json, spec_of_module,
                          write_safetensors)

__all__ = [
    "CheckpointError",
    "ModelFileError",
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
    "MODEL_FORMAT_VERSION",
]

FORMAT_VERSION = 3        # checkpoints; 3: training state hashed in the header. 1 and 2 are refused
_OLD_FORMATS = (1, 2)
STATE_KEY = "bitkern_state"
MODEL_FORMAT_VERSION = 2  # save_model files; v1 (no content hash) likewise
JSON_NAME = "checkpoint.json"
_MAX_COUNT = 10 ** 12     # epochs / steps
_RESERVED = ("format_version", "weights", "weights_sha256", "content_sha256")


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


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _bad(where, msg: str) -> ModelFileError:
    return ModelFileError(f"{where}: {msg}")


def _canonical(obj) -> str:
    """Canonical JSON text (sorted keys, no spaces, ASCII, no NaN): equal text <=> equal JSON values."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)


def _diff_paths(a, b, path: str = "", out: list[str] | None = None, limit: int = 5) -> list[str]:
    """Where two JSON values differ (as canonical JSON), e.g. ``optimizer.param_groups[0].betas``."""
    out = [] if out is None else out
    if len(out) >= limit:
        return out
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b)):
            sub = f"{path}.{k}" if path else str(k)
            if k not in a or k not in b:
                out.append(sub + (" (removed)" if k not in b else " (added)"))
            else:
                _diff_paths(a[k], b[k], sub, out, limit)
            if len(out) >= limit:
                break
    elif isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        for i, (x, y) in enumerate(zip(a, b)):
            _diff_paths(x, y, f"{path}[{i}]", out, limit)
            if len(out) >= limit:
                break
    elif _canonical(a) != _canonical(b):
        out.append(path or "<root>")
    return out


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


def _kind(v) -> str:
    if v is None:
        return "none"
    if isinstance(v, bool):
        return "bool"
    if isinstance(v, (int, float)):
        return "number"
    if isinstance(v, str):
        return "str"
    if isinstance(v, (list, tuple)):
        return f"seq{len(v)}"
    return type(v).__name__


def _check_json_scalar(where, what: str, v) -> None:
    ok = v is None or isinstance(v, (bool, str)) or _is_number(v) or (
        isinstance(v, (list, tuple)) and all(x is None or isinstance(x, (bool, str)) or _is_number(x) for x in v))
    if not ok:
        raise _bad(where, f"{what} must be a finite number, bool, string or null, got {v!r:.80}")


def _check_optimizer_json(where, meta) -> None:
    """Structure of the ``optimizer`` entry (needs no optimizer)."""
    if not isinstance(meta, dict) or not isinstance(meta.get("type"), str):
        raise _bad(where, "optimizer must be an object with a string 'type'")
    groups = meta.get("param_groups")
    if not isinstance(groups, list) or not all(isinstance(g, dict) for g in groups):
        raise _bad(where, "optimizer param_groups must be a list of objects")
    seen: set[int] = set()
    for i, g in enumerate(groups):
        params = g.get("params")
        if not isinstance(params, list) or not all(is_int(p) and 0 <= p < 2 ** 31 for p in params):
            raise _bad(where, f"optimizer param_groups[{i}].params must be a list of non-negative ints")
        if seen.intersection(params) or len(set(params)) != len(params):
            raise _bad(where, f"optimizer param_groups[{i}].params repeats a parameter index")
        seen.update(params)
        for key, val in g.items():
            if key != "params":
                _check_json_scalar(where, f"optimizer param_groups[{i}].{key}", val)
                _check_group_value(where, f"optimizer param_groups[{i}].{key}", key, val)
        if g.get("nesterov") is True and not (_is_number(g.get("momentum")) and g["momentum"] > 0
                                              and g.get("dampening", 0) == 0):
            raise _bad(where, f"optimizer param_groups[{i}]: nesterov needs momentum > 0 and dampening 0, "
                              f"got momentum {g.get('momentum')!r:.40}, dampening {g.get('dampening')!r:.40}")
    scalars = meta.get("scalars", {})
    if not isinstance(scalars, dict):
        raise _bad(where, "optimizer scalars must be an object")
    for idx, kv in scalars.items():
        if not re.fullmatch(r"0|[1-9][0-9]{0,9}", idx) or int(idx) not in seen or not isinstance(kv, dict):
            raise _bad(where, f"optimizer scalars key {idx!r} is not the index of a parameter")
        for key, val in kv.items():
            _check_json_scalar(where, f"optimizer scalars[{idx}].{key}", val)
            if key == "step" and not (_is_number(val) and 0 <= val <= _MAX_COUNT):
                raise _bad(where, f"optimizer scalars[{idx}].step must be a number in [0, {_MAX_COUNT}], "
                                  f"got {val!r:.40}")


_UNIT = lambda v: 0 <= v <= 1  # noqa: E731
# param-group hyper-parameters of torch's optimizers: (check, what it must be)
_GROUP_RANGES: dict[str, tuple[Any, str]] = {
    "lr": (lambda v: _is_number(v) and v >= 0, "a finite number >= 0"),
    "initial_lr": (lambda v: _is_number(v) and v >= 0, "a finite number >= 0"),
    "momentum": (lambda v: _is_number(v) and _UNIT(v), "a number in [0, 1]"),
    "dampening": (lambda v: _is_number(v) and _UNIT(v), "a number in [0, 1]"),
    "alpha": (lambda v: _is_number(v) and _UNIT(v), "a number in [0, 1]"),
    "betas": (lambda v: isinstance(v, (list, tuple)) and len(v) == 2
              and all(_is_number(b) and 0 <= b < 1 for b in v), "two numbers in [0, 1)"),
    "eps": (lambda v: _is_number(v) and v > 0, "a finite number > 0"),
    "weight_decay": (lambda v: _is_number(v) and v >= 0, "a finite number >= 0"),
    **{k: (lambda v: isinstance(v, bool), "true or false")
       for k in ("nesterov", "maximize", "amsgrad", "capturable", "differentiable", "decoupled_weight_decay",
                 "centered")},
    **{k: (lambda v: v is None or isinstance(v, bool), "true, false or null") for k in ("foreach", "fused")},
}


def _check_group_value(where, what: str, key: str, val) -> None:
    check = _GROUP_RANGES.get(key)
    if check is not None and not check[0](val):
        raise _bad(where, f"{what} must be {check[1]}, got {val!r:.60}")


def _optimizer_params(opt: torch.optim.Optimizer, meta: dict, where) -> dict[int, torch.Tensor]:
    """Saved parameter index -> the optimizer's parameter; checks that the groups fit ``opt``."""
    if meta.get("type") != type(opt).__name__:
        raise CheckpointError(f"{where}: checkpoint optimizer is {meta.get('type')}, got {type(opt).__name__}")
    saved, current = meta["param_groups"], opt.param_groups
    if len(saved) != len(current):
        raise CheckpointError(f"{where}: checkpoint has {len(saved)} optimizer param groups, the optimizer "
                              f"has {len(current)}")
    out: dict[int, torch.Tensor] = {}
    for i, (sg, cg) in enumerate(zip(saved, current)):
        if len(sg["params"]) != len(cg["params"]):
            raise CheckpointError(f"{where}: optimizer param_groups[{i}] has {len(sg['params'])} parameters, "
                                  f"the optimizer {len(cg['params'])}")
        unknown, missing = sorted(set(sg) - set(cg)), sorted(set(cg) - set(sg))
        if unknown or missing:
            raise CheckpointError(f"{where}: optimizer param_groups[{i}] does not fit {type(opt).__name__}: "
                                  + ", ".join(([f"unknown key(s) {unknown}"] if unknown else [])
                                              + ([f"missing key(s) {missing}"] if missing else [])))
        for key, val in sg.items():
            if (key == "params" or key not in cg or val is None or cg[key] is None
                    or isinstance(cg[key], torch.Tensor)):
                continue
            if _kind(val) != _kind(cg[key]):
                raise CheckpointError(f"{where}: optimizer param_groups[{i}].{key} = {val!r:.60} does not fit "
                                      f"the optimizer's {cg[key]!r:.60}")
        out.update(zip(sg["params"], cg["params"]))
    return out


def _check_optimizer_tensors(where, tensors_meta: dict[str, Any], params: dict[int, torch.Tensor]) -> None:
    """optim/<idx>/<key>: a known parameter index; a scalar or the parameter's shape and dtype."""
    for name, entry in tensors_meta.items():
        _, idx, key = name.split("/", 2)
        p = params.get(int(idx))
        if p is None:
            raise _bad(where, f"tensor {name!r} belongs to no parameter of the optimizer")
        if not entry.dtype.is_floating_point:
            raise _bad(where, f"tensor {name!r} is stored as {entry.dtype_name}, expected a float dtype")
        if entry.shape != () and (entry.shape != tuple(p.shape) or entry.dtype != p.dtype):
            raise _bad(where, f"tensor {name!r} is {entry.dtype_name} {list(entry.shape)}; its parameter is "
                              f"{p.dtype} {list(p.shape)}")


def _optimizer_load(opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict, where) -> None:
    state: dict[int, dict[str, Any]] = {}
    for key, val in tensors.items():
        if key.startswith("optim/"):
            _, idx, name = key.split("/", 2)
            state.setdefault(int(idx), {})[name] = val
    for idx, kv in meta.get("scalars", {}).items():
        state.setdefault(int(idx), {}).update(kv)
    groups = [dict(g) for g in meta["param_groups"]]
    for g in groups:
        for k, v in g.items():
            if isinstance(v, list) and k != "params":
                g[k] = tuple(v)
    try:
        opt.load_state_dict({"state": state, "param_groups": groups})
    except (ValueError, KeyError, TypeError, RuntimeError) as e:
        raise CheckpointError(f"{where}: optimizer state does not fit this optimizer: "
                              f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from None


# -------------------------------------------------------------------------------- checkpoint JSON
def _count(where, state: dict, key: str) -> None:
    v = state[key]
    if not is_int(v) or not 0 <= v <= _MAX_COUNT:
        raise _bad(where, f"{key} must be a non-negative int, got {type(v).__name__} {v!r:.40}")


def _check_rng_json(where, rng) -> None:
    if not isinstance(rng, dict):
        raise _bad(where, "rng must be an object")
    u32 = lambda x: is_int(x) and 0 <= x < 2 ** 32  # noqa: E731
    if "numpy" in rng:
        n = rng["numpy"]
        if not (isinstance(n, list) and len(n) == 5 and n[0] == "MT19937" and isinstance(n[1], list)
                and len(n[1]) == 624 and all(u32(x) for x in n[1]) and is_int(n[2]) and 0 <= n[2] <= 624
                and n[3] in (0, 1) and is_int(n[3]) and _is_number(n[4])):
            raise _bad(where, "rng.numpy is not a valid MT19937 state")
    if "python" in rng:
        p = rng["python"]
        if not (isinstance(p, list) and len(p) == 3 and is_int(p[0]) and isinstance(p[1], list)
                and len(p[1]) == 625 and all(u32(x) for x in p[1]) and p[1][-1] <= 624
                and (p[2] is None or _is_number(p[2]))):
            raise _bad(where, "rng.python is not a valid random.getstate() state")


def _check_state(where, state, *, loading: bool) -> None:
    """Types and ranges of the checkpoint JSON fields bitkern reads."""
    if not isinstance(state, dict):
        raise _bad(where, f"checkpoint JSON is not an object (got {type(state).__name__})")
    if loading:
        fv = state.get("format_version")
        if is_int(fv) and fv in _OLD_FORMATS:
            raise _bad(where, f"checkpoint format_version {fv} was written by an older bitkern and its "
                              f"training state is not hashed, so it cannot be resumed safely; start the run "
                              f"again without --resume in a new --out directory (or delete "
                              f"{Path(where).parent})")
        if not is_int(fv) or fv != FORMAT_VERSION or not isinstance(state.get("weights"), str):
            raise _bad(where, f"not a bitkern checkpoint (format_version {fv!r:.40}, expected "
                              f"{FORMAT_VERSION}, and a weights file name)")
        if not is_sha256(state.get("weights_sha256")):
            raise _bad(where, "has no valid weights_sha256 (64 hex digits); refusing unverified weights")
        if not is_sha256(state.get("content_sha256")):
            raise _bad(where, "has no valid content_sha256 (64 hex digits); refusing unverified weights")
    for key in ("epoch", "step"):
        if key in state:
            _count(where, state, key)
    for key in ("config", "metrics", "recipe_state"):
        if key in state and not isinstance(state[key], dict):
            raise _bad(where, f"{key} must be an object, got {type(state[key]).__name__}")
    if "history" in state and not (isinstance(state["history"], list)
                                   and all(isinstance(r, dict) for r in state["history"])):
        raise _bad(where, "history must be a list of objects")
    if "config" in state:  # written by bitkern.train.fit: epoch, step and history belong to it
        for key in ("epoch", "step", "history"):
            if key not in state:
                raise _bad(where, f"training checkpoint lacks {key}")
        run_epochs = state["config"].get("run_epochs")
        if is_int(run_epochs) and state["epoch"] > run_epochs:
            raise _bad(where, f"epoch {state['epoch']} exceeds the run's {run_epochs} epochs")
        if len(state["history"]) != state["epoch"]:
            raise _bad(where, f"history has {len(state['history'])} rows for epoch {state['epoch']}")
    if "optimizer" in state:
        _check_optimizer_json(where, state["optimizer"])
    if "rng" in state:
        _check_rng_json(where, state["rng"])
    check_model_meta(where, {k: state[k] for k in ("arch", "quant", "num_classes", "in_channels") if k in state},
                     required=(), known=False)


_MODEL_KEYS = ("arch", "quant", "num_classes", "in_channels")


def _norm_model_value(key: str, v):
    if key == "arch" and isinstance(v, str):
        return v.strip().lower()
    if key == "quant" and isinstance(v, str):
        from .models import parse_quant
        try:
            return str(parse_quant(v))
        except (ValueError, TypeError):
            return v
    return v if is_int(v) or isinstance(v, str) else repr(v)


def _check_model_identity(where, state: dict, model: torch.nn.Module, what: str = "checkpoint") -> None:
    """arch / quant / num_classes / in_channels of the checkpoint equal those of ``model``."""
    have = model_meta(model)
    for key in _MODEL_KEYS:
        saved, cur = state.get(key), have.get(key)
        if saved is None and cur is None:
            continue
        if saved is None or cur is None or _norm_model_value(key, saved) != _norm_model_value(key, cur):
            raise CheckpointError(f"{where}: {what} {key} is {saved!r:.60}, but the model being "
                                  f"{'resumed' if what == 'checkpoint' else 'saved'} has {key} {cur!r:.60}")


_TENSOR_NAME = re.compile(r"model/.+|optim/(0|[1-9][0-9]{0,9})/[A-Za-z0-9_.]+|rng/torch|extra/.+")


# ------------------------------------------------------------------------------------- checkpoint
def has_checkpoint(directory: str | os.PathLike) -> bool:
    return (Path(directory) / JSON_NAME).is_file()


def save_checkpoint(directory: str | os.PathLike, *, model: torch.nn.Module,
                    optimizer: torch.optim.Optimizer | None = None, state: dict[str, Any] | None = None,
                    tensors: dict[str, torch.Tensor] | None = None, rng: bool = True) -> Path:
    """Write model / optimizer / RNG / extra tensors + JSON state; returns the JSON path."""
    directory = Path(directory)
    state = dict(state or {})
    clash = [k for k in _RESERVED if k in state]
    if clash:
        raise ValueError(f"state: keys {clash} are reserved for the checkpoint format")
    state = {**model_meta(model), **state}  # what defines the model is always recorded
    _check_model_identity(directory / JSON_NAME, state, model, what="state")
    directory.mkdir(parents=True, exist_ok=True)
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
    try:
        text = _canonical(state)
    except (TypeError, ValueError) as e:
        raise TypeError(f"state: cannot be stored as JSON ({e})") from None
    state = json.loads(text)  # exactly what loading will see (tuples -> lists)
    _check_state(directory / JSON_NAME, state, loading=False)  # never write what loading would refuse

    # a fresh file name per save: the JSON keeps pointing at the previous, intact file until replaced
    existing = sorted(directory.glob("checkpoint-*.safetensors"))
    serial = 1 + max((int(p.stem.split("-")[-1]) for p in existing if p.stem.split("-")[-1].isdigit()),
                     default=0)
    wname = f"checkpoint-{serial:06d}.safetensors"
    digest = write_safetensors(directory / wname, out, {"format": "pt", "bitkern": "checkpoint",
                                                        "bitkern_format_version": str(FORMAT_VERSION),
                                                        STATE_KEY: text})
    state.update({"format_version": FORMAT_VERSION, "weights": wname,
                  "weights_sha256": _sha256(directory / wname), "content_sha256": digest})
    json_path = directory / JSON_NAME
    atomic_write_json(json_path, state)
    for p in existing:  # only now is the old pair unreferenced
        if p.name != wname:
            p.unlink(missing_ok=True)
    return json_path


def load_checkpoint(directory: str | os.PathLike, *, model: torch.nn.Module | None = None,
                    optimizer: torch.optim.Optimizer | None = None, rng: bool = False,
                    strict: bool = True) -> Checkpoint:
    """Read a checkpoint; optionally load it into ``model`` / ``optimizer`` and restore RNG states.

    Everything is checked (JSON fields, weights path, hashes, tensor names / dtypes / shapes against
    ``model`` and ``optimizer``, finite values) before ``model`` / ``optimizer`` / the RNGs are touched."""
    directory = Path(directory)
    json_path = directory / JSON_NAME
    if not json_path.is_file():
        raise CheckpointError(f"no checkpoint in {directory} (missing {JSON_NAME})")
    state = read_json(json_path, "checkpoint JSON")
    _check_state(json_path, state, loading=True)
    wpath = contained_file(directory, state["weights"], json_path)
    if not wpath.is_file():
        raise CheckpointError(f"{json_path} names {wpath.name}, which is missing")
    header = read_header(wpath)
    md = header.metadata
    if md.get("bitkern") != "checkpoint" or md.get("bitkern_format_version") != str(FORMAT_VERSION):
        raise _bad(wpath, f"is not a bitkern checkpoint weights file of format {FORMAT_VERSION} (header "
                          f"bitkern / bitkern_format_version)")
    if md.get("bitkern_sha256") != state["content_sha256"]:
        raise _bad(wpath, f"content hash in its header does not match {json_path.name} "
                          f"(corrupt or mixed checkpoint)")
    try:
        hstate = _loads(md.get(STATE_KEY, "null"))
    except (ValueError, RecursionError):
        hstate = None
    if not isinstance(hstate, dict):
        raise _bad(wpath, f"header has no training state ({STATE_KEY} is missing or not a JSON object)")
    jstate = {k: v for k, v in state.items() if k not in _RESERVED}
    if _canonical(jstate) != _canonical(hstate):
        raise _bad(json_path, f"training state differs from the hashed copy in {wpath.name} at "
                              f"{', '.join(_diff_paths(hstate, jstate))} (edited or mixed checkpoint); refusing it")
    state = {**hstate, **{k: state[k] for k in _RESERVED}}  # the hashed state (equal to the JSON's)
    bad = sorted(n for n in header.entries if not _TENSOR_NAME.fullmatch(n))
    if bad:
        raise _bad(wpath, f"unexpected tensor name(s) {bad[:3]} (expected model/, optim/<index>/, rng/torch, "
                          f"extra/)")
    rng_entry = header.entries.get("rng/torch")
    if rng_entry is not None and (rng_entry.dtype != torch.uint8
                                  or rng_entry.shape != tuple(torch.get_rng_state().shape)):
        raise _bad(wpath, f"tensor 'rng/torch' is {rng_entry.dtype_name} {list(rng_entry.shape)}, expected U8 "
                          f"{list(torch.get_rng_state().shape)}")
    if model is not None:
        _check_model_identity(json_path, state, model)
        expected = {f"model/{k}": v for k, v in spec_of_module(model).items()}
        check_entries(header, expected, strict=strict, only=[n for n in header.entries if n.startswith("model/")])
    optim_entries = {n: e for n, e in header.entries.items() if n.startswith("optim/")}
    if optim_entries and "optimizer" not in state:
        raise _bad(json_path, "weights hold optimizer tensors but the JSON has no optimizer entry")
    if optimizer is not None:
        if "optimizer" not in state:
            raise CheckpointError(f"{json_path}: checkpoint has no optimizer state")
        params = _optimizer_params(optimizer, state["optimizer"], json_path)
        _check_optimizer_tensors(wpath, optim_entries, params)
    tensors = load_verified(header, whole_sha256=state["weights_sha256"], require_hash=True)

    # everything checked: now change the caller's objects
    backup = None
    if model is not None:
        msd = {k[len("model/"):]: v for k, v in tensors.items() if k.startswith("model/")}
        backup = {k: v.detach().clone() for k, v in model.state_dict().items()}
        try:
            model.load_state_dict(msd, strict=strict)
        except RuntimeError as e:
            raise CheckpointError(f"{wpath}: model weights do not fit this model: "
                                  f"{str(e).splitlines()[0]}") from None
    if optimizer is not None:
        try:
            _optimizer_load(optimizer, tensors, state["optimizer"], json_path)
        except CheckpointError:
            if backup is not None:
                model.load_state_dict(backup, strict=False)
            raise
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
    """Save model weights to ``path`` (safetensors, with the description and a content hash in its header)
    and the description + hashes to ``path`` with a .json suffix."""
    import json

    path = Path(path)
    meta = {**model_meta(model), **(meta or {})}
    clash = [k for k in _RESERVED if k in meta]
    if clash:
        raise ValueError(f"meta: keys {clash} are reserved for the file format")
    try:
        text = json.dumps(meta, sort_keys=True, allow_nan=False)
    except (TypeError, ValueError) as e:
        raise TypeError(f"meta: cannot be stored as JSON ({e})") from None
    tensors = {k: _plain(v) for k, v in model.state_dict().items()}
    digest = write_safetensors(path, tensors, {"format": "pt", "bitkern": "model",
                                               "bitkern_format_version": str(MODEL_FORMAT_VERSION),
                                               "meta": text})
    atomic_write_json(_meta_path(path), {**meta, "format_version": MODEL_FORMAT_VERSION, "weights": path.name,
                                         "weights_sha256": _sha256(path), "content_sha256": digest})
    return path


def read_model_meta(path: str | os.PathLike) -> dict[str, Any]:
    """The checked ``<name>.json`` next to a model file written by save_model."""
    path = Path(path)
    mp = _meta_path(path)
    if not mp.is_file():
        raise CheckpointError(f"missing model metadata {mp} next to {path}")
    side = read_json(mp, "model metadata JSON")
    if not isinstance(side, dict):
        raise _bad(mp, f"model metadata is not a JSON object (got {type(side).__name__})")
    fv = side.get("format_version", 1)
    if not is_int(fv) or fv not in (1, MODEL_FORMAT_VERSION) or (fv == 1 and "format_version" in side):
        raise _bad(mp, f"unsupported model format_version {fv!r:.40} (expected {MODEL_FORMAT_VERSION})")
    contained_file(mp.parent, side.get("weights"), mp)
    if side["weights"] != path.name:
        raise _bad(mp, f"names weights {side['weights']!r}, not {path.name!r} (metadata of another file?)")
    if not is_sha256(side.get("weights_sha256")):
        raise _bad(mp, "has no valid weights_sha256 (64 hex digits); re-create the file with "
                       "bitkern.checkpoint.save_model")
    if fv >= 2 and not is_sha256(side.get("content_sha256")):
        raise _bad(mp, "has no valid content_sha256 (64 hex digits); re-create the file with "
                       "bitkern.checkpoint.save_model")
    check_model_meta(mp, side, required=(), known=False)
    return side


def _header_meta(path: Path, header, side: dict) -> dict[str, Any]:
    """The model description from the (hashed) header; must agree with the sidecar."""
    import json

    md = header.metadata
    if side.get("format_version", 1) >= 2:
        if md.get("bitkern") != "model" or md.get("bitkern_format_version") != str(MODEL_FORMAT_VERSION):
            raise _bad(path, "header does not mark a bitkern model file (bitkern / bitkern_format_version)")
        if md.get("bitkern_sha256") != side["content_sha256"]:
            raise _bad(path, f"content hash in its header does not match {_meta_path(path).name} "
                             f"(corrupt or mixed files)")
    if "meta" not in md:
        raise _bad(path, "header has no model description (meta)")
    try:
        hmeta = json.loads(md["meta"])
    except (ValueError, RecursionError):
        hmeta = None
    if not isinstance(hmeta, dict):
        raise _bad(path, "model description (meta) in the header is not a JSON object")
    smeta = {k: v for k, v in side.items() if k not in _RESERVED}
    if _canonical(smeta) != _canonical(hmeta):  # as JSON text: 1, 1.0 and true differ
        diff = sorted(k for k in set(smeta) | set(hmeta)
                      if k not in smeta or k not in hmeta or _canonical(smeta[k]) != _canonical(hmeta[k]))
        raise _bad(path, f"description in {_meta_path(path).name} differs from its header in {diff[:5]}")
    return hmeta


def load_model(path: str | os.PathLike, model: torch.nn.Module | None = None, strict: bool = True):
    """Load weights saved by save_model. Without ``model`` the model is rebuilt from the metadata
    with ``bitkern.models.create(arch, quant, num_classes, in_channels)``.

    The sidecar, the header description, both hashes and every tensor's name / dtype / shape (against
    ``model``, or the model the description implies, built on the meta device first) are checked, and
    floats must be finite, before any weight is loaded."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"model file not found: {path}")
    side = read_model_meta(path)
    header = read_header(path)
    meta = _header_meta(path, header, side)
    if model is None:
        check_model_meta(path, meta)
        expected = expected_state(path, meta)
    else:
        expected = spec_of_module(model)
    check_entries(header, expected, strict=strict)
    tensors = load_verified(header, whole_sha256=side["weights_sha256"],
                            require_hash=side.get("format_version", 1) >= 2, expected=expected)
    if model is None:
        from .models import create

        with torch.random.fork_rng(devices=[]):
            model = create(meta["arch"], meta["quant"], num_classes=meta["num_classes"],
                           in_channels=meta["in_channels"])
    try:
        model.load_state_dict(tensors, strict=strict)
    except RuntimeError as e:
        raise CheckpointError(f"{path}: weights do not fit the model: {str(e).splitlines()[0]}") from None
    return model
