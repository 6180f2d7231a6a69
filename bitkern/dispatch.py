"""One place that decides which backend runs an op.

CPU tensors go to the C++ extension ("cpp") when it is built, CUDA tensors to "cuda" or "triton" when
available; everything else (and anything, when forced) to the pure-torch float emulation ("torch").
`BITKERN_BACKEND=torch|cpp|cuda|triton` or `set_backend(name)` forces one; layers never care which ran.

Environment: `check_environment()` validates every BITKERN_* variable the package reads and raises
ValueError with one line (variable, value, what was expected) for a bad one. Every op checks the
kernel variables (BITKERN_BACKEND, BITKERN_ISA, BITKERN_NUM_THREADS, BITKERN_OUTPUT_POOL_MB) before it
picks a backend, so a bad value fails the first op instead of silently changing backends.
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

# ---------------------------------------------------------------------------------------------------
# environment variables

ISAS = ("avx512", "avx2", "scalar")  # BITKERN_ISA values (the cpp backend's ISA paths)
MAX_NUM_THREADS = 256  # the engine's thread cap: BITKERN_NUM_THREADS above it is an error, not clamped
MAX_OUTPUT_POOL_MB = 1 << 20  # 1 TiB
# The variables the ops read (checked before every op; the check is skipped while they are unchanged).
KERNEL_ENV_VARS = ("BITKERN_BACKEND", "BITKERN_ISA", "BITKERN_NUM_THREADS", "BITKERN_OUTPUT_POOL_MB")
# Read by the CLI and the training loop (checked by check_environment only).
OTHER_ENV_VARS = ("BITKERN_DEBUG", "BITKERN_PROGRESS", "BITKERN_KILL_AFTER_EPOCH")
_env_ok_key: tuple | None = None  # KERNEL_ENV_VARS values last found valid


def _env_error(name: str, value: str, expected: str) -> ValueError:
    return ValueError(f"{name}={value!r}: expected {expected}")


def _env_int(name: str, value: str, lo: int, hi: int, what: str) -> int:
    text = value.strip()
    if not (text.isascii() and text.isdigit()) or not lo <= int(text) <= hi:
        raise _env_error(name, value, f"{what}, an integer in {lo}..{hi}")
    return int(text)


def env_backend() -> str | None:
    """BITKERN_BACKEND validated (None: unset or empty)."""
    value = os.environ.get("BITKERN_BACKEND")
    if not value:
        return None
    if value not in BACKEND_MODULES:
        raise _env_error("BITKERN_BACKEND", value, f"one of {', '.join(sorted(BACKEND_MODULES))} (or unset)")
    return value


def env_isa() -> str | None:
    """BITKERN_ISA validated by name (case and surrounding blanks ignored; None: unset or empty)."""
    value = os.environ.get("BITKERN_ISA")
    if not value:
        return None
    name = value.strip().lower()
    if name not in ISAS:
        raise _env_error("BITKERN_ISA", value, f"one of {', '.join(ISAS)} (or unset)")
    return name


def env_num_threads() -> int | None:
    """BITKERN_NUM_THREADS validated: 1..MAX_NUM_THREADS (None: unset or empty)."""
    value = os.environ.get("BITKERN_NUM_THREADS")
    if not value:
        return None
    return _env_int("BITKERN_NUM_THREADS", value, 1, MAX_NUM_THREADS, "a thread count")


def env_output_pool_mb() -> int | None:
    """BITKERN_OUTPUT_POOL_MB validated: 0..MAX_OUTPUT_POOL_MB MiB (None: unset or empty)."""
    value = os.environ.get("BITKERN_OUTPUT_POOL_MB")
    if not value:
        return None
    return _env_int("BITKERN_OUTPUT_POOL_MB", value, 0, MAX_OUTPUT_POOL_MB, "a size in MiB")


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
        supported = _cpu_isas()
        if supported is not None and isa not in supported:
            raise _env_error("BITKERN_ISA", environ["BITKERN_ISA"],
                             f"an ISA this CPU/OS supports: {', '.join(supported)}")
    _env_ok_key = key


def _cpu_isas():
    """ISA paths the cpp backend can run here, or None when the extension cannot be loaded."""
    backend = get("cpp")
    return backend.isa_supported() if backend.available else None


def check_environment() -> None:
    """Raise ValueError (one line: variable, value, expected) when a BITKERN_* variable the package reads
    has a bad value; return None otherwise. Kernel variables: BITKERN_BACKEND (torch, cpp, cuda,
    triton), BITKERN_ISA (avx512, avx2, scalar; one this CPU supports), BITKERN_NUM_THREADS (1..256),
    BITKERN_OUTPUT_POOL_MB (0..1048576). Others: BITKERN_DEBUG and BITKERN_PROGRESS (0 or 1),
    BITKERN_KILL_AFTER_EPOCH (a positive integer). Unset or empty means the default. No side effects
    beyond loading the cpp extension to learn which ISAs this CPU supports (when BITKERN_ISA is set)."""
    _check_kernel_environment()
    for name in ("BITKERN_DEBUG", "BITKERN_PROGRESS"):
        value = os.environ.get(name)
        if value and value not in ("0", "1"):
            raise _env_error(name, value, "0 or 1 (or unset)")
    value = os.environ.get("BITKERN_KILL_AFTER_EPOCH")
    if value:
        _env_int("BITKERN_KILL_AFTER_EPOCH", value, 1, 1 << 31, "an epoch number (a test hook)")


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
    """{name: (available, reason)} for every backend. While a kernel environment variable is bad, every
    backend is reported unavailable with that variable's one-line error (ops raise it)."""
    try:
        _check_kernel_environment()
    except ValueError as exc:
        return {name: (False, f"environment: {exc}") for name in BACKEND_MODULES}
    return {name: (bool(get(name).available), getattr(get(name), "reason", "") or "")
            for name in BACKEND_MODULES}


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


def _supports(backend, device: torch.device) -> bool:
    supports = getattr(backend, "supports", None)
    return supports(device) if supports is not None else device.type == "cpu"


def backend_for(device: torch.device | str):
    """The backend that runs ops on tensors of `device`."""
    _check_kernel_environment()
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
