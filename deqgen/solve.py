"""``fixed_point``: the one-call entry point that joins a problem and a solver."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import Tensor

from deqgen.problem import FixedPointProblem
from deqgen.solvers.base import Solver, run
from deqgen.solvers.picard import Picard
from deqgen.stats import Solution

__all__ = ["fixed_point"]


def fixed_point(
    f: Callable[..., Tensor],
    z0: Tensor,
    solver: Solver[Any] | None = None,
    *,
    x: Any = None,
    indexed: bool = False,
    separable: bool = False,
    trace: bool = False,
    throw: bool = False,
) -> Solution:
    """Solve ``z* = f(z*)`` for a batch ``z0: (B, *S)`` of independent samples.

    Args:
        f: the map; see :class:`~deqgen.problem.FixedPointProblem` for how it is called.
        z0: start point ``(B, *S)``.
        solver: a :class:`~deqgen.solvers.Solver`; defaults to ``Picard()``.
        x: optional injection passed to ``f``.
        indexed: call ``f`` with the iteration number ``k``.
        separable: ``f`` accepts a subset of rows (``rows=`` keyword), so converged rows are skipped.
        trace: record the residual traces ``(K, B)``.
        throw: raise :class:`~deqgen.stats.SolverError` if a sample does not converge.

    Returns:
        :class:`~deqgen.stats.Solution` with ``z: (B, *S)`` and per-sample :class:`~deqgen.stats.SolverStats`.

    Example:
        >>> import torch
        >>> from deqgen import Anderson, fixed_point
        >>> A = 0.5 * torch.eye(3, dtype=torch.float64)
        >>> sol = fixed_point(lambda z: z @ A.T + 1.0, torch.zeros(4, 3, dtype=torch.float64), Anderson(tol=1e-12))
        >>> sol.z[0].tolist(), sol.stats.status.tolist()
        ([2.0, 2.0, 2.0], [0, 0, 0, 0])
    """
    problem = FixedPointProblem(f, z0, x=x, indexed=indexed, separable=separable)
    return run(problem, solver if solver is not None else Picard(), trace=trace, throw=throw)
