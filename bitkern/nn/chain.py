"""Whole-network packed inference: a run of frozen blocks executed as one chain of packed convs.

A block takes part when it declares its packed convs and how its activations flow (``chain_convs()``,
see bitkern.models.resnet.ResidualFusedBlock): each conv reads one activation, optionally adds a residual
read from an earlier one (identity, or option A: every s-th pixel and a channel offset) and writes one,
all epilogues (bias, residual add, clamp) fused. :class:`ChainedSequential` is an nn.Sequential of such
blocks (same children, so the same state_dict keys) that, in plain eager inference on a backend with
``Capabilities.bitplane_output``, runs them as one backend chain built once per input shape: every conv
hands its successors the packed bit planes they read instead of a float tensor (docs/cpu_kernels.md
"Chains"). Everywhere else (autograd for attacks, torch.compile / export, other backends, NaN inputs) it
runs the blocks one by one, as before; both ways give bit-identical outputs.
"""
from __future__ import annotations

import contextlib
from collections import OrderedDict
from dataclasses import dataclass

import torch
from torch import nn

from .. import _bitmath, _checks, dispatch
from ..backends.base import ChainConv
from ..ops.eager import plain_eager
from .packed import PackedMBNConv2d

_ENABLED = True
_MAX_SHAPES = 8  # built chains kept per ChainedSequential (one per input shape and ISA; oldest dropped)


def chains_enabled() -> bool:
    return _ENABLED


@contextlib.contextmanager
def use_chains(enabled: bool):
    """Turn chained inference on / off inside the block (off: frozen models run layer by layer, as
    before chains existed; for comparisons and debugging)."""
    global _ENABLED
    if not isinstance(enabled, bool):
        raise TypeError(f"enabled: expected a bool, got {type(enabled).__name__}")
    previous, _ENABLED = _ENABLED, enabled
    try:
        yield
    finally:
        _ENABLED = previous


# chain_convs() entries: (conv, src, dst, residual or None); src / dst / residual name activations:
# "in" (the block's input), "out" (its output) or a name local to the block. residual: (name, stride,
# channel offset).


@dataclass(frozen=True)
class Handoff:
    """How one packed conv's output reaches the next layers inside a chain."""
    producer: str          # module path of the conv
    consumers: tuple[str, ...]  # convs that read its bit planes
    float_kept: bool       # also kept as floats (a later residual or the chain's output)

    def __str__(self) -> str:
        what = "bit planes" + (" + float (residual / output)" if self.float_kept else " only")
        return f"{self.producer} -> {', '.join(self.consumers) or '(chain output)'}: {what}"


def _steps_of(blocks) -> list | None:
    """(conv, block index, src, dst, residual) over the blocks with globally numbered activations, or
    None when a block declares no chain."""
    steps, current, next_id = [], 0, 1
    for index, block in enumerate(blocks):
        declare = getattr(block, "chain_convs", None)
        convs = declare() if callable(declare) else None
        if not convs:
            return None
        local = {"in": current}
        for conv, src, dst, residual in convs:
            if not isinstance(conv, PackedMBNConv2d) or conv.is_linear or src not in local:
                return None
            if residual is not None and residual[0] not in local:
                return None
            local[dst] = next_id
            next_id += 1
            steps.append((conv, index, local[src], local[dst],
                          None if residual is None else (local[residual[0]], residual[1], residual[2])))
        if "out" not in local:
            return None
        current = local["out"]
    return steps if steps and steps[-1][3] == current else None


def handoffs(seq: nn.Sequential) -> list[Handoff] | None:
    """Which conv hands bit planes to which (None: the blocks cannot run as a chain)."""
    blocks = list(seq)
    steps = _steps_of(blocks)
    if steps is None:
        return None
    names = {id(m): f"{i}.{n}" for i, block in enumerate(blocks) for n, m in block.named_modules()}
    steps = [(conv, names[id(conv)], *rest) for conv, _, *rest in steps]
    last = steps[-1][3]
    found = []
    for conv, name, src, dst, _ in steps:
        consumers = tuple(n for _, n, s, _, _ in steps if s == dst)
        kept = dst == last or any(r is not None and r[0] == dst for *_, r in steps)
        found.append(Handoff(name, consumers, kept))
    return found


def _chain_conv(conv: PackedMBNConv2d, src: int, dst: int, residual) -> ChainConv:
    alpha2d = _bitmath.alpha2d(conv.alpha, *conv.w_packed.shape[:2]).float().contiguous()
    beta = conv.beta if conv.beta is not None else torch.ones(conv.N)
    return ChainConv(src, dst, None if residual is None else residual[0],
                     1 if residual is None else int(residual[1]), 0 if residual is None else int(residual[2]),
                     conv.w_packed, conv.in_channels, conv.kernel_size, conv.stride, conv.padding, alpha2d, conv.v,
                     beta.float().contiguous(), conv.bias, conv.clamp)


def chainable(x) -> bool:
    """Whether x takes the chained inference path: plain eager inference (no autograd, compile, export
    or dispatch mode) on float32 [B, C, H, W] whose backend has chains (Capabilities.bitplane_output)."""
    return (_ENABLED and plain_eager((x,), differentiable=True) and isinstance(x, torch.Tensor)
            and x.dim() == 4 and x.dtype == torch.float32 and x.numel() > 0
            and dispatch.backend_for(x.device).capabilities.bitplane_output)


class ChainedSequential(nn.Sequential):
    """nn.Sequential of chain-capable frozen blocks; one backend chain per input shape in inference."""

    def __init__(self, *blocks: nn.Module):
        super().__init__(*blocks)
        self._chains: OrderedDict = OrderedDict()

    def handoffs(self) -> list[Handoff] | None:
        return handoffs(self)

    def __getstate__(self):  # built chains are backend objects: copies and pickles rebuild their own
        state = super().__getstate__() if hasattr(super(), "__getstate__") else self.__dict__.copy()
        return {**state, "_chains": OrderedDict()}

    def _watched(self) -> list:
        """The modules whose children chain_convs() reads: this one, its blocks, their Sequentials."""
        found = [self]
        for block in self._modules.values():
            found.append(block)
            found += [c for c in block._modules.values() if isinstance(c, nn.Sequential)]
        return found

    @staticmethod
    def _fingerprint(watched, convs) -> tuple:
        """What a built chain depends on: the module tree it was planned from (identities), every buffer
        of its convs (identity and version counter: in-place writes such as load_state_dict bump it)
        and their clamps. Plain dict reads: checked on every call (~20 us for ResNet-20)."""
        fp = [id(child) for m in watched for child in m._modules.values()]
        for conv in convs:
            for t in conv._buffers.values():
                fp += (id(t), None if t is None else t._version)
            fp.append(conv.clamp)
        return tuple(fp)

    def _chain_for(self, x: torch.Tensor, backend):
        key = (tuple(x.shape[1:]), backend.name, backend.chain_key())
        watched = self._watched()
        hit = self._chains.get(key)
        if hit is not None and self._fingerprint(watched, hit[1]) == hit[0]:
            self._chains.move_to_end(key)
            return hit[3]
        steps = _steps_of(list(self))
        if steps is None:
            return None
        shapes = {0: tuple(x.shape[1:])}
        convs = []
        for conv, _, src, dst, residual in steps:
            c, h, w = shapes[src]
            if c != conv.in_channels:  # the layer-by-layer path raises its own error
                return None
            shapes[dst] = (conv.out_channels,
                           *_checks.conv_output_size((h, w), conv.kernel_size, conv.stride, conv.padding))
            convs.append(_chain_conv(conv, src, dst, residual))
        chain = backend.build_chain([shapes[i] for i in range(len(shapes))], convs)
        packed = [conv for conv, *_ in steps]
        # the entry keeps every module and tensor it fingerprints alive, so their ids stay unique
        alive = ([list(m._modules.values()) for m in watched], [list(c._buffers.values()) for c in packed])
        self._chains[key] = (self._fingerprint(watched, packed), packed, alive, chain)
        self._chains.move_to_end(key)
        while len(self._chains) > _MAX_SHAPES:
            self._chains.popitem(last=False)
        return chain

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if chainable(x):
            try:
                chain = self._chain_for(x, dispatch.backend_for(x.device))
            except ValueError:  # a block does not fit this input (e.g. too small): layer by layer
                chain = None
            if chain is not None:
                out = chain.run(x)
                if out is not None:
                    return out
        return super().forward(x)  # autograd, compile / export, other backends; raises for NaN input


_LAYOUT_FREE = (nn.BatchNorm2d, nn.ReLU, nn.ReLU6, nn.Hardtanh, nn.MaxPool2d, nn.Identity)


class ChannelsLastStem(nn.Sequential):
    """An fp stem (Conv2d, then BatchNorm2d / ReLU / Hardtanh / MaxPool2d) in front of a chain: in chained
    inference its conv's output is made channels_last before the rest. Those ops give the same values in
    either layout (elementwise, or a max) and run far faster channels_last (ResNet-18's 3x3/2 max pool at
    224x224, batch 1: 0.17 vs 3.1 ms); the chain then reads the activations in place. Same children, so
    the same state_dict keys. An eager autograd pass in eval mode (an attack step) takes the same
    channels_last tail: the packed convs' backward works channels_last (docs/cpu_kernels.md "The
    backward"), so the stem's BatchNorm / ReLU backward then run in one layout instead of a mixed one
    (~6x slower), and the gradient stays bit for bit the same: those backward passes give equal values in
    either layout and the stem conv keeps its input's layout (tests/test_ste_backward.py). Everywhere else
    (training mode, compile / export) it is an nn.Sequential."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (chainable(x) or self._eager_eval_autograd(x)):
            return super().forward(x)
        modules = iter(self)
        x = next(modules)(x).contiguous(memory_format=torch.channels_last)
        for module in modules:
            x = module(x)
        return x

    def _eager_eval_autograd(self, x) -> bool:
        return (not self.training and torch.is_grad_enabled() and isinstance(x, torch.Tensor)
                and x.dim() == 4 and x.device.type == "cpu" and plain_eager((x,), differentiable=False))

    @staticmethod
    def fits(seq: nn.Module) -> bool:
        return (type(seq) is nn.Sequential and len(seq) > 1 and type(seq[0]) is nn.Conv2d
                and all(type(m) in _LAYOUT_FREE for m in list(seq)[1:]))


def chain_sequentials(net: nn.Module) -> list[str]:
    """Turn every nn.Sequential of `net` whose blocks can run as a chain into a ChainedSequential (in
    place, same children); returns their module paths."""
    found = []
    for parent_name, parent in list(net.named_modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.Sequential and len(child) and handoffs(child) is not None:
                setattr(parent, name, ChainedSequential(*child))
                found.append(f"{parent_name}.{name}" if parent_name else name)
    if found:  # an fp stem in front of the chains runs its layout-free tail channels_last
        for parent in list(net.modules()):
            for name, child in list(parent.named_children()):
                if ChannelsLastStem.fits(child):
                    setattr(parent, name, ChannelsLastStem(*child))
    return found


__all__ = ["ChainedSequential", "ChannelsLastStem", "chainable", "Handoff", "handoffs", "chain_sequentials",
           "use_chains", "chains_enabled"]
