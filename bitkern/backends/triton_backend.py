"""Triton backend: packed sign packing and multi-base XNOR-popcount convolution.

Usable on CUDA tensors when a CUDA device exists, and on CPU tensors when TRITON_INTERPRET=1 is set
before triton is imported (the interpreter; that is how the kernels are tested without a GPU).
The module-level object `backend` implements the backend interface of docs/architecture.md.
"""
import math
import os

import torch

from bitkern.backends.cuda import check_conv_args, check_pack_args


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
        from bitkern.backends import triton_kernels
    except Exception as exc:  # pragma: no cover - a triton version without the features used
        return False, f"triton kernels failed to load ({type(exc).__name__}: {exc})", None
    where = "interpreter (TRITON_INTERPRET=1, CPU tensors)" if _interpreting() else "CUDA device"
    return True, f"available: {where}", triton_kernels


class TritonBackend:
    name = "triton"

    def __init__(self):
        self.available, self.reason, self._k = _probe()
        # Interpreter mode is fixed when triton.jit decorates the kernels (at import).
        self.interpret = self.available and _interpreting()

    def supports(self, device) -> bool:
        """CUDA tensors; CPU tensors too in the interpreter (bitkern.dispatch asks this)."""
        device_type = torch.device(device).type
        return device_type == "cuda" or (self.interpret and device_type == "cpu")

    # -- helpers ---------------------------------------------------------------------------------
    def _require(self):
        if not self.available:
            raise RuntimeError(f"bitkern triton backend is not available: {self.reason}")

    def _check_device(self, name, t):
        if t.device.type == "cuda":
            return
        if self.interpret and t.device.type == "cpu":
            return
        raise ValueError(f"{name}: the triton backend needs CUDA tensors (or CPU tensors with "
                         f"TRITON_INTERPRET=1), got a tensor on {t.device}")

    def _launch_pack(self, x3, mode, v_vec):
        """x3 float [L, C, HW] contiguous, v_vec float32 [NV] -> int64 [NV, L, HW, Kw]."""
        L, C, HW = x3.shape
        kw_words = max(1, math.ceil(C / 64))
        nv = v_vec.numel()
        out = torch.empty((nv, L, HW, kw_words), dtype=torch.int64, device=x3.device)
        P = L * HW
        if P == 0:
            return out
        block_p = 64 if self.interpret else 32
        grid = (triton_cdiv(P, block_p), kw_words, nv)
        self._k.pack_signs_kernel[grid](
            x3, v_vec, out, P, C, HW, kw_words,
            MODE=self._k.MODE_HV if mode == "hv" else self._k.MODE_SIGN, BLOCK_P=block_p,
        )
        return out

    # -- interface -------------------------------------------------------------------------------
    def pack_signs(self, x, mode="sign", v=0.0):
        """x float [B, C, H, W] or [Co, C, KH, KW] (or [M, Co, C, KH, KW]) -> int64 [..., H, W, Kw]."""
        check_pack_args(x, mode)
        self._require()
        self._check_device("x", x)
        lead = x.shape[:-3]
        C, H, W = x.shape[-3:]
        x3 = x.reshape(-1, C, H * W).contiguous()
        v_vec = torch.tensor([float(v)], dtype=torch.float32, device=x.device)
        packed = self._launch_pack(x3, mode, v_vec)[0]
        return packed.reshape(*lead, H, W, packed.shape[-1])

    def mbn_conv2d_packed(self, x, w_packed, in_channels, kernel_size, alpha2d, v, beta, stride,
                          padding, want_pairs=False):
        a = check_conv_args(x, w_packed, in_channels, kernel_size, alpha2d, v, beta, stride, padding,
                            want_pairs)
        self._require()
        tensors = [("x", x), ("w_packed", w_packed)] + ([("v", v)] if v is not None else [])
        tensors += [("alpha2d", alpha2d)] if a.want_out else []
        for name, t in tensors:
            self._check_device(name, t)
            if t.device != x.device:
                raise ValueError(f"{name} is on {t.device} but x is on {x.device}")
        dev = x.device
        x3 = x.reshape(a.B, a.C, a.H * a.W).contiguous()
        if v is None:
            xp = self._launch_pack(x3, "sign", torch.zeros(1, dtype=torch.float32, device=dev))
        else:
            xp = self._launch_pack(x3, "hv", v.to(torch.float32).contiguous())
        w = w_packed.contiguous()
        dummy_f = torch.zeros(1, dtype=torch.float32, device=dev)  # stands in for unused pointers
        if a.want_out:
            alpha = alpha2d.to(torch.float32).contiguous()
            beta_f = a.beta
            out = torch.empty((a.B, a.Co, a.OH, a.OW), dtype=torch.float32, device=dev)
        else:
            alpha = beta_f = out = dummy_f
        pairs = (torch.empty((a.M, a.N, a.B, a.Co, a.OH, a.OW), dtype=torch.int32, device=dev)
                 if want_pairs else torch.zeros(1, dtype=torch.int32, device=dev))
        P = a.B * a.OH * a.OW
        if P > 0 and a.Co > 0:
            args = (xp, w, alpha, beta_f, out, pairs, a.B, a.H, a.W, a.C, a.kw_words, a.Co, a.OH,
                    a.OW, a.M, a.N, a.KH, a.KW, a.SH, a.SW, a.PH, a.PW)
            flags = dict(WANT_OUT=a.want_out, WANT_PAIRS=want_pairs)
            if self.interpret:
                bp, bc, bk = 64, 16, 4
                grid = (triton_cdiv(P, bp), triton_cdiv(a.Co, bc))
                self._k.mbn_conv_kernel[grid](*args, **flags, BLOCK_P=bp, BLOCK_CO=bc, BLOCK_K=bk)
            else:
                def grid(meta):
                    return (triton_cdiv(P, meta["BLOCK_P"]), triton_cdiv(a.Co, meta["BLOCK_CO"]))
                with torch.cuda.device(dev):
                    self._k.mbn_conv_kernel_tuned[grid](*args, **flags)
        return (out if a.want_out else None), (pairs if want_pairs else None)


def triton_cdiv(a, b):
    return -(-a // b)


backend = TritonBackend()
