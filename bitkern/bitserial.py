"""Bit-serial fixed-point convolution and a Loom-style bit-serial accelerator model (paper 000 Sec. 3.1/3.3).

Arithmetic: activations are unsigned a_bits integers, weights two's-complement signed w_bits integers
(w_bits = 1 therefore means {-1, 0}). The convolution is computed bit-serially: both operands are split
into 0/1 bit planes; every plane pair contributes 2^(i+j) * popcount(a_i AND w_j) over the receptive field,
with the weight's sign plane (j = w_bits - 1) weighted negatively. popcount(a AND w) of 0/1 planes is derived
exactly from the packed ±1 kernel: with A = 2a - 1, W = 2w - 1 on the valid (non-padded) taps,
sum(A W) = 4 sum(a w) - 2 sum(a) - 2 sum(w) + taps, where sum(A W) = bitkern.ops.binary_conv2d(A, W).

Accelerator model (Loom, Sharify et al. DAC 2018): `pes` processing elements with `lanes` 1-bit lanes each;
a lane performs one serial step (1-bit x 1-bit AND + accumulate in the adder tree; or 1-bit x parallel
operand when only one side is serial) per cycle. A fixed-point MAC needs w_bits * a_bits steps when both
operands are serial ("both", Loom), w_bits steps ("weights") or a_bits ("activations") otherwise. An MBN
M x N layer is M * N independent binary convolutions (1 step per MAC each) that run in parallel on the
lanes: no bit-to-bit data dependency, so its serial chain per product is 1 step (paper Sec. 3.1).
Full-precision layers (first conv, last fc) are modelled at 8 x 8 bits as in the BOPS count. Which case a
layer is, its Precision says (``arithmetic``: "binary" for M x N 1-bit bases, else bit-serial).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import torch
from torch.nn import functional as F

from . import ops
from ._checks import int_in, pair
from .bops import profile
from .nn.precision import Precision

SERIAL_MODES = ("both", "weights", "activations")


# --------------------------------------------------------------------------------------------------
# exact bit-serial convolution

def _check_int_tensor(name: str, t, bits: int, signed: bool) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if t.dim() != 4:
        raise ValueError(f"{name}: expected a 4-d tensor, got shape {tuple(t.shape)}")
    if t.is_floating_point() and not bool((t == t.round()).all()):
        raise ValueError(f"{name}: expected integer values, got non-integers (dtype {t.dtype})")
    lo, hi = (-(1 << (bits - 1)), (1 << (bits - 1)) - 1) if signed else (0, (1 << bits) - 1)
    t = t.to(torch.int64)
    if t.numel() and (int(t.min()) < lo or int(t.max()) > hi):
        raise ValueError(f"{name}: values must lie in [{lo}, {hi}] for {bits}-bit "
                         f"{'signed' if signed else 'unsigned'} integers, got [{int(t.min())}, {int(t.max())}]")
    return t


def _check_bits(name: str, bits) -> int:
    if not int_in(bits, 1, 8):
        raise ValueError(f"{name}: expected an int number of bits in 1..8, got {bits!r}")
    return bits


def bit_planes(t: torch.Tensor, bits: int) -> list[torch.Tensor]:
    """0/1 float planes of the `bits`-bit two's-complement pattern of int64 t, least significant first."""
    pattern = t & ((1 << bits) - 1)
    return [((pattern >> i) & 1).to(torch.float32) for i in range(bits)]


def and_popcount_conv2d(a01: torch.Tensor, w01: torch.Tensor, stride=1, padding=0) -> torch.Tensor:
    """sum over the receptive field of (a AND w) for 0/1 planes, exactly, via the packed ±1 kernel (int64)."""
    pm1 = ops.binary_conv2d(2 * a01 - 1, 2 * w01 - 1, stride, padding).to(torch.int64)
    a64, w64 = a01.to(torch.float64), w01.to(torch.float64)
    ones_w = torch.ones((1,) + tuple(w01.shape[1:]), dtype=torch.float64)
    ones_x = torch.ones((1,) + tuple(a01.shape[1:]), dtype=torch.float64)
    sum_a = F.conv2d(a64, ones_w, stride=stride, padding=padding)           # [B, 1, OH, OW]
    sum_w = F.conv2d(ones_x, w64, stride=stride, padding=padding)           # [1, Co, OH, OW]
    taps = F.conv2d(ones_x, ones_w, stride=stride, padding=padding)         # [1, 1, OH, OW]
    total = pm1 + (2 * sum_a + 2 * sum_w - taps).round().to(torch.int64)
    if bool((total % 4 != 0).any()):
        raise RuntimeError("and_popcount_conv2d: ±1 identity violated (kernel result inconsistent)")
    return total // 4


def integer_conv2d(a: torch.Tensor, w: torch.Tensor, stride=1, padding=0) -> torch.Tensor:
    """Reference integer convolution (float64 is exact for these magnitudes), int64."""
    return F.conv2d(a.to(torch.float64), w.to(torch.float64), stride=stride, padding=padding).round().to(torch.int64)


def bitserial_conv2d(a: torch.Tensor, w: torch.Tensor, a_bits: int, w_bits: int, stride=1, padding=0,
                     check: bool = True) -> torch.Tensor:
    """Fixed-point conv computed bit-serially from AND-popcounts of bit planes (int64 [B, Co, OH, OW]).

    a: unsigned ints [B, C, H, W] in [0, 2^a_bits); w: signed ints [Co, C, KH, KW] in
    [-2^(w_bits-1), 2^(w_bits-1)). check=True compares with the integer convolution and raises on mismatch.
    """
    a_bits, w_bits = _check_bits("a_bits", a_bits), _check_bits("w_bits", w_bits)
    a = _check_int_tensor("a", a, a_bits, signed=False)
    w = _check_int_tensor("w", w, w_bits, signed=True)
    if a.shape[1] != w.shape[1]:
        raise ValueError(f"w: expected {a.shape[1]} input channels (a has shape {tuple(a.shape)}), "
                         f"got shape {tuple(w.shape)}")
    stride, padding = pair("stride", stride, minimum=1), pair("padding", padding, minimum=0)
    a_planes, w_planes = bit_planes(a, a_bits), bit_planes(w, w_bits)
    out = None
    for j, wj in enumerate(w_planes):
        sign = -1 if j == w_bits - 1 else 1  # two's complement: the top plane has weight -2^(w_bits-1)
        for i, ai in enumerate(a_planes):
            term = (sign << (i + j)) * and_popcount_conv2d(ai, wj, stride, padding)
            out = term if out is None else out + term
    if check:
        expected = integer_conv2d(a, w, stride, padding)
        if not torch.equal(out, expected):
            bad = int((out != expected).sum())
            raise RuntimeError(f"bitserial_conv2d: {bad} outputs differ from the integer convolution")
    return out


# --------------------------------------------------------------------------------------------------
# accelerator model

@dataclass
class Accelerator:
    """Loom-style bit-serial accelerator: pes x lanes one-bit lanes at clock_hz."""
    pes: int = 16
    lanes: int = 256
    clock_hz: float = 1.0e9
    serial: str = "both"

    def __post_init__(self):
        for name in ("pes", "lanes"):
            value = getattr(self, name)
            if not int_in(value, 1):
                raise ValueError(f"{name}: expected a positive int, got {value!r}")
        if not self.clock_hz > 0:
            raise ValueError(f"clock_hz: expected a positive frequency, got {self.clock_hz!r}")
        if self.serial not in SERIAL_MODES:
            raise ValueError(f"serial: expected one of {SERIAL_MODES}, got {self.serial!r}")

    def serial_steps(self, precision, w_bits: int | None = None, a_bits: int | None = None) -> int:
        """Dependent serial steps per product (per base pair for binary layers) of a layer of `precision`
        (a bitkern.nn.Precision; the older call serial_steps(kind, w_bits, a_bits) still works)."""
        p = _as_precision(precision, w_bits, a_bits)
        if p.binary:
            return 1
        return {"both": p.w_bits * p.a_bits, "weights": p.w_bits, "activations": p.a_bits}[self.serial]

    def lane_steps(self, precision, macs: int, w_bits: int | None = None, a_bits: int | None = None) -> int:
        """Total lane-steps of a layer: a binary layer runs M*N binary convs of 1 step per MAC."""
        p = _as_precision(precision, w_bits, a_bits)
        if p.binary:
            return macs * p.w_bits * p.a_bits  # w_bits = M, a_bits = N
        return macs * self.serial_steps(p)


def _as_precision(precision, w_bits, a_bits) -> Precision:
    if isinstance(precision, Precision):
        return precision
    # legacy call with a kind string: the built-in binary kinds are the 1-bit-bases ones
    arithmetic = "binary" if precision in ("mbn", "xnor") else "fixed" if precision == "fixed" else "float"
    return Precision(str(precision), int(w_bits), int(a_bits), arithmetic)


@dataclass
class LayerSim:
    name: str
    kind: str
    macs: int
    w_bits: int
    a_bits: int
    bit_ops: int
    serial_steps: int
    cycles: int


@dataclass
class SimReport:
    layers: list = field(default_factory=list)
    accel: Accelerator = field(default_factory=Accelerator)
    quant: str = ""

    @property
    def bit_ops(self) -> int:
        return sum(r.bit_ops for r in self.layers)

    @property
    def cycles(self) -> int:
        return sum(r.cycles for r in self.layers)

    @property
    def seconds(self) -> float:
        return self.cycles / self.accel.clock_hz

    def to_dict(self) -> dict:
        return {"quant": self.quant, "accel": asdict(self.accel), "bit_ops": self.bit_ops,
                "cycles": self.cycles, "seconds": self.seconds, "layers": [asdict(r) for r in self.layers]}

    def table(self) -> str:
        acc = self.accel
        head = (f"{'layer':30s} {'kind':6s} {'w':>2s} {'a':>2s} {'MACs':>12s} {'bit-ops':>14s} "
                f"{'steps':>5s} {'cycles':>11s}")
        lines = [f"accelerator: {acc.pes} PEs x {acc.lanes} lanes @ {acc.clock_hz / 1e6:.0f} MHz, "
                 f"bit-serial over {acc.serial}" + (f"; model {self.quant}" if self.quant else ""), head,
                 "-" * len(head)]
        for r in self.layers:
            lines.append(f"{r.name:30.30s} {r.kind:6s} {r.w_bits:2d} {r.a_bits:2d} {r.macs:12,d} "
                         f"{r.bit_ops:14,d} {r.serial_steps:5d} {r.cycles:11,d}")
        lines.append("-" * len(head))
        lines.append(f"{'total':30s} {'':6s} {'':2s} {'':2s} {sum(r.macs for r in self.layers):12,d} "
                     f"{self.bit_ops:14,d} {'':5s} {self.cycles:11,d}  ({self.seconds * 1e3:.3f} ms)")
        return "\n".join(lines)


def simulate_network(model, input_shape=(3, 32, 32), accel: Accelerator | None = None,
                     convention: str = "exact", verify: bool = False, seed: int = 0) -> SimReport:
    """Bit-ops and cycles per layer on `accel` for one input (layers and MACs as in bitkern.bops).

    verify=True also runs every fixed-point layer's geometry through bitserial_conv2d with random
    integers of its precision (batch 1) and checks exact equality with the integer convolution.
    """
    accel = accel or Accelerator()
    report = profile(model, input_shape, convention)
    rows = []
    lanes = accel.pes * accel.lanes
    for row in report.layers:
        steps = accel.lane_steps(row.precision, row.macs)
        rows.append(LayerSim(row.name, row.kind, row.macs, row.w_bits, row.a_bits, row.bops,
                             accel.serial_steps(row.precision), math.ceil(steps / lanes)))
    if verify:
        _verify_layers(model, report, seed)
    return SimReport(rows, accel, str(getattr(model, "quant", "")))


def _verify_layers(model, report, seed: int) -> None:
    modules = dict(model.named_modules())
    gen = torch.Generator().manual_seed(seed)
    for row in report.layers:
        module = modules[row.name]
        if row.precision.arithmetic != "fixed" or not hasattr(module, "kernel_size"):
            continue
        cin, (kh, kw) = module.in_channels, module.kernel_size
        oh, ow = row.out_shape[-2:]
        (sh, sw), (ph, pw) = module.stride, module.padding
        height, width = (oh - 1) * sh + kh - 2 * ph, (ow - 1) * sw + kw - 2 * pw
        a = torch.randint(0, 1 << row.a_bits, (1, cin, height, width), generator=gen)
        w = torch.randint(-(1 << (row.w_bits - 1)), 1 << (row.w_bits - 1), (module.out_channels, cin, kh, kw),
                          generator=gen)
        bitserial_conv2d(a, w, row.a_bits, row.w_bits, module.stride, module.padding, check=True)


@dataclass
class Comparison:
    reports: dict

    def table(self) -> str:
        names = list(self.reports)
        base = self.reports[names[0]]
        head = f"{'model':14s} {'bit-ops':>16s} {'cycles':>13s} {'time [ms]':>10s} {'vs ' + names[0]:>14s}"
        lines = [head, "-" * len(head)]
        for name in names:
            r = self.reports[name]
            lines.append(f"{name:14s} {r.bit_ops:16,d} {r.cycles:13,d} {r.seconds * 1e3:10.3f} "
                         f"{base.cycles / r.cycles:13.2f}x")
        return "\n".join(lines)


def compare_networks(arch: str = "resnet20", specs=("pact-w2a2", "mbn3x1", "xnor"), input_shape=(3, 32, 32),
                     accel: Accelerator | None = None, num_classes: int = 10, convention: str = "exact"):
    """Simulate the same architecture under several quant specs (e.g. PACT-2 vs MBN3x1 vs XNOR)."""
    from .models import create
    in_channels = int(input_shape[0])
    reports = {}
    for spec in specs:
        model = create(arch, spec, num_classes=num_classes, in_channels=in_channels)
        reports[spec] = simulate_network(model, input_shape, accel, convention)
    return Comparison(reports)


__all__ = ["bitserial_conv2d", "and_popcount_conv2d", "integer_conv2d", "bit_planes", "Accelerator",
           "simulate_network", "compare_networks", "SimReport", "LayerSim", "Comparison", "SERIAL_MODES"]
