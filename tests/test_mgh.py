"""Moré-Garbow-Hillstrom systems (``tests/mgh.py``): the definitions against their known roots, and deqgen's
Anderson and Broyden solving a few of them from the standard start (float64, success = max|F| < 1e-8,
re-measured here)."""

from __future__ import annotations

import math

import pytest
import torch

from deqgen import Anderson, Broyden, Status, fixed_point
from tests.mgh import MGH_PROBLEMS, fixed_point_map

F64 = torch.float64
_BY_NAME = {p.name: p for p in MGH_PROBLEMS}


@pytest.mark.parametrize(
    "name, root",
    [
        ("Rosenbrock", [1.0, 1.0]),
        ("Helical valley", [1.0, 0.0, 0.0]),
        ("Powell singular", [0.0, 0.0, 0.0, 0.0]),
        ("Brown almost-linear n=10", [1.0] * 10),
    ],
)
def test_definitions_vanish_at_the_known_roots(name: str, root: list[float]) -> None:
    F = _BY_NAME[name].F
    assert float(F(torch.tensor([root], dtype=F64)).abs().max()) == 0.0


def test_chebyquad_n2_root_is_the_gauss_chebyshev_pair() -> None:
    # n = 2: x = 1/2 -+ 1/(2 sqrt 3) integrates T_1 and T_2 on [0, 1] exactly
    x = torch.tensor([[0.5 - 0.5 / math.sqrt(3), 0.5 + 0.5 / math.sqrt(3)]], dtype=F64)
    assert float(_BY_NAME["Chebyquad n=5"].F(x).abs().max()) < 1e-15


def test_discrete_boundary_value_and_integral_equation_share_their_root() -> None:
    # the integral equation is the boundary-value problem's Green's-function form: same solution
    from scipy.optimize import root

    sols = []
    for name in ("Discrete boundary value n=10", "Discrete integral equation n=10"):
        p = _BY_NAME[name]
        r = root(
            lambda v, p=p: p.F(torch.tensor(v[None]))[0].numpy(),
            p.start()[0].numpy(),
            method="hybr",
            tol=1e-14,
        )
        sols.append(torch.tensor(r.x))
    assert torch.allclose(sols[0], sols[1], rtol=0, atol=1e-6)


# Each solver with its defaults, on problems the previous release failed (Broyden memory 16 dropping its oldest
# pair: Powell badly scaled, Brown, boundary value, trigonometric; Anderson without line search or NaN recovery:
# Powell singular, Chebyquad, Brown), plus two it already solved.
@pytest.mark.parametrize(
    "cls, name",
    [
        (Broyden, "Rosenbrock"),
        (Broyden, "Powell badly scaled"),
        (Broyden, "Brown almost-linear n=10"),
        (Broyden, "Discrete boundary value n=10"),
        (Broyden, "Trigonometric n=10"),
        (Anderson, "Discrete integral equation n=10"),
        (Anderson, "Powell singular"),
        (Anderson, "Chebyquad n=5"),
        (Anderson, "Brown almost-linear n=10"),
    ],
)
def test_solves_from_the_standard_start(cls: type, name: str) -> None:
    p = _BY_NAME[name]
    solver = cls(tol=1e-8, stop_mode="abs", norm="inf", max_iter=1000)
    sol = fixed_point(fixed_point_map(p.F), p.start(), solver)
    assert int(sol.stats.status[0]) == Status.CONVERGED, sol.stats.summary()
    assert float(p.F(sol.z).abs().max()) < 1e-8
