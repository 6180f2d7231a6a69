"""Atomic file writes: write to a temp file in the same directory, fsync, then os.replace.

The one place bitkern writes files: bytes, text, JSON, numpy archives and matplotlib figures.

A reader (or a resumed run) therefore sees either the old file or the complete new one, never a
half-written file, even if the process is killed mid-write. The file gets the mode a plain ``open(path,
"w")`` would give it (0666 less the umask), not mkstemp's private 0600, so colleagues can read results.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Iterator

__all__ = ["atomic_path", "atomic_write_bytes", "atomic_write_text", "atomic_write_json", "atomic_write_npz",
           "atomic_save_figure"]


def _umask() -> int:
    """The process umask, read without changing it where the OS allows (threads may be writing)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success it replaces ``path`` atomically.

    Use for writers that want a file name (safetensors.save_file, matplotlib savefig). On error the
    temporary file is removed and ``path`` is left untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix + ".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        # after the writer: some (safetensors' save_file) replace the file with a new private one
        os.chmod(tmp_path, 0o666 & ~_umask())
        with open(tmp_path, "rb+") as f:  # flush the writer's data to disk before the rename
            os.fsync(f.fileno())
        os.replace(tmp_path, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp_path.unlink()
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> str:
    """Write ``data`` to ``path`` atomically; returns the path written."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return os.fspath(path)


def atomic_write_text(path: str | os.PathLike, text: str, encoding: str = "utf-8") -> str:
    return atomic_write_bytes(path, text.encode(encoding))


def atomic_write_json(path: str | os.PathLike, obj: Any, indent: int | None = 2) -> str:
    return atomic_write_text(path, json.dumps(obj, indent=indent, sort_keys=False, allow_nan=True) + "\n")


def atomic_write_npz(path: str | os.PathLike, arrays: dict) -> str:
    """A compressed .npz of plain numeric/bool arrays only, so loading never needs allow_pickle."""
    import numpy as np

    buf = io.BytesIO()
    np.savez_compressed(buf, **arrays)
    return atomic_write_bytes(path, buf.getvalue())


def atomic_save_figure(fig, path: str | os.PathLike, **savefig_kwargs: Any) -> str:
    """A matplotlib figure as PNG (dpi 120 unless given; other ``savefig`` options pass through)."""
    buf = io.BytesIO()
    fig.savefig(buf, **{"format": "png", "dpi": 120, **savefig_kwargs})
    return atomic_write_bytes(path, buf.getvalue())
