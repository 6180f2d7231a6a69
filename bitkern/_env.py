"""The BITKERN_* environment variables the kernels read, parsed and validated (one line per error:
variable, value, what was expected). bitkern.dispatch.check_environment composes these."""
from __future__ import annotations

import os

ISAS = ("avx512", "avx2", "scalar")  # BITKERN_ISA values (the cpp backend's ISA paths)
MAX_NUM_THREADS = 256  # the engine's thread cap: BITKERN_NUM_THREADS above it is an error, not clamped
MAX_OUTPUT_POOL_MB = 1 << 20  # 1 TiB
# The variables the ops read (checked before every op; the check is skipped while they are unchanged).
KERNEL_ENV_VARS = ("BITKERN_BACKEND", "BITKERN_ISA", "BITKERN_NUM_THREADS", "BITKERN_OUTPUT_POOL_MB")
# Read by the CLI and the training loop (checked by check_environment only).
OTHER_ENV_VARS = ("BITKERN_DEBUG", "BITKERN_PROGRESS", "BITKERN_KILL_AFTER_EPOCH")


def env_error(name: str, value: str, expected: str) -> ValueError:
    return ValueError(f"{name}={value!r}: expected {expected}")


def env_int(name: str, value: str, lo: int, hi: int, what: str) -> int:
    text = value.strip()
    if not (text.isascii() and text.isdigit()) or not lo <= int(text) <= hi:
        raise env_error(name, value, f"{what}, an integer in {lo}..{hi}")
    return int(text)


def env_isa() -> str | None:
    """BITKERN_ISA validated by name (case and surrounding blanks ignored; None: unset or empty)."""
    value = os.environ.get("BITKERN_ISA")
    if not value:
        return None
    name = value.strip().lower()
    if name not in ISAS:
        raise env_error("BITKERN_ISA", value, f"one of {', '.join(ISAS)} (or unset)")
    return name


def env_num_threads() -> int | None:
    """BITKERN_NUM_THREADS validated: 1..MAX_NUM_THREADS (None: unset or empty)."""
    value = os.environ.get("BITKERN_NUM_THREADS")
    if not value:
        return None
    return env_int("BITKERN_NUM_THREADS", value, 1, MAX_NUM_THREADS, "a thread count")


def env_output_pool_mb() -> int | None:
    """BITKERN_OUTPUT_POOL_MB validated: 0..MAX_OUTPUT_POOL_MB MiB (None: unset or empty)."""
    value = os.environ.get("BITKERN_OUTPUT_POOL_MB")
    if not value:
        return None
    return env_int("BITKERN_OUTPUT_POOL_MB", value, 0, MAX_OUTPUT_POOL_MB, "a size in MiB")


def check_other_variables() -> None:
    """The non-kernel variables: BITKERN_DEBUG / BITKERN_PROGRESS (0 or 1), BITKERN_KILL_AFTER_EPOCH."""
    for name in ("BITKERN_DEBUG", "BITKERN_PROGRESS"):
        value = os.environ.get(name)
        if value and value not in ("0", "1"):
            raise env_error(name, value, "0 or 1 (or unset)")
    value = os.environ.get("BITKERN_KILL_AFTER_EPOCH")
    if value:
        env_int("BITKERN_KILL_AFTER_EPOCH", value, 1, 1 << 31, "an epoch number (a test hook)")
