"""The STE (straight-through estimator) window the backward of every op uses.

"clipped" is the paper's estimator (gradient passes where the binarizer's input lies in its clip window);
"identity" passes it everywhere; "smooth" is a triangle of the same area as the clip box (Bi-Real Net's
ApproxSign derivative). The last two are surrogates for checking attacks for gradient masking
(bitkern.attacks.surrogate switches between them).
"""
from __future__ import annotations

import contextlib

import torch
from torch import Tensor

STE_MODES = ("clipped", "identity", "smooth")
_state = {"mode": "clipped"}


def set_ste_mode(mode: str) -> None:
    if mode not in STE_MODES:
        raise ValueError(f"mode: expected one of {STE_MODES}, got {mode!r}")
    _state["mode"] = mode


def get_ste_mode() -> str:
    return _state["mode"]


@contextlib.contextmanager
def ste_mode(mode: str):
    previous = _state["mode"]
    set_ste_mode(mode)
    try:
        yield
    finally:
        _state["mode"] = previous


def ste_window(t: Tensor, mode: str, low: float = -1.0, high: float = 1.0) -> Tensor:
    """STE derivative of a binarizer whose clip window is [low, high]: 1 inside ("clipped"), 1 everywhere
    ("identity"), or a triangle peaking at the window's centre with the same area ("smooth")."""
    if mode == "identity":
        return torch.ones_like(t)
    if mode == "smooth":
        centred = (t - (low + high) / 2) * (2 / (high - low))
        return (2 - 2 * centred.abs()).clamp_min(0)
    return ((t >= low) & (t <= high)).to(t.dtype)
