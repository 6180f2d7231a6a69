"""Argument checks shared by the attacks (clear errors naming the argument)."""
from __future__ import annotations

import math
import numbers
from fractions import Fraction

import torch


def parse_eps(value, name: str = "eps") -> float:
    """Turn 8/255, "8/255", "0.03" or 0.03 into a float in [0, 1].

    Inputs live in [0, 1], so a budget above 1 is almost always a unit mistake (eps=8 meant 8/255);
    it is rejected instead of silently covering the whole input range.
    """
    if isinstance(value, bool) or value is None:
        raise TypeError(f"{name} must be a number or a string like '8/255', got {value!r}")
    if isinstance(value, str):
        text = value.strip().replace(" ", "")
        try:
            if "/" in text:
                num, den = text.split("/", 1)
                result = float(Fraction(num)) / float(Fraction(den))
            else:
                result = float(text)
        except (ValueError, ZeroDivisionError) as exc:
            raise ValueError(f"{name}={value!r} is not a number or a fraction like '8/255'") from exc
    elif isinstance(value, numbers.Real):
        result = float(value)
    elif isinstance(value, torch.Tensor) and value.numel() == 1:
        result = float(value.item())
    else:
        raise TypeError(f"{name} must be a number or a string like '8/255', got {type(value).__name__}")
    if not math.isfinite(result):
        raise ValueError(f"{name} must be finite, got {value!r}")
    if result < 0:
        raise ValueError(f"{name} must be >= 0, got {value!r}")
    if result > 1:
        raise ValueError(f"{name}={value!r} exceeds 1 but inputs are in [0, 1]; "
                         f"give pixel units as a fraction, e.g. '8/255'")
    return result


def check_positive(value, name: str, allow_zero: bool = False) -> float:
    value = parse_eps(value, name) if isinstance(value, str) else value
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value) or value < 0 or (value == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"{name} must be finite and {bound}, got {value!r}")
    return value


def check_int(value, name: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} ({value!r})")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


def check_inputs(x, y, name_x: str = "x", name_y: str = "y"):
    """x: float tensor [B, ...] in [0, 1]; y: int64 labels [B]. Returns detached copies."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name_x} must be a torch.Tensor, got {type(x).__name__}")
    if not isinstance(y, torch.Tensor):
        raise TypeError(f"{name_y} must be a torch.Tensor of int labels, got {type(y).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{name_x} must be a floating tensor with values in [0, 1], got dtype {x.dtype}")
    if x.dim() < 2:
        raise ValueError(f"{name_x} must be batched [B, ...], got shape {tuple(x.shape)}")
    if x.shape[0] == 0:
        raise ValueError(f"{name_x} is empty (shape {tuple(x.shape)}): nothing to attack")
    if y.dtype in (torch.bool,) or y.is_floating_point() or y.is_complex():
        raise TypeError(f"{name_y} must be an integer tensor of class indices, got dtype {y.dtype}")
    if y.dim() != 1 or y.shape[0] != x.shape[0]:
        raise ValueError(f"{name_y} must have shape [{x.shape[0]}] to match {name_x} {tuple(x.shape)}, "
                         f"got {tuple(y.shape)}")
    if torch.isnan(x).any():
        raise ValueError(f"{name_x} contains NaN")
    lo, hi = float(x.min()), float(x.max())
    if lo < 0 or hi > 1:
        raise ValueError(f"{name_x} must have values in [0, 1] (attacks work on unnormalised images; "
                         f"models normalise inside), got range [{lo:.4g}, {hi:.4g}]")
    if int(y.min()) < 0:
        raise ValueError(f"{name_y} has negative labels (min {int(y.min())})")
    return x.detach(), y.detach().long()


def check_labels_fit(y: torch.Tensor, num_classes: int, name: str = "y") -> None:
    if int(y.max()) >= num_classes:
        raise ValueError(f"{name} has label {int(y.max())} but the model outputs {num_classes} classes "
                         f"(labels must be in [0, {num_classes - 1}])")
