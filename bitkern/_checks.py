"""Argument validation with errors that name the argument, what was received and what was expected."""
from __future__ import annotations

import numbers

import torch


def describe(t: torch.Tensor) -> str:
    return f"shape {tuple(t.shape)}, dtype {t.dtype}, device {t.device}"


def check_tensor(name: str, t, *, ndim: int | None = None, floating: bool = False,
                 dtype: torch.dtype | None = None) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{name}: expected a {ndim}-d tensor, got {describe(t)}")
    if floating and not t.is_floating_point():
        raise TypeError(f"{name}: expected a floating-point tensor, got {describe(t)}")
    if dtype is not None and t.dtype != dtype:
        raise TypeError(f"{name}: expected dtype {dtype}, got {describe(t)}")
    return t


def _has_values(t: torch.Tensor) -> bool:
    # Meta tensors (shape-only passes, e.g. BOPS counting) and the fake / functional tensors of tracing
    # (torch.export) carry no values to check: the traced graph records the ops, which check what they
    # can when it runs (the cpp kernels raise for NaN activations).
    return (t.is_floating_point() and t.device.type != "meta"
            and type(t) in (torch.Tensor, torch.nn.Parameter, torch.nn.Buffer))


def check_no_nan(name: str, t: torch.Tensor, scan=None) -> None:
    """NaN has no sign: binarizing it would silently pick a bit. `scan` is a backend's fast NaN test."""
    if _has_values(t) and (scan(t) if scan is not None else bool(torch.isnan(t).any())):
        raise ValueError(f"{name}: contains NaN ({describe(t)}); binarization needs ordered values")


def check_finite(name: str, t: torch.Tensor) -> None:
    """Finite once converted to float32, the type every kernel computes in (a float64 1e300 is +inf)."""
    if _has_values(t) and not bool(torch.isfinite(t if t.dtype == torch.float32 else t.float()).all()):
        raise ValueError(f"{name}: contains NaN or Inf ({describe(t)}); expected finite values "
                         "(in float32)")


def pair(name: str, value, *, minimum: int) -> tuple[int, int]:
    """Normalise an int or (h, w) pair and check each entry >= minimum."""
    if isinstance(value, int) and not isinstance(value, bool):
        values = (value, value)
    elif isinstance(value, (tuple, list)) and len(value) == 2 and all(
            isinstance(v, int) and not isinstance(v, bool) for v in value):
        values = (int(value[0]), int(value[1]))
    else:
        raise TypeError(f"{name}: expected an int or a pair of ints, got {value!r}")
    if min(values) < minimum:
        raise ValueError(f"{name}: expected values >= {minimum}, got {value!r}")
    return values


def conv_output_size(x_shape, kernel_size, stride, padding, x_name="x") -> tuple[int, int]:
    """Output (OH, OW) of a convolution; errors when the kernel is larger than the padded input."""
    height, width = x_shape[-2:]
    (kh, kw), (sh, sw), (ph, pw) = kernel_size, stride, padding
    if height + 2 * ph < kh or width + 2 * pw < kw:
        raise ValueError(
            f"kernel {kh}x{kw} is larger than the padded input of {x_name} "
            f"({height}+2*{ph})x({width}+2*{pw}) (input shape {tuple(x_shape)})")
    return (height + 2 * ph - kh) // sh + 1, (width + 2 * pw - kw) // sw + 1


def module_device(model: torch.nn.Module, default=None) -> torch.device | None:
    """The device of a model's first parameter, else of its first buffer, else `default`."""
    for tensors in (model.parameters(), model.buffers()):
        first = next(iter(tensors), None)
        if first is not None:
            return first.device
    return None if default is None else torch.device(default)


def is_int(value) -> bool:
    """A true integer (bool is not one)."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def int_in(value, lo: int | None = None, hi: int | None = None) -> bool:
    """is_int(value) and lo <= value <= hi (a missing bound is no bound)."""
    return is_int(value) and (lo is None or value >= lo) and (hi is None or value <= hi)
