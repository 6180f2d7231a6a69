"""Packed inference models: bitkern.freeze(model) and bitkern.load_frozen(path).

freeze() deep-copies the model and asks the model's quant scheme (bitkern.quant, from ``model.quant``)
which packed layer each trained layer becomes (built-in: every MBN / XNOR layer's ``to_packed()``, a
bitkern.nn.PackedMBNConv2d that holds the sign bits of its weight bases pre-packed as int64
[M, Co, KH, KW, Kw], no latent float weights, plus alpha / v / beta as buffers, and computes through
bitkern.ops.mbn_conv2d_packed, differentiable in the input, so attacks still work); a scheme that cannot
be frozen is refused. Pruning masks are baked into the weights.

With fuse=True (default) an eval BatchNorm2d right after a packed conv is folded into it (alpha becomes
alpha * gamma / sqrt(var + eps) per output channel, [M, Co]; bias = beta_bn - mean * gamma / sqrt(var +
eps)), and a Hardtanh / ReLU that only feeds the next layer (act1 of a BasicBlock; an activation after the
BN inside an nn.Sequential) becomes the conv's clamp: both run in the packed kernel's epilogue and the
BN / activation modules become nn.Identity. Which chains qualify, the modules declare (``fusion_chains``;
for an nn.Sequential its consecutive items). Then every module with a ``fuse_residual()`` hook may replace
itself: a BasicBlock whose conv2 absorbed bn2 becomes a ResidualFusedBlock (bitkern/models/resnet.py): its
`act2(conv2_out + shortcut(x))` runs in conv2's epilogue as well (residual = shortcut(x), clamp = act2's
bounds), so the residual add and act2 cost no pass of their own. Last, every nn.Sequential of blocks that
declare their packed convs becomes a bitkern.nn.chain.ChainedSequential: in plain eager inference the
blocks run as one prepared backend chain with bit planes handed between the convs (bit-identical to
running them one by one; FrozenModel.handoffs() lists who feeds whom).
Logits equal the original eval model's up to float32 rounding (the sums are taken in another order;
tests use rtol/atol 1e-4 with identical predictions); input gradients use the same STE masks.

Files: FrozenModel.save / load_frozen read and write through bitkern.model_files (safetensors, content
hash, checks against the state the metadata implies); this module only describes the model (the JSON
under ``bitkern`` in the header: FROZEN_FORMAT, FROZEN_FORMAT_VERSION, fused; bitkern.model_files).
"""
from __future__ import annotations

import copy
import os
from dataclasses import replace
from pathlib import Path

import torch
from torch import nn
from torch.nn.utils import prune as torch_prune

from .model_files import (FROZEN_FORMAT, FROZEN_FORMAT_VERSION, ModelFileError, check_entries,
                          expected_state, frozen_header, load_verified, read_frozen_meta, read_header,
                          write_safetensors)
from .nn.chain import ChainedSequential, chain_sequentials, chainable
from .nn.packed import PackedMBNConv2d, fold_into_packed
from .quant import QuantScheme, scheme_of

# ------------------------------------------------------------------------------------------ freezing
def _replace_layers(module: nn.Module, freeze_layer) -> None:
    """Replace every layer that `freeze_layer` packs (in place); bake pruning masks into the others."""
    for name, child in list(module.named_children()):
        packed = freeze_layer(child)
        if packed is not None:
            setattr(module, name, packed)
        else:
            if hasattr(child, "weight_mask"):
                torch_prune.remove(child, "weight")  # bake the mask into the weight
            _replace_layers(child, freeze_layer)


def _fusion_chains(module: nn.Module):
    """(conv, bn, act or None) attribute-name triples a module declares foldable (``fusion_chains``, an
    attribute or a method); for an nn.Sequential, every consecutive (item, next, the one after)."""
    chains = getattr(module, "fusion_chains", None)
    if callable(chains):
        chains = chains()
    if chains:
        return [(conv, bn, act) for conv, bn, act in chains]
    if isinstance(module, nn.Sequential):  # e.g. option-B shortcut (conv, BN); stem-like chains
        n = len(module)
        return [(str(i), str(i + 1), str(i + 2) if i + 2 < n else None) for i in range(n - 1)]
    return []


def _fuse_residuals(net: nn.Module) -> None:
    """Replace every module whose ``fuse_residual()`` returns a module by that module (same name)."""
    for parent in list(net.modules()):
        for name, child in list(parent.named_children()):
            fuse = getattr(child, "fuse_residual", None)
            replacement = fuse() if callable(fuse) else None
            if replacement is not None:
                setattr(parent, name, replacement)


def _activations_in_place(net: nn.Module) -> None:
    """A ReLU / Hardtanh right after an eval BatchNorm2d in an nn.Sequential (the fp stem) overwrites the
    BN's output instead of allocating another activation tensor: the same values, and nothing else reads
    that output (BN's backward needs its input, not its output)."""
    for module in net.modules():
        if type(module) is nn.Sequential:
            for before, act in zip(module, list(module)[1:]):
                if type(before) is nn.BatchNorm2d and type(act) in (nn.ReLU, nn.Hardtanh, nn.ReLU6):
                    act.inplace = True


def fuse_packed(net: nn.Module) -> nn.Module:
    """Fold eval BatchNorm2d (and a following Hardtanh / ReLU that only feeds the next layer) into the
    preceding packed convs, in place; the folded modules become nn.Identity. Which (conv, BN, activation)
    chains qualify, a module declares with ``fusion_chains`` (nn.Sequential: its consecutive items); then
    every module with a ``fuse_residual()`` that returns a replacement is replaced by it (BasicBlock: a
    ResidualFusedBlock, residual add + act2 in conv2's epilogue). Last, every nn.Sequential of blocks
    that declare their packed convs (``chain_convs``) becomes a bitkern.nn.chain.ChainedSequential: in
    inference they run as one chain of packed convs with bit planes handed between them."""
    for module in list(net.modules()):
        for conv_name, bn_name, act_name in _fusion_chains(module):
            act = None if act_name is None else getattr(module, act_name)
            bn_done, act_done = fold_into_packed(getattr(module, conv_name), getattr(module, bn_name), act)
            if bn_done:
                setattr(module, bn_name, nn.Identity())
            if act_done:
                setattr(module, act_name, nn.Identity())
    _fuse_residuals(net)
    chain_sequentials(net)
    _activations_in_place(net)
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
        return self.net(self._inference_layout(x))

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.net.forward_features(self._inference_layout(x))

    def _inference_layout(self, x):
        """x in channels_last for chained inference on a batch > 1: torch then runs the fp stem through
        oneDNN in either layout (bit-identical results; tests/test_chain.py checks it), and channels_last
        skips oneDNN's NCHW reorders (the CIFAR stem conv runs ~10x faster), while the chain reads either.
        A single image keeps its layout (torch's NCHW conv may take another algorithm there)."""
        if isinstance(x, torch.Tensor) and x.dim() == 4 and x.shape[0] > 1 and x.device.type == "cpu":
            if any(isinstance(m, ChainedSequential) for m in self.net.modules()) and chainable(x):
                return x.contiguous(memory_format=torch.channels_last)
        return x

    @property
    def fc(self) -> nn.Module:
        return self.net.fc

    def handoffs(self) -> list:
        """Where a packed conv hands its successors bit planes instead of a float tensor (plain eager
        inference on a backend with chains, e.g. cpp): one bitkern.nn.chain.Handoff per packed conv of
        every chained run of blocks, module paths relative to the model."""
        found = []
        for path, module in self.named_modules():
            if isinstance(module, ChainedSequential):
                found += [replace(h, producer=f"{path}.{h.producer}",
                                  consumers=tuple(f"{path}.{c}" for c in h.consumers))
                          for h in module.handoffs() or ()]
        return found

    def save(self, path: str | os.PathLike) -> None:
        """Write safetensors (atomically): the model description as JSON under ``bitkern`` in the header
        metadata, and ``bitkern_sha256``, a content hash over that description and every tensor."""
        write_safetensors(path, self.state_dict(), frozen_header(self.meta))


def _meta_of(model: nn.Module) -> dict:
    meta = {"format": FROZEN_FORMAT, "version": FROZEN_FORMAT_VERSION}
    for key in ("arch", "quant", "num_classes", "in_channels"):
        val = getattr(model, key, None)
        if isinstance(val, (str, int, float, bool)):
            meta[key] = val
    return meta


_GENERIC = QuantScheme()  # models without a registered quant spec: every layer with a to_packed() is packed


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
    found = scheme_of(model)
    if found is not None and not found[0].freezable:
        raise ValueError(f"freeze: quant scheme {found[0].name!r} (model quant {str(found[1])!r}) has no packed "
                         f"inference form; evaluate the trained model directly")
    freeze_layer = found[0].freeze_layer if found is not None else _GENERIC.freeze_layer
    net = copy.deepcopy(model)
    _replace_layers(net, freeze_layer)
    net.eval()
    if fuse:
        fuse_packed(net)
    frozen = FrozenModel(net, {**_meta_of(model), "fused": fuse})
    frozen.eval()
    return frozen


# ------------------------------------------------------------------------------------------ loading
def _freeze_fused(model: nn.Module) -> FrozenModel:  # module-level: expected_state caches by function
    return freeze(model, fuse=True)


def _freeze_unfused(model: nn.Module) -> FrozenModel:
    return freeze(model, fuse=False)


def load_frozen(path: str | os.PathLike, device="cpu") -> FrozenModel:
    """Load a model written by FrozenModel.save (safetensors only; nothing is unpickled).

    Before any tensor is used: the header, the metadata (types, bounds), every tensor's name / dtype / shape
    against the packed model the metadata implies, and the content hash are checked; then floats must be
    finite and packed words must have no bits set beyond their channel count. Any problem raises
    ModelFileError (a ValueError) naming the file."""
    from .models import create

    path = Path(path)
    header = read_header(path)
    meta = read_frozen_meta(header)
    fused = meta["fused"]
    expected = expected_state(path, meta, transform=_freeze_fused if fused else _freeze_unfused)
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
        frozen.meta.update(version=FROZEN_FORMAT_VERSION, fused=True)
    return frozen.to(device).eval()


def __getattr__(name):
    if name == "ResidualFusedBlock":  # moved to bitkern.models.resnet; loaded lazily (freeze is imported eagerly)
        from .models.resnet import ResidualFusedBlock
        return ResidualFusedBlock
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def state_dict_bytes(module: nn.Module) -> int:
    """Bytes of the module's state_dict tensors (parameters and buffers)."""
    return sum(t.numel() * t.element_size() for t in module.state_dict().values())


__all__ = ["freeze", "load_frozen", "fuse_packed", "FrozenModel", "ChainedSequential", "PackedMBNConv2d",
           "ResidualFusedBlock", "state_dict_bytes", "ModelFileError"]
