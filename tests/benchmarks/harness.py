"""Shared by the pytest-benchmark tests and ``benchmarks/solver_table.py``: deqgen vs torchdeq on P1-P4.

Protocol (docs/benchmarks.md): float32, ``torch.set_num_threads(1)``, ``torch.no_grad()``, z0 = 0, relative
stopping, max_iter 100 (P3: 200); torchdeq's solvers with their library defaults (Anderson m=6, lam=1e-4;
Broyden without line search, memory = max_iter). deqgen's solvers run with their defaults and, since every
bank problem is batch-separable, ``separable=True`` (converged rows are not evaluated again). The residual
is re-measured here on the returned z, per row, in float64: ``||f(z) - z|| / ||f(z)||``.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from deqgen import FixedPointProblem, run, solvers
from tests.problems import BankProblem

LIBRARIES = ("deqgen", "torchdeq")
SOLVER_NAMES = ("picard", "anderson", "broyden")


@dataclass(frozen=True)
class Outcome:
    """One solve: wall seconds, effective NFE (rows evaluated / B), iterations, convergence, worst residual."""

    seconds: float
    rows_per_b: float
    calls: int
    conv: float
    max_res: float


class Counted:
    """Wraps ``f`` to count calls and rows evaluated (torchdeq reports neither)."""

    def __init__(self, f: Callable[..., Tensor]) -> None:
        self.f, self.calls, self.rows = f, 0, 0

    def __call__(self, z: Tensor, rows: Tensor | None = None) -> Tensor:
        self.calls += 1
        self.rows += z.shape[0]
        return self.f(z, rows=rows)


def solve_once(library: str, name: str, bp: BankProblem, tol: float) -> tuple[Tensor, Counted, float]:
    """Run one solver on ``bp``; returns (z, the call counter, wall seconds)."""
    counted = Counted(bp.f)
    if library == "deqgen":
        solver = solvers.get(name, tol=tol, stop_mode="rel", max_iter=bp.max_iter)
        problem = FixedPointProblem(counted, bp.z0, separable=True)
        t0 = time.perf_counter()
        z = run(problem, solver).z
        return z, counted, time.perf_counter() - t0
    if library == "torchdeq":
        from torchdeq.solver import anderson_solver, broyden_solver, fixed_point_iter

        fn = {"picard": fixed_point_iter, "anderson": anderson_solver, "broyden": broyden_solver}[name]
        t0 = time.perf_counter()
        z, _, _ = fn(counted, bp.z0, max_iter=bp.max_iter, tol=tol, stop_mode="rel")
        return z, counted, time.perf_counter() - t0
    raise ValueError(f"unknown library {library!r}; choose one of {LIBRARIES}")


def relative_residual(bp: BankProblem, z: Tensor) -> Tensor:
    """``(B,)`` float64 ``||f(z) - z|| / ||f(z)||`` per row."""
    fz = bp.full(z).double().flatten(1)
    zz = z.double().flatten(1)
    return (fz - zz).norm(dim=1) / fz.norm(dim=1)


def measure(library: str, name: str, bp: BankProblem, tol: float) -> Outcome:
    with torch.no_grad():
        z, counted, seconds = solve_once(library, name, bp, tol)
        res = relative_residual(bp, z)
    B = bp.z0.shape[0]
    return Outcome(
        seconds=seconds,
        rows_per_b=counted.rows / B,
        calls=counted.calls,
        conv=float((res <= tol).double().mean()),
        max_res=float(res.max()),
    )


def time_f(bp: BankProblem, repeats: int = 5) -> float:
    """Median seconds of one full-batch call of ``f``."""
    times = []
    with torch.no_grad():
        for _ in range(repeats):
            t0 = time.perf_counter()
            bp.full(bp.z0)
            times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]
