"""Magnitude (unstructured) and L1 channel (filter) pruning with masks kept as buffers.

Both use torch.nn.utils.prune: the mask is the buffer ``weight_mask`` and a forward pre-hook computes
``weight = weight_orig * weight_mask`` before every forward, so masks stay applied while fine-tuning.
Pruning the same layer again combines the masks.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils import prune as torch_prune


def _check_ratio(ratio) -> float:
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0.0 <= float(ratio) < 1.0:
        raise ValueError(f"ratio: expected the fraction to prune in [0, 1), got {ratio!r}")
    return float(ratio)


def prunable_layers(model: nn.Module, include_linear: bool = True):
    """(name, module) of every conv (and linear) layer with a weight, in module order."""
    kinds = (nn.Conv2d, nn.Linear) if include_linear else (nn.Conv2d,)
    return [(name, mod) for name, mod in model.named_modules() if isinstance(mod, kinds)]


def _current_weight(module: nn.Module) -> torch.Tensor:
    return module.weight_orig * module.weight_mask if hasattr(module, "weight_mask") else module.weight


@torch.no_grad()
def prune_magnitude(model: nn.Module, ratio: float) -> nn.Module:
    """Unstructured pruning: in every conv and linear layer, zero the `ratio` fraction of weights with
    the smallest |w| (per layer, round(ratio * numel) weights). Returns the model (modified in place)."""
    ratio = _check_ratio(ratio)
    for _, module in prunable_layers(model):
        weight = _current_weight(module)
        count = int(round(ratio * weight.numel()))
        mask = torch.ones_like(weight)
        if count:
            order = weight.abs().flatten().argsort(stable=True)
            mask.view(-1)[order[:count]] = 0
        torch_prune.custom_from_mask(module, "weight", mask)
    return model


@torch.no_grad()
def prune_channels_l1(model: nn.Module, ratio: float) -> nn.Module:
    """Structured pruning: in every conv layer, zero whole output channels (filters) with the smallest
    L1 norm, round(ratio * out_channels) per layer. The classifier (linear) is left intact (its outputs
    are the classes). Returns the model (modified in place)."""
    ratio = _check_ratio(ratio)
    for _, module in prunable_layers(model, include_linear=False):
        weight = _current_weight(module)
        count = int(round(ratio * weight.shape[0]))
        mask = torch.ones_like(weight)
        if count:
            norms = weight.abs().flatten(1).sum(dim=1)
            mask[norms.argsort(stable=True)[:count]] = 0
        torch_prune.custom_from_mask(module, "weight", mask)
    return model


def kept_fraction(module: nn.Module) -> float:
    """Fraction of the layer's weights still in use (1.0 when the layer is not pruned)."""
    mask = getattr(module, "weight_mask", None)
    return 1.0 if mask is None else float(mask.sum()) / mask.numel()


__all__ = ["prune_magnitude", "prune_channels_l1", "kept_fraction", "prunable_layers"]
