"""The backend contract: what a backend declares, what it receives, and the one argument check.

A backend is a `Backend` subclass that implements two kernels on arguments that are already valid:

  run_pack(x, mode, v)  x float32 [L, C, H, W] on a supported device -> int64 [L, H, W, ceil(C/64)]
                        (bit = x >= 0 in mode "sign", fl32(x + v) >= 0.5 in mode "hv"; bitkern._bitmath)
  run_conv(args)        args: a ConvArgs -> (out float32 [B, Co, OH, OW] or None, pairs int32
                        [M, N, B, Co, OH, OW] or None)

and declares its `Capabilities`. `out` is the contract's float epilogue, rounded to float32 at every step
in this order (docs/architecture.md): out = sum over n (outer), m (inner) of fl32(alpha[m, co] * beta[n])
* dot_mn, then + bias, then + residual, then clamp(lo, hi). Backends without `fused_epilogue` /
`fused_residual` receive no bias / clamp / residual (bitkern.ops applies them afterwards in that order).

bitkern.ops validates its arguments once and calls run_pack / run_conv directly. Direct callers (tests,
benchmarks) use the validating entry points `pack_signs` / `mbn_conv2d_packed` this class provides, so a
backend never checks arguments itself and every backend raises the same errors.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from .. import _bitmath, _checks

PACK_MODES = ("sign", "hv")


@dataclass(frozen=True)
class Capabilities:
    """What a backend can do beyond the two kernels; bitkern.ops reads these instead of probing."""
    devices: tuple[str, ...]        # device types it can run on, "*" for all (`available`: whether it can now)
    fused_epilogue: bool = False    # run_conv applies bias and clamp inside the kernel
    fused_residual: bool = False    # run_conv adds the residual inside the kernel (needs fused_epilogue)
    checks_nan: bool = False        # run_pack / run_conv raise ValueError for NaN in x while packing it
    checks_residual: bool = False   # run_conv raises ValueError for a non-finite residual (its epilogue)
    fast_nan_scan: bool = False     # has_nan(t) is faster than torch.isnan(t).any()
    bitplane_output: bool = False   # build_chain: packed convs run as one chain, bit planes between them
    ste_backward: bool = False      # backward kernels for the STE (issue 16)


@dataclass(frozen=True)
class ConvArgs:
    """Validated arguments of one multi-base binary conv (see `check_conv_args` for the rules)."""
    x: torch.Tensor                  # float32 [B, C, H, W], NCHW- or channels_last-contiguous or not
    w_packed: torch.Tensor           # int64 [M, Co, KH, KW, Kw], contiguous
    v: torch.Tensor | None           # float32 [N] contiguous (activation shifts, mode "hv") or None (sign)
    alpha2d: torch.Tensor | None     # float32 [M, Co] contiguous, or None: pairs only
    beta: torch.Tensor | None        # float32 [N] contiguous when alpha2d is given, else None
    bias: torch.Tensor | None        # float32 [Co] contiguous or None
    residual: torch.Tensor | None    # float32 [B, Co, OH, OW] or None
    clamp: tuple[float, float] | None
    want_pairs: bool
    kernel_size: tuple[int, int]
    stride: tuple[int, int]
    padding: tuple[int, int]
    out_size: tuple[int, int]

    @property
    def want_out(self) -> bool:
        return self.alpha2d is not None

    @property
    def num_weight_bases(self) -> int:  # M
        return self.w_packed.shape[0]

    @property
    def num_act_bases(self) -> int:  # N
        return 1 if self.v is None else self.v.numel()

    @property
    def out_channels(self) -> int:  # Co
        return self.w_packed.shape[1]

    @property
    def words(self) -> int:  # Kw: int64 words per packed pixel
        return self.w_packed.shape[4]


@dataclass(frozen=True)
class ChainConv:
    """One conv of a chain (Backend.build_chain): float buffers are numbered, 0 the chain's input and the
    last its output (each [B, C, H, W] for one input shape). The conv reads buffer `src` (binarized as in
    mbn_conv2d_packed), adds buffer `residual` read as buf[:, co - res_offset, ::res_stride, ::res_stride]
    (zero outside its channels; None: no residual) and writes buffer `dst` through its epilogue."""
    src: int
    dst: int
    residual: int | None
    res_stride: int
    res_offset: int
    w_packed: torch.Tensor          # int64 [M, Co, KH, KW, Kw]
    in_channels: int                # C of w_packed (must be buffer src's)
    kernel_size: tuple[int, int]
    stride: tuple[int, int]
    padding: tuple[int, int]
    alpha2d: torch.Tensor           # float32 [M, Co]
    v: torch.Tensor | None          # float32 [N] or None (sign)
    beta: torch.Tensor              # float32 [N]
    bias: torch.Tensor | None       # float32 [Co] or None
    clamp: tuple[float, float] | None


def _float32(name: str, t, ndim: int, numel: int | None = None, what: str = "",
             contiguous: bool = True) -> torch.Tensor:
    """A floating tensor of `ndim` dims, as float32 (float16 / bfloat16 / float64 converted)."""
    _checks.check_tensor(name, t, ndim=ndim, floating=True)
    if numel is not None and t.numel() != numel:
        raise ValueError(f"{name}: expected {numel} entries{what}, got {_checks.describe(t)}")
    t = t.to(torch.float32)
    return t.contiguous() if contiguous else t


def check_clamp(clamp) -> tuple[float, float] | None:
    """None, or (lo, hi) real numbers with lo < hi (either may be infinite: ReLU is (0, inf))."""
    if clamp is None:
        return None
    if (not isinstance(clamp, (tuple, list)) or len(clamp) != 2
            or not all(isinstance(c, (int, float)) and not isinstance(c, bool) for c in clamp)):
        raise TypeError(f"clamp: expected None or a (lo, hi) pair of floats, got {clamp!r}")
    lo, hi = float(clamp[0]), float(clamp[1])
    if not lo < hi:  # also rejects NaN
        raise ValueError(f"clamp: expected lo < hi, got {clamp!r}")
    return lo, hi


def check_pack_args(x, mode) -> torch.Tensor:
    """x as float32 that binarizes like x (bitkern._bitmath.binarizable: a float64 sign is decided in
    float64), after checking it is a floating 4-d or 5-d tensor and mode is known."""
    _checks.check_tensor("x", x, floating=True)
    if x.dim() not in (4, 5):
        raise ValueError(f"x: expected a 4-d tensor [B, C, H, W] (or 5-d [M, Co, C, KH, KW]), got "
                         f"{_checks.describe(x)}")
    if mode not in PACK_MODES:
        raise ValueError(f"mode: expected 'sign' or 'hv', got {mode!r}")
    return _bitmath.binarizable(x, mode == "sign")


def check_packed_shape(w_packed: torch.Tensor, in_channels: int, kernel_size: tuple[int, int]) -> None:
    """w_packed (an int64 5-d tensor) is [M >= 1, Co, KH, KW, ceil(in_channels / 64)], as pack_bases
    writes it for these kernel_size and in_channels."""
    words = _bitmath.words_for(in_channels)
    if tuple(w_packed.shape[2:]) != (*kernel_size, words) or w_packed.shape[0] < 1:
        raise ValueError(f"w_packed: expected shape [M, Co, {kernel_size[0]}, {kernel_size[1]}, {words}] "
                         f"for kernel {kernel_size} and {in_channels} input channels, got "
                         f"{_checks.describe(w_packed)}")


def check_conv_args(x, w_packed, in_channels, kernel_size, alpha2d, v, beta, stride, padding,
                    want_pairs=False, bias=None, clamp=None, residual=None) -> ConvArgs:
    """Validate the arguments of Backend.mbn_conv2d_packed (every tensor float32 except the int64
    w_packed, all on x's device; shapes as in ConvArgs) and derive the geometry. Floating tensors of
    other dtypes are converted to float32 (x so that it binarizes like the original: _bitmath.binarizable)."""
    _checks.check_tensor("x", x, ndim=4, floating=True)
    x = _bitmath.binarizable(x, v is None)
    _checks.check_tensor("w_packed", w_packed, ndim=5, dtype=torch.int64)
    kernel_size = _checks.pair("kernel_size", kernel_size, minimum=1)
    stride = _checks.pair("stride", stride, minimum=1)
    padding = _checks.pair("padding", padding, minimum=0)
    batch, channels = x.shape[:2]
    if channels != in_channels:
        raise ValueError(f"x: expected {in_channels} channels (in_channels), got {_checks.describe(x)}")
    check_packed_shape(w_packed, in_channels, kernel_size)
    num_w, out_ch = w_packed.shape[:2]
    out_size = _checks.conv_output_size(x.shape, kernel_size, stride, padding)
    if v is not None:
        v = _float32("v", v, 1)
        if v.numel() < 1:
            raise ValueError("v: expected at least one activation shift, got an empty tensor")
    num_a = 1 if v is None else v.numel()
    if alpha2d is None:
        if not want_pairs:
            raise ValueError("alpha2d: None and want_pairs is False: nothing to compute")
        beta = bias = residual = clamp = None  # they only shape `out`
    else:
        alpha2d = _float32("alpha2d", alpha2d, 2)
        if tuple(alpha2d.shape) != (num_w, out_ch):
            raise ValueError(f"alpha2d: expected shape ({num_w}, {out_ch}) = [M, Co], "
                             f"got {_checks.describe(alpha2d)}")
        beta = (torch.ones(num_a, dtype=torch.float32, device=x.device) if beta is None
                else _float32("beta", beta, 1, num_a, " (one per activation base)"))
        if bias is not None:
            bias = _float32("bias", bias, 1)
            if bias.numel() != out_ch:
                raise ValueError(f"bias: expected shape [{out_ch}] = [Co], got {_checks.describe(bias)}")
        clamp = check_clamp(clamp)
        if residual is not None:
            residual = _float32("residual", residual, 4, contiguous=False)  # any layout
            if tuple(residual.shape) != (batch, out_ch, *out_size):
                raise ValueError(f"residual: expected shape {(batch, out_ch, *out_size)} = [B, Co, OH, OW], "
                                 f"got {_checks.describe(residual)}")
    for name, t in (("w_packed", w_packed), ("v", v), ("alpha2d", alpha2d), ("beta", beta),
                    ("bias", bias), ("residual", residual)):
        if t is not None and t.device != x.device:
            raise ValueError(f"{name}: expected a tensor on {x.device} (like x), got {_checks.describe(t)}")
    return ConvArgs(x, w_packed.contiguous(), v, alpha2d, beta, bias, residual, clamp, bool(want_pairs),
                    kernel_size, stride, padding, out_size)


class Backend:
    """Base class of every backend: declares the contract, provides the validating entry points."""
    name: str = "?"
    capabilities: Capabilities = Capabilities(devices=())
    available: bool = False
    reason: str = ""  # why it is unavailable (or where it runs, when available)

    def supports(self, device) -> bool:
        """Whether this backend runs ops on tensors of `device` (bitkern.dispatch asks this); "*" in
        `capabilities.devices` means every device type."""
        devices = self.capabilities.devices
        return "*" in devices or torch.device(device).type in devices

    def require(self, device) -> None:
        if not self.available:
            raise RuntimeError(f"bitkern {self.name} backend is not available: {self.reason}")
        if not self.supports(device):
            raise ValueError(f"x: the {self.name} backend cannot run on {torch.device(device)} tensors "
                             f"(it runs on {', '.join(self.capabilities.devices)})")

    # -- kernels: arguments already valid --------------------------------------------------------
    def run_pack(self, x: torch.Tensor, mode: str, v: float) -> torch.Tensor:
        raise NotImplementedError

    def run_conv(self, args: ConvArgs) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        raise NotImplementedError

    def has_nan(self, t: torch.Tensor) -> bool:
        return bool(torch.isnan(t).any())

    # -- optional chains of packed convs (Capabilities.bitplane_output; issue 13) --------------------
    def build_chain(self, buffers: list[tuple[int, int, int]], convs: list[ChainConv]):
        """A prepared chain for one input shape: buffers (C, H, W) per float buffer, convs in order.
        Its run(x) -> out (or None when a packed value was NaN or a residual non-finite: the caller then
        runs layer by layer, which raises the usual error) must equal running the convs one by one with
        mbn_conv2d_packed bit for bit."""
        raise NotImplementedError

    def chain_key(self):
        """What else a built chain depends on (e.g. the CPU instruction set): chains are rebuilt when it
        changes."""
        return None

    # -- optional STE backward kernels (Capabilities.ste_backward; issue 16) ----------------------
    # Their float arithmetic is fixed by bitkern.ops.autograd (ste_input_grad_torch, clamp_mask_grad):
    # a backend declaring ste_backward must return bit-identical results (float32, CPU tensors of one
    # shape; bitkern.ops only calls them with the "clipped" STE mode).
    def run_ste_input_grad(self, x: torch.Tensor, g: torch.Tensor, v: torch.Tensor | None,
                           beta: torch.Tensor) -> torch.Tensor:
        """grad_x = sum_n (in order) fl32(g * beta[n]) where 0 <= fl32(x + v[n]) <= 1 (|x| <= 1 when v
        is None), else +0. x, g float32 [B, C, H, W]; v float32 [N] or None; beta float32 [N]."""
        raise NotImplementedError

    def run_clamp_grad(self, grad: torch.Tensor, out: torch.Tensor, lo: float, hi: float) -> torch.Tensor:
        """grad where lo < out < hi (strict), else +0 (the fused clamp's backward); float32, one shape."""
        raise NotImplementedError

    # Window bits (issue 16): the forward saves these instead of x / out when only the input gradient
    # will be needed, and the backward reads them (python_ref.ops_ref.window_bits_ref / masked_grad_ref).
    # "Element i" is the i-th float32 of a dense (NCHW- or channels_last-contiguous) tensor in memory
    # order; the backward hands g over in the layout src had.
    def run_window_bits(self, src: torch.Tensor, shift: torch.Tensor | None, lo: float, hi: float,
                        open_: bool) -> torch.Tensor:
        """int64 [K, ceil(n / 64)]: bit i % 64 of word i / 64 of mask k set where lo <= s <= hi (open_:
        lo < s < hi), s = fl32(src[i] + shift[k]) (shift None: src[i], K = 1); src float32, dense."""
        raise NotImplementedError

    def run_masked_grad(self, bits: torch.Tensor, g: torch.Tensor, scale: torch.Tensor | None,
                        out: torch.Tensor | None = None) -> torch.Tensor:
        """t_0 + t_1 + ... (left to right), t_k = fl32(g * scale[k]) (scale None: g) where bit i of mask
        k is set, else +0 -- run_ste_input_grad's / run_clamp_grad's arithmetic with the windows read
        from bits; g float32, dense, laid out as the bits' src was. Written into `out` (may be g) if given."""
        raise NotImplementedError

    # -- validating entry points for direct callers ----------------------------------------------
    def pack_signs(self, x: torch.Tensor, mode: str = "sign", v: float = 0.0) -> torch.Tensor:
        """float32 [B, C, H, W] (or [M, Co, C, KH, KW]) -> int64 [..., H, W, ceil(C/64)]."""
        x = check_pack_args(x, mode)
        self.require(x.device)
        if x.dim() == 5:
            return self.run_pack(x.flatten(0, 1), mode, float(v)).unflatten(0, x.shape[:2])
        return self.run_pack(x, mode, float(v))

    def mbn_conv2d_packed(self, x, w_packed, in_channels, kernel_size, alpha2d, v, beta, stride, padding,
                          want_pairs=False, bias=None, clamp=None, residual=None):
        """Validate (check_conv_args), then run_conv. Epilogue arguments a backend does not fuse are
        applied here in the contract's order, so every backend answers every call."""
        args = check_conv_args(x, w_packed, in_channels, kernel_size, alpha2d, v, beta, stride, padding,
                               want_pairs, bias, clamp, residual)
        self.require(x.device)
        return run_conv_with_epilogue(self, args)


def run_conv_with_epilogue(backend: Backend, args: ConvArgs):
    """backend.run_conv(args), with the epilogue parts it does not fuse applied afterwards."""
    caps = backend.capabilities
    if not caps.fused_epilogue and (args.bias is not None or args.clamp is not None or args.residual is not None):
        bias, residual, clamp = args.bias, args.residual, args.clamp
        args = replace(args, bias=None, residual=None, clamp=None)
    elif not caps.fused_residual and args.residual is not None:
        bias, residual, clamp = None, args.residual, args.clamp
        args = replace(args, residual=None, clamp=None)  # the residual must come before the clamp
    else:
        return backend.run_conv(args)
    out, pairs = backend.run_conv(args)
    if bias is not None:
        out = out + bias.reshape(1, -1, 1, 1)
    if residual is not None:
        out = out + residual
    if clamp is not None:
        out = out.clamp(*clamp)
    return out, pairs


def empty_output(args: ConvArgs) -> torch.Tensor:
    """The result for an empty batch or spatial size: zeros plus the epilogue (nothing to convolve)."""
    out = torch.zeros((args.x.shape[0], args.out_channels, *args.out_size), dtype=torch.float32,
                      device=args.x.device)
    if args.bias is not None:
        out.add_(args.bias.reshape(1, -1, 1, 1))
    if args.residual is not None:
        out.add_(args.residual)
    if args.clamp is not None:
        out.clamp_(*args.clamp)
    return out

