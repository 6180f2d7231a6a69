"""The backend registry: every backend registers itself here (name, how to build it, its preference per
device type); bitkern.dispatch picks from it. A new backend is one module that calls `register` plus one
import line in bitkern/backends/__init__.py (or a `register` call in user code or a test)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from .base import Backend


@dataclass(frozen=True)
class Entry:
    name: str
    build: Callable[[], Backend]   # called once, on first use; may be slow (extension / triton import)
    priority: dict                 # {device type or "*": rank}: higher is preferred when nothing is forced


class Unavailable(Backend):
    """Stands in for a backend whose build failed, with the reason."""

    def __init__(self, name: str, reason: str):
        self.name, self.reason = name, reason


_entries: dict[str, Entry] = {}
_built: dict[str, Backend] = {}
_preference: dict[str, tuple[str, ...]] = {}  # per device type; every op asks, so cached


def register(name: str, build: Callable[[], Backend], *, priority: dict) -> None:
    """Add (or replace) a backend. `build()` returns the Backend; it runs on first use only."""
    if not name.isidentifier():
        raise ValueError(f"name: expected an identifier, got {name!r}")
    _entries[name] = Entry(name, build, dict(priority))
    _built.pop(name, None)
    _preference.clear()


def unregister(name: str) -> None:
    """Remove a backend (tests that register a toy one clean up with this)."""
    _entries.pop(name, None)
    _built.pop(name, None)
    _preference.clear()


def names() -> tuple[str, ...]:
    return tuple(_entries)


def get(name: str) -> Backend:
    """The backend called `name` (an Unavailable with the reason when building it failed)."""
    if name not in _entries:
        raise ValueError(f"BITKERN_BACKEND / set_backend: unknown backend {name!r}; "
                         f"expected one of {sorted(_entries)}")
    if name not in _built:
        try:
            _built[name] = _entries[name].build()
        except Exception as exc:  # a broken backend must say why, never vanish
            _built[name] = Unavailable(name, f"import failed: {type(exc).__name__}: {exc}")
    return _built[name]


def preference(device_type: str) -> tuple[str, ...]:
    """Registered backends that rank `device_type`, best first."""
    cached = _preference.get(device_type)
    if cached is not None:
        return cached
    ranked = [(e.priority.get(device_type, e.priority.get("*")), i, e.name)
              for i, e in enumerate(_entries.values())]
    ranked = [r for r in ranked if r[0] is not None]
    order = _preference[device_type] = tuple(name for _, _, name in sorted(ranked, key=lambda r: (-r[0], r[1])))
    return order
