"""Which iterate a solve returns, and the combined stop rule (issue 21, part 2).

References are derived by hand: ``F(x) = x (x - 5)^2`` has roots 0 and 5, posed as the fixed-point map
``g(x) = x + F(x)``, so the absolute residual of an iterate is ``|F(x)|``, computed here directly.
"""

from __future__ import annotations

import math

import pytest
import torch

from deqgen import Anderson, Broyden, Picard, Status, fixed_point

SOLVERS = [Picard, Anderson, Broyden]
IDS = ["picard", "anderson", "broyden"]
F64 = torch.float64


def _cubic(x: torch.Tensor) -> torch.Tensor:
    return x * (x - 5) ** 2


def _cubic_map(z: torch.Tensor) -> torch.Tensor:
    return z + _cubic(z)


@pytest.mark.parametrize("cls", SOLVERS, ids=IDS)
@pytest.mark.parametrize("stop_mode", ["abs", "rel"])
def test_returned_iterate_is_never_worse_than_the_start(cls, stop_mode: str) -> None:
    x0 = torch.linspace(-3, 12, 61, dtype=F64)[:, None]
    sol = fixed_point(_cubic_map, x0, cls(tol=1e-10, stop_mode=stop_mode, max_iter=300))
    failed = sol.stats.status != Status.CONVERGED
    start, end = _cubic(x0).abs()[:, 0], _cubic(sol.z).abs()[:, 0]
    assert bool((end[failed] <= start[failed]).all()), (x0[failed][end[failed] > start[failed]], end[failed])
    # the reported residual is |(x + F) - x|, which rounds F at the scale of x + F
    assert bool(((sol.stats.abs_residual - end).abs() <= 1e-12 * (end + _cubic_map(sol.z).abs()[:, 0])).all())


@pytest.mark.parametrize("x0", [0.75, 1.25])
def test_anderson_rel_mode_does_not_return_a_worse_point(x0: float) -> None:
    # Before the fix Anderson returned x ~ 8.6 (|F| = 108) from x0 = 0.75 (|F| = 13.5): the relative residual
    # |F| / |x + F| is lower out there, although the absolute residual is eight times the start's.
    z0 = torch.full((1, 1), x0, dtype=F64)
    sol = fixed_point(_cubic_map, z0, Anderson(tol=1e-10, stop_mode="rel", max_iter=300))
    assert float(_cubic(sol.z).abs()) <= float(_cubic(z0).abs())


def test_combined_rule_reaches_the_root_at_zero_in_rel_mode() -> None:
    # Near the root x = 0 the relative residual |F| / |x + F| tends to 25 / 26, so rel <= tol alone can never
    # stop there; abs <= atol does.
    z0 = torch.ones(1, 1, dtype=F64)
    rel_only = fixed_point(_cubic_map, z0, Anderson(tol=1e-10, stop_mode="rel", max_iter=200))
    assert int(rel_only.stats.status[0]) == Status.MAX_ITER
    both = fixed_point(_cubic_map, z0, Anderson(tol=1e-10, stop_mode="rel", atol=1e-12, max_iter=200))
    assert int(both.stats.status[0]) == Status.CONVERGED, both.stats.summary()
    assert float(_cubic(both.z).abs()) <= 1e-12 and abs(float(both.z)) < 1e-12


@pytest.mark.parametrize("atol", [0.0, 1e-6])
def test_combined_rule_stops_at_the_first_iterate_meeting_either_test(atol: float) -> None:
    # Picard on f(z) = z / 2 from ones(4): rel = ||z/2|| / ||z/2|| = 1 at every iterate; abs_k = 2 * 2^-(k+1)
    # (the l2 norm of ones(4) is 2), so abs <= 1e-6 first holds at k + 1 = ceil(log2(2e6)) = 21 evaluations.
    z0 = torch.ones(1, 4, dtype=F64)
    sol = fixed_point(lambda z: z / 2, z0, Picard(tol=1e-3, stop_mode="rel", atol=atol, max_iter=40))
    if atol:
        assert int(sol.stats.status[0]) == Status.CONVERGED and int(sol.stats.nfe[0]) == math.ceil(
            math.log2(2e6)
        )
        assert torch.equal(sol.z, z0 * 2.0**-20)
    else:  # every iterate has rel = 1: none is strictly better than the start, which is returned
        assert int(sol.stats.status[0]) == Status.MAX_ITER and int(sol.stats.nfe[0]) == 40
        assert torch.equal(sol.z, z0)


@pytest.mark.parametrize("cls", SOLVERS, ids=IDS)
def test_atol_needs_rel_mode_and_a_finite_nonnegative_value(cls) -> None:
    with pytest.raises(ValueError, match="atol=1e-06 with stop_mode='abs'"):
        cls(stop_mode="abs", atol=1e-6)
    with pytest.raises(ValueError, match="atol=-1"):
        cls(atol=-1.0)
    with pytest.raises(TypeError, match="atol=True"):
        cls(atol=True)
