"""Bit-operation (BOPS) counting from the model itself (paper 000 Sec. 3.3).

A real forward pass of a zero input runs with forward hooks on every conv / linear layer; each layer
reports its MACs (kept weights only for pruned layers) and its operand precision (its ``precision``
property, a bitkern.nn.Precision; a layer without one is full precision):

* fixed point (PACT / DoReFa): BOPS = MACs x w_bits x a_bits
* MBN M x N: MACs x M x N; XNOR: MACs x 1 x 1
* any full-precision layer (the fp first conv and last fc of every model, all layers of fp and pruned
  models): counted at 8 x 8 bits, as the paper does.

convention="paper" additionally counts strided 1x1 projection shortcuts as 3x3 convolutions: this is
the convention that reproduces the paper's ResNet-18 column (see docs/models.md); it changes nothing
for the CIFAR ResNets (option-A shortcuts have no convolution).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from ._checks import module_device
from .nn.precision import FP, Precision, precision_of

FP_BITS = FP.w_bits
CONVENTIONS = ("exact", "paper")


@dataclass
class LayerBops:
    name: str
    kind: str          # the layer's Precision.kind: "fp" (counted 8x8), "fixed", "xnor", "mbn", ...
    macs: int          # MACs actually computed (kept weights only), per sample
    w_bits: int        # weight bits, or number of weight bases M for MBN
    a_bits: int        # activation bits, or number of activation bases N for MBN
    bops: int
    kept: float = 1.0  # fraction of weights kept after pruning
    out_shape: tuple = ()
    kernel: tuple = ()
    stride: tuple = ()
    precision: Precision | None = field(default=None, repr=False)  # the layer's; not in to_dict()

    def to_dict(self) -> dict:
        row = asdict(self)
        del row["precision"]
        return row


@dataclass
class BopsReport:
    layers: list = field(default_factory=list)
    input_shape: tuple = ()
    convention: str = "exact"

    @property
    def total(self) -> int:
        return sum(row.bops for row in self.layers)

    @property
    def macs(self) -> int:
        return sum(row.macs for row in self.layers)

    def to_dict(self) -> dict:
        return {"total": self.total, "macs": self.macs, "input_shape": list(self.input_shape),
                "convention": self.convention, "layers": [row.to_dict() for row in self.layers]}

    def table(self) -> str:
        head = f"{'layer':34s} {'kind':6s} {'w':>2s} {'a':>2s} {'kept':>5s} {'MACs':>13s} {'BOPS':>15s}"
        lines = [head, "-" * len(head)]
        for row in self.layers:
            lines.append(f"{row.name:34.34s} {row.kind:6s} {row.w_bits:2d} {row.a_bits:2d} {row.kept:5.2f} "
                         f"{row.macs:13,d} {row.bops:15,d}")
        lines.append("-" * len(head))
        lines.append(f"{'total':34s} {'':6s} {'':2s} {'':2s} {'':5s} {self.macs:13,d} {self.total:15,d}"
                     f"  ({self.total / 1e8:.2f} x 10^8 BOPS)")
        return "\n".join(lines)


def layer_precision(module: nn.Module) -> tuple[str, int, int]:
    """(kind, weight bits or bases, activation bits or bases) of a compute layer, from its precision."""
    p = precision_of(module)
    return p.kind, p.w_bits, p.a_bits


def _is_compute_layer(module: nn.Module) -> bool:
    return (isinstance(module, (nn.Conv2d, nn.Linear)) or getattr(module, "bops_layer", False)
            or isinstance(getattr(module, "precision", None), Precision))


def _kept_weights(module: nn.Module, dense: int) -> int:
    mask = getattr(module, "weight_mask", None)
    return dense if mask is None else int(mask.count_nonzero())


def _conv_geometry(module: nn.Module):
    kernel = tuple(module.kernel_size) if isinstance(module.kernel_size, (tuple, list)) else (module.kernel_size,) * 2
    stride = tuple(module.stride) if isinstance(module.stride, (tuple, list)) else (module.stride,) * 2
    groups = getattr(module, "groups", 1)
    return kernel, stride, groups


def profile(model: nn.Module, input_shape=(3, 32, 32), convention: str = "exact") -> BopsReport:
    """Per-layer MACs and precision from one forward pass of a zero input of shape [1, *input_shape]."""
    if convention not in CONVENTIONS:
        raise ValueError(f"convention: expected one of {CONVENTIONS}, got {convention!r}")
    shape = tuple(int(s) for s in input_shape)
    if len(shape) != 3 or min(shape) < 1:
        raise ValueError(f"input_shape: expected (C, H, W) with positive sizes, got {input_shape!r}")
    rows: list[LayerBops] = []
    hooks = []

    def hook_for(name):
        def hook(module, inputs, output):
            p = precision_of(module)
            if isinstance(module, nn.Linear) or getattr(module, "is_linear", False):
                in_f, out_f = module.in_features, module.out_features
                positions = output.numel() // output.shape[0] // out_f
                dense_weights, kernel, stride = in_f * out_f, (1, 1), (1, 1)
            else:
                kernel, stride, groups = _conv_geometry(module)
                positions = output.shape[-1] * output.shape[-2]
                dense_weights = module.out_channels * (module.in_channels // groups) * kernel[0] * kernel[1]
            kept = _kept_weights(module, dense_weights)
            macs = kept * positions
            if convention == "paper" and kernel == (1, 1) and max(stride) > 1:
                macs *= 9  # the paper counts strided projection shortcuts as 3x3 convolutions
            rows.append(LayerBops(name, p.kind, macs, p.w_bits, p.a_bits, macs * p.bops_per_mac,
                                  kept / dense_weights, tuple(output.shape[1:]), kernel, stride, p))
        return hook

    for name, module in model.named_modules():
        if _is_compute_layer(module):
            hooks.append(module.register_forward_hook(hook_for(name)))
    was_training = model.training
    try:
        model.eval()
        device = module_device(model, "cpu")
        with torch.no_grad():
            model(torch.zeros((1,) + shape, device=device))
    finally:
        for handle in hooks:
            handle.remove()
        model.train(was_training)
    return BopsReport(rows, shape, convention)


def count(model: nn.Module, input_shape=(3, 32, 32), convention: str = "exact") -> BopsReport:
    """BOPS of `model` for one input of shape input_shape (C, H, W). See the module docstring."""
    return profile(model, input_shape, convention)


__all__ = ["count", "profile", "BopsReport", "LayerBops", "layer_precision", "CONVENTIONS"]
