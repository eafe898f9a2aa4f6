"""``fixed_point``: the one-call entry point that joins a problem and a solver."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from deqgen.problem import FixedPointProblem
from deqgen.solvers.base import Solver, run
from deqgen.solvers.picard import Picard
from deqgen.stats import Solution
from deqgen.tree import State

__all__ = ["fixed_point"]


def fixed_point(
    f: Callable[..., Any],
    z0: State,
    solver: Solver[Any] | None = None,
    *,
    x: Any = None,
    indexed: bool = False,
    separable: bool = False,
    trace: bool = False,
    throw: bool = False,
) -> Solution:
    """Solve ``z* = f(z*)`` for a batch ``z0: (B, *S)`` of independent samples.

    ``z0`` may also be a tuple, list or dict of tensors sharing the batch dim (a multi-resolution state);
    ``f`` then takes and returns that structure, and ``Solution.z`` has it too. Per-sample freezing,
    separable evaluation, NaN isolation and the stats work as for one tensor: the residual of a sample is
    taken over all its leaves together.

    Args:
        f: the map; see :class:`~deqgen.problem.FixedPointProblem` for how it is called.
        z0: start point ``(B, *S)``, or a structured state (see :mod:`deqgen.tree`).
        solver: a :class:`~deqgen.solvers.Solver`; defaults to ``Picard()``.
        x: optional injection passed to ``f``.
        indexed: call ``f`` with the iteration number ``k``.
        separable: ``f`` accepts a subset of rows (``rows=`` keyword), so converged rows are skipped.
        trace: record the residual traces ``(K, B)``.
        throw: raise :class:`~deqgen.stats.SolverError` if a sample does not converge.

    Returns:
        :class:`~deqgen.stats.Solution` with ``z: (B, *S)`` (or the structure of ``z0``) and per-sample
        :class:`~deqgen.stats.SolverStats`.

    Example:
        >>> import torch
        >>> from deqgen import Anderson, fixed_point
        >>> A = 0.5 * torch.eye(3, dtype=torch.float64)
        >>> sol = fixed_point(lambda z: z @ A.T + 1.0, torch.zeros(4, 3, dtype=torch.float64), Anderson(tol=1e-12))
        >>> sol.z[0].tolist(), sol.stats.status.tolist()
        ([2.0, 2.0, 2.0], [0, 0, 0, 0])
    """
    problem = FixedPointProblem(f, z0, x=x, indexed=indexed, separable=separable)  # type: ignore[arg-type]
    return run(problem, solver if solver is not None else Picard(), trace=trace, throw=throw)
