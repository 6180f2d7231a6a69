"""Triton backend: packed sign packing and multi-base XNOR-popcount convolution.

Usable on CUDA tensors when a CUDA device exists, and on CPU tensors when TRITON_INTERPRET=1 is set
before triton is imported (the interpreter; that is how the kernels are tested without a GPU). Arguments
arrive validated by the contract (bitkern.backends.base); bias / residual / clamp are applied by the
contract's epilogue in torch (no fused epilogue). triton is imported when the backend is first built.
"""
from __future__ import annotations

import os

import torch

from .. import _bitmath
from . import registry
from .base import Backend, Capabilities, ConvArgs


def _interpreting():
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _probe():
    """(available, reason, kernels module or None)."""
    try:
        import triton  # noqa: F401
    except Exception as exc:  # ImportError or a broken install
        return False, f"triton is not importable ({type(exc).__name__}: {exc})", None
    if not (_interpreting() or torch.cuda.is_available()):
        return False, ("triton is installed but there is no CUDA device "
                       "(set TRITON_INTERPRET=1 before importing triton to run on CPU tensors)"), None
    try:
        from . import triton_kernels
    except Exception as exc:  # pragma: no cover - a triton version without the features used
        return False, f"triton kernels failed to load ({type(exc).__name__}: {exc})", None
    where = "interpreter (TRITON_INTERPRET=1, CPU tensors)" if _interpreting() else "CUDA device"
    return True, f"available: {where}", triton_kernels


def cdiv(a, b):
    return -(-a // b)


class TritonBackend(Backend):
    name = "triton"

    def __init__(self):
        self.available, self.reason, self._k = _probe()
        # Interpreter mode is fixed when triton.jit decorates the kernels (at import).
        self.interpret = self.available and _interpreting()
        self.capabilities = Capabilities(devices=("cuda", "cpu") if self.interpret else ("cuda",))

    def _launch_pack(self, x3, v_vec):
        """x3 float32 [L, C, HW] contiguous, v_vec None (sign) or float32 [NV] -> int64 [NV, L, HW, Kw]."""
        L, C, HW = x3.shape
        words = _bitmath.words_for(C)
        hv = v_vec is not None
        if not hv:
            v_vec = torch.zeros(1, dtype=torch.float32, device=x3.device)
        nv = v_vec.numel()
        out = torch.empty((nv, L, HW, words), dtype=torch.int64, device=x3.device)
        P = L * HW
        if P == 0 or words == 0:
            return out
        block_p = 64 if self.interpret else 32
        grid = (cdiv(P, block_p), words, nv)
        self._k.pack_signs_kernel[grid](
            x3, v_vec, out, P, C, HW, words,
            MODE=self._k.MODE_HV if hv else self._k.MODE_SIGN, BLOCK_P=block_p,
        )
        return out

    def run_pack(self, x, mode, v):
        L, C, H, W = x.shape
        v_vec = torch.tensor([v], dtype=torch.float32, device=x.device) if mode == "hv" else None
        packed = self._launch_pack(x.reshape(L, C, H * W).contiguous(), v_vec)[0]
        return packed.reshape(L, H, W, packed.shape[-1])

    def run_conv(self, a: ConvArgs):
        B, C, H, W = a.x.shape
        M, N, Co = a.num_weight_bases, a.num_act_bases, a.out_channels
        (KH, KW), (SH, SW), (PH, PW), (OH, OW) = a.kernel_size, a.stride, a.padding, a.out_size
        dev = a.x.device
        xp = self._launch_pack(a.x.reshape(B, C, H * W).contiguous(), a.v)
        dummy_f = torch.zeros(1, dtype=torch.float32, device=dev)  # stands in for unused pointers
        if a.want_out:
            alpha, beta = a.alpha2d, a.beta
            out = torch.empty((B, Co, OH, OW), dtype=torch.float32, device=dev)
        else:
            alpha = beta = out = dummy_f
        pairs = (torch.empty((M, N, B, Co, OH, OW), dtype=torch.int32, device=dev)
                 if a.want_pairs else torch.zeros(1, dtype=torch.int32, device=dev))
        P = B * OH * OW
        if P > 0 and Co > 0:
            args = (xp, a.w_packed, alpha, beta, out, pairs, B, H, W, C, a.words, Co, OH, OW, M, N, KH, KW,
                    SH, SW, PH, PW)
            flags = dict(WANT_OUT=a.want_out, WANT_PAIRS=a.want_pairs)
            if self.interpret:
                bp, bc, bk = 64, 16, 4
                grid = (cdiv(P, bp), cdiv(Co, bc))
                self._k.mbn_conv_kernel[grid](*args, **flags, BLOCK_P=bp, BLOCK_CO=bc, BLOCK_K=bk)
            else:
                def grid(meta):
                    return (cdiv(P, meta["BLOCK_P"]), cdiv(Co, meta["BLOCK_CO"]))
                with torch.cuda.device(dev):
                    self._k.mbn_conv_kernel_tuned[grid](*args, **flags)
        return (out if a.want_out else None), (pairs if a.want_pairs else None)


registry.register("triton", TritonBackend, priority={"cuda": 10})
