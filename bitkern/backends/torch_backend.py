"""Pure-torch backend: the float emulation a researcher would write, on any device.

Binary values are represented as +-1 floats and each (weight base, activation base) pair is convolved with
F.conv2d (exact integers), then combined with alpha * beta in the packed kernels' order, so results are
bit-identical to the C++ backend. Packing uses integer tensor ops. It is the reference the packed backends
are compared with and the fallback where none is available.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def _bit_weights(device) -> torch.Tensor:
    """int64 [64] with 1 << i (bit 63 is the sign bit: the int64 pattern of uint64 1 << 63).

    Built per call (64 elements) rather than cached, so it is a fake tensor under fake/meta tracing."""
    return torch.bitwise_left_shift(torch.ones(64, dtype=torch.int64, device=device),
                                    torch.arange(64, device=device))


def binarize(x: torch.Tensor, mode: str = "sign", v: float | torch.Tensor = 0.0) -> torch.Tensor:
    """Boolean bits: x >= 0 (mode "sign") or fl32(x + v) >= 0.5 (mode "hv")."""
    if mode == "sign":
        return x >= 0
    if mode == "hv":
        return (x.float() + v) >= 0.5
    raise ValueError(f"mode: expected 'sign' or 'hv', got {mode!r}")


def pack_bits(bits: torch.Tensor) -> torch.Tensor:
    """bool [B, C, ...] -> int64 [B, ..., ceil(C/64)], channel c in word c // 64, bit c % 64."""
    channels = bits.shape[1]
    words = -(-channels // 64)
    moved = bits.movedim(1, -1).to(torch.int64)
    moved = F.pad(moved, (0, words * 64 - channels))
    grouped = moved.reshape(*moved.shape[:-1], words, 64)
    # Distinct powers of two: the sum is their OR, and wraps correctly into bit 63.
    return (grouped * _bit_weights(bits.device)).sum(-1)


def unpack_signs(packed: torch.Tensor, channels: int, dtype=torch.float32) -> torch.Tensor:
    """int64 [B, ..., Kw] -> +-1 [B, channels, ...] in `dtype` (inverse of pack_bits)."""
    bits = torch.bitwise_and(packed.unsqueeze(-1), _bit_weights(packed.device)) != 0
    bits = bits.reshape(*packed.shape[:-1], -1)[..., :channels]
    return (bits.to(dtype) * 2 - 1).movedim(-1, 1)


def unpack_weight_bases(w_packed: torch.Tensor, channels: int, dtype=torch.float32) -> torch.Tensor:
    """int64 [M, Co, KH, KW, Kw] -> +-1 [M, Co, C, KH, KW]."""
    num_bases = w_packed.shape[0]
    flat = unpack_signs(w_packed.flatten(0, 1), channels, dtype)
    return flat.reshape(num_bases, -1, *flat.shape[1:])


def activation_bases(x: torch.Tensor, v: torch.Tensor | None) -> list[torch.Tensor]:
    """+-1 float activation bases: [sign(x)] or [H_{v_n}(x) for n]."""
    if v is None:
        return [binarize(x).to(x.dtype) * 2 - 1]
    return [binarize(x, "hv", vn).to(x.dtype) * 2 - 1 for vn in v.to(torch.float32)]


class TorchBackend:
    name = "torch"
    available = True
    reason = ""
    fused_epilogue = True  # bias / residual / clamp applied in place on the fresh output (no extra tensors)

    def supports(self, device) -> bool:
        return True

    def pack_signs(self, x: torch.Tensor, mode: str = "sign", v: float = 0.0) -> torch.Tensor:
        return pack_bits(binarize(x, mode, v))

    def mbn_conv2d_packed(self, x, w_packed, in_channels, kernel_size, alpha2d, v, beta, stride, padding,
                          want_pairs=False, bias=None, clamp=None, residual=None):
        # +-1 sums stay exact in float32 up to 2**24 terms; use float64 beyond.
        exact = torch.float32 if in_channels * kernel_size[0] * kernel_size[1] < 2 ** 24 else torch.float64
        weights = unpack_weight_bases(w_packed, in_channels, exact)
        acts = [a.to(exact) for a in activation_bases(x.float(), v)]
        # Exact integer +-1 convolutions, one per (weight base m, activation base n).
        counts = [[F.conv2d(a, wm, stride=stride, padding=padding) for a in acts] for wm in weights]
        pairs = None
        if want_pairs:
            pairs = torch.stack([torch.stack(row) for row in counts]).round().to(torch.int32)
        out = None
        if alpha2d is not None:
            # The packed kernels' arithmetic step for step: n outer, m inner, out += fl32(alpha*beta) * dot,
            # every product and sum rounded to float32 (the C++ build disables FMA contraction). Backends
            # thus agree bit for bit, which keeps attack trajectories identical across them: binary nets
            # amplify a 1-ulp difference at a binarization threshold into a different gradient field.
            scale = alpha2d.float()[:, None, :] * beta.float()[None, :, None]  # [M, N, Co]
            for n in range(len(acts)):
                for m in range(len(weights)):
                    term = counts[m][n].float() * scale[m, n].reshape(1, -1, 1, 1)
                    out = term if out is None else out + term
            if bias is not None:
                out.add_(bias.to(out.dtype).reshape(1, -1, 1, 1))
            if residual is not None:  # after the bias, before the clamp: the packed epilogue's order
                out.add_(residual.to(out.dtype))
            if clamp is not None:
                out.clamp_(float(clamp[0]), float(clamp[1]))
        return out, pairs


backend = TorchBackend()
