"""CUDA backend: the csrc/cuda kernels through the optional extension bitkern._C_cuda.

The extension is built only with BITKERN_BUILD_CUDA=1 (see docs/gpu_backends.md). It takes raw device
pointers, so every shape, dtype and device is checked here before a launch. `backend.available` is
True only with the built extension and a CUDA device; `backend.reason` says which one is missing.

check_conv_args / check_pack_args are shared with the Triton backend (same contract, same errors).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from bitkern import _checks

MODES = ("sign", "hv")


def _describe(t):
    if not isinstance(t, torch.Tensor):
        return type(t).__name__
    return f"{t.dtype} tensor of shape {tuple(t.shape)} on {t.device}"


def check_pack_args(x, mode):
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise TypeError(f"x must be a floating-point tensor, got {_describe(x)}")
    if x.dim() not in (4, 5):
        raise ValueError(f"x must be 4-D [B, C, H, W] / [Co, C, KH, KW] or 5-D [M, Co, C, KH, KW], "
                         f"got {_describe(x)}")
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")


@dataclass(frozen=True)
class ConvArgs:
    B: int
    C: int
    H: int
    W: int
    M: int
    N: int
    Co: int
    KH: int
    KW: int
    SH: int
    SW: int
    PH: int
    PW: int
    OH: int
    OW: int
    kw_words: int
    want_out: bool
    beta: torch.Tensor | None  # float32 [N] on x's device when want_out, else None


def check_conv_args(x, w_packed, in_channels, kernel_size, alpha2d, v, beta, stride, padding,
                    want_pairs) -> ConvArgs:
    """Validate the mbn_conv2d_packed arguments (docs/architecture.md) and derive the geometry."""
    if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.dim() != 4:
        raise ValueError(f"x must be a float tensor [B, C, H, W], got {_describe(x)}")
    if not isinstance(w_packed, torch.Tensor) or w_packed.dtype != torch.int64 or w_packed.dim() != 5:
        raise ValueError(f"w_packed must be an int64 tensor [M, Co, KH, KW, Kw], got {_describe(w_packed)}")
    B, C, H, W = x.shape
    if C != in_channels:
        raise ValueError(f"x has {C} channels (shape {tuple(x.shape)}) but in_channels={in_channels}")
    KH, KW = _checks.pair("kernel_size", kernel_size, minimum=1)
    SH, SW = _checks.pair("stride", stride, minimum=1)
    PH, PW = _checks.pair("padding", padding, minimum=0)
    kw_words = max(1, math.ceil(C / 64))
    M, Co = w_packed.shape[:2]
    if tuple(w_packed.shape[2:]) != (KH, KW, kw_words) or M < 1:
        raise ValueError(f"w_packed must have shape [M, Co, {KH}, {KW}, {kw_words}] for kernel_size="
                         f"{(KH, KW)} and in_channels={C}, got {_describe(w_packed)}")
    if v is not None and (not isinstance(v, torch.Tensor) or v.dim() != 1 or v.numel() < 1):
        raise ValueError(f"v must be a 1-D tensor [N] or None, got {_describe(v)}")
    N = 1 if v is None else v.numel()
    want_out = alpha2d is not None
    if not (want_out or want_pairs):
        raise ValueError("nothing to compute: alpha2d is None and want_pairs is False")
    if want_out:
        if not isinstance(alpha2d, torch.Tensor) or tuple(alpha2d.shape) != (M, Co):
            raise ValueError(f"alpha2d must be a tensor [M, Co] = [{M}, {Co}], got {_describe(alpha2d)}")
        if beta is None:
            beta = torch.ones(N, dtype=torch.float32, device=x.device)
        if not isinstance(beta, torch.Tensor) or beta.numel() != N:
            raise ValueError(f"beta must be a tensor with N = {N} elements, got {_describe(beta)}")
        beta = beta.to(device=x.device, dtype=torch.float32).reshape(N).contiguous()
    else:
        beta = None
    OH = (H + 2 * PH - KH) // SH + 1
    OW = (W + 2 * PW - KW) // SW + 1
    if H + 2 * PH < KH or W + 2 * PW < KW:
        raise ValueError(f"kernel {KH}x{KW} is larger than the padded input {H + 2 * PH}x{W + 2 * PW}")
    return ConvArgs(B, C, H, W, M, N, Co, KH, KW, SH, SW, PH, PW, OH, OW, kw_words, want_out, beta)


def _load_extension():
    try:
        from bitkern import _C_cuda
    except ImportError as exc:
        return None, (f"the CUDA extension bitkern._C_cuda is not built ({exc}); build it with "
                      "BITKERN_BUILD_CUDA=1 pip install -e . --no-build-isolation")
    return _C_cuda, ""


class CudaBackend:
    name = "cuda"

    def __init__(self):
        self._ext, ext_reason = _load_extension()
        missing = []
        if self._ext is None:
            missing.append(ext_reason)
        if not torch.cuda.is_available():
            missing.append(f"torch reports no CUDA device (torch {torch.__version__}, "
                           f"built with CUDA {torch.version.cuda})")
        elif self._ext is not None:
            count, error = self._ext.device_count()
            if count == 0:
                missing.append(f"the extension's CUDA runtime sees no device ({error or 'count 0'})")
        self.available = not missing
        self.reason = "; ".join(missing) if missing else "available: bitkern._C_cuda on a CUDA device"

    def supports(self, device) -> bool:
        """CUDA tensors only (bitkern.dispatch asks this)."""
        return torch.device(device).type == "cuda"

    def _require(self, tensors):
        if not self.available:
            raise RuntimeError(f"bitkern cuda backend is not available: {self.reason}")
        device = tensors[0][1].device
        for name, t in tensors:
            if t.device.type != "cuda":
                raise ValueError(f"{name}: the cuda backend needs CUDA tensors, got {_describe(t)}")
            if t.device != device:
                raise ValueError(f"{name} is on {t.device} but {tensors[0][0]} is on {device}")

    @staticmethod
    def _stream(device):
        return torch.cuda.current_stream(device).cuda_stream

    def _pack(self, x4, mode, v_vec, pad_h, pad_w):
        """x4 float [L, C, H, W] -> int64 [NV, L, H + 2 pad_h, W + 2 pad_w, Kw] (zero border)."""
        L, C, H, W = x4.shape
        kw_words = max(1, math.ceil(C / 64))
        nv = 1 if v_vec is None else v_vec.numel()
        if mode == "sign" and x4.dtype != torch.float32:
            # the kernel reads float32; decide the sign in the input dtype first (a tiny negative
            # float64 would round to -0.0, i.e. +1)
            x4 = torch.where(x4 >= 0, 1.0, -1.0).to(torch.float32)
        x4 = x4.to(torch.float32).contiguous()  # mode hv: fl32(x) + v, as the reference
        out = torch.empty((nv, L, H + 2 * pad_h, W + 2 * pad_w, kw_words), dtype=torch.int64,
                          device=x4.device)
        self._ext.pack_signs(x4.data_ptr(), out.data_ptr(),
                             self._ext.MODE_HV if mode == "hv" else self._ext.MODE_SIGN,
                             0 if v_vec is None else v_vec.data_ptr(), nv, L, C, H, W, pad_h, pad_w,
                             self._stream(x4.device))
        return out

    def pack_signs(self, x, mode="sign", v=0.0):
        check_pack_args(x, mode)
        self._require([("x", x)])
        lead = x.shape[:-3]
        C, H, W = x.shape[-3:]
        v_vec = (torch.tensor([float(v)], dtype=torch.float32, device=x.device)
                 if mode == "hv" else None)
        with torch.cuda.device(x.device):
            packed = self._pack(x.reshape(-1, C, H, W), mode, v_vec, 0, 0)[0]
        return packed.reshape(*lead, H, W, packed.shape[-1])

    def mbn_conv2d_packed(self, x, w_packed, in_channels, kernel_size, alpha2d, v, beta, stride,
                          padding, want_pairs=False):
        a = check_conv_args(x, w_packed, in_channels, kernel_size, alpha2d, v, beta, stride, padding,
                            want_pairs)
        tensors = [("x", x), ("w_packed", w_packed)]
        if v is not None:
            tensors.append(("v", v))
        if a.want_out:
            tensors.append(("alpha2d", alpha2d))
        self._require(tensors)
        dev = x.device
        with torch.cuda.device(dev):
            v_vec = None if v is None else v.to(torch.float32).contiguous()
            xpad = self._pack(x, "sign" if v is None else "hv", v_vec, a.PH, a.PW)
            w = w_packed.contiguous()
            stream = self._stream(dev)
            table = torch.empty((a.M, a.Co, a.KH, a.KW), dtype=torch.int32, device=dev)
            self._ext.tap_table(w.data_ptr(), table.data_ptr(), a.M * a.Co, a.KH * a.KW, a.kw_words,
                                a.C, stream)
            out = pairs = None
            alpha_ptr = beta_ptr = 0
            if a.want_out:
                alpha = alpha2d.to(torch.float32).contiguous()
                alpha_ptr, beta_ptr = alpha.data_ptr(), a.beta.data_ptr()
                out = torch.empty((a.B, a.Co, a.OH, a.OW), dtype=torch.float32, device=dev)
            if want_pairs:
                pairs = torch.empty((a.M, a.N, a.B, a.Co, a.OH, a.OW), dtype=torch.int32, device=dev)
            self._ext.mbn_conv(xpad.data_ptr(), w.data_ptr(), table.data_ptr(), alpha_ptr, beta_ptr,
                               0 if out is None else out.data_ptr(),
                               0 if pairs is None else pairs.data_ptr(),
                               a.M, a.N, a.B, a.C, a.H, a.W, a.Co, a.KH, a.KW, a.SH, a.SW, a.PH, a.PW,
                               stream)
        return out, pairs


backend = CudaBackend()
