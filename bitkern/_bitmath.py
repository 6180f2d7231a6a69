"""Bit math shared by the ops and every backend: the sign rule, packing layout and activation bases.

Layout: channel c of a pixel lives in int64 word c // 64, bit c % 64 (bit 63 is the sign bit, the int64
pattern of uint64 1 << 63); a set bit means +1. Sign rule: t >= 0 -> +1 (so -0.0 -> +1); the activation
bases H_v compare fl32(fl32(x) + v) >= 0.5.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

WORD_BITS = 64


def words_for(channels: int) -> int:
    """int64 words per packed pixel: ceil(channels / 64)."""
    return -(-channels // WORD_BITS)


def _bit_weights(device) -> torch.Tensor:
    """int64 [64] with 1 << i. Built per call (64 elements) rather than cached, so it is a fake tensor
    under fake/meta tracing."""
    return torch.bitwise_left_shift(torch.ones(WORD_BITS, dtype=torch.int64, device=device),
                                    torch.arange(WORD_BITS, device=device))


def binarize(x: torch.Tensor, mode: str = "sign", v: float | torch.Tensor = 0.0) -> torch.Tensor:
    """Boolean bits: x >= 0 (mode "sign") or fl32(x + v) >= 0.5 (mode "hv")."""
    if mode == "sign":
        return x >= 0
    if mode == "hv":
        return (x.float() + v) >= 0.5
    raise ValueError(f"mode: expected 'sign' or 'hv', got {mode!r}")


def binarizable(t: torch.Tensor, sign: bool = True) -> torch.Tensor:
    """float32 tensor that binarizes like t: t itself (float32) or t.float() (float16 / bfloat16 widen
    exactly, and H_v is defined on fl32(x)); in sign mode a float64 t becomes +-1 (t < 0 -> -1), since
    rounding it to float32 could turn a tiny negative value into -0.0, whose bit is +1."""
    if sign and t.dtype == torch.float64:
        return torch.where(t < 0, -1.0, 1.0).to(torch.float32)
    return t.float()


def pack_bits(bits: torch.Tensor) -> torch.Tensor:
    """bool [B, C, ...] -> int64 [B, ..., ceil(C/64)], channel c in word c // 64, bit c % 64."""
    channels = bits.shape[1]
    words = words_for(channels)
    moved = bits.movedim(1, -1).to(torch.int64)
    moved = F.pad(moved, (0, words * WORD_BITS - channels))
    grouped = moved.reshape(*moved.shape[:-1], words, WORD_BITS)
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


def alpha2d(alpha: torch.Tensor, num_bases: int, out_channels: int) -> torch.Tensor:
    """alpha [M] or [M, Co] -> float32 [M, Co] (the kernels' per-base, per-channel scales)."""
    return alpha.float().reshape(num_bases, -1).expand(num_bases, out_channels).contiguous()
