"""Surrogate gradients for gradient-masking checks.

By default an attack differentiates the attacked model itself, i.e. through the same STE that training
uses. A surrogate replaces only the *backward* source, the forward check always uses the real model:

* ``nn.Module`` (BPDA, Athalye et al. 2018): gradients come from ``surrogate_model(x)``, a differentiable
  stand-in (e.g. the FP model, or the same weights with a smooth activation); always available.
* ``"clipped" | "identity" | "smooth"`` (bitkern.ops.STE_MODES): switch the STE of bitkern.ops with
  ``bitkern.ops.ste_mode`` around every gradient forward pass (restored afterwards).
* a zero-argument callable returning a context manager: entered around every gradient forward pass.
"""
from __future__ import annotations

import contextlib

import torch.nn as nn

from ..ops import STE_MODES, ste_mode

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
