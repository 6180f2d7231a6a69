"""Packed inference models: bitkern.freeze(model) and bitkern.load_frozen(path).

freeze() deep-copies the model and replaces every MBN / XNOR layer by a PackedMBNConv2d that holds the
sign bits of its weight bases pre-packed as int64 [M, Co, KH, KW, Kw] (no latent float weights) plus
alpha / v / beta as buffers, and computes through bitkern.ops.mbn_conv2d_packed (differentiable in the
input, so attacks still work). Pruning masks are baked into the weights.

With fuse=True (default) an eval BatchNorm2d right after a packed conv is folded into it (alpha becomes
alpha * gamma / sqrt(var + eps) per output channel, [M, Co]; bias = beta_bn - mean * gamma / sqrt(var +
eps)), and a Hardtanh / ReLU that only feeds the next layer (act1 of a BasicBlock; an activation after the
BN inside an nn.Sequential) becomes the conv's clamp: both run in the packed kernel's epilogue and the
BN / activation modules become nn.Identity. A BasicBlock whose conv2 absorbed bn2 becomes a
ResidualFusedBlock: its `act2(conv2_out + shortcut(x))` runs in conv2's epilogue as well (residual =
shortcut(x), clamp = act2's bounds), so the residual add and act2 cost no pass of their own.
Logits equal the original eval model's up to float32 rounding (the sums are taken in another order;
tests use rtol/atol 1e-4 with identical predictions); input gradients use the same STE masks.
"""
from __future__ import annotations

import copy
import json
import math
import os
from pathlib import Path

import torch
from torch import nn
from torch.nn.utils import prune as torch_prune

from . import ops
from .model_files import (ModelFileError, check_entries, check_model_meta, expected_state, load_verified,
                          read_header, write_safetensors)
from .nn import MBNConv2d, MBNLinear, XNORConv2d, XNORLinear

FORMAT = "bitkern-frozen"
FORMAT_VERSION = 3  # v2: BatchNorm / activation folding (meta "fused"); v3: content hash (bitkern_sha256)
# in the header. v1 / v2 files carry no hash and are refused with a message telling how to re-create them.


class PackedMBNConv2d(nn.Module):
    """Inference-only MBN / XNOR layer with pre-packed weight bases (conv, or linear as a 1x1 conv)."""

    bops_layer = True  # counted by bitkern.bops / bitkern.bitserial

    def __init__(self, w_packed: torch.Tensor, in_channels: int, out_channels: int, kernel_size, stride,
                 padding, alpha: torch.Tensor, v, beta, bias, xnor: bool, is_linear: bool, clamp=None):
        super().__init__()
        # (lo, hi) of a fused activation, applied after the bias (not a buffer: it follows from the
        # architecture, which load_frozen rebuilds).
        self.clamp = None if clamp is None else (float(clamp[0]), float(clamp[1]))
        self.in_channels, self.out_channels = int(in_channels), int(out_channels)
        self.kernel_size, self.stride, self.padding = tuple(kernel_size), tuple(stride), tuple(padding)
        self.xnor, self.is_linear = bool(xnor), bool(is_linear)
        self.M, self.N = int(w_packed.shape[0]), 1 if v is None else int(v.numel())
        if is_linear:
            self.in_features, self.out_features = self.in_channels, self.out_channels
        self.register_buffer("w_packed", w_packed.contiguous())
        self.register_buffer("alpha", alpha.detach().float().clone().contiguous())
        self.register_buffer("v", None if v is None else v.detach().float().clone().contiguous())
        self.register_buffer("beta", None if beta is None else beta.detach().float().clone().contiguous())
        self.register_buffer("bias", None if bias is None else bias.detach().float().clone().contiguous())

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        """residual (conv only): [B, Co, OH, OW], added after the bias and before the clamp."""
        lead = None
        if self.is_linear:
            if residual is not None:
                raise ValueError("residual: not supported by a packed linear layer")
            lead = x.shape[:-1]
            x = x.reshape(-1, self.in_channels, 1, 1)
        out = ops.mbn_conv2d_packed(x, self.w_packed, self.in_channels, self.kernel_size, self.alpha,
                                    self.v, self.beta, self.stride, self.padding, bias=self.bias,
                                    clamp=self.clamp, residual=residual)
        return out.reshape(*lead, self.out_channels) if self.is_linear else out

    @torch.no_grad()
    def fold_batchnorm(self, bn: nn.BatchNorm2d) -> None:
        """Absorb an eval-mode BatchNorm2d that follows this layer (exact algebra, float64, then float32)."""
        if self.clamp is not None:
            raise ValueError("fold_batchnorm: this layer already ends in a clamp; a BatchNorm after it "
                             "cannot be folded")
        if bn.running_mean is None or bn.num_features != self.out_channels:
            raise ValueError(f"bn: expected a BatchNorm2d({self.out_channels}) with running statistics, "
                             f"got {bn}")
        scale = torch.rsqrt(bn.running_var.double() + bn.eps)
        if bn.weight is not None:
            scale = scale * bn.weight.double()
        shift = -bn.running_mean.double() * scale
        if bn.bias is not None:
            shift = shift + bn.bias.double()
        if self.bias is not None:
            shift = shift + self.bias.double() * scale
        alpha2d = self.alpha.double().reshape(self.M, -1).expand(self.M, self.out_channels)
        self.alpha = (alpha2d * scale).float().contiguous()
        self.bias = shift.float().contiguous()

    def extra_repr(self) -> str:
        kind = "xnor" if self.xnor else f"mbn M={self.M} N={self.N}"
        clamp = "" if self.clamp is None else f", clamp={self.clamp}"
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"padding={self.padding}, {kind}{', linear' if self.is_linear else ''}{clamp}")


@torch.no_grad()
def _pack_bases(bases: torch.Tensor) -> torch.Tensor:
    """float [M, Co, C, KH, KW] -> int64 [M, Co, KH, KW, Kw] via bitkern.ops.pack_signs."""
    return ops.pack_signs(bases.flatten(0, 1).contiguous()).unflatten(0, bases.shape[:2])


@torch.no_grad()
def _packed_layer(module: nn.Module) -> PackedMBNConv2d:
    linear = isinstance(module, (MBNLinear, XNORLinear))
    if isinstance(module, (MBNConv2d, MBNLinear)):
        bases = module.bases()
        alpha, v, beta, xnor = module.alpha, module.v, module.beta, False
    else:
        bases, alpha, v, beta, xnor = module.weight.unsqueeze(0), module.scale(), None, None, True
    if linear:
        bases = bases[..., None, None]
        geometry = ((1, 1), (1, 1), (0, 0))
        cin, cout = module.in_features, module.out_features
    else:
        geometry = (module.kernel_size, module.stride, module.padding)
        cin, cout = module.in_channels, module.out_channels
    if not linear and isinstance(module.padding, str):
        raise ValueError(f"freeze: string padding {module.padding!r} is not supported; use ints")
    return PackedMBNConv2d(_pack_bases(bases.float()), cin, cout, *geometry, alpha, v, beta, module.bias,
                           xnor, linear)


def _replace_layers(module: nn.Module) -> None:
    for name, child in list(module.named_children()):
        if isinstance(child, (MBNConv2d, MBNLinear, XNORConv2d, XNORLinear)):
            setattr(module, name, _packed_layer(child))
        else:
            if hasattr(child, "weight_mask"):
                torch_prune.remove(child, "weight")  # bake the mask into the weight
            _replace_layers(child)


def _activation_clamp(module: nn.Module):
    """(lo, hi) when `module` is an elementwise clamp (Hardtanh, ReLU6, ReLU), else None."""
    if isinstance(module, nn.Hardtanh):  # ReLU6 is a Hardtanh(0, 6)
        return float(module.min_val), float(module.max_val)
    if isinstance(module, nn.ReLU):
        return 0.0, math.inf
    return None


def _fold(conv: nn.Module, bn: nn.Module, act: nn.Module | None = None) -> tuple[bool, bool]:
    """Fold bn (and act, when a clamp) into a packed conv: (bn folded, act folded)."""
    if not (isinstance(conv, PackedMBNConv2d) and not conv.is_linear and conv.clamp is None
            and type(bn) is nn.BatchNorm2d and bn.running_mean is not None):
        return False, False
    conv.fold_batchnorm(bn)
    clamp = None if act is None else _activation_clamp(act)
    if clamp is not None:
        conv.clamp = clamp
    return True, clamp is not None


class ResidualFusedBlock(nn.Module):
    """A frozen BasicBlock whose residual add and act2 run in conv2's epilogue:
    conv2(act1(bn1(conv1(x))), residual=shortcut(x)), conv2 carrying act2's clamp. Same submodule names
    as BasicBlock (act2 becomes nn.Identity), so state_dict keys are unchanged."""

    def __init__(self, block: nn.Module):
        super().__init__()
        clamp = _activation_clamp(block.act2)
        conv2 = block.conv2
        if not _residual_fusable(block):
            raise ValueError(f"block: expected a folded BasicBlock with a packed conv2 and a Hardtanh / ReLU "
                             f"act2, got {block}")
        self.conv1, self.bn1, self.act1 = block.conv1, block.bn1, block.act1
        self.conv2, self.bn2, self.act2 = conv2, block.bn2, nn.Identity()
        self.shortcut = block.shortcut
        conv2.clamp = clamp

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.act1(self.bn1(self.conv1(x)))
        return self.conv2(out, residual=self.shortcut(x))


def _residual_fusable(block: nn.Module) -> bool:
    conv2 = block.conv2
    return (isinstance(conv2, PackedMBNConv2d) and not conv2.is_linear and conv2.clamp is None
            and isinstance(block.bn2, nn.Identity) and _activation_clamp(block.act2) is not None)


def _fuse_residuals(net: nn.Module) -> None:
    """Replace every fusable BasicBlock by a ResidualFusedBlock (in place, same names)."""
    from .models.resnet import BasicBlock
    for parent in list(net.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is BasicBlock and _residual_fusable(child):
                setattr(parent, name, ResidualFusedBlock(child))


def fuse_packed(net: nn.Module) -> nn.Module:
    """Fold eval BatchNorm2d (and a following Hardtanh / ReLU that only feeds the next layer) into the
    preceding packed convs, in place; the folded modules become nn.Identity. Then BasicBlocks whose bn2 was
    folded become ResidualFusedBlocks (residual add + act2 in conv2's epilogue)."""
    from .models.resnet import BasicBlock
    for module in list(net.modules()):
        if isinstance(module, BasicBlock):
            bn_done, act_done = _fold(module.conv1, module.bn1, module.act1)  # act1 feeds conv2 only
            if bn_done:
                module.bn1 = nn.Identity()
            if act_done:
                module.act1 = nn.Identity()
            if _fold(module.conv2, module.bn2)[0]:  # act2 follows the residual add: fused below
                module.bn2 = nn.Identity()
        elif isinstance(module, nn.Sequential):  # e.g. option-B shortcut (conv, BN); stem-like chains
            for i in range(len(module) - 1):
                act = module[i + 2] if i + 2 < len(module) else None
                bn_done, act_done = _fold(module[i], module[i + 1], act)
                if bn_done:
                    module[i + 1] = nn.Identity()
                if act_done:
                    module[i + 2] = nn.Identity()
    _fuse_residuals(net)
    return net


class FrozenModel(nn.Module):
    """Packed inference model; forward / forward_features as the original, plus save(path)."""

    def __init__(self, net: nn.Module, meta: dict):
        super().__init__()
        self.net = net
        self.meta = dict(meta)
        self.arch = meta.get("arch")
        self.quant = meta.get("quant")
        self.num_classes = meta.get("num_classes")
        self.in_channels = meta.get("in_channels")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.net.forward_features(x)

    @property
    def fc(self) -> nn.Module:
        return self.net.fc

    def save(self, path: str | os.PathLike) -> None:
        """Write safetensors (atomically): the model description as JSON under ``bitkern`` in the header
        metadata, and ``bitkern_sha256``, a content hash over that description and every tensor."""
        meta = {**self.meta, "format": FORMAT, "version": FORMAT_VERSION}
        meta["fused"] = bool(meta.get("fused", False))
        try:
            text = json.dumps(meta, sort_keys=True, allow_nan=False)
        except (TypeError, ValueError) as e:
            raise TypeError(f"meta: cannot be stored as JSON ({e})") from None
        write_safetensors(path, self.state_dict(), {"bitkern": text})


def _meta_of(model: nn.Module) -> dict:
    meta = {"format": FORMAT, "version": FORMAT_VERSION}
    for key in ("arch", "quant", "num_classes", "in_channels"):
        val = getattr(model, key, None)
        if isinstance(val, (str, int, float, bool)):
            meta[key] = val
    return meta


def freeze(model: nn.Module, fuse: bool = True) -> FrozenModel:
    """Packed inference copy of `model` (the original is left unchanged), in eval mode.

    fuse: fold eval BatchNorm (and the activation that only feeds the next layer) into the packed convs'
    epilogue (see the module docstring); the BN running statistics are then baked in."""
    if not isinstance(fuse, bool):
        raise TypeError(f"fuse: expected a bool, got {type(fuse).__name__}")
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    if isinstance(model, FrozenModel):
        return model
    for module in model.modules():
        if hasattr(module, "weight_mask") and isinstance(getattr(module, "weight", None), torch.Tensor):
            # torch.nn.utils.prune caches weight = weight_orig * mask (a non-leaf, which deepcopy refuses);
            # its pre-hook recomputes it on every forward, so a detached cache changes nothing.
            module.weight = module.weight.detach()
    net = copy.deepcopy(model)
    _replace_layers(net)
    net.eval()
    if fuse:
        fuse_packed(net)
    frozen = FrozenModel(net, {**_meta_of(model), "fused": fuse})
    frozen.eval()
    return frozen


def _frozen_meta(header) -> dict:
    """The checked model description of a frozen file (from its header; nothing is allocated)."""
    path = header.path
    if "bitkern" not in header.metadata:
        raise ModelFileError(f"{path}: has no bitkern metadata; expected a file written by FrozenModel.save()")
    try:
        meta = json.loads(header.metadata["bitkern"])
    except (ValueError, RecursionError):
        raise ModelFileError(f"{path}: bitkern metadata is not valid JSON") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        got = meta.get("format") if isinstance(meta, dict) else meta
        raise ModelFileError(f"{path}: holds format {got!r}; expected {FORMAT!r}")
    version = meta.get("version")
    if version in (1, 2) and not isinstance(version, bool):
        raise ModelFileError(
            f"{path}: frozen format v{version} (written by an older bitkern) carries no content hash and is "
            f"refused; re-create it from the trained model: "
            f"bitkern.freeze(bitkern.checkpoint.load_model('model.safetensors')).save('{path.name}')")
    if version != FORMAT_VERSION or isinstance(version, bool):
        raise ModelFileError(f"{path}: unsupported frozen format version {version!r}; expected {FORMAT_VERSION}")
    if not isinstance(meta.get("fused"), bool):
        raise ModelFileError(f"{path}: metadata fused must be true or false, got {meta.get('fused')!r}")
    return check_model_meta(path, meta)


def load_frozen(path: str | os.PathLike, device="cpu") -> FrozenModel:
    """Load a model written by FrozenModel.save (safetensors only; nothing is unpickled).

    Before any tensor is used: the header, the metadata (types, bounds), every tensor's name / dtype / shape
    against the packed model the metadata implies, and the content hash are checked; then floats must be
    finite and packed words must have no bits set beyond their channel count. Any problem raises
    ModelFileError (a ValueError) naming the file."""
    from .models import create

    path = Path(path)
    header = read_header(path)
    meta = _frozen_meta(header)
    fused = meta["fused"]
    expected = expected_state(path, meta, frozen=True, fused=fused)
    check_entries(header, expected)
    state = load_verified(header, expected=expected)
    with torch.random.fork_rng(devices=[]):
        skeleton = create(meta["arch"], meta["quant"], num_classes=meta["num_classes"],
                          in_channels=meta["in_channels"])
    frozen = freeze(skeleton, fuse=fused)
    try:
        frozen.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise ModelFileError(f"{path}: weights do not fit the model ({str(e).splitlines()[0]})") from None
    if not fused:  # an unfused file: fold now, for speed (saving it again writes the fused form)
        fuse_packed(frozen.net)
        frozen.meta.update(version=FORMAT_VERSION, fused=True)
    return frozen.to(device).eval()


def state_dict_bytes(module: nn.Module) -> int:
    """Bytes of the module's state_dict tensors (parameters and buffers)."""
    return sum(t.numel() * t.element_size() for t in module.state_dict().values())


__all__ = ["freeze", "load_frozen", "fuse_packed", "FrozenModel", "PackedMBNConv2d", "ResidualFusedBlock",
           "state_dict_bytes", "ModelFileError"]
