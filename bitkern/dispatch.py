"""One place that decides which backend runs an op.

Backends register themselves (bitkern.backends.registry) with a preference per device type: CPU tensors
go to the C++ extension ("cpp") when it is built, CUDA tensors to "cuda" or "triton" when available;
everything else (and anything, when forced) to the pure-torch float emulation ("torch").
`BITKERN_BACKEND=<name>` or `set_backend(name)` forces one; layers never care which ran.

Environment: `check_environment()` validates every BITKERN_* variable the package reads and raises
ValueError with one line (variable, value, what was expected) for a bad one. Every op checks the
kernel variables (BITKERN_BACKEND, BITKERN_ISA, BITKERN_NUM_THREADS, BITKERN_OUTPUT_POOL_MB) before it
picks a backend, so a bad value fails the first op instead of silently changing backends.
"""
from __future__ import annotations

import contextlib
import os
import warnings

import torch

from . import _env, backends
from ._env import ISAS, KERNEL_ENV_VARS, MAX_NUM_THREADS, OTHER_ENV_VARS, env_isa, env_num_threads  # noqa: F401
from ._env import env_output_pool_mb  # noqa: F401
from .backends import registry
from .backends.base import Backend

_forced: str | None = None
_warned_fallback: set = set()
_env_ok_key: tuple | None = None  # KERNEL_ENV_VARS values last found valid


def env_backend() -> str | None:
    """BITKERN_BACKEND validated against the registered backends (None: unset or empty)."""
    value = os.environ.get("BITKERN_BACKEND")
    if not value:
        return None
    if value not in registry.names():
        raise _env.env_error("BITKERN_BACKEND", value,
                             f"one of {', '.join(sorted(registry.names()))} (or unset)")
    return value


def _check_kernel_environment() -> None:
    """Validate KERNEL_ENV_VARS; cheap when they have not changed since the last successful check."""
    global _env_ok_key
    environ = os.environ
    key = tuple(environ.get(name) for name in KERNEL_ENV_VARS)
    if key == _env_ok_key:
        return
    env_backend()
    isa = env_isa()
    env_num_threads()
    env_output_pool_mb()
    if isa is not None and isa != "scalar":
        cpp = get("cpp")
        supported = cpp.isa_supported() if cpp.available else None
        if supported is not None and isa not in supported:
            raise _env.env_error("BITKERN_ISA", environ["BITKERN_ISA"],
                                 f"an ISA this CPU/OS supports: {', '.join(supported)}")
    _env_ok_key = key


def check_environment() -> None:
    """Raise ValueError (one line: variable, value, expected) when a BITKERN_* variable the package reads
    has a bad value; return None otherwise. Kernel variables: BITKERN_BACKEND (a registered backend:
    torch, cpp, cuda, triton), BITKERN_ISA (avx512, avx2, scalar; one this CPU supports),
    BITKERN_NUM_THREADS (1..256), BITKERN_OUTPUT_POOL_MB (0..1048576). Others: BITKERN_DEBUG and
    BITKERN_PROGRESS (0 or 1), BITKERN_KILL_AFTER_EPOCH (a positive integer). Unset or empty means the
    default. No side effects beyond loading the cpp extension to learn which ISAs this CPU supports
    (when BITKERN_ISA is set)."""
    _check_kernel_environment()
    _env.check_other_variables()


def get(name: str) -> Backend:
    """The backend called `name` (unavailable, with a reason, when it cannot be built here)."""
    return registry.get(name)


def backends_status() -> dict[str, tuple[bool, str]]:
    """{name: (available, reason)} for every backend. While a kernel environment variable is bad, every
    backend is reported unavailable with that variable's one-line error (ops raise it)."""
    try:
        _check_kernel_environment()
    except ValueError as exc:
        return {name: (False, f"environment: {exc}") for name in registry.names()}
    return {name: (bool(get(name).available), get(name).reason or "") for name in registry.names()}


def backend_report() -> str:
    """One line per backend: available or not, and why."""
    return "\n".join(f"{name:7s} {'available' if ok else 'unavailable'}{'' if ok else ': ' + reason}"
                     for name, (ok, reason) in backends_status().items())


def set_backend(name: str | None) -> None:
    """Force a backend for every op (None returns to automatic choice)."""
    global _forced
    if name is not None:
        get(name)  # validates the name
    _forced = name


def forced_backend() -> str | None:
    return _forced or env_backend()


@contextlib.contextmanager
def use_backend(name: str | None):
    """Temporarily force a backend: `with bitkern.dispatch.use_backend("torch"): ...`."""
    previous = _forced
    set_backend(name)
    try:
        yield
    finally:
        set_backend(previous)


def backend_for(device: torch.device | str) -> Backend:
    """The backend that runs ops on tensors of `device`."""
    _check_kernel_environment()
    device = torch.device(device)
    forced = forced_backend()
    if forced:
        backend = get(forced)
        if not backend.available:
            raise RuntimeError(f"backend {forced!r} was requested (BITKERN_BACKEND / set_backend) but is "
                               f"unavailable: {backend.reason}")
        if not backend.supports(device):
            raise RuntimeError(f"backend {forced!r} cannot run on {device.type} tensors; "
                               f"use BITKERN_BACKEND=torch or move the tensors")
        return backend
    order = registry.preference(device.type)
    for i, name in enumerate(order):
        backend = get(name)
        if backend.available and backend.supports(device):
            if name == "torch" and i > 0 and device.type not in _warned_fallback:
                _warned_fallback.add(device.type)
                reasons = "; ".join(f"{n}: {get(n).reason}" for n in order[:i])
                warnings.warn(f"bitkern: no packed backend for {device.type} tensors ({reasons}); "
                              "using the pure-torch float emulation", RuntimeWarning, stacklevel=3)
            return backend
    raise RuntimeError(f"no bitkern backend can run on {device}")  # torch supports all: unreachable


def set_isa(name: str | None) -> None:
    """Force the CPU kernels' instruction set: "avx512", "avx2", "scalar" (None: best available)."""
    backends.cpp.set_isa(name)
