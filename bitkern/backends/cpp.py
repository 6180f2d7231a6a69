"""C++ CPU backend: the bitkern._C extension (packed XNOR-popcount kernels, AVX-512 / AVX2 / scalar).

The extension works on raw pointers; this module checks dtype, shape, contiguity and device, allocates
the outputs with torch and passes `data_ptr()`s. Importing it never fails: when bitkern._C cannot be
loaded, `backend.available` is False and `backend.reason` says why.

ISA: env BITKERN_ISA=avx512|avx2|scalar (read at every call) or set_isa(name); default the best one.
Threads: env BITKERN_NUM_THREADS (1..256, read at every call), else torch.get_num_threads().
Outputs of 256 KiB and more come from the engine's retaining pool (see `output_pool_limit`).
Environment values are validated by bitkern.dispatch (env_isa, env_num_threads, env_output_pool_mb);
a bad one never makes this module fail to import (that would silently switch ops to the torch backend).
"""
from __future__ import annotations

import math

import torch

from bitkern import _checks, dispatch

try:
    from bitkern import _C
    _IMPORT_ERROR = ""
except Exception as exc:  # missing build, wrong ABI, ...: report, never raise at import
    _C = None
    _IMPORT_ERROR = f"bitkern._C could not be imported ({type(exc).__name__}: {exc}); " \
                    "build it with `pip install -e . --no-build-isolation`"

ISAS = ("avx512", "avx2", "scalar")
_MODES = {"sign": 0, "hv": 1}
_isa_override: str | None = None


def set_isa(name: str | None) -> None:
    """Force an ISA path for this process (None: back to BITKERN_ISA / best available)."""
    global _isa_override
    if name is not None:
        _validate_isa(name, "set_isa")
    _isa_override = name


def _validate_isa(name: str, source: str) -> str:
    if name not in ISAS:
        raise ValueError(f"{source}: unknown ISA {name!r}; expected one of {list(ISAS)}")
    supported = backend.isa_supported()
    if name not in supported:
        raise RuntimeError(f"{source}: ISA {name!r} is not supported by this CPU/OS "
                           f"(supported: {supported})")
    return name


def current_isa() -> str:
    """The ISA the next call will use."""
    if _isa_override is not None:
        return _isa_override
    env = dispatch.env_isa()
    if env:
        return _validate_isa(env, "BITKERN_ISA")
    return backend.isa_supported()[0]


def num_threads() -> int:
    """Threads the next call will use: BITKERN_NUM_THREADS (1..256), else torch.get_num_threads()."""
    env = dispatch.env_num_threads()
    if env is not None:
        return env
    return max(1, min(torch.get_num_threads(), dispatch.MAX_NUM_THREADS))


# Output pool: large outputs are blocks the engine keeps mapped between calls (handed over by DLPack),
# so writing them takes no page faults. Small ones come from torch (nothing to gain).
_POOL_MIN_BYTES = 1 << 18
_DLPACK_DTYPES = {torch.int32: (0, 32), torch.int64: (0, 64), torch.float32: (2, 32)}  # DLPack (code, bits)


def _empty(shape: tuple, dtype: torch.dtype) -> torch.Tensor:
    """An uninitialized contiguous CPU tensor; from the output pool when large."""
    numel = math.prod(shape)
    code, bits = _DLPACK_DTYPES[dtype]
    if numel * bits // 8 < _POOL_MIN_BYTES or _C.pool_limit() == 0:
        return torch.empty(shape, dtype=dtype)
    return torch.from_dlpack(_C.pooled_empty(numel, code, bits)).view(shape)


def output_pool_limit(megabytes: float | None = None) -> float:
    """The output pool's cap on cached free memory, in MiB; with an argument, set it first.

    Large outputs of this backend come from blocks that stay mapped after their tensors die and are
    reused for the next output of the same size (a fresh allocation of that size is a fresh mmap whose
    every page faults on first write: about as long as the binary conv itself on CIFAR shapes). 0
    disables the pool and frees what it holds. Default 512, or env BITKERN_OUTPUT_POOL_MB at import."""
    backend._require()
    if megabytes is not None:
        if not megabytes >= 0:
            raise ValueError(f"megabytes: expected a number >= 0, got {megabytes!r}")
        _C.pool_set_limit(int(megabytes * (1 << 20)))
    return _C.pool_limit() / (1 << 20)


def _check_cpu_tensor(name: str, t, dtype: torch.dtype, ndim: int) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if t.device.type != "cpu":
        raise ValueError(f"{name}: the cpp backend runs on CPU tensors, got device {t.device}")
    if t.dtype != dtype:
        raise TypeError(f"{name}: expected dtype {dtype}, got {t.dtype} (shape {tuple(t.shape)})")
    if t.dim() != ndim:
        raise ValueError(f"{name}: expected a {ndim}-d tensor, got shape {tuple(t.shape)}")
    return t


def _clamp_bounds(clamp) -> tuple[float, float]:
    """(lo, hi) floats with lo < hi, or (-inf, inf) for clamp=None."""
    if clamp is None:
        return float("-inf"), float("inf")
    if not isinstance(clamp, (tuple, list)) or len(clamp) != 2:
        raise TypeError(f"clamp: expected None or a (lo, hi) pair of floats, got {clamp!r}")
    lo, hi = float(clamp[0]), float(clamp[1])
    if not lo < hi:
        raise ValueError(f"clamp: expected lo < hi, got {clamp!r}")
    return lo, hi


def _raise_nan(x: torch.Tensor) -> None:
    """The kernels report NaN in x while packing it; same text as bitkern._checks.check_no_nan."""
    raise ValueError(f"x: contains NaN ({_checks.describe(x)}); binarization needs ordered values")


def _raise_residual(residual: torch.Tensor) -> None:
    """The kernel's epilogue reports a NaN / +-inf residual; same text as bitkern._checks.check_finite."""
    raise ValueError(f"residual: contains NaN or Inf ({_checks.describe(residual)}); expected finite "
                     "values (in float32)")


def _activation_layout(x: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """x itself when NCHW- or channels_last-contiguous (no copy), else an NCHW-contiguous copy."""
    if x.is_contiguous():
        return x, False
    if x.is_contiguous(memory_format=torch.channels_last):
        return x, True
    return x.contiguous(), False


class CppBackend:
    name = "cpp"
    fused_epilogue = True  # mbn_conv2d_packed applies bias / residual / clamp inside the kernel's epilogue
    # pack_signs / mbn_conv2d_packed raise ValueError for NaN in x, detected while packing x (no separate
    # pass), so bitkern.ops skips its own NaN scan of x (weights are still scanned there).
    checks_nan = True
    # mbn_conv2d_packed raises ValueError for a NaN / +-inf residual, detected by the fused epilogue as it
    # reads the residual (no extra pass), so bitkern.ops skips its own scan of a float32 residual.
    checks_residual = True

    def __init__(self):
        self.available = _C is not None
        self.reason = _IMPORT_ERROR
        self._isas = tuple(_C.isa_supported()) if _C is not None else ()  # the CPU does not change

    def supports(self, device) -> bool:
        return torch.device(device).type == "cpu"

    def isa_supported(self) -> list[str]:
        """ISA paths usable here, best first (subset of ["avx512", "avx2", "scalar"])."""
        self._require()
        return list(self._isas)

    def _require(self):
        if not self.available:
            raise RuntimeError(f"cpp backend unavailable: {self.reason}")

    def engine(self, in_channels: int, kernel_size, stride) -> str:
        """The kernel family a conv runs on with the current ISA: "lane16" / "lane32" (AVX-512, up to
        16 / 32 input channels) or "word" (64-channel words); docs/cpu_kernels.md explains the choice."""
        self._require()
        kh, kw = _checks.pair("kernel_size", kernel_size, minimum=1)
        _, sw = _checks.pair("stride", stride, minimum=1)
        return _C.conv_engine(current_isa(), int(in_channels), kh, kw, sw)

    def has_nan(self, t: torch.Tensor) -> bool:
        """NaN scan in one vectorized pass (torch's isnan().any() costs ~10x more on large inputs)."""
        self._require()
        dense = t.is_contiguous() or (t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last))
        if t.dtype != torch.float32 or t.device.type != "cpu" or not dense:
            return bool(torch.isnan(t).any())
        return bool(_C.has_nan(t.data_ptr(), t.numel(), current_isa(), num_threads()))

    def pack_signs(self, x: torch.Tensor, mode: str = "sign", v: float = 0.0) -> torch.Tensor:
        """float32 [B, C, H, W] -> int64 [B, H, W, ceil(C/64)] (bit = x >= 0, or fl32(x + v) >= 0.5)."""
        self._require()
        _check_cpu_tensor("x", x, torch.float32, 4)
        if mode not in _MODES:
            raise ValueError(f"mode: expected 'sign' or 'hv', got {mode!r}")
        given = x
        x, channels_last = _activation_layout(x)
        batch, channels, height, width = x.shape
        out = _empty((batch, height, width, -(-channels // 64)), torch.int64)
        if out.numel() and _C.pack_signs(x.data_ptr(), batch, channels, height, width, channels_last,
                                         _MODES[mode], float(v), out.data_ptr(), current_isa(),
                                         num_threads()):
            _raise_nan(given)
        return out

    def mbn_conv2d_packed(self, x, w_packed, in_channels, kernel_size, alpha2d, v, beta, stride, padding,
                          want_pairs=False, bias=None, clamp=None, residual=None):
        """Multi-base binary conv on packed weights; see docs/architecture.md (Backends).

        bias (float32 [Co] or None), residual (float32 [B, Co, OH, OW] or None) and clamp ((lo, hi) or
        None) are fused into out's epilogue: out = clamp((sum_{m,n} alpha * beta * conv_mn + bias) +
        residual, lo, hi); pairs are unaffected. residual is read channels_last (copied only if it
        is not channels_last-contiguous).
        Returns (out float32 [B, Co, OH, OW] in channels_last memory format, or None when alpha2d is
        None; pairs int32 [M, N, B, Co, OH, OW] (a permuted view) or None)."""
        self._require()
        _check_cpu_tensor("x", x, torch.float32, 4)
        _check_cpu_tensor("w_packed", w_packed, torch.int64, 5)
        kh, kw = _checks.pair("kernel_size", kernel_size, minimum=1)
        (sh, sw) = _checks.pair("stride", stride, minimum=1)
        (ph, pw) = _checks.pair("padding", padding, minimum=0)
        batch, channels, height, width = x.shape
        if channels != in_channels:
            raise ValueError(f"x: expected {in_channels} channels (in_channels), got shape {tuple(x.shape)}")
        words = -(-in_channels // 64)
        num_w, out_ch = w_packed.shape[:2]
        if tuple(w_packed.shape[2:]) != (kh, kw, words):
            raise ValueError(f"w_packed: expected shape [M, Co, {kh}, {kw}, {words}] for kernel {kh}x{kw} "
                             f"and {in_channels} input channels, got {tuple(w_packed.shape)}")
        if height + 2 * ph < kh or width + 2 * pw < kw:
            raise ValueError(f"kernel {kh}x{kw} is larger than the padded input ({height}+2*{ph})x"
                             f"({width}+2*{pw}) of x with shape {tuple(x.shape)}")
        if v is None:
            mode, num_a = 0, 1  # the kernel reads no v
        else:
            mode = 1
            v = _check_cpu_tensor("v", v, torch.float32, 1).contiguous()
            num_a = v.numel()
            if num_a < 1:
                raise ValueError("v: expected at least one activation shift, got an empty tensor")
        if beta is None:
            beta = torch.ones(num_a, dtype=torch.float32) if alpha2d is not None else None  # out only
        else:
            beta = _check_cpu_tensor("beta", beta, torch.float32, 1).contiguous()
        if beta is not None and beta.numel() != num_a:
            raise ValueError(f"beta: expected {num_a} entries (one per activation base), "
                             f"got shape {tuple(beta.shape)}")
        if alpha2d is not None:
            alpha2d = _check_cpu_tensor("alpha2d", alpha2d, torch.float32, 2).contiguous()
            if tuple(alpha2d.shape) != (num_w, out_ch):
                raise ValueError(f"alpha2d: expected shape ({num_w}, {out_ch}) = [M, Co], "
                                 f"got {tuple(alpha2d.shape)}")
        if bias is not None:
            bias = _check_cpu_tensor("bias", bias, torch.float32, 1).contiguous()
            if bias.numel() != out_ch:
                raise ValueError(f"bias: expected shape [{out_ch}] = [Co], got {tuple(bias.shape)}")
        clamp_lo, clamp_hi = _clamp_bounds(clamp)
        oh, ow = (height + 2 * ph - kh) // sh + 1, (width + 2 * pw - kw) // sw + 1
        if residual is not None:
            residual = _check_cpu_tensor("residual", residual, torch.float32, 4)
            if tuple(residual.shape) != (batch, out_ch, oh, ow):
                raise ValueError(f"residual: expected shape {(batch, out_ch, oh, ow)} = [B, Co, OH, OW], "
                                 f"got {tuple(residual.shape)}")
            given_residual = residual
            residual = residual.contiguous(memory_format=torch.channels_last)
        given = x
        x, channels_last = _activation_layout(x)
        w_packed = w_packed.contiguous()
        out = pairs = None
        if alpha2d is not None:
            out = _empty((batch, oh, ow, out_ch), torch.float32).permute(0, 3, 1, 2)
        if want_pairs:
            pairs = _empty((num_w, num_a, batch, oh, ow, out_ch), torch.int32).permute(
                0, 1, 2, 5, 3, 4)
        if batch * out_ch * oh * ow and (out is not None or pairs is not None):
            flags = _C.mbn_conv2d(
                x.data_ptr(), batch, channels, height, width, channels_last, w_packed.data_ptr(),
                num_w, out_ch, kh, kw, mode, v.data_ptr() if v is not None else 0, num_a, sh, sw, ph, pw,
                alpha2d.data_ptr() if alpha2d is not None else 0, beta.data_ptr() if beta is not None else 0,
                bias.data_ptr() if bias is not None else 0,
                residual.data_ptr() if residual is not None and alpha2d is not None else 0,
                clamp_lo, clamp_hi,
                out.data_ptr() if out is not None else 0,
                pairs.data_ptr() if pairs is not None else 0, current_isa(), num_threads())
            if flags & 1:
                _raise_nan(given)
            if flags & 2:
                _raise_residual(given_residual)
            return out, pairs
        if x.numel() and self.has_nan(x):  # the kernel did not run (nothing to compute), so scan here
            _raise_nan(given)
        if batch * channels * height * width == 0 and out is not None:
            out.zero_()
            if bias is not None:
                out.add_(bias.reshape(1, -1, 1, 1))
            if residual is not None:
                if not bool(torch.isfinite(residual).all()):
                    _raise_residual(given_residual)
                out.add_(residual)
            if clamp is not None:
                out.clamp_(clamp_lo, clamp_hi)
        return out, pairs


backend = CppBackend()


def _pool_limit_from_env() -> None:
    """Apply BITKERN_OUTPUT_POOL_MB (ValueError for a bad value)."""
    megabytes = dispatch.env_output_pool_mb()
    if megabytes is not None and _C is not None:
        output_pool_limit(megabytes)


try:
    _pool_limit_from_env()
except ValueError:
    pass  # never fail the import: every op (bitkern.dispatch.backend_for) raises this error instead
