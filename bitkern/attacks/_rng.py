"""Per-example, counter-based randomness for the attacks (batch-composition independent).

``ExampleRNG(seeds, restart)`` gives every example its own stream: the value drawn for example ``i`` depends
only on ``(seeds[i], restart, stream, draw counter, element index)``, hashed with the splitmix64 finaliser
(Steele et al. 2014) on int64 tensors. So splitting the same examples into other batches or permuting them
gives bit-identical per-example draws (integer arithmetic, then an exact int->float step, so the draws
are meant to be device-independent too; only checked on CPU).

``GeneratorRNG`` has the same interface over one batch-level ``torch.Generator`` (the attacks' historical
behaviour when no ``example_seeds`` are given): its draws depend on the batch.

All draw methods take a per-example ``shape`` (without the batch dimension) and return ``[B, *shape]``.
"""
from __future__ import annotations

import math

import torch

_MASK64 = (1 << 64) - 1


def _signed(c: int) -> int:
    c &= _MASK64
    return c - (1 << 64) if c >= (1 << 63) else c


_GOLDEN = _signed(0x9E3779B97F4A7C15)
_M1 = _signed(0xBF58476D1CE4E5B9)
_M2 = _signed(0x94D049BB133111EB)
_K_RESTART = _signed(0xD1B54A32D192ED03)
_K_STREAM = _signed(0x8CB92BA72F3D8DD7)
_K_DRAW = _signed(0xAEF17502108EF2D9)


def _srl(z: torch.Tensor, k: int) -> torch.Tensor:
    """Logical right shift of int64 (torch's ``>>`` on int64 is arithmetic: mask the sign copies)."""
    return (z >> k) & ((1 << (64 - k)) - 1)


def mix64(z: torch.Tensor) -> torch.Tensor:
    """splitmix64 finaliser on an int64 tensor (multiplications wrap modulo 2**64)."""
    z = (z ^ _srl(z, 30)) * _M1
    z = (z ^ _srl(z, 27)) * _M2
    return z ^ _srl(z, 31)


def _offset(k: int, mult: int) -> int:
    return _signed((k + 1) * mult)


def derive_seeds(base: torch.Tensor, key: int) -> torch.Tensor:
    """Non-negative int64 seeds hashed from int64 ``base`` values and an integer ``key``."""
    return mix64(base * _GOLDEN + _signed(key * _K_STREAM)) & ((1 << 63) - 1)


def restart_seeds(seeds: torch.Tensor, restart: int) -> torch.Tensor:
    """Per-example seeds of one restart, for attacks that run their inner attack once per restart."""
    return derive_seeds(seeds, _offset(restart, _K_RESTART))


def check_example_seeds(example_seeds, batch: int):
    """Validate ``example_seeds`` (integer tensor [B] of seeds >= 0) and return it as int64, or None."""
    if example_seeds is None:
        return None
    if not isinstance(example_seeds, torch.Tensor):
        raise TypeError(f"example_seeds must be an int64 tensor of shape [{batch}], "
                        f"got {type(example_seeds).__name__}")
    if example_seeds.is_floating_point() or example_seeds.is_complex() or example_seeds.dtype == torch.bool:
        raise TypeError(f"example_seeds must be an integer tensor, got dtype {example_seeds.dtype}")
    if example_seeds.shape != (batch,):
        raise ValueError(f"example_seeds must have shape [{batch}] (one seed per example), "
                         f"got {tuple(example_seeds.shape)}")
    seeds = example_seeds.detach().long()
    if batch and int(seeds.min()) < 0:
        raise ValueError(f"example_seeds must be >= 0, got min {int(seeds.min())}")
    return seeds


def _numel(shape) -> int:
    return int(math.prod(shape))


class ExampleRNG:
    """Counter-based per-example generator; see the module docstring.

    seeds:   int64 [B] per-example seeds (>= 0).
    restart: restart index r (another independent stream per restart).
    stream:  extra stream key (e.g. the target class of APGD-T).
    Every draw uses the next value of the draw counter (shared by the whole batch), unless an explicit
    ``counter=`` is given; ``subset(index)`` views the same streams for some examples (same counter).
    """

    def __init__(self, seeds: torch.Tensor, restart: int = 0, stream: int = 0, *, _keys=None, _counter=None):
        self.seeds = seeds
        self.restart = int(restart)
        self.stream = int(stream)
        if _keys is None:
            k = mix64(seeds.long() + _GOLDEN)
            k = mix64(k + _offset(self.restart, _K_RESTART))
            k = mix64(k + _offset(self.stream, _K_STREAM))
            _keys = k
        self.keys = _keys
        self._counter = [0] if _counter is None else _counter

    # ------------------------------------------------------------- structure
    @property
    def batch(self) -> int:
        return int(self.keys.shape[0])

    @property
    def device(self):
        return self.keys.device

    @property
    def counter(self) -> int:
        return self._counter[0]

    def subset(self, index: torch.Tensor) -> "ExampleRNG":
        """The same per-example streams for ``index`` examples (shares the draw counter)."""
        index = index.to(self.keys.device)
        return ExampleRNG(self.seeds[index], self.restart, self.stream, _keys=self.keys[index],
                          _counter=self._counter)

    def fork(self, stream: int) -> "ExampleRNG":
        """Independent streams keyed by ``stream`` (counter restarts at 0)."""
        k = mix64(self.keys + _offset(int(stream), _K_STREAM))
        return ExampleRNG(self.seeds, self.restart, stream, _keys=k)

    # ------------------------------------------------------------- raw bits
    def bits(self, shape, counter: int | None = None) -> torch.Tensor:
        """int64 [B, *shape] of 64 random bits per element."""
        shape = tuple(int(s) for s in shape)
        if counter is None:
            counter = self._counter[0]
            self._counter[0] += 1
        draw = mix64(self.keys + _offset(int(counter), _K_DRAW))
        n = _numel(shape)
        j = (torch.arange(1, n + 1, dtype=torch.int64, device=self.keys.device) * _GOLDEN)
        v = mix64(draw[:, None] + j[None, :])
        return v.reshape(self.batch, *shape)

    # ------------------------------------------------------------- draws
    def uniform(self, shape, dtype=torch.float32, counter: int | None = None) -> torch.Tensor:
        """U[0, 1) with 24 (float32 and smaller) or 53 (float64) random bits."""
        v = self.bits(shape, counter)
        if dtype == torch.float64:
            return _srl(v, 11).to(torch.float64) * (2.0 ** -53)
        u = _srl(v, 40).to(torch.float32) * (2.0 ** -24)
        return u if dtype == torch.float32 else u.to(dtype)

    def normal(self, shape, dtype=torch.float32, counter: int | None = None) -> torch.Tensor:
        """N(0, 1) by Box-Muller from two 53-bit uniforms (computed in float64)."""
        v1 = self.bits(shape, counter)
        v2 = self.bits(shape, None if counter is None else counter + (1 << 40))
        u1 = (_srl(v1, 11).to(torch.float64) + 1.0) * (2.0 ** -53)       # (0, 1]
        u2 = _srl(v2, 11).to(torch.float64) * (2.0 ** -53)                # [0, 1)
        return (torch.sqrt(-2.0 * torch.log(u1)) * torch.cos(2.0 * math.pi * u2)).to(dtype)

    def randint(self, low, high, shape=(), counter: int | None = None) -> torch.Tensor:
        """long [B, *shape] = low + floor(U * (high - low)); ``high`` an int or a per-example tensor [B].

        Same rule as the reference ``random_int`` (auto-attack / Square): high is exclusive, and
        ``high == low`` gives ``low``.
        """
        u = self.uniform(shape, torch.float64, counter)
        return _scale_int(u, low, high, self.batch, len(tuple(shape)), self.keys.device)

    def choice_sign(self, shape, dtype=torch.float32, counter: int | None = None) -> torch.Tensor:
        """Independent fair signs in {-1, +1}."""
        v = self.bits(shape, counter)
        return (_srl(v, 63) * 2 - 1).to(dtype)


class GeneratorRNG:
    """The ExampleRNG interface over one batch-level CPU ``torch.Generator`` (batch-dependent draws)."""

    def __init__(self, generator: torch.Generator, batch: int, device):
        self.generator = generator
        self._batch = int(batch)
        self.device = torch.device(device)

    @property
    def batch(self) -> int:
        return self._batch

    def subset(self, index: torch.Tensor) -> "GeneratorRNG":
        return GeneratorRNG(self.generator, int(index.numel()), self.device)

    def fork(self, stream: int) -> "GeneratorRNG":
        return self

    def uniform(self, shape, dtype=torch.float32, counter=None) -> torch.Tensor:
        return torch.rand((self._batch, *shape), generator=self.generator, dtype=dtype).to(self.device)

    def normal(self, shape, dtype=torch.float32, counter=None) -> torch.Tensor:
        return torch.randn((self._batch, *shape), generator=self.generator, dtype=dtype).to(self.device)

    def randint(self, low, high, shape=(), counter=None) -> torch.Tensor:
        u = torch.rand((self._batch, *shape), generator=self.generator, dtype=torch.float64).to(self.device)
        return _scale_int(u, low, high, self._batch, len(tuple(shape)), self.device)

    def choice_sign(self, shape, dtype=torch.float32, counter=None) -> torch.Tensor:
        t = 2 * torch.rand((self._batch, *shape), generator=self.generator) - 1
        return torch.where(t >= 0, 1.0, -1.0).to(dtype).to(self.device)


def _scale_int(u, low, high, batch, extra_dims, device):
    if isinstance(high, torch.Tensor):
        high = high.to(device=device, dtype=torch.float64).reshape(batch, *([1] * extra_dims))
    if isinstance(low, torch.Tensor):
        low = low.to(device=device, dtype=torch.float64).reshape(batch, *([1] * extra_dims))
    return (low + (high - low) * u).floor().long()
