"""C++ CPU backend: the bitkern._C extension (packed XNOR-popcount kernels, AVX-512 / AVX2 / scalar).

The extension works on raw pointers: this module receives arguments validated by the contract
(bitkern.backends.base), allocates the outputs with torch and passes `data_ptr()`s. Importing it never
fails: when bitkern._C cannot be loaded, `backend.available` is False and `backend.reason` says why.

ISA: env BITKERN_ISA=avx512|avx2|scalar (read at every call) or set_isa(name); default the best one.
Threads: env BITKERN_NUM_THREADS (1..256, read at every call), else torch.get_num_threads().
Outputs of 256 KiB and more come from the engine's retaining pool (see `output_pool_limit`).
Environment values are parsed by bitkern._env (env_isa, env_num_threads, env_output_pool_mb);
a bad one never makes this module fail to import (that would silently switch ops to the torch backend).
"""
from __future__ import annotations

import math

import torch

from .. import _bitmath, _checks, _env
from . import registry
from .base import Backend, Capabilities, ChainConv, ConvArgs, check_packed_shape

try:
    from .. import _C
    _IMPORT_ERROR = ""
except Exception as exc:  # missing build, wrong ABI, ...: report, never raise at import
    _C = None
    _IMPORT_ERROR = f"bitkern._C could not be imported ({type(exc).__name__}: {exc}); " \
                    "build it with `pip install -e . --no-build-isolation`"

ISAS = _env.ISAS
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
    env = _env.env_isa()
    if env:
        return _validate_isa(env, "BITKERN_ISA")
    return backend.isa_supported()[0]


def num_threads() -> int:
    """Threads the next call will use: BITKERN_NUM_THREADS (1..256), else torch.get_num_threads()."""
    env = _env.env_num_threads()
    if env is not None:
        return env
    return max(1, min(torch.get_num_threads(), _env.MAX_NUM_THREADS))


# Output pool: large outputs are blocks the engine keeps mapped between calls (handed over by DLPack),
# so writing them takes no page faults. Small ones come from torch (nothing to gain).
_POOL_MIN_BYTES = 1 << 18
_DLPACK_DTYPES = {torch.int32: (0, 32), torch.int64: (0, 64), torch.float32: (2, 32)}  # DLPack (code, bits)


_CHANNELS_LAST = (0, 2, 3, 1)  # NCHW dims in memory order


def _empty(shape: tuple, dtype: torch.dtype, memory_order: tuple | None = None) -> torch.Tensor:
    """An uninitialized CPU tensor of `shape` whose dims lie in memory in `memory_order` (outermost
    first; default: contiguous); from the output pool when large. Never a view, so an op's output can
    be written in place by its caller (autograd forbids that for a view made inside a custom Function)."""
    numel = math.prod(shape)
    strides, step = [0] * len(shape), 1
    for dim in reversed(memory_order or range(len(shape))):
        strides[dim], step = step, step * shape[dim]
    code, bits = _DLPACK_DTYPES[dtype]
    if numel * bits // 8 < _POOL_MIN_BYTES or _C.pool_limit() == 0:
        return torch.empty_strided(shape, strides, dtype=dtype)
    block = torch.from_dlpack(_C.pooled_empty(numel, code, bits))
    return torch.empty((0,), dtype=dtype).set_(block.untyped_storage(), 0, shape, strides)


def output_pool_limit(megabytes: float | None = None) -> float:
    """The output pool's cap on cached free memory, in MiB; with an argument, set it first.

    Large outputs of this backend come from blocks that stay mapped after their tensors die and are
    reused for the next output of the same size (a fresh allocation of that size is a fresh mmap whose
    every page faults on first write: about as long as the binary conv itself on CIFAR shapes). 0
    disables the pool and frees what it holds. Default 512, or env BITKERN_OUTPUT_POOL_MB at import."""
    backend.require("cpu")
    if megabytes is not None:
        if not megabytes >= 0:
            raise ValueError(f"megabytes: expected a number >= 0, got {megabytes!r}")
        _C.pool_set_limit(int(megabytes * (1 << 20)))
    return _C.pool_limit() / (1 << 20)


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


class CppBackend(Backend):
    name = "cpp"
    capabilities = Capabilities(
        devices=("cpu",),
        # bias / residual / clamp are applied inside the kernel's epilogue
        fused_epilogue=True, fused_residual=True,
        # NaN in x is detected while packing it (no separate pass); a NaN / +-inf residual by the fused
        # epilogue as it reads it: bitkern.ops skips its own scans of x and of a float32 residual.
        checks_nan=True, checks_residual=True,
        fast_nan_scan=True,
        # run_ste_input_grad / run_clamp_grad: the STE backward's elementwise passes in one fused pass each
        ste_backward=True,
        # build_chain: csrc/cpu/common/chain.h (convs prepared once, bit planes handed between them)
        bitplane_output=True)

    def __init__(self):
        self.available = _C is not None
        self.reason = _IMPORT_ERROR
        self._isas = tuple(_C.isa_supported()) if _C is not None else ()  # the CPU does not change

    def isa_supported(self) -> list[str]:
        """ISA paths usable here, best first (subset of ["avx512", "avx2", "scalar"])."""
        self.require("cpu")
        return list(self._isas)

    def engine(self, in_channels: int, kernel_size, stride) -> str:
        """The kernel family a conv runs on with the current ISA: "lane16" / "lane32" (AVX-512, up to
        16 / 32 input channels) or "word" (64-channel words); docs/cpu_kernels.md explains the choice."""
        self.require("cpu")
        kh, kw = _checks.pair("kernel_size", kernel_size, minimum=1)
        _, sw = _checks.pair("stride", stride, minimum=1)
        return _C.conv_engine(current_isa(), int(in_channels), kh, kw, sw)

    def has_nan(self, t: torch.Tensor) -> bool:
        """NaN scan in one vectorized pass (torch's isnan().any() costs ~10x more on large inputs)."""
        self.require("cpu")
        dense = t.is_contiguous() or (t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last))
        if t.dtype != torch.float32 or t.device.type != "cpu" or not dense:
            return bool(torch.isnan(t).any())
        return bool(_C.has_nan(t.data_ptr(), t.numel(), current_isa(), num_threads()))

    def run_pack(self, x: torch.Tensor, mode: str, v: float) -> torch.Tensor:
        given = x
        x, channels_last = _activation_layout(x)
        batch, channels, height, width = x.shape
        out = _empty((batch, height, width, _bitmath.words_for(channels)), torch.int64)
        if out.numel() and _C.pack_signs(x.data_ptr(), batch, channels, height, width, channels_last,
                                         _MODES[mode], float(v), out.data_ptr(), current_isa(),
                                         num_threads()):
            _raise_nan(given)
        return out

    def run_conv(self, a: ConvArgs):
        """out float32 [B, Co, OH, OW] in channels_last memory format (or None); pairs int32
        [M, N, B, Co, OH, OW] laid out [M, N, B, OH, OW, Co] (or None). The residual is read
        channels_last (copied only if it is not channels_last-contiguous)."""
        batch, channels, height, width = a.x.shape
        (kh, kw), (sh, sw), (ph, pw), (oh, ow) = a.kernel_size, a.stride, a.padding, a.out_size
        num_w, out_ch, num_a = a.num_weight_bases, a.out_channels, a.num_act_bases
        out = pairs = None
        if a.want_out:
            out = _empty((batch, out_ch, oh, ow), torch.float32, _CHANNELS_LAST)
        if a.want_pairs:
            pairs = _empty((num_w, num_a, batch, out_ch, oh, ow), torch.int32, (0, 1, 2, 4, 5, 3))
        if batch * out_ch * oh * ow == 0:  # nothing to compute; x is still checked for NaN
            if a.x.numel() and self.has_nan(a.x):
                _raise_nan(a.x)
            return out, pairs
        x, channels_last = _activation_layout(a.x)
        residual = None
        if a.residual is not None:
            residual = a.residual.contiguous(memory_format=torch.channels_last)
        lo, hi = a.clamp if a.clamp is not None else (float("-inf"), float("inf"))
        flags = _C.mbn_conv2d(
            x.data_ptr(), batch, channels, height, width, channels_last, a.w_packed.data_ptr(),
            num_w, out_ch, kh, kw, 0 if a.v is None else 1, 0 if a.v is None else a.v.data_ptr(), num_a,
            sh, sw, ph, pw,
            _ptr(a.alpha2d), _ptr(a.beta), _ptr(a.bias), _ptr(residual), lo, hi,
            _ptr(out), _ptr(pairs), current_isa(), num_threads())
        if flags & 1:
            _raise_nan(a.x)
        if flags & 2:
            _raise_residual(a.residual)
        return out, pairs

    def build_chain(self, buffers, convs):
        self.require("cpu")
        return CppChain(buffers, convs)

    def chain_key(self):
        return current_isa()

    def run_ste_input_grad(self, x, g, v, beta):
        g = _dense(g)
        x = _like(x, g)
        dst = _empty_like(g)
        beta = beta.contiguous()
        if dst.numel():
            _C.ste_grad_x(x.data_ptr(), g.data_ptr(), _ptr(None if v is None else v.contiguous()),
                          beta.data_ptr(), 1 if v is None else v.numel(), dst.data_ptr(), dst.numel(),
                          current_isa(), num_threads())
        return dst

    def run_clamp_grad(self, grad, out, lo, hi):
        out = _dense(out)
        grad = _like(grad, out)
        dst = _empty_like(out)
        if dst.numel():
            _C.clamp_grad(grad.data_ptr(), out.data_ptr(), float(lo), float(hi), dst.data_ptr(), dst.numel(),
                          current_isa(), num_threads())
        return dst

    def run_window_bits(self, src, shift, lo, hi, open_):
        src = _dense(src)
        n, masks = src.numel(), 1 if shift is None else shift.numel()
        words = (n + 63) // 64
        dst = torch.zeros((masks, words), dtype=torch.int64)
        if n:
            _C.interval_bits(src.data_ptr(), _ptr(None if shift is None else shift.contiguous()), masks,
                             float(lo), float(hi), bool(open_), dst.data_ptr(), words, n, current_isa(),
                             num_threads())
        return dst

    def run_masked_grad(self, bits, g, scale, out=None):
        g = _dense(g)
        dst = _empty_like(g) if out is None else out
        if dst.stride() != g.stride() or dst.shape != g.shape:
            raise ValueError("out: expected g's shape and strides")
        bits = bits.contiguous()
        if g.numel():
            _C.masked_grad(bits.data_ptr(), bits.shape[1], bits.shape[0], g.data_ptr(),
                           _ptr(None if scale is None else scale.contiguous()), dst.data_ptr(), g.numel(),
                           current_isa(), num_threads())
        return dst


class CppChain:
    """A bitkern._C.Chain for one input shape and ISA (Backend.build_chain): weights and tables are
    copied in once; run(x) is one C++ call."""

    def __init__(self, buffers: list[tuple[int, int, int]], convs: list[ChainConv]):
        self.isa = current_isa()
        self.buffers = [tuple(int(d) for d in b) for b in buffers]
        self._chain = _C.Chain(self.isa, [[h, w, c] for c, h, w in self.buffers])
        for conv in convs:
            w = conv.w_packed.contiguous()  # kept alive while add_conv copies it
            _checks.check_tensor("w_packed", w, ndim=5, dtype=torch.int64)
            check_packed_shape(w, conv.in_channels, conv.kernel_size)
            if w.device.type != "cpu":
                raise ValueError(f"w_packed: expected a cpu tensor, got {_checks.describe(w)}")
            lo, hi = conv.clamp if conv.clamp is not None else (float("-inf"), float("inf"))
            self._chain.add_conv(
                conv.src, conv.dst, -1 if conv.residual is None else conv.residual, conv.res_stride,
                conv.res_offset, w.data_ptr(), conv.in_channels, w.shape[0], w.shape[1], *conv.kernel_size,
                *conv.stride, *conv.padding, 0 if conv.v is None else 1,
                [] if conv.v is None else conv.v.tolist(), conv.alpha2d.flatten().tolist(), conv.beta.tolist(),
                [] if conv.bias is None else conv.bias.tolist(), lo, hi)

    def engines(self) -> list[str]:
        return list(self._chain.engines())

    def run(self, x: torch.Tensor) -> torch.Tensor | None:
        """x float32 [B, C, H, W] of buffer 0's shape (NCHW or channels_last, else copied) -> the last
        buffer, float32 channels_last; None when the kernels flagged a NaN / non-finite value."""
        x, channels_last = _activation_layout(x)
        c, h, w = self.buffers[-1]
        out = _empty((x.shape[0], c, h, w), torch.float32, _CHANNELS_LAST)
        if x.shape[0] and self._chain.run(x.data_ptr(), channels_last, out.data_ptr(), x.shape[0],
                                          num_threads()):
            return None
        return out


def _empty_like(ref: torch.Tensor) -> torch.Tensor:
    """An uninitialized float32 tensor with the dense `ref`'s strides, from the output pool when large
    (no page faults on the first write, as for the conv outputs)."""
    if ref.dim() == 4 and not ref.is_contiguous() and ref.is_contiguous(memory_format=torch.channels_last):
        out = _empty(tuple(ref.shape), torch.float32, _CHANNELS_LAST)
    else:
        out = _empty(tuple(ref.shape), torch.float32)
    return out if out.stride() == ref.stride() else torch.empty_like(ref)


def _dense(t: torch.Tensor) -> torch.Tensor:
    """t when NCHW- or channels_last-contiguous, else an NCHW-contiguous copy."""
    if t.is_contiguous() or t.is_contiguous(memory_format=torch.channels_last):
        return t
    return t.contiguous()


def _like(t: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """t laid out element for element like the dense `ref` (same strides): t itself or a copy."""
    if t.stride() == ref.stride() and (t.is_contiguous() or t.is_contiguous(memory_format=torch.channels_last)):
        return t
    return torch.empty_like(ref).copy_(t)


def _ptr(t) -> int:
    return 0 if t is None else t.data_ptr()


backend = CppBackend()
registry.register("cpp", lambda: backend, priority={"cpu": 20})


def _pool_limit_from_env() -> None:
    """Apply BITKERN_OUTPUT_POOL_MB (ValueError for a bad value)."""
    megabytes = _env.env_output_pool_mb()
    if megabytes is not None and _C is not None:
        output_pool_limit(megabytes)


try:
    _pool_limit_from_env()
except ValueError:
    pass  # never fail the import: every op (bitkern.dispatch.backend_for) raises this error instead
