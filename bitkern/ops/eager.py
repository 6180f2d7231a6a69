"""The eager fast path: call an op's implementation directly when the dispatcher would only route to it.

The dispatcher's Python custom-op path costs ~50 us per call, as much as a small conv. In plain eager
mode (no torch.compile, dispatch or torch-function mode, functorch transform or profiler; plain tensors;
for a differentiable op, no input that needs a gradient) `call` skips it. It reads private torch hooks
(torch 2.13); without them every call goes through the dispatcher.
"""
from __future__ import annotations

import torch
from torch import Tensor

_EAGER_HOOKS = all(hasattr(mod, name) for mod, name in (
    (torch._C, "_len_torch_dispatch_stack"), (torch._C, "_is_torch_function_mode_enabled"),
    (torch._C._functorch, "peek_interpreter_stack"), (torch.autograd.profiler, "_is_profiler_enabled")))


def plain_eager(args, differentiable: bool) -> bool:
    """True when calling an op through the dispatcher would only route to its Python implementation."""
    if (not _EAGER_HOOKS or torch.compiler.is_compiling() or torch._C._len_torch_dispatch_stack()
            or torch._C._is_torch_function_mode_enabled()
            or torch._C._functorch.peek_interpreter_stack() is not None
            or torch.autograd.profiler._is_profiler_enabled):
        return False
    grad = differentiable and torch.is_grad_enabled()
    return all(type(a) is Tensor and not (grad and a.requires_grad)
               for a in args if isinstance(a, Tensor))


# op -> torch.autograd.Function running the op's implementation and its registered autograd formula
_AUTOGRAD_FUNCTIONS: dict = {}


def register_autograd(op, backward, setup_context) -> None:
    """op.register_autograd(backward, setup_context=...), plus a torch.autograd.Function running the same
    two functions around the op's implementation: `call` takes it in plain eager autograd, skipping the
    dispatcher's custom-op autograd path (~0.3 ms per conv of a ResNet attack step); compile, export,
    functorch and tensor subclasses still go through the op."""
    op.register_autograd(backward, setup_context=setup_context)

    def forward(ctx, *args):
        out = op._init_fn(*args)
        setup_context(ctx, args, out)
        return out

    name = f"{op._name.split('::')[-1]}_eager_autograd"  # grad_fn: <name>Backward
    _AUTOGRAD_FUNCTIONS[op] = type(name, (torch.autograd.Function,), {
        "forward": staticmethod(forward), "backward": staticmethod(lambda ctx, grad: backward(ctx, grad))})


def call(op, *args, differentiable: bool = True):
    """op(*args), through its implementation directly in plain eager mode (with autograd: through the
    Function `register_autograd` made for it)."""
    if plain_eager(args, differentiable):
        return op._init_fn(*args)
    function = _AUTOGRAD_FUNCTIONS.get(op) if differentiable else None
    if function is not None and plain_eager(args, differentiable=False):
        return function.apply(*args)
    return op(*args)
