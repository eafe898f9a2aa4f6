"""``benchmarks/loop_floor.py``: its stripped loops really solve what they are timed on.

The floor they measure only means something if they do the same work as deqgen's solvers: every row reaches the
tolerance, at deqgen's iterate, and the stripped Anderson makes the same number of f calls as deqgen's.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch

from deqgen import Anderson, FixedPointProblem, Picard, run
from tests.benchmarks.harness import Counted
from tests.problems import mixed

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "loop_floor.py"


def _load() -> ModuleType:
    spec = importlib.util.spec_from_file_location("loop_floor", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("kind", ["picard", "anderson"])
def test_stripped_loops_solve_like_deqgen(kind: str) -> None:
    floor = _load()
    bp = mixed(B=16, D=64, dtype=torch.float32)
    tol = 1e-5
    stripped, ours = Counted(bp.f), Counted(bp.f)
    with torch.no_grad():
        if kind == "picard":
            z = floor.stripped_picard(stripped, bp.z0, tol, bp.max_iter)
            sol = run(FixedPointProblem(ours, bp.z0, separable=True), Picard(tol=tol, max_iter=bp.max_iter))
        else:
            z = floor.stripped_anderson(stripped, bp.z0, tol, bp.max_iter)
            sol = run(FixedPointProblem(ours, bp.z0, separable=True), Anderson(tol=tol, max_iter=bp.max_iter))
        fz = bp.full(z).double()
        rel = (fz - z.double()).norm(dim=1) / fz.norm(dim=1)
    assert float(rel.max()) <= tol * 1.01  # float32 loop, residual re-measured in float64
    assert sol.stats.all_converged
    assert stripped.calls == ours.calls  # the same iterations: a floor of the same solve, not an easier one
    assert abs(stripped.rows - ours.rows) <= 0.05 * ours.rows
    torch.testing.assert_close(z, sol.z, rtol=0, atol=5 * tol)
