"""bitkern: packed XNOR-popcount kernels for multi-bit networks and their adversarial robustness.

    import bitkern
    model = bitkern.models.create("resnet20", "mbn3x1")    # trains through the packed op (STE backward)
    frozen = bitkern.freeze(model.eval())                  # pre-packed weight bases for fast evaluation
    bitkern.eval.robustness(frozen, (x, y), {"PGD-20": bitkern.attacks.PGD(frozen, 2/255, 0.5/255, 20)})
"""
import importlib

from . import dispatch, ops  # noqa: F401
from .dispatch import backend_report, backends_status, set_backend  # noqa: F401
# Imported eagerly so that the name bitkern.freeze is the function, not its module.
from .freeze import freeze, load_frozen  # noqa: F401

__version__ = "0.1.0"

# Heavier subpackages load on first use (bitkern.attacks, bitkern.eval, ...).
_LAZY_SUBMODULES = ("attacks", "bitserial", "bops", "checkpoint", "data", "eval", "models", "nn", "quant",
                    "study", "train")


def __getattr__(name):
    if name in _LAZY_SUBMODULES:
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module 'bitkern' has no attribute {name!r}")
