"""The quant-scheme registry: QuantSpec (a parsed spec string), QuantScheme (what one scheme knows) and
the functions that find schemes by spec string, kind or model.

A scheme is one class (built-ins: bitkern/quant/builtin.py) registered with :func:`register_scheme`.
Everything that depends on the quant kind asks the scheme: bitkern.models (layers, activation, pruning),
bitkern.freeze (packed layers, or a refusal), the study tables (:func:`method_columns`), the recipes
(:meth:`QuantScheme.one_bit`); BOPS and the bit-serial simulator read the layers' own ``precision``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import nn

from ..nn.precision import FP, Precision


@dataclass(frozen=True)
class QuantSpec:
    """Parsed quant spec. kind: the scheme's name (fp | pact | xnor | mbn | prune-weight | prune-channel, or a
    registered scheme's); the other fields are the parameters the built-in schemes use; params holds a
    registered scheme's own (name, value) pairs."""
    kind: str
    w_bits: int = 32
    a_bits: int = 32
    M: int = 1
    N: int = 1
    prune_percent: int = 0
    params: tuple = ()

    def __str__(self) -> str:
        scheme = _SCHEMES.get(self.kind)
        return self.kind if scheme is None else scheme.format(self)

    @property
    def scheme(self) -> "QuantScheme":
        return get_scheme(self.kind)

    @property
    def binary(self) -> bool:
        """Sign activations in the body (XNOR / MBN): Hardtanh between layers."""
        return self.scheme.binary

    @property
    def precision(self) -> Precision:
        """Precision of the body layers (the scheme's answer)."""
        return self.scheme.precision(self)

    def param(self, name: str, default: Any = None) -> Any:
        return dict(self.params).get(name, default)


class QuantScheme:
    """One quantization scheme. Subclass, set ``name`` / ``forms``, implement ``parse`` (and what differs
    from full precision), then ``register_scheme(MyScheme)``.

    name: the QuantSpec.kind it parses to. forms: its accepted spec forms, for error messages.
    binary: sign activations (the models put a Hardtanh, not a ReLU, between layers: the sign of a ReLU
        output would be a constant +1).
    freezable: False makes bitkern.freeze refuse models of this scheme with a clear error.
    """

    name: str = ""
    forms: str = ""
    binary: bool = False
    freezable: bool = True

    # ---- spec strings ------------------------------------------------------------------------------
    def parse(self, text: str) -> QuantSpec | None:
        """The spec for the (stripped, lower-case) `text`, or None when `text` is not one of this scheme's
        forms. Raise ValueError (without the accepted-forms list: the registry appends it) when it is this
        scheme's form with bad values."""
        return QuantSpec(self.name) if text == self.name else None

    def format(self, spec: QuantSpec) -> str:
        """The spec string (inverse of parse)."""
        return self.name

    # ---- building models ---------------------------------------------------------------------------
    def make_conv(self, spec: QuantSpec, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1,
                  padding: int = 0) -> nn.Module:
        """A conv without bias for the body of a network (first conv and last fc stay fp in every model)."""
        return nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding, bias=False)

    def make_activation(self, spec: QuantSpec) -> nn.Module:
        """The body's activation: Hardtanh for binary schemes (matches the STE window [-1, 1]), else ReLU."""
        return nn.Hardtanh(inplace=False) if self.binary else nn.ReLU(inplace=False)

    def finish_model(self, spec: QuantSpec, model: nn.Module) -> nn.Module:
        """Called on the built model (e.g. to apply pruning masks); returns it."""
        return model

    # ---- what it costs -----------------------------------------------------------------------------
    def precision(self, spec: QuantSpec) -> Precision:
        """Precision of the body layers (what their ``precision`` property reports)."""
        return FP

    def sparsity(self, spec: QuantSpec) -> float:
        """Fraction of the body's weights pruned when the model is built."""
        return 0.0

    def one_bit(self, spec: QuantSpec) -> bool:
        """1-bit weights and activations (the recipes' ODG-Q uses its small lambda for these)."""
        return self.precision(spec).one_bit

    # ---- tables ------------------------------------------------------------------------------------
    def method_name(self, spec: QuantSpec) -> str:
        return str(spec)

    def columns(self, spec: QuantSpec) -> dict[str, Any]:
        """Method name and weight / activation bits-or-bases as in Table 2 of paper 000 (fp counts 8 x 8)."""
        p = self.precision(spec)
        return {"method": self.method_name(spec), "weights": p.w_bits, "activations": p.a_bits}

    # ---- freezing ----------------------------------------------------------------------------------
    def freeze_layer(self, module: nn.Module) -> nn.Module | None:
        """The packed inference layer a trained layer becomes, or None to keep it (its pruning mask is
        baked in). Default: the layer's own ``to_packed()`` when it has one."""
        to_packed = getattr(module, "to_packed", None)
        return to_packed() if callable(to_packed) else None

    def __repr__(self) -> str:
        return f"<quant scheme {self.name!r}: {self.forms}>"


_SCHEMES: dict[str, QuantScheme] = {}


def register_scheme(scheme, *, replace: bool = False):
    """Add a scheme (a QuantScheme subclass or instance) to the registry; returns its argument, so it can
    decorate the class. A name already registered raises ValueError unless replace=True."""
    instance = scheme() if isinstance(scheme, type) else scheme
    if not isinstance(instance, QuantScheme):
        raise TypeError(f"scheme: expected a QuantScheme subclass or instance, got {scheme!r}")
    name = instance.name
    if not isinstance(name, str) or not name or name != name.strip().lower():
        raise ValueError(f"scheme name: expected a non-empty lower-case string, got {name!r}")
    if name in _SCHEMES and not replace:
        raise ValueError(f"quant scheme {name!r} is already registered ({_SCHEMES[name]!r}); pass replace=True")
    _SCHEMES[name] = instance
    return scheme


def unregister_scheme(name: str) -> None:
    """Remove a registered scheme (tests)."""
    _SCHEMES.pop(name, None)


def schemes() -> tuple[QuantScheme, ...]:
    """The registered schemes, in registration order (the order specs are matched in)."""
    return tuple(_SCHEMES.values())


def get_scheme(kind) -> QuantScheme:
    """The scheme of a kind name, a QuantSpec or a spec string."""
    if isinstance(kind, QuantSpec):
        kind = kind.kind
    elif isinstance(kind, str) and kind not in _SCHEMES:
        kind = parse_quant(kind).kind
    try:
        return _SCHEMES[kind]
    except (KeyError, TypeError):
        raise ValueError(f"quant: no scheme {kind!r} is registered; registered: {', '.join(_SCHEMES)}") from None


def accepted_forms() -> str:
    """The accepted spec forms of every registered scheme (for messages and help texts)."""
    return ", ".join(s.forms for s in _SCHEMES.values() if s.forms)


def parse_quant(spec) -> QuantSpec:
    """Parse a quant spec string; ValueError listing the accepted forms otherwise."""
    if isinstance(spec, QuantSpec):
        return spec
    if not isinstance(spec, str):
        raise TypeError(f"quant: expected a spec string ({accepted_forms()}), got {type(spec).__name__}")
    text = spec.strip().lower()
    for scheme in _SCHEMES.values():
        try:
            parsed = scheme.parse(text)
        except ValueError as e:
            raise ValueError(f"quant: {e}; accepted: {accepted_forms()}") from None
        if parsed is not None:
            return parsed
    raise ValueError(f"quant: unknown spec {spec!r}; accepted: {accepted_forms()}")


def scheme_of(model: nn.Module) -> tuple[QuantScheme, QuantSpec] | None:
    """(scheme, spec) from ``model.quant`` (every bitkern model has one), or None when it has none or it
    is not a registered spec."""
    quant = getattr(model, "quant", None)
    if not isinstance(quant, (str, QuantSpec)):
        return None
    try:
        spec = parse_quant(quant)
    except (ValueError, TypeError):
        return None
    return spec.scheme, spec


def method_columns(spec) -> dict[str, Any]:
    """Method name and weight / activation bases-or-bits as in Table 2 of paper 000, e.g.
    method_columns("mbn3x1") == {"method": "MBN 3x1", "weights": 3, "activations": 1}."""
    q = parse_quant(spec)
    return q.scheme.columns(q)


__all__ = ["QuantSpec", "QuantScheme", "register_scheme", "unregister_scheme", "schemes", "get_scheme",
           "accepted_forms", "parse_quant", "scheme_of", "method_columns"]
