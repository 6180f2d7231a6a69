"""Pure-torch backend: the float emulation a researcher would write, on any device.

Binary values are represented as +-1 floats and each (weight base, activation base) pair is convolved with
F.conv2d (exact integers), then combined with alpha * beta in the contract's order, so results are
bit-identical to the packed backends. Packing uses integer tensor ops (bitkern._bitmath). It is the
reference the packed backends are compared with and the fallback where none is available.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import _bitmath
from . import registry
from .base import Backend, Capabilities, ConvArgs


class TorchBackend(Backend):
    name = "torch"
    # bias / residual / clamp applied in place on the fresh output (no extra tensors)
    capabilities = Capabilities(devices=("*",), fused_epilogue=True, fused_residual=True)
    available = True
    reason = ""

    def run_pack(self, x: torch.Tensor, mode: str, v: float) -> torch.Tensor:
        return _bitmath.pack_bits(_bitmath.binarize(x, mode, v))

    def run_conv(self, a: ConvArgs):
        in_channels, (kh, kw) = a.x.shape[1], a.kernel_size
        # +-1 sums stay exact in float32 up to 2**24 terms; use float64 beyond.
        exact = torch.float32 if in_channels * kh * kw < 2 ** 24 else torch.float64
        weights = _bitmath.unpack_weight_bases(a.w_packed, in_channels, exact)
        acts = [t.to(exact) for t in _bitmath.activation_bases(a.x, a.v)]
        # Exact integer +-1 convolutions, one per (weight base m, activation base n).
        counts = [[F.conv2d(t, wm, stride=a.stride, padding=a.padding) for t in acts] for wm in weights]
        pairs = None
        if a.want_pairs:
            pairs = torch.stack([torch.stack(row) for row in counts]).round().to(torch.int32)
        out = None
        if a.want_out:
            # The contract's arithmetic step for step: n outer, m inner, out += fl32(alpha*beta) * dot,
            # every product and sum rounded to float32 (the C++ build disables FMA contraction). Backends
            # thus agree bit for bit, which keeps attack trajectories identical across them: binary nets
            # amplify a 1-ulp difference at a binarization threshold into a different gradient field.
            scale = a.alpha2d[:, None, :] * a.beta[None, :, None]  # [M, N, Co]
            for n in range(len(acts)):
                for m in range(len(weights)):
                    term = counts[m][n].float() * scale[m, n].reshape(1, -1, 1, 1)
                    out = term if out is None else out + term
            if a.bias is not None:
                out.add_(a.bias.reshape(1, -1, 1, 1))
            if a.residual is not None:  # after the bias, before the clamp: the contract's order
                out.add_(a.residual)
            if a.clamp is not None:
                out.clamp_(*a.clamp)
        return out, pairs


backend = TorchBackend()
registry.register("torch", lambda: backend, priority={"*": 0})
