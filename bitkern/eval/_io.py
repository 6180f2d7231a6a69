"""Result writers for bitkern.eval on top of bitkern._io's atomic writes; each returns the path written."""
from __future__ import annotations

import io
import os

import numpy as np

from .. import _io


def atomic_write_text(path, text: str) -> str:
    _io.atomic_write_text(path, text)
    return os.fspath(path)


def atomic_write_npz(path, arrays: dict) -> str:
    """Plain numeric/bool arrays only, so loading never needs allow_pickle."""
    buf = io.BytesIO()
    np.savez_compressed(buf, **arrays)
    _io.atomic_write_bytes(path, buf.getvalue())
    return os.fspath(path)


def atomic_save_figure(fig, path) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120, bbox_inches="tight")
    _io.atomic_write_bytes(path, buf.getvalue())
    return os.fspath(path)
