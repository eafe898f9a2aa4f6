"""A diverging or overflowing solve is never reported as converged (issue 21, part 1).

The expected facts are derived by hand: ``f(z) = 2|z| + 1`` has no real fixed point (for ``z >= 0`` the
equation reads ``z = 2z + 1``, for ``z < 0`` it reads ``3z = 1``; neither has a solution in its half-line), so
no solver may report a sample as converged on it, whatever the precision, stop mode or norm. The residual norms
are checked against float64 references computed with scaling (``max|v| * ||v / max|v|||``), which cannot
overflow while the entries are finite.
"""

from __future__ import annotations

import math

import pytest
import torch

from deqgen import Anderson, Broyden, Picard, Status, fixed_point
from deqgen.solvers import get

SOLVERS = [Picard, Anderson, Broyden]
IDS = ["picard", "anderson", "broyden"]
DTYPES = [torch.float32, torch.float64]


def _no_fixed_point(z: torch.Tensor) -> torch.Tensor:
    return 2 * z.abs() + 1


def _scaled_norm(v: torch.Tensor) -> torch.Tensor:
    """Per-row l2 norm in float64, scaled by the largest entry so that it cannot overflow."""
    v = v.double().flatten(1)
    peak = v.abs().amax(dim=1).clamp_min(torch.finfo(torch.float64).tiny)
    return peak * (v / peak[:, None]).norm(dim=1)


@pytest.mark.parametrize("cls", SOLVERS, ids=IDS)
@pytest.mark.parametrize("stop_mode", ["abs", "rel"])
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "fp64"])
@pytest.mark.parametrize("norm", ["l2", "inf"])
def test_map_without_fixed_point_never_converges(cls, stop_mode: str, dtype: torch.dtype, norm: str) -> None:
    z0 = torch.ones(2, 10, dtype=dtype)
    sol = fixed_point(_no_fixed_point, z0, cls(tol=1e-6, stop_mode=stop_mode, norm=norm, max_iter=2000))
    status = sol.stats.status.tolist()
    assert all(s in (Status.NON_FINITE, Status.MAX_ITER) for s in status), sol.stats.summary()
    assert torch.isfinite(sol.z).all()
    assert torch.isfinite(sol.stats.abs_residual).all() and torch.isfinite(sol.stats.rel_residual).all()


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "fp64"])
def test_issue_example_doubling_map_is_not_converged(dtype: torch.dtype) -> None:
    # The issue's reproduction: Picard on f(z) = 2z from ones. The relative residual is exactly 1/2 at every
    # finite iterate; the iterate doubles until it overflows.
    tol = 1e-6 if dtype == torch.float32 else 1e-10
    sol = fixed_point(
        lambda z: 2 * z,
        torch.ones(1, 10, dtype=dtype),
        get("picard", tol=tol, stop_mode="rel", max_iter=2000),
    )
    assert int(sol.stats.status[0]) == Status.NON_FINITE, sol.stats.summary()
    assert float(sol.stats.rel_residual[0]) == 0.5
    # f(z_k) = 2^(k+1) * ones(10) has the l2 norm sqrt(10) 2^(k+1): the first evaluation whose norm exceeds the
    # dtype's range ends the row, n = k + 1 = floor(log2(max / sqrt(10))) + 1 (127 for float32, 1023 for float64)
    want = math.floor(math.log2(torch.finfo(dtype).max / math.sqrt(10))) + 1
    assert int(sol.stats.nfe[0]) == want


@pytest.mark.parametrize("cls", SOLVERS, ids=IDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "fp64"])
def test_large_finite_entries_do_not_overflow_the_norms(cls, dtype: torch.dtype) -> None:
    # f(z) = 1.001 z from z0 = c * ones with c^2 * D above the dtype's max: the squares overflow, the entries do
    # not. The relative residual is 0.001 / 1.001 at any nonzero iterate, so tol 1e-6 is not met at z0.
    D = 16
    c = (
        math.sqrt(torch.finfo(dtype).max) / 2
    )  # c^2 * D = max * 4 overflows; 1.001 c and D * (0.001 c)^2 do not
    z0 = torch.full((1, D), c, dtype=dtype)
    sol = fixed_point(lambda z: 1.001 * z, z0, cls(tol=1e-6, stop_mode="rel", max_iter=1), trace=True)
    assert int(sol.stats.status[0]) == Status.MAX_ITER, sol.stats.summary()
    assert torch.equal(sol.z, z0)
    g, fz = 1.001 * z0 - z0, 1.001 * z0
    want_abs = float(_scaled_norm(g)[0])
    want_rel = want_abs / float(_scaled_norm(fz)[0])
    assert math.isclose(float(sol.stats.abs_residual[0]), want_abs, rel_tol=1e-5)
    assert math.isclose(float(sol.stats.rel_residual[0]), want_rel, rel_tol=1e-5)
    assert math.isclose(float(sol.stats.rel_trace[0, 0]), want_rel, rel_tol=1e-5)


@pytest.mark.parametrize("cls", SOLVERS, ids=IDS)
@pytest.mark.parametrize("stop_mode", ["abs", "rel"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_half_precision_under_autocast_never_converges_without_fixed_point(
    cls, stop_mode: str, dtype: torch.dtype
) -> None:
    z0 = torch.ones(2, 10, dtype=dtype)
    with torch.autocast("cpu", dtype=dtype):
        sol = fixed_point(_no_fixed_point, z0, cls(tol=1e-3, stop_mode=stop_mode, max_iter=500))
    assert sol.z.dtype == dtype
    assert all(s in (Status.NON_FINITE, Status.MAX_ITER) for s in sol.stats.status.tolist()), (
        sol.stats.summary()
    )
    assert torch.isfinite(sol.z).all()


@pytest.mark.parametrize("cls", SOLVERS, ids=IDS)
@pytest.mark.parametrize("stop_mode", ["abs", "rel"])
@pytest.mark.parametrize("dtype", [torch.bfloat16], ids=["bf16"])
def test_half_precision_without_autocast_never_converges(cls, stop_mode: str, dtype: torch.dtype) -> None:
    # bf16 keeps float32's exponent range: its squares overflow a float32 accumulator (the fp16 range cannot)
    z0 = torch.ones(2, 10, dtype=dtype)
    sol = fixed_point(_no_fixed_point, z0, cls(tol=1e-2, stop_mode=stop_mode, max_iter=500))
    assert all(s in (Status.NON_FINITE, Status.MAX_ITER) for s in sol.stats.status.tolist()), (
        sol.stats.summary()
    )
