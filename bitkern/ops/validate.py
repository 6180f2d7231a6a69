"""Argument checks of the public ops, made once before dispatch: every error names the argument, what was
received and what was expected. The value checks (NaN in x, a non-finite residual) come last, and are left
to backends whose capabilities say their kernels make them (no extra pass over the data)."""
from __future__ import annotations

import torch
from torch import Tensor

from .. import _checks, dispatch
from ..backends.base import check_clamp  # noqa: F401  (re-exported: one clamp rule for ops and backends)
from ..backends.base import check_packed_shape  # one packed-weight shape rule for ops and backends


def check_same_device(x: Tensor, **others) -> None:
    for name, t in others.items():
        if t is not None and t.device != x.device:
            raise ValueError(f"{name}: expected a tensor on {x.device} (like x), got {_checks.describe(t)}")


def check_activation_args(x, v, beta) -> Tensor:
    """v (None or [N] finite shifts) and beta ([N] finite, default ones); returns beta."""
    if v is not None:
        _checks.check_tensor("v", v, ndim=1, floating=True)
        if v.numel() == 0:
            raise ValueError(f"v: expected at least one activation shift, got {_checks.describe(v)}")
        _checks.check_finite("v", v)
    num_act = 1 if v is None else v.shape[0]
    if beta is None:
        beta = torch.ones(num_act, device=x.device)
    _checks.check_tensor("beta", beta, ndim=1, floating=True)
    if beta.shape[0] != num_act:
        expected = "1 (v is None: sign activations)" if v is None else f"{num_act} (one per shift in v)"
        raise ValueError(f"beta: expected shape [{expected}], got {_checks.describe(beta)}")
    _checks.check_finite("beta", beta)
    return beta


def check_alpha(alpha, num_bases, out_channels) -> None:
    _checks.check_tensor("alpha", alpha, floating=True)
    if tuple(alpha.shape) not in ((num_bases,), (num_bases, out_channels)):
        raise ValueError(f"alpha: expected shape [{num_bases}] or [{num_bases}, {out_channels}] "
                         f"(per base, or per base and output channel), got {_checks.describe(alpha)}")
    _checks.check_finite("alpha", alpha)


def check_no_nan(name, t) -> None:
    backend = dispatch.backend_for(t.device)
    caps = backend.capabilities
    # Backends that check NaN detect it in the activations while packing them (one read of x) and raise
    # the same error; only float32 4-d x reaches them unchanged, so the message names the same
    # shape/dtype. Weights are small: always scanned here.
    if name == "x" and caps.checks_nan and t.dtype == torch.float32 and t.dim() == 4:
        return
    _checks.check_no_nan(name, t, backend.has_nan if caps.fast_nan_scan else None)


def check_input(x, in_channels, kernel_size, stride, padding, weight_name) -> tuple[int, int]:
    """x float [B, in_channels, H, W], non-empty, large enough for the kernel; returns (OH, OW)."""
    _checks.check_tensor("x", x, ndim=4, floating=True)
    if x.shape[1] != in_channels:
        raise ValueError(f"x: expected {in_channels} input channels (from {weight_name}), "
                         f"got {_checks.describe(x)}")
    if x.numel() == 0:
        raise ValueError(f"x: expected a non-empty tensor, got {_checks.describe(x)}")
    return _checks.conv_output_size(x.shape, kernel_size, stride, padding)


def check_packed_weights(w_packed, in_channels, kernel_size) -> None:
    _checks.check_tensor("w_packed", w_packed, ndim=5, dtype=torch.int64)
    check_packed_shape(w_packed, in_channels, kernel_size)
    if w_packed.shape[1] == 0:
        raise ValueError(f"w_packed: expected at least one output channel (Co), got {_checks.describe(w_packed)}")


def check_bias(bias, out_channels) -> None:
    if bias is None:
        return
    _checks.check_tensor("bias", bias, ndim=1, floating=True)
    if bias.shape[0] != out_channels:
        raise ValueError(f"bias: expected shape [{out_channels}] (one per output channel, Co), "
                         f"got {_checks.describe(bias)}")
    _checks.check_finite("bias", bias)


def check_residual(residual, expected_shape) -> None:
    if residual is None:
        return
    _checks.check_tensor("residual", residual, ndim=4, floating=True)
    if tuple(residual.shape) != tuple(expected_shape):
        raise ValueError(f"residual: expected shape {list(expected_shape)} (the output's [B, Co, OH, OW]), "
                         f"got {_checks.describe(residual)}")


def check_values(x, residual=None) -> None:
    """The value checks of x (NaN) and residual (finite), last, in that order: backends that make them
    inside the kernel do so after the parameters were checked here, so every backend names the same
    argument when several are bad."""
    check_no_nan("x", x)
    if residual is None:
        return
    # Backends that check the residual detect a non-finite one in their fused epilogue (no extra pass)
    # and raise the same error; only a float32 residual reaches them unchanged.
    if not (dispatch.backend_for(residual.device).capabilities.checks_residual
            and residual.dtype == torch.float32):
        _checks.check_finite("residual", residual)
