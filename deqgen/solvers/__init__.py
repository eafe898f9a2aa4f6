"""Batched fixed-point solvers. Each is a frozen object with ``init``/``step``; :func:`run` is the one loop.

``get(name, **options)`` builds a solver from a config string, with loud errors for unknown names and options.
"""

from __future__ import annotations

import dataclasses
from types import MappingProxyType
from typing import Any

from deqgen.solvers.anderson import Anderson, AndersonState
from deqgen.solvers.base import Solver, run, take_rows
from deqgen.solvers.broyden import Broyden, BroydenState
from deqgen.solvers.picard import Picard

__all__ = [
    "Solver",
    "Picard",
    "Anderson",
    "Broyden",
    "AndersonState",
    "BroydenState",
    "SOLVERS",
    "get",
    "options",
    "run",
    "take_rows",
]

SOLVERS: MappingProxyType[str, type[Solver[Any]]] = MappingProxyType(
    {"picard": Picard, "anderson": Anderson, "broyden": Broyden}
)
"""Read-only name -> solver class table used by configs."""


def options(name: str) -> tuple[str, ...]:
    """The option names a solver accepts, e.g. ``options("anderson")``."""
    return tuple(f.name for f in dataclasses.fields(_lookup(name)))


def _lookup(name: str) -> type[Solver[Any]]:
    if not isinstance(name, str):
        raise TypeError(f"solver name must be a string, got {type(name).__name__}")
    key = name.strip().lower()
    if key not in SOLVERS:
        raise ValueError(f"unknown solver {name!r}; choose one of {sorted(SOLVERS)}")
    return SOLVERS[key]


def get(name: str, **opts: Any) -> Solver[Any]:
    """Build a solver by name: ``get("anderson", m=5, tol=1e-6)``.

    Raises:
        ValueError: unknown solver name, or a bad option value (the message names the option).
        TypeError: an option the solver does not have (the message lists the valid ones).
    """
    cls = _lookup(name)
    valid = options(name)
    unknown = sorted(set(opts) - set(valid))
    if unknown:
        raise TypeError(f"solver {name!r} has no option(s) {unknown}; valid options: {list(valid)}")
    return cls(**opts)
