"""pytest-benchmark: every deqgen solver next to the matching torchdeq solver on P1-P4
(the protocol in docs/benchmarks.md).

Skipped in the default run. Run the timings with::

    python -m pytest tests/benchmarks --benchmark-only

and the markdown table of time ratios with ``python benchmarks/solver_table.py``. With ``--benchmark-disable``
each case runs once as a smoke test (CI does this). ``extra_info`` holds nfe (rows evaluated / B), calls,
success (fraction of rows at or below tol, re-measured in float64) and the worst residual.
"""

from __future__ import annotations

import functools

import pytest
import torch

from tests.benchmarks.harness import LIBRARIES, SOLVER_NAMES, relative_residual, solve_once
from tests.problems import BankProblem, benchmark_problem

pytest.importorskip("torchdeq")


@functools.cache
def _problem(name: str) -> BankProblem:
    return benchmark_problem(name, torch.float32)


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("library", LIBRARIES)
@pytest.mark.parametrize("solver", SOLVER_NAMES)
@pytest.mark.parametrize("tol", [1e-4, 1e-6])
@pytest.mark.parametrize("problem", ["P1", "P2", "P3", "P4"])
def test_solver(benchmark, problem: str, tol: float, solver: str, library: str) -> None:
    bp = _problem(problem)
    benchmark.group = f"{problem} tol={tol:g} {solver}"
    rounds = 1 if problem == "P4" else 5

    def once():
        with torch.no_grad():
            return solve_once(library, solver, bp, tol)

    z, counted, _ = benchmark.pedantic(once, rounds=rounds, warmup_rounds=1 if rounds > 1 else 0)
    res = relative_residual(bp, z)
    benchmark.extra_info.update(
        nfe=counted.rows / bp.z0.shape[0],
        calls=counted.calls,
        success=float((res <= tol).double().mean()),
        max_residual=float(res.max()),
    )
    assert torch.isfinite(z).all()
    if library == "deqgen":  # deqgen promises every row at or below tol on these contractions
        assert float(res.max()) <= tol * 1.05, (
            f"{problem} {solver}: max residual {float(res.max()):.3g} > tol"
        )
