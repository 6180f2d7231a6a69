"""CIFAR ResNet-20/32/44/56 (He et al. 2016, option-A shortcuts) and ImageNet ResNet-18, built from a quant spec.

Block ordering (all specs): conv -> BN -> activation, residual added before the block's last activation.
The layers and the activation come from the quant scheme (bitkern.quant): ReLU for fp / PACT / pruned
nets and Hardtanh for XNOR / MBN nets. The first conv and the last fc always stay full precision. Inputs
are in [0, 1]; normalisation (mean/std buffers) happens inside the model.

BasicBlock declares what bitkern.freeze may fuse once its convs are packed (``fusion_chains`` and
``fuse_residual``); the fusion pass itself knows no block by name.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn
from torch.nn import functional as F

from ..nn.packed import PackedMBNConv2d, activation_clamp
from ..quant import QuantSpec, parse_quant
from .._checks import int_in


class OptionAShortcut(nn.Module):
    """Parameter-free shortcut: stride-2 subsampling plus zero channel padding (He et al. option A)."""

    def __init__(self, in_planes: int, planes: int, stride: int):
        super().__init__()
        self.stride = stride
        extra = planes - in_planes
        self.pad_front, self.pad_back = extra // 2, extra - extra // 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x[:, :, ::self.stride, ::self.stride]
        return F.pad(x, (0, 0, 0, 0, self.pad_front, self.pad_back))


class BasicBlock(nn.Module):
    """conv1 -> bn1 -> act1 -> conv2 -> bn2, + shortcut(x), -> act2."""

    # For bitkern.freeze: (conv, BatchNorm, activation that only feeds the next layer, or None) triples whose
    # BN (and activation) fold into the packed conv's epilogue. act2 follows the residual add: see
    # fuse_residual.
    fusion_chains = (("conv1", "bn1", "act1"), ("conv2", "bn2", None))

    def __init__(self, spec: QuantSpec, in_planes: int, planes: int, stride: int, shortcut: str):
        super().__init__()
        scheme = spec.scheme
        self.conv1 = scheme.make_conv(spec, in_planes, planes, 3, stride, 1)
        self.bn1 = nn.BatchNorm2d(planes)
        self.act1 = scheme.make_activation(spec)
        self.conv2 = scheme.make_conv(spec, planes, planes, 3, 1, 1)
        self.bn2 = nn.BatchNorm2d(planes)
        self.act2 = scheme.make_activation(spec)
        if stride == 1 and in_planes == planes:
            self.shortcut = nn.Identity()
        elif shortcut == "A":
            self.shortcut = OptionAShortcut(in_planes, planes, stride)
        else:  # option B: 1x1 projection (quantized like the body) + BN
            self.shortcut = nn.Sequential(scheme.make_conv(spec, in_planes, planes, 1, stride, 0),
                                          nn.BatchNorm2d(planes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.act1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.act2(out + self.shortcut(x))

    def fuse_residual(self) -> nn.Module | None:
        """For bitkern.freeze, after the folding: a ResidualFusedBlock when conv2 is packed, absorbed bn2
        and act2 is a clamp; else None (the block stays as it is)."""
        if type(self).forward is not BasicBlock.forward:  # a subclass computing something else: keep it
            return None
        return ResidualFusedBlock(self) if residual_fusable(self) else None


def residual_fusable(block: nn.Module) -> bool:
    conv2 = block.conv2
    return (isinstance(conv2, PackedMBNConv2d) and not conv2.is_linear and conv2.clamp is None
            and isinstance(block.bn2, nn.Identity) and activation_clamp(block.act2) is not None)


class ResidualFusedBlock(nn.Module):
    """A frozen BasicBlock whose residual add and act2 run in conv2's epilogue:
    conv2(act1(bn1(conv1(x))), residual=shortcut(x)), conv2 carrying act2's clamp. Same submodule names
    as BasicBlock (act2 becomes nn.Identity), so state_dict keys are unchanged."""

    def __init__(self, block: nn.Module):
        super().__init__()
        clamp = activation_clamp(block.act2)
        conv2 = block.conv2
        if not residual_fusable(block):
            raise ValueError(f"block: expected a folded BasicBlock with a packed conv2 and a Hardtanh / ReLU "
                             f"act2, got {block}")
        self.conv1, self.bn1, self.act1 = block.conv1, block.bn1, block.act1
        self.conv2, self.bn2, self.act2 = conv2, block.bn2, nn.Identity()
        self.shortcut = block.shortcut
        conv2.clamp = clamp

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.act1(self.bn1(self.conv1(x)))
        return self.conv2(out, residual=self.shortcut(x))

    def chain_convs(self):
        """For bitkern.nn.chain (whole-network inference): the block's packed convs in order as (conv,
        src, dst, residual) over activations "in", "out" and local names; residual = (name, stride,
        channel offset). None when a part cannot run in a chain (a BN or activation left unfolded, a
        shortcut other than identity / option A / packed 1x1 conv + folded BN)."""
        conv1, shortcut = self.conv1, self.shortcut
        if not (isinstance(conv1, PackedMBNConv2d) and not conv1.is_linear and isinstance(self.bn1, nn.Identity)
                and isinstance(self.act1, nn.Identity)):
            return None
        steps = []
        if isinstance(shortcut, nn.Identity):
            residual = ("in", 1, 0)
        elif isinstance(shortcut, OptionAShortcut):
            residual = ("in", shortcut.stride, shortcut.pad_front)
        elif (isinstance(shortcut, nn.Sequential) and len(shortcut) == 2 and isinstance(shortcut[1], nn.Identity)
              and isinstance(shortcut[0], PackedMBNConv2d) and not shortcut[0].is_linear
              and shortcut[0].clamp is None):
            steps.append((shortcut[0], "in", "shortcut", None))
            residual = ("shortcut", 1, 0)
        else:
            return None
        return steps + [(conv1, "in", "mid", None), (self.conv2, "mid", "out", residual)]


def _norm_buffer(values, channels: int, name: str) -> torch.Tensor:
    t = torch.as_tensor(values, dtype=torch.float32).reshape(-1)
    if t.numel() == 1:
        t = t.expand(channels)
    if t.numel() != channels:
        raise ValueError(f"{name}: expected 1 or {channels} values (one per input channel), got {t.numel()}")
    return t.reshape(1, channels, 1, 1).clone()


class QuantResNet(nn.Module):
    """Common skeleton: normalisation -> fp stem -> stages of BasicBlocks -> global pool -> fp fc."""

    def __init__(self, arch: str, spec: QuantSpec, num_classes: int, in_channels: int, stem: nn.Module,
                 stem_planes: int, widths: Sequence[int], depths: Sequence[int], shortcut: str,
                 mean, std):
        super().__init__()
        if not int_in(num_classes, 1):
            raise ValueError(f"num_classes: expected a positive int, got {num_classes!r}")
        self.arch, self.quant, self.num_classes, self.in_channels = arch, str(spec), num_classes, in_channels
        self.register_buffer("mean", _norm_buffer(mean, in_channels, "mean"))
        self.register_buffer("std", _norm_buffer(std, in_channels, "std"))
        if bool((self.std <= 0).any()):
            raise ValueError(f"std: expected positive values, got {self.std.flatten().tolist()}")
        self.stem = stem
        layers, in_planes = [], stem_planes
        for index, (planes, depth) in enumerate(zip(widths, depths)):
            for block in range(depth):
                stride = 2 if index > 0 and block == 0 else 1
                layers.append(BasicBlock(spec, in_planes, planes, stride, shortcut))
                in_planes = planes
        self.layers = nn.Sequential(*layers)
        self.feature_dim = in_planes
        self.fc = nn.Linear(in_planes, num_classes)
        for module in self.modules():
            if isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"x: expected [B, {self.in_channels}, H, W] in [0, 1], got shape {tuple(x.shape)}")
        if min(x.shape[-2:]) < 8:
            raise ValueError(f"x: expected spatial size >= 8x8, got {tuple(x.shape[-2:])}")
        x = (x - self.mean).div_(self.std)  # in place on the fresh difference: one tensor, same values
        x = self.layers(self.stem(x))
        return torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.forward_features(x))


CIFAR_DEPTHS = {"resnet20": 3, "resnet32": 5, "resnet44": 7, "resnet56": 9}
ARCHS = tuple(CIFAR_DEPTHS) + ("resnet18",)
CIFAR_MEAN, CIFAR_STD = 0.5, 0.25


def _finish(model: nn.Module, spec: QuantSpec) -> nn.Module:
    return spec.scheme.finish_model(spec, model)  # e.g. pruning masks


def _check_in_channels(in_channels) -> int:
    if not int_in(in_channels, 1):
        raise ValueError(f"in_channels: expected a positive int, got {in_channels!r}")
    return in_channels


def cifar_resnet(arch: str, quant="fp", num_classes: int = 10, in_channels: int = 3,
                 mean=CIFAR_MEAN, std=CIFAR_STD) -> QuantResNet:
    spec = parse_quant(quant)
    in_channels = _check_in_channels(in_channels)
    depth = CIFAR_DEPTHS[arch]
    stem = nn.Sequential(nn.Conv2d(in_channels, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU())
    model = QuantResNet(arch, spec, num_classes, in_channels, stem, 16, (16, 32, 64), (depth,) * 3, "A",
                        mean, std)
    return _finish(model, spec)


def resnet20(quant="fp", num_classes: int = 10, in_channels: int = 3, **kw) -> QuantResNet:
    return cifar_resnet("resnet20", quant, num_classes, in_channels, **kw)


def resnet32(quant="fp", num_classes: int = 10, in_channels: int = 3, **kw) -> QuantResNet:
    return cifar_resnet("resnet32", quant, num_classes, in_channels, **kw)


def resnet44(quant="fp", num_classes: int = 10, in_channels: int = 3, **kw) -> QuantResNet:
    return cifar_resnet("resnet44", quant, num_classes, in_channels, **kw)


def resnet56(quant="fp", num_classes: int = 10, in_channels: int = 3, **kw) -> QuantResNet:
    return cifar_resnet("resnet56", quant, num_classes, in_channels, **kw)


def resnet18(quant="fp", num_classes: int = 1000, in_channels: int = 3, mean=(0.485, 0.456, 0.406),
             std=(0.229, 0.224, 0.225)) -> QuantResNet:
    """ImageNet ResNet-18: 7x7/2 stem + 3x3/2 maxpool, BasicBlocks 64-128-256-512, 1x1 projection
    shortcuts (quantized like the body, as counted in paper 000). mean/std default to ImageNet's
    (for other in_channels pass a scalar or one value per channel)."""
    spec = parse_quant(quant)
    in_channels = _check_in_channels(in_channels)
    if in_channels != 3 and (mean, std) == ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)):
        mean, std = CIFAR_MEAN, CIFAR_STD
    stem = nn.Sequential(nn.Conv2d(in_channels, 64, 7, 2, 3, bias=False), nn.BatchNorm2d(64), nn.ReLU(),
                         nn.MaxPool2d(3, 2, 1))
    model = QuantResNet("resnet18", spec, num_classes, in_channels, stem, 64, (64, 128, 256, 512),
                        (2, 2, 2, 2), "B", mean, std)
    return _finish(model, spec)


_BUILDERS = {"resnet20": resnet20, "resnet32": resnet32, "resnet44": resnet44, "resnet56": resnet56,
             "resnet18": resnet18}


def create(arch: str, quant="fp", num_classes: int = 10, in_channels: int = 3, **kw) -> QuantResNet:
    """Build `arch` (resnet20/32/44/56 for CIFAR, resnet18 for ImageNet) with the quant spec `quant`."""
    if not isinstance(arch, str) or arch.lower() not in _BUILDERS:
        raise ValueError(f"arch: unknown architecture {arch!r}; accepted: {', '.join(ARCHS)}")
    return _BUILDERS[arch.lower()](quant=quant, num_classes=num_classes, in_channels=in_channels, **kw)


__all__ = ["create", "resnet18", "resnet20", "resnet32", "resnet44", "resnet56", "QuantResNet", "ARCHS",
           "OptionAShortcut", "BasicBlock", "ResidualFusedBlock"]
