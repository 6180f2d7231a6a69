"""One place that decides which backend runs an op.

CPU tensors go to the C++ extension ("cpp") when it is built, CUDA tensors to "cuda" or "triton" when
available; everything else (and anything, when forced) to the pure-torch float emulation ("torch").
`BITKERN_BACKEND=torch|cpp|cuda|triton` or `set_backend(name)` forces one; layers never care which ran.
"""
from __future__ import annotations

import contextlib
import importlib
import os
import warnings

import torch

BACKEND_MODULES = {
    "cpp": "bitkern.backends.cpp",
    "cuda": "bitkern.backends.cuda",
    "triton": "bitkern.backends.triton_backend",
    "torch": "bitkern.backends.torch_backend",
}
# Preference order per device type when nothing is forced.
AUTO_ORDER = {"cpu": ("cpp", "torch"), "cuda": ("cuda", "triton", "torch")}

_forced: str | None = None
_loaded: dict = {}
_warned_fallback: set = set()


class _Unavailable:
    available = False

    def __init__(self, name: str, reason: str):
        self.name, self.reason = name, reason


def get(name: str):
    """The backend object called `name` (an _Unavailable with a reason when it cannot be loaded)."""
    if name not in BACKEND_MODULES:
        raise ValueError(f"BITKERN_BACKEND / set_backend: unknown backend {name!r}; "
                         f"expected one of {sorted(BACKEND_MODULES)}")
    if name not in _loaded:
        try:
            _loaded[name] = importlib.import_module(BACKEND_MODULES[name]).backend
        except Exception as exc:  # a broken backend must say why, never vanish
            _loaded[name] = _Unavailable(name, f"import failed: {type(exc).__name__}: {exc}")
    return _loaded[name]


def backends_status() -> dict[str, tuple[bool, str]]:
    """{name: (available, reason)} for every backend."""
    return {name: (bool(get(name).available), getattr(get(name), "reason", "") or "")
            for name in BACKEND_MODULES}


def set_backend(name: str | None) -> None:
    """Force a backend for every op (None returns to automatic choice)."""
    global _forced
    if name is not None:
        get(name)  # validates the name
    _forced = name


def forced_backend() -> str | None:
    return _forced or os.environ.get("BITKERN_BACKEND") or None


@contextlib.contextmanager
def use_backend(name: str | None):
    """Temporarily force a backend: `with bitkern.dispatch.use_backend("torch"): ...`."""
    previous = _forced
    set_backend(name)
    try:
        yield
    finally:
        set_backend(previous)


def _supports(backend, device: torch.device) -> bool:
    supports = getattr(backend, "supports", None)
    return supports(device) if supports is not None else device.type == "cpu"


def backend_for(device: torch.device | str):
    """The backend that runs ops on tensors of `device`."""
    device = torch.device(device)
    forced = forced_backend()
    if forced:
        backend = get(forced)
        if not backend.available:
            raise RuntimeError(f"backend {forced!r} was requested (BITKERN_BACKEND / set_backend) but is "
                               f"unavailable: {backend.reason}")
        if not _supports(backend, device):
            raise RuntimeError(f"backend {forced!r} cannot run on {device.type} tensors; "
                               f"use BITKERN_BACKEND=torch or move the tensors")
        return backend
    order = AUTO_ORDER.get(device.type, ("torch",))
    for name in order:
        backend = get(name)
        if backend.available and _supports(backend, device):
            if name == "torch" and len(order) > 1 and device.type not in _warned_fallback:
                _warned_fallback.add(device.type)
                reasons = "; ".join(f"{n}: {get(n).reason}" for n in order[:-1])
                warnings.warn(f"bitkern: no packed backend for {device.type} tensors ({reasons}); "
                              "using the pure-torch float emulation", RuntimeWarning, stacklevel=3)
            return backend
    raise RuntimeError(f"no bitkern backend can run on {device}")  # torch supports all: unreachable


def set_isa(name: str | None) -> None:
    """Force the CPU kernels' instruction set: "avx512", "avx2", "scalar" (None: best available)."""
    from .backends import cpp
    cpp.set_isa(name)
