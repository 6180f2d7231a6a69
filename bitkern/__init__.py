"""bitkern: packed XNOR-popcount kernels for multi-bit networks and their adversarial robustness."""
from . import dispatch, ops  # noqa: F401
from .dispatch import backends_status, set_backend  # noqa: F401

__version__ = "0.1.0"


def backend_report() -> str:
    """One line per backend: available or not, and why."""
    lines = []
    for name, (ok, reason) in backends_status().items():
        lines.append(f"{name:7s} {'available' if ok else 'unavailable'}{'' if ok else ': ' + reason}")
    return "\n".join(lines)
