"""The README's main job (the solver demo) runs and every sample converges."""

from __future__ import annotations

import pytest

from recipes.solver_demo import main


def test_solver_demo_prints_a_converged_table(capsys: pytest.CaptureFixture[str]) -> None:
    main(["--tol", "1e-5"])
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ") and "converged" in line]
    assert len(rows) == 9  # 3 problems x 3 solvers
    assert all("32 converged" in r and "max_iter" not in r and "non_finite" not in r for r in rows)
