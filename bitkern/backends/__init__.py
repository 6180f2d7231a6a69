"""Interchangeable implementations of the bitkern ops (the contract: base.py; the registry: registry.py).

Each module below registers its backend on import; building a backend (loading an extension, importing
triton) waits until bitkern.dispatch first asks for it. A new backend: one module that subclasses
base.Backend and calls registry.register, plus its import line here.
"""
from . import cpp, cuda, torch_backend, triton_backend  # noqa: F401  (registration)
from .base import Backend, Capabilities, ConvArgs, check_conv_args  # noqa: F401
from .registry import register, unregister  # noqa: F401
