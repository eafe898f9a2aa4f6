"""The solver demo (recipes/solver_demo.py) runs and every sample converges."""

from __future__ import annotations

import runpy
from pathlib import Path

import pytest

# recipes/ holds runnable examples, not a package: load the script by path, as a user runs it.
main = runpy.run_path(str(Path(__file__).resolve().parents[1] / "recipes" / "solver_demo.py"))["main"]


def test_solver_demo_prints_a_converged_table(capsys: pytest.CaptureFixture[str]) -> None:
    main(["--tol", "1e-5"])
    rows = [
        line for line in capsys.readouterr().out.splitlines() if line.startswith("| ") and "converged" in line
    ]
    assert len(rows) == 9  # 3 problems x 3 solvers
    assert all("32 converged" in r and "max_iter" not in r and "non_finite" not in r for r in rows)
