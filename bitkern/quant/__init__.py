"""The quant-scheme registry: every quant kind (fp, pact, xnor, mbn, prune-weight, prune-channel, and any
scheme registered with register_scheme) in one class that parses its spec string, builds its layers,
reports its precision, freezes itself and labels itself in tables. See bitkern/quant/registry.py."""
from .registry import (QuantScheme, QuantSpec, accepted_forms, get_scheme, method_columns, parse_quant,
                       register_scheme, scheme_of, schemes, unregister_scheme)
from .builtin import BUILTIN_SCHEMES, FullPrecision, Mbn, Pact, PruneChannel, PruneWeight, Xnor

ACCEPTED = accepted_forms()  # the built-in schemes' forms (messages use accepted_forms(), which is live)

__all__ = ["QuantSpec", "QuantScheme", "register_scheme", "unregister_scheme", "schemes", "get_scheme",
           "parse_quant", "accepted_forms", "scheme_of", "method_columns", "ACCEPTED", "BUILTIN_SCHEMES",
           "FullPrecision", "Pact", "Xnor", "Mbn", "PruneWeight", "PruneChannel"]
