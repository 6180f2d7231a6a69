"""Surrogate gradients for gradient-masking checks.

By default an attack differentiates the attacked model itself, i.e. through the same STE that training
uses. A surrogate replaces only the *backward* source, the forward check always uses the real model:

* ``nn.Module`` (BPDA, Athalye et al. 2018): gradients come from ``surrogate_model(x)``, a differentiable
  stand-in (e.g. the FP model, or the same weights with a smooth activation); always available.
* ``"identity" | "clipped" | "smooth"``: temporarily switch the STE of bitkern.ops with
  ``bitkern.ops.set_ste_mode`` (restored afterwards); needs bitkern.ops to provide ``set_ste_mode`` and
  ``get_ste_mode``.
* a zero-argument callable returning a context manager: entered around every gradient forward pass.
"""
from __future__ import annotations

import contextlib

import torch.nn as nn

STE_MODES = ("identity", "clipped", "smooth")


@contextlib.contextmanager
def ste_mode(mode: str):
    """Temporarily set bitkern.ops' STE surrogate (restored even on exception)."""
    if mode not in STE_MODES:
        raise ValueError(f"surrogate STE mode must be one of {STE_MODES}, got {mode!r}")
    try:
        from bitkern import ops
    except Exception as exc:  # pragma: no cover - depends on the build state of bitkern.ops
        raise RuntimeError(f"surrogate={mode!r} needs bitkern.ops, which failed to import ({exc}); "
                           f"pass a differentiable surrogate nn.Module instead (BPDA)") from exc
    setter, getter = getattr(ops, "set_ste_mode", None), getattr(ops, "get_ste_mode", None)
    if setter is None or getter is None:
        raise RuntimeError(f"surrogate={mode!r} needs bitkern.ops.set_ste_mode/get_ste_mode, which this "
                           f"build lacks; pass a differentiable surrogate nn.Module instead (BPDA)")
    previous = getter()
    try:
        setter(mode)
    except ValueError as exc:
        raise ValueError(f"surrogate={mode!r}: bitkern.ops does not support this STE mode ({exc}); "
                         f"pass a differentiable surrogate nn.Module instead (BPDA)") from exc
    try:
        yield
    finally:
        setter(previous)


class Surrogate:
    """Normalised form of the ``surrogate=`` argument: a gradient model and a context to enter."""

    def __init__(self, spec):
        self.spec = spec
        self.model: nn.Module | None = None
        self._context_factory = contextlib.nullcontext
        if spec is None:
            return
        if isinstance(spec, nn.Module):
            self.model = spec
        elif isinstance(spec, str):
            if spec not in STE_MODES:
                raise ValueError(f"surrogate must be None, an nn.Module (BPDA), one of {STE_MODES} or a "
                                 f"callable returning a context manager; got {spec!r}")
            with ste_mode(spec):  # fail now, not mid-attack, if bitkern.ops lacks this mode
                pass
            self._context_factory = lambda: ste_mode(spec)
        elif callable(spec):
            self._context_factory = spec
        else:
            raise TypeError(f"surrogate must be None, an nn.Module, an STE mode name or a callable, "
                            f"got {type(spec).__name__}")

    def context(self):
        return self._context_factory()

    def describe(self) -> str | None:
        if self.spec is None:
            return None
        if isinstance(self.spec, nn.Module):
            return f"bpda:{type(self.spec).__name__}"
        if isinstance(self.spec, str):
            return f"ste:{self.spec}"
        return f"context:{getattr(self.spec, '__name__', type(self.spec).__name__)}"
