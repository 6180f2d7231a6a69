"""Triton backend: packed sign packing and multi-base XNOR-popcount convolution.

Usable on CUDA tensors when a CUDA device exists, and on CPU tensors when TRITON_INTERPRET=1 is set
before triton is imported (the interpreter; that is how the kernels are tested without a GPU).
The module-level object `backend` implements the backend interface of docs/architecture.md.
"""
import math
import os

import torch

_MODES = ("sign", "hv")


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


def _pair(value, name):
    if isinstance(value, int):
        pair = (value, value)
    else:
        pair = tuple(value)
    if len(pair) != 2 or not all(isinstance(p, int) for p in pair):
        raise ValueError(f"{name} must be an int or a pair of ints, got {value!r}")
    return pair


class TritonBackend:
    name = "triton"

    def __init__(self):
        self.available, self.reason, self._k = _probe()
        # Interpreter mode is fixed when triton.jit decorates the kernels (at import).
        self.interpret = self.available and _interpreting()

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
        self._require()
        if not isinstance(x, torch.Tensor) or not x.is_floating_point():
            raise TypeError(f"x must be a floating-point tensor, got {type(x).__name__}"
                            f"{'' if not isinstance(x, torch.Tensor) else ' of dtype ' + str(x.dtype)}")
        if x.dim() not in (4, 5):
            raise ValueError(f"x must be 4-D [B, C, H, W] or 5-D [M, Co, C, KH, KW], got shape "
                             f"{tuple(x.shape)}")
        if mode not in _MODES:
            raise ValueError(f"mode must be one of {_MODES}, got {mode!r}")
        self._check_device("x", x)
        lead = x.shape[:-3]
        C, H, W = x.shape[-3:]
        x3 = x.reshape(-1, C, H * W).contiguous()
        v_vec = torch.tensor([float(v)], dtype=torch.float32, device=x.device)
        packed = self._launch_pack(x3, mode, v_vec)[0]
        return packed.reshape(*lead, H, W, packed.shape[-1])

    def mbn_conv2d_packed(self, x, w_packed, in_channels, kernel_size, alpha2d, v, beta, stride,
                          padding, want_pairs=False):
        self._require()
        if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.dim() != 4:
            raise ValueError(f"x must be a float tensor [B, C, H, W], got "
                             f"{getattr(x, 'dtype', type(x).__name__)} {tuple(getattr(x, 'shape', ()))}")
        if not isinstance(w_packed, torch.Tensor) or w_packed.dtype != torch.int64 or w_packed.dim() != 5:
            raise ValueError(f"w_packed must be int64 [M, Co, KH, KW, Kw], got "
                             f"{getattr(w_packed, 'dtype', type(w_packed).__name__)} "
                             f"{tuple(getattr(w_packed, 'shape', ()))}")
        B, C, H, W = x.shape
        if C != in_channels:
            raise ValueError(f"x has {C} channels but in_channels={in_channels}")
        KH, KW = _pair(kernel_size, "kernel_size")
        SH, SW = _pair(stride, "stride")
        PH, PW = _pair(padding, "padding")
        if SH < 1 or SW < 1 or PH < 0 or PW < 0:
            raise ValueError(f"stride must be >= 1 and padding >= 0, got stride={stride}, "
                             f"padding={padding}")
        M, Co, wkh, wkw, kw_words = w_packed.shape
        if (wkh, wkw) != (KH, KW) or kw_words != max(1, math.ceil(C / 64)):
            raise ValueError(f"w_packed shape {tuple(w_packed.shape)} does not match kernel_size="
                             f"{(KH, KW)} and in_channels={C} (expected [M, Co, {KH}, {KW}, "
                             f"{max(1, math.ceil(C / 64))}])")
        if v is not None and v.dim() != 1:
            raise ValueError(f"v must be 1-D [N] or None, got shape {tuple(v.shape)}")
        N = 1 if v is None else v.numel()
        # alpha2d None: only the exact pair counts are wanted (binary_conv2d, alpha/beta gradients)
        want_out = alpha2d is not None
        if not (want_out or want_pairs):
            raise ValueError("nothing to compute: alpha2d is None and want_pairs is False")
        tensors = [("x", x), ("w_packed", w_packed)]
        if want_out:
            if tuple(alpha2d.shape) != (M, Co):
                raise ValueError(f"alpha2d must have shape [M, Co] = [{M}, {Co}], got "
                                 f"{tuple(alpha2d.shape)}")
            if beta is None:
                beta = torch.ones(N, dtype=torch.float32, device=x.device)
            if beta.numel() != N:
                raise ValueError(f"beta must have N = {N} elements, got shape {tuple(beta.shape)}")
            tensors += [("alpha2d", alpha2d), ("beta", beta)]
        for name, t in tensors:
            self._check_device(name, t)
            if t.device != x.device:
                raise ValueError(f"{name} is on {t.device} but x is on {x.device}")
        OH = (H + 2 * PH - KH) // SH + 1
        OW = (W + 2 * PW - KW) // SW + 1
        if OH <= 0 or OW <= 0:
            raise ValueError(f"output would be empty: input {H}x{W}, kernel {KH}x{KW}, "
                             f"stride {(SH, SW)}, padding {(PH, PW)}")
        dev = x.device
        if v is None:
            xp = self._launch_pack(x.reshape(B, C, H * W).contiguous(), "sign",
                                   torch.zeros(1, dtype=torch.float32, device=dev))
        else:
            xp = self._launch_pack(x.reshape(B, C, H * W).contiguous(), "hv",
                                   v.to(device=dev, dtype=torch.float32).contiguous())
        w = w_packed.contiguous()
        dummy_f = torch.zeros(1, dtype=torch.float32, device=dev)  # placeholder for unused pointers
        if want_out:
            alpha = alpha2d.to(torch.float32).contiguous()
            beta_f = beta.to(device=dev, dtype=torch.float32).reshape(N).contiguous()
            out = torch.empty((B, Co, OH, OW), dtype=torch.float32, device=dev)
        else:
            alpha = beta_f = out = dummy_f
        pairs = (torch.empty((M, N, B, Co, OH, OW), dtype=torch.int32, device=dev)
                 if want_pairs else torch.zeros(1, dtype=torch.int32, device=dev))
        P = B * OH * OW
        args = (xp, w, alpha, beta_f, out, pairs, B, H, W, C, kw_words, Co, OH, OW,
                M, N, KH, KW, SH, SW, PH, PW)
        flags = dict(WANT_OUT=want_out, WANT_PAIRS=want_pairs)
        if self.interpret:
            bp, bc, bk = 64, 16, 4
            grid = (triton_cdiv(P, bp), triton_cdiv(Co, bc))
            self._k.mbn_conv_kernel[grid](*args, **flags, BLOCK_P=bp, BLOCK_CO=bc, BLOCK_K=bk)
        else:
            def grid(meta):
                return (triton_cdiv(P, meta["BLOCK_P"]), triton_cdiv(Co, meta["BLOCK_CO"]))
            self._k.mbn_conv_kernel_tuned[grid](*args, **flags)
        return (out if want_out else None), (pairs if want_pairs else None)


def triton_cdiv(a, b):
    return -(-a // b)


backend = TritonBackend()
