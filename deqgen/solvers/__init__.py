"""Batched fixed-point solvers. Each is a frozen object with ``init``/``step``; :func:`run` is the one loop.

``get(name, **options)`` builds a solver from a config string, with loud errors for unknown names and options.
"""

from __future__ import annotations

from typing import Any

from deqgen._registry import Registry
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

_REGISTRY: Registry[Solver[Any]] = Registry("solver", (Picard, Anderson, Broyden))
SOLVERS = _REGISTRY.table
"""Read-only name -> solver class table used by configs."""


def options(name: str) -> tuple[str, ...]:
    """The option names a solver accepts, e.g. ``options("anderson")``."""
    return _REGISTRY.options(name)


def get(name: str, **opts: Any) -> Solver[Any]:
    """Build a solver by name: ``get("anderson", m=5, tol=1e-6)``.

    Raises:
        ValueError: unknown solver name, or a bad option value (the message names the option).
        TypeError: an option the solver does not have (the message lists the valid ones).
    """
    return _REGISTRY.check_options(name, opts)(**opts)
