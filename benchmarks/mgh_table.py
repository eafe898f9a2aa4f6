"""Moré-Garbow-Hillstrom nonlinear equations: which solver solves which problem, and in how many f calls.

    python benchmarks/mgh_table.py            # ~30 s on one core

Each square system ``F(x) = 0`` of the set (``tests/mgh.py``: standard dimensions and starting points, Moré,
Garbow & Hillstrom, ACM TOMS 1981) is solved from its standard start, in float64, by deqgen's Anderson and
Broyden (on the fixed-point map ``g(z) = z + F(z)``, ``stop_mode="abs"``, ``norm="inf"``, ``tol=1e-8``,
``max_iter=1000``; Broyden also with ``memory=1000``, the full memory torchdeq's Broyden keeps by default),
torchdeq's ``broyden_solver`` (abs mode, tol 1e-8, max_iter 1000, library defaults), and
scipy.optimize.root with ``hybr`` (MINPACK, ``maxfev=1000``), ``broyden1`` and ``anderson`` (``fatol=1e-8``,
``maxiter=1000``). A cell reads ``calls`` when the returned point has ``max|F| < 1e-8`` within 1,000
evaluations of F, else ``- (max|F|)``; ``calls`` counts every evaluation, line-search ones included.
"""

from __future__ import annotations

import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from deqgen import Anderson, Broyden, fixed_point  # noqa: E402
from tests.mgh import MGH_PROBLEMS, MGHProblem  # noqa: E402

TOL, BUDGET = 1e-8, 1000


class _Counted:
    """Counts evaluations of ``F`` (any array type in, the same type out)."""

    def __init__(self, F: Callable[[Tensor], Tensor]) -> None:
        self.F, self.calls = F, 0

    def torch(self, x: Tensor) -> Tensor:
        self.calls += 1
        return self.F(x)

    def numpy(self, x: np.ndarray) -> np.ndarray:
        self.calls += 1
        return self.F(torch.as_tensor(x, dtype=torch.float64)[None])[0].numpy()


def _deqgen(solver_cls: type, **options: Any) -> Callable[[MGHProblem, _Counted], np.ndarray]:
    def solve(p: MGHProblem, c: _Counted) -> np.ndarray:
        solver = solver_cls(tol=TOL, stop_mode="abs", norm="inf", max_iter=BUDGET, **options)
        return fixed_point(lambda z: z + c.torch(z), p.start(), solver).z[0].numpy()

    return solve


def _torchdeq(p: MGHProblem, c: _Counted) -> np.ndarray:
    from torchdeq.solver import broyden_solver

    z, _, _ = broyden_solver(lambda z: z + c.torch(z), p.start(), max_iter=BUDGET, tol=TOL, stop_mode="abs")
    return z[0].numpy()


def _scipy(method: str) -> Callable[[MGHProblem, _Counted], np.ndarray]:
    from scipy.optimize import root

    def solve(p: MGHProblem, c: _Counted) -> np.ndarray:
        opts = {"maxfev": BUDGET} if method == "hybr" else {"fatol": TOL, "maxiter": BUDGET}
        return root(c.numpy, np.array(p.x0), method=method, options=opts).x

    return solve


SOLVERS: dict[str, Callable[[MGHProblem, _Counted], np.ndarray]] = {
    "deqgen Anderson": _deqgen(Anderson),
    "deqgen Broyden": _deqgen(Broyden),
    "deqgen Broyden memory=1000": _deqgen(Broyden, memory=BUDGET),
    "torchdeq Broyden": _torchdeq,
    "scipy hybr": _scipy("hybr"),
    "scipy broyden1": _scipy("broyden1"),
    "scipy anderson": _scipy("anderson"),
}


def cell(p: MGHProblem, solve: Callable[[MGHProblem, _Counted], np.ndarray]) -> tuple[bool, str]:
    """Run one solver on one problem: (solved, table cell)."""
    counted = _Counted(p.F)
    try:
        with warnings.catch_warnings(), np.errstate(all="ignore"), torch.no_grad():
            warnings.simplefilter("ignore")
            x = solve(p, counted)
        err = float(np.abs(counted.F(torch.as_tensor(x, dtype=torch.float64)[None])[0].numpy()).max())
    except Exception as exc:  # scipy's quasi-Newton solvers raise on singular or non-finite steps
        return False, f"- ({type(exc).__name__})"
    solved = err < TOL and counted.calls <= BUDGET
    return solved, (f"{counted.calls}" if solved else f"- ({err:.1e})")


def main() -> None:
    torch.set_num_threads(1)
    names = list(SOLVERS)
    print("| problem | n | " + " | ".join(names) + " |")
    print("|---|---|" + "---|" * len(names))
    totals = dict.fromkeys(names, 0)
    for p in MGH_PROBLEMS:
        cells = []
        for name in names:
            solved, text = cell(p, SOLVERS[name])
            totals[name] += solved
            cells.append(text)
        print(f"| {p.name} | {p.n} | " + " | ".join(cells) + " |", flush=True)
    print("| **solved** | | " + " | ".join(f"**{totals[n]} / {len(MGH_PROBLEMS)}**" for n in names) + " |")


if __name__ == "__main__":
    main()
