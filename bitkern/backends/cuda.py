"""CUDA backend: the csrc/cuda kernels through the optional extension bitkern._C_cuda.

The extension is built only with BITKERN_BUILD_CUDA=1 (see docs/gpu_backends.md). It takes raw device
pointers; arguments arrive validated by the contract (bitkern.backends.base). `available` is True only
with the built extension and a CUDA device; `reason` says which one is missing. The kernel computes out
and pairs; bias / residual / clamp are applied by the contract's epilogue in torch (no fused epilogue).
"""
from __future__ import annotations

import torch

from .. import _bitmath
from . import registry
from .base import Backend, Capabilities, ConvArgs


def _load_extension():
    try:
        from .. import _C_cuda
    except ImportError as exc:
        return None, (f"the CUDA extension bitkern._C_cuda is not built ({exc}); build it with "
                      "BITKERN_BUILD_CUDA=1 pip install -e . --no-build-isolation")
    return _C_cuda, ""


class CudaBackend(Backend):
    name = "cuda"
    capabilities = Capabilities(devices=("cuda",))

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

    @staticmethod
    def _stream(device):
        return torch.cuda.current_stream(device).cuda_stream

    def _pack(self, x4, v_vec, pad_h, pad_w):
        """x4 float32 [L, C, H, W] -> int64 [NV, L, H + 2 pad_h, W + 2 pad_w, Kw] (zero border);
        v_vec None: sign mode, else float32 [NV] shifts (mode hv)."""
        L, C, H, W = x4.shape
        nv = 1 if v_vec is None else v_vec.numel()
        x4 = x4.contiguous()
        out = torch.empty((nv, L, H + 2 * pad_h, W + 2 * pad_w, _bitmath.words_for(C)), dtype=torch.int64,
                          device=x4.device)
        self._ext.pack_signs(x4.data_ptr(), out.data_ptr(),
                             self._ext.MODE_SIGN if v_vec is None else self._ext.MODE_HV,
                             0 if v_vec is None else v_vec.data_ptr(), nv, L, C, H, W, pad_h, pad_w,
                             self._stream(x4.device))
        return out

    def run_pack(self, x, mode, v):
        v_vec = torch.tensor([v], dtype=torch.float32, device=x.device) if mode == "hv" else None
        with torch.cuda.device(x.device):
            return self._pack(x, v_vec, 0, 0)[0]

    def run_conv(self, a: ConvArgs):
        B, C, H, W = a.x.shape
        M, N, Co = a.num_weight_bases, a.num_act_bases, a.out_channels
        (KH, KW), (SH, SW), (PH, PW), (OH, OW) = a.kernel_size, a.stride, a.padding, a.out_size
        dev = a.x.device
        with torch.cuda.device(dev):
            xpad = self._pack(a.x, a.v, PH, PW)
            w = a.w_packed
            stream = self._stream(dev)
            table = torch.empty((M, Co, KH, KW), dtype=torch.int32, device=dev)
            self._ext.tap_table(w.data_ptr(), table.data_ptr(), M * Co, KH * KW, a.words, C, stream)
            out = pairs = None
            if a.want_out:
                out = torch.empty((B, Co, OH, OW), dtype=torch.float32, device=dev)
            if a.want_pairs:
                pairs = torch.empty((M, N, B, Co, OH, OW), dtype=torch.int32, device=dev)
            self._ext.mbn_conv(xpad.data_ptr(), w.data_ptr(), table.data_ptr(),
                               0 if out is None else a.alpha2d.data_ptr(),
                               0 if out is None else a.beta.data_ptr(),
                               0 if out is None else out.data_ptr(),
                               0 if pairs is None else pairs.data_ptr(),
                               M, N, B, C, H, W, Co, KH, KW, SH, SW, PH, PW, stream)
        return out, pairs


registry.register("cuda", CudaBackend, priority={"cuda": 20})
