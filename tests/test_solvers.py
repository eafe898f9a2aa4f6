"""The solvers and the shared run loop against independent references: closed forms, manual loops, scipy.

Every expected number is derived here (closed forms, hand-written Picard loops, torch.linalg.solve, scipy),
never copied from a solver's output. Sizes are small so the file runs in seconds on 2 CPU cores.
"""

from __future__ import annotations

import doctest
import importlib
import math

import numpy as np
import pytest
import torch

from deqgen import Anderson, Broyden, FixedPointProblem, Picard, SolverError, Status, fixed_point, solvers
from tests.problems import attention, linear, mixed, rowwise_tanh, tanh_mlp

F64 = torch.float64
SOLVERS = [Picard, Anderson, Broyden]
IDS = ["picard", "anderson", "broyden"]


def _only(f, keep: list[int]):
    """The separable map ``f`` restricted to the original rows ``keep`` (row j of the new problem is
    row keep[j] of the old one), so a sub-batch is solved with bitwise the same per-row arithmetic."""
    keep_t = torch.tensor(keep)

    def g(z, *args, rows=None):
        return f(z, *args, rows=keep_t if rows is None else keep_t[rows])

    return g


def _norm(v: torch.Tensor, norm: str = "l2") -> torch.Tensor:
    v = v.flatten(1)
    return v.norm(dim=1) if norm == "l2" else v.abs().amax(dim=1)


def _residuals(f, z: torch.Tensor, norm: str = "l2") -> tuple[torch.Tensor, torch.Tensor]:
    """Independent abs and rel residuals of ``z`` under the full-batch map ``f``."""
    fz = f(z)
    a = _norm(fz - z, norm)
    return a, a / _norm(fz, norm)


def _scalar_linear(a: torch.Tensor, b: torch.Tensor):
    """``f(z) = a_b z + b_b`` with a scalar rate per row: the Jacobian is ``a_b I``."""

    def f(z, rows=None):
        r = slice(None) if rows is None else rows
        return a[r, None] * z + b[r]

    return f


# ---------------------------------------------------------------------------------------------- accuracy


@pytest.mark.parametrize("cls", SOLVERS, ids=IDS)
@pytest.mark.parametrize("stop_mode", ["abs", "rel"])
def test_linear_contraction_reaches_exact_solution(cls, stop_mode: str) -> None:
    bp = linear(B=4, D=32)
    tol = 1e-12
    sol = fixed_point(bp.f, bp.z0, cls(tol=tol, stop_mode=stop_mode, max_iter=500), separable=True)
    assert bool((sol.stats.status == Status.CONVERGED).all()), sol.stats.summary()
    # exact z* from torch.linalg.solve (float64); for ||A||_2 = 0.9: ||z - z*|| <= ||f(z) - z|| / (1 - 0.9)
    b = bp.f(torch.zeros(4, 32, dtype=F64))
    exact = torch.linalg.solve(torch.eye(32, dtype=F64) - _linear_A(), b.T).T
    assert torch.allclose(exact, bp.exact, rtol=0, atol=1e-12)
    abs_res, rel_res = _residuals(bp.full, sol.z)
    bound = abs_res / (1 - 0.9) * 1.001 + 1e-14
    err = (sol.z - exact).norm(dim=1)
    assert bool((err <= bound).all()), (err, bound)
    assert bool(((rel_res if stop_mode == "rel" else abs_res) <= tol * (1 + 1e-6)).all())
    assert float(err.max()) <= 1e-10 * float(exact.norm(dim=1).max())


def _linear_A() -> torch.Tensor:
    """Recover A of ``linear(B, D=32)`` from the map itself: f(e_i) - f(0) is row i of A^T."""
    bp = linear(B=4, D=32)
    zero = torch.zeros(32, 32, dtype=F64)
    # feed the basis vectors as a batch of 32 rows, each against row 0's offset b_0
    rows0 = torch.zeros(32, dtype=torch.long)
    return (bp.f(torch.eye(32, dtype=F64), rows=rows0) - bp.f(zero, rows=rows0)).T


@pytest.mark.parametrize("cls", SOLVERS, ids=IDS)
@pytest.mark.parametrize(
    "make",
    [lambda: tanh_mlp(B=4, D=32), lambda: mixed(B=6, D=32), lambda: attention(B=2, L=8, C=16, heads=2)],
    ids=["tanh_mlp", "mixed", "attention"],
)
def test_converges_on_problem_bank(cls, make) -> None:
    bp = make()
    tol = 1e-8
    sol = fixed_point(bp.f, bp.z0, cls(tol=tol, max_iter=300), separable=True)
    assert bool((sol.stats.status == Status.CONVERGED).all()), sol.stats.summary()
    assert sol.z.shape == bp.z0.shape and sol.z.dtype == bp.z0.dtype
    abs_res, rel_res = _residuals(bp.full, sol.z)
    assert bool((rel_res <= tol * (1 + 1e-4)).all()), rel_res
    # the reported residuals are those of the returned iterate (f on a row subset may round differently)
    assert torch.allclose(sol.stats.abs_residual, abs_res, rtol=1e-5, atol=1e-13)
    assert torch.allclose(sol.stats.rel_residual, rel_res, rtol=1e-5, atol=1e-13)
    assert bool((sol.stats.nfe >= 1).all()) and int(sol.stats.nfe.max()) == sol.stats.iterations


def test_mixed_batch_hard_rows_cost_more_than_easy_rows() -> None:
    bp = mixed(B=8, D=32)
    sol = fixed_point(bp.f, bp.z0, Picard(tol=1e-8, max_iter=1000), separable=True)
    # the row rates as mixed() documents them: linspace(0.3, 0.99) shuffled with seed 1003
    perm = torch.randperm(8, generator=torch.Generator().manual_seed(1003))
    c = torch.linspace(0.3, 0.99, 8, dtype=F64)[perm]
    easy, hard = int(c.argmin()), int(c.argmax())
    assert sol.stats.all_converged
    assert int(sol.stats.nfe[easy]) < int(sol.stats.nfe[hard]) // 3
    # separable: frozen rows cost nothing, so the rows evaluated are exactly the sum of per-row nfe
    assert sol.stats.rows_evaluated == int(sol.stats.nfe.sum())


@pytest.mark.parametrize("cls", SOLVERS, ids=IDS)
def test_picard_rate_and_secant_exactness_on_scalar_jacobian(cls) -> None:
    # f(z) = a z + b from z0 = 0: Picard's residual is a^k ||b|| at evaluation k (closed form); Anderson and
    # Broyden make a Picard step, then a secant step that is exact when the Jacobian is a multiple of I.
    a = torch.tensor([0.5, 0.8, -0.6], dtype=F64)
    b = torch.randn(3, 5, generator=torch.Generator().manual_seed(3), dtype=F64)
    tol = 1e-9
    solver = (
        cls(tol=tol, stop_mode="abs", max_iter=200)
        if cls is not Anderson
        else Anderson(tol=tol, stop_mode="abs", max_iter=200, lam=0.0)
    )
    sol = fixed_point(_scalar_linear(a, b), torch.zeros(3, 5, dtype=F64), solver, separable=True)
    exact = b / (1 - a[:, None])
    assert sol.stats.all_converged
    # ||z - z*|| = ||f(z) - z|| / (1 - a) for this map
    assert bool(((sol.z - exact).norm(dim=1) <= tol / (1 - a.abs()) * (1 + 1e-6)).all())
    if cls is Picard:
        expect = [
            next(k for k in range(200) if abs(float(ai)) ** k * float(b[i].norm()) <= tol) + 1
            for i, ai in enumerate(a)
        ]
        assert sol.stats.nfe.tolist() == expect
    else:
        assert sol.stats.nfe.tolist() == [3, 3, 3]
        assert float((sol.z - exact).abs().max()) <= 1e-14


@pytest.mark.parametrize("cls", SOLVERS, ids=IDS)
def test_agrees_with_scipy(cls) -> None:
    scipy_optimize = pytest.importorskip("scipy.optimize")
    bp = tanh_mlp(B=1, D=12, seed=11)

    def f_np(v: np.ndarray) -> np.ndarray:
        return bp.full(torch.from_numpy(v).reshape(1, -1)).numpy().ravel()

    root = scipy_optimize.root(lambda v: f_np(v) - v, np.zeros(12), method="hybr", tol=1e-14)
    assert root.success
    fp = scipy_optimize.fixed_point(f_np, np.zeros(12), xtol=1e-14, maxiter=5000, method="iteration")
    assert np.allclose(root.x, fp, rtol=0, atol=1e-11)
    sol = fixed_point(bp.f, bp.z0, cls(tol=1e-13, stop_mode="abs", max_iter=500), separable=True)
    assert sol.stats.all_converged
    assert np.allclose(sol.z.numpy().ravel(), root.x, rtol=0, atol=1e-11)
    assert np.allclose(sol.z.numpy().ravel(), fp, rtol=0, atol=1e-11)


# ---------------------------------------------------------------------------------------- batch invariance


@pytest.mark.parametrize("cls", SOLVERS, ids=IDS)
@pytest.mark.parametrize("separable", [True, False], ids=["separable", "whole"])
@pytest.mark.parametrize("check_every", [1, 3])
def test_batch_invariance(cls, separable: bool, check_every: int) -> None:
    B = 6
    bp = rowwise_tanh(B=B, D=12, seed=21)
    tol, max_iter = 1e-11, 300
    f = bp.f if separable else (lambda z: bp.f(z))
    solver = cls(tol=tol, max_iter=max_iter, check_every=check_every)
    full = fixed_point(f, bp.z0, solver, separable=separable)
    assert full.stats.all_converged, full.stats.summary()
    nfes = []
    for i in range(B):
        alone = fixed_point(
            _only(bp.f, [i]), bp.z0[i : i + 1], cls(tol=tol, max_iter=max_iter), separable=True
        )
        assert float((alone.z[0] - full.z[i]).abs().max()) <= 1e-10, i
        assert int(alone.stats.nfe[0]) == int(full.stats.nfe[i]), i
        assert int(alone.stats.status[0]) == int(full.stats.status[i])
        nfes.append(int(alone.stats.nfe[0]))
    assert len(set(nfes)) > 2  # rows really need different iteration counts, so freezing is exercised
    # results do not depend on check_every or on separability either
    ref = fixed_point(bp.f, bp.z0, cls(tol=tol, max_iter=max_iter), separable=True)
    assert torch.equal(full.stats.nfe, ref.stats.nfe) and torch.equal(full.stats.status, ref.stats.status)
    assert float((full.z - ref.z).abs().max()) <= 1e-12
    assert torch.allclose(full.stats.abs_residual, ref.stats.abs_residual, rtol=1e-9, atol=0)
    if separable and check_every == 1:
        assert full.stats.rows_evaluated == sum(nfes)
    if not separable:
        assert full.stats.rows_evaluated == B * full.stats.iterations


@pytest.mark.parametrize("cls", [Anderson, Broyden], ids=IDS[1:])
@pytest.mark.parametrize("separable", [True, False], ids=["separable", "whole"])
def test_batch_invariance_with_rejected_steps(cls, separable: bool) -> None:
    # On a map with no fixed point the secant steps overshoot and get rejected (reject_ratio = 1 rejects any
    # rise of the residual): the safeguard, the restart and the best-iterate tracking must all be per row.
    z0 = torch.tensor([[-2.0, 0.7], [-0.5, 2.0], [0.3, -1.0], [1.5, 0.0]], dtype=F64)
    solver = cls(tol=1e-3, stop_mode="abs", max_iter=25, reject_ratio=1.0, check_every=2)

    def f(z, rows=None):
        return _rising_map(z)

    full = fixed_point(f if separable else _rising_map, z0, solver, separable=separable, trace=True)
    assert full.stats.status.tolist() == [Status.MAX_ITER] * 4
    for i in range(4):
        alone = fixed_point(f, z0[i : i + 1], solver, separable=True, trace=True)
        assert torch.equal(alone.z[0], full.z[i])
        assert torch.equal(alone.stats.abs_trace[:, 0], full.stats.abs_trace[:, i])
    # rejections did happen: without the safeguard every row follows another trajectory
    free = fixed_point(f, z0, cls(tol=1e-3, stop_mode="abs", max_iter=25, reject_ratio=math.inf), trace=True)
    for i in range(4):
        assert not torch.equal(free.stats.abs_trace[:, i], full.stats.abs_trace[:, i])


@pytest.mark.parametrize("cls", SOLVERS, ids=IDS)
def test_batch_invariance_under_row_permutation(cls) -> None:
    bp = rowwise_tanh(B=6, D=12, seed=22)
    perm = [4, 0, 5, 2, 1, 3]
    solver = cls(tol=1e-11, max_iter=300)
    a = fixed_point(bp.f, bp.z0, solver, separable=True)
    b = fixed_point(_only(bp.f, perm), bp.z0[perm], solver, separable=True)
    assert torch.equal(a.stats.nfe[perm], b.stats.nfe)
    assert float((a.z[perm] - b.z).abs().max()) <= 1e-10


# -------------------------------------------------------------------------------------------- NaN / Inf rows


@pytest.mark.parametrize("cls", SOLVERS, ids=IDS)
@pytest.mark.parametrize("separable", [True, False], ids=["separable", "whole"])
@pytest.mark.parametrize("check_every", [1, 3])
def test_nan_row_is_frozen_and_other_rows_are_bit_identical(cls, separable: bool, check_every: int) -> None:
    B, bad, nan_at = 5, 2, 4
    bp = rowwise_tanh(B=B, D=10, seed=31)

    def f_nan(z, k, rows=None):
        out = bp.f(z, rows=rows)
        r = torch.arange(B) if rows is None else rows
        if k >= nan_at:
            out = torch.where((r == bad)[:, None], math.nan, out)
        return out

    solver = cls(tol=1e-10, stop_mode="abs", max_iter=200, check_every=check_every)
    f = f_nan if separable else (lambda z, k: f_nan(z, k))
    sol = fixed_point(f, bp.z0, solver, indexed=True, separable=separable, trace=True)
    keep = [i for i in range(B) if i != bad]
    ref = fixed_point(_only(bp.f, keep), bp.z0[keep], solver, separable=True)

    st = sol.stats
    assert int(st.status[bad]) == Status.NON_FINITE
    # stopped at the first NaN evaluation, or after the solver's retries (shrink and retry) all came back NaN
    assert int(st.nfe[bad]) == nan_at + 1 + solver.non_finite_retries
    assert torch.isfinite(sol.z).all()
    # the bad row returns its lowest-residual finite iterate: its residual is the smallest finite trace entry
    col = st.abs_trace[:, bad]
    assert torch.isfinite(col[:nan_at]).all() and torch.isnan(col[nan_at:]).all()
    assert float(st.abs_residual[bad]) == float(col[:nan_at].min())
    assert torch.allclose(_residuals(bp.full, sol.z)[0][bad], st.abs_residual[bad], rtol=1e-12, atol=0)
    if cls is Picard:  # a contraction's Picard residual decreases: the best finite iterate is f^3(z0)
        z = bp.z0[bad : bad + 1]
        for _ in range(nan_at - 1):
            z = bp.f(z, rows=torch.tensor([bad]))
        assert torch.equal(sol.z[bad], z[0])
    # the other rows are untouched by the NaN row, bit for bit
    assert torch.equal(sol.z[keep], ref.z)
    assert torch.equal(st.nfe[keep], ref.stats.nfe)
    assert torch.equal(st.status[keep], ref.stats.status)
    assert torch.equal(st.abs_residual[keep], ref.stats.abs_residual)
    assert bool((st.status[keep] == Status.CONVERGED).all())


@pytest.mark.parametrize("stop_mode", ["abs", "rel"])
def test_overflowing_row_is_non_finite_and_isolated(stop_mode: str) -> None:
    # row 1: f(z) = 1e100 z + 1 from 0 gives z = 0, 1, 1e100, 1e200, 1e300 and f(1e300) = inf at evaluation 4.
    # (The max norm: torch's l2 norm squares its entries and overflows already for entries ~1e155.)
    a = torch.tensor([0.5, 1e100, 0.7], dtype=F64)
    b = torch.ones(3, 4, dtype=F64)
    f = _scalar_linear(a, b)
    solver = Picard(tol=1e-10, stop_mode=stop_mode, norm="inf", max_iter=200)
    sol = fixed_point(f, torch.zeros(3, 4, dtype=F64), solver, separable=True)
    ref = fixed_point(_only(f, [0, 2]), torch.zeros(2, 4, dtype=F64), solver, separable=True)
    assert sol.stats.status.tolist() == [Status.CONVERGED, Status.NON_FINITE, Status.CONVERGED]
    assert int(sol.stats.nfe[1]) == 5
    if stop_mode == "abs":  # residuals 1, 1e100, ...: the best finite iterate is z0 = 0, residual ||b|| = 1
        assert torch.equal(sol.z[1], torch.zeros(4, dtype=F64)) and float(sol.stats.abs_residual[1]) == 1.0
    assert torch.isfinite(sol.z).all()
    assert torch.equal(sol.z[[0, 2]], ref.z) and torch.equal(sol.stats.nfe[[0, 2]], ref.stats.nfe)


@pytest.mark.parametrize("cls", SOLVERS, ids=IDS)
def test_nan_row_at_z0_returns_z0(cls) -> None:
    def f(z):
        out = 0.5 * z + 1.0
        out[1] = math.inf
        return out

    z0 = torch.full((3, 2), 3.0, dtype=F64)
    sol = fixed_point(f, z0, cls(tol=1e-10, max_iter=100))
    assert sol.stats.status.tolist() == [Status.CONVERGED, Status.NON_FINITE, Status.CONVERGED]
    assert sol.stats.nfe[1] == 1 and torch.equal(sol.z[1], z0[1])
    assert torch.allclose(sol.z[[0, 2]], torch.full((2, 2), 2.0, dtype=F64), rtol=0, atol=1e-9)


@pytest.mark.parametrize("cls", SOLVERS, ids=IDS)
@pytest.mark.parametrize("stop_mode", ["abs", "rel"])
def test_zero_output_is_not_mistaken_for_non_finite(cls, stop_mode: str) -> None:
    # f(z) = relu(-z - 1) is finite everywhere with fixed point 0; at z0 = 10 it returns exactly 0, so the
    # relative residual ||f(z) - z|| / ||f(z)|| is +inf while f returned nothing non-finite. The next iterate
    # is z1 = f(z0) = 0 = f(z1): converged after 2 evaluations.
    def f(z):
        return torch.relu(-z - 1.0)

    z0 = torch.full((2, 4), 10.0, dtype=F64)
    sol = fixed_point(f, z0, cls(tol=1e-8, stop_mode=stop_mode, max_iter=20))
    assert sol.stats.status.tolist() == [Status.CONVERGED] * 2, sol.stats.summary()
    assert sol.stats.nfe.tolist() == [2, 2] and torch.equal(sol.z, torch.zeros(2, 4, dtype=F64))
    budget = fixed_point(f, z0, cls(tol=None, stop_mode=stop_mode, max_iter=3))
    assert budget.stats.status.tolist() == [Status.BUDGET] * 2 and budget.stats.nfe.tolist() == [3, 3]


# -------------------------------------------------------------------------------------------- abs vs rel


@pytest.mark.parametrize("norm", ["l2", "inf"])
def test_abs_and_rel_stopping_follow_their_definitions(norm: str) -> None:
    # f(z) = a z + b from z0 = 0 (Picard): z_k = b (1 - a^k) / (1 - a), g_k = a^k b, f(z_k) = z_{k+1}, so
    # abs_k = a^k ||b|| and rel_k = a^k (1 - a) / (1 - a^(k+1)) in any norm (f(z_k) is parallel to b).
    a_val, D, tol = 0.5, 8, 1e-4
    b = torch.stack([torch.full((D,), 100.0, dtype=F64), torch.full((D,), 1e-3, dtype=F64)])
    b[:, 0] *= 2  # l2 and inf norms differ
    a = torch.full((2,), a_val, dtype=F64)
    f = _scalar_linear(a, b)
    bn = _norm(b, norm).tolist()

    def abs_k(i: int, k: int) -> float:
        return a_val**k * bn[i]

    def rel_k(k: int) -> float:
        return a_val**k * (1 - a_val) / (1 - a_val ** (k + 1))

    k_abs = [next(k for k in range(200) if abs_k(i, k) <= tol) for i in range(2)]
    k_rel = next(k for k in range(200) if rel_k(k) <= tol)
    for i in range(2):  # thresholds are not within rounding of tol
        for k in (k_abs[i], k_abs[i] - 1):
            assert abs(math.log(abs_k(i, k) / tol)) > 1e-3
    assert k_abs[0] > k_rel > k_abs[1]  # big b: abs stops later than rel; tiny b: earlier

    z0 = torch.zeros(2, D, dtype=F64)
    results = {}
    for mode, ks in (("abs", k_abs), ("rel", [k_rel, k_rel])):
        sol = fixed_point(f, z0, Picard(tol=tol, stop_mode=mode, norm=norm, max_iter=200), separable=True)
        results[mode] = sol
        assert sol.stats.all_converged
        assert sol.stats.nfe.tolist() == [k + 1 for k in ks]
        for i, k in enumerate(ks):
            zk = b[i] * (1 - a_val**k) / (1 - a_val)
            assert torch.allclose(sol.z[i], zk, rtol=1e-13, atol=0)
            assert math.isclose(float(sol.stats.abs_residual[i]), abs_k(i, k), rel_tol=1e-7)
            assert math.isclose(float(sol.stats.rel_residual[i]), rel_k(k), rel_tol=1e-7)
        # definitions, recomputed from the returned z alone
        abs_res, rel_res = _residuals(lambda z: f(z), sol.z, norm)
        assert torch.allclose(sol.stats.abs_residual, abs_res, rtol=1e-12, atol=0)
        assert torch.allclose(sol.stats.rel_residual, rel_res, rtol=1e-12, atol=0)
        fz_norm = _norm(f(sol.z), norm)
        assert torch.allclose(sol.stats.rel_residual, sol.stats.abs_residual / fz_norm, rtol=1e-12)
    assert results["abs"].stats.nfe.tolist() != results["rel"].stats.nfe.tolist()


@pytest.mark.parametrize("cls", SOLVERS, ids=IDS)
@pytest.mark.parametrize("norm", ["l2", "inf"])
def test_reported_residuals_match_returned_iterate(cls, norm: str) -> None:
    bp = tanh_mlp(B=3, D=16)
    for mode in ("abs", "rel"):
        sol = fixed_point(bp.f, bp.z0, cls(tol=1e-9, stop_mode=mode, norm=norm, max_iter=300), separable=True)
        abs_res, rel_res = _residuals(bp.full, sol.z, norm)
        assert sol.stats.all_converged
        assert bool(((abs_res if mode == "abs" else rel_res) <= 1e-9 * (1 + 1e-4)).all())
        assert torch.allclose(sol.stats.abs_residual, abs_res, rtol=1e-5, atol=1e-14)
        assert torch.allclose(sol.stats.rel_residual, rel_res, rtol=1e-5, atol=1e-14)


# ------------------------------------------------------------------------------------ f(z, k) and its rows


@pytest.mark.parametrize("cls", SOLVERS, ids=IDS)
@pytest.mark.parametrize("with_x", [False, True], ids=["no_x", "x"])
@pytest.mark.parametrize("separable", [True, False], ids=["separable", "whole"])
def test_f_receives_iteration_numbers_rows_and_x(cls, with_x: bool, separable: bool) -> None:
    B, D = 5, 8
    bp = rowwise_tanh(B=B, D=D, seed=41)
    x = torch.arange(1, B + 1, dtype=F64)[:, None] * torch.ones(B, 3, dtype=F64)
    calls: list[dict] = []

    def f(z, *args, rows=None):
        k = args[-1]
        calls.append(
            {
                "k": k,
                "rows": None if rows is None else rows.tolist(),
                "z": z.clone(),
                "x": args[0] if with_x else None,
            }
        )
        return bp.f(z, rows=rows) if separable else bp.f(z)

    if not separable:
        f_call = (lambda z, x_, k: f(z, x_, k)) if with_x else (lambda z, k: f(z, k))
    else:
        f_call = f
    sol = fixed_point(
        f_call,
        bp.z0,
        cls(tol=1e-10, max_iter=200),
        x=x if with_x else None,
        indexed=True,
        separable=separable,
    )
    st = sol.stats
    assert st.all_converged
    assert [c["k"] for c in calls] == list(range(st.iterations))  # k = 0 for z0, then 1, 2, ...
    assert torch.equal(calls[0]["z"], bp.z0)
    if separable:
        seen = [list(range(B)) if c["rows"] is None else c["rows"] for c in calls]
        assert calls[0]["rows"] is None
        for c, r in zip(calls, seen):
            assert c["z"].shape == (len(r), D)
            if with_x:
                assert torch.equal(c["x"], x[r])
        for i in range(B):  # row i is passed in calls 0 .. nfe_i - 1 and never again once frozen
            assert [j for j, r in enumerate(seen) if i in r] == list(range(int(st.nfe[i])))
        assert st.rows_evaluated == sum(len(r) for r in seen)
        assert st.rows_evaluated == int(st.nfe.sum())
    else:
        for c in calls:
            assert c["rows"] is None and c["z"].shape == (B, D)
            if with_x:
                assert c["x"] is x
        assert st.rows_evaluated == B * st.iterations
        # a frozen row keeps its value: after row i stopped, f sees it at its final (returned) iterate
        for i in range(B):
            for c in calls[int(st.nfe[i]) :]:
                assert torch.equal(c["z"][i], sol.z[i]), (i, c["k"])


@pytest.mark.parametrize("cls", SOLVERS, ids=IDS)
def test_separable_rows_with_check_every(cls) -> None:
    # with check_every = 3, a finished row is still passed (frozen) until the next host check, never after
    B, ce = 5, 3
    bp = rowwise_tanh(B=B, D=8, seed=42)
    seen: list[list[int]] = []

    def f(z, rows=None):
        seen.append(list(range(B)) if rows is None else rows.tolist())
        return bp.f(z, rows=rows)

    sol = fixed_point(f, bp.z0, cls(tol=1e-10, max_iter=200, check_every=ce), separable=True)
    st = sol.stats
    for i in range(B):
        last = int(st.nfe[i]) - 1  # the evaluation at which row i finished
        check = min(math.ceil((last + 1) / ce) * ce - 1, st.iterations - 1)
        assert [j for j, r in enumerate(seen) if i in r] == list(range(check + 1)), i
    assert st.rows_evaluated == sum(len(r) for r in seen)


@pytest.mark.parametrize("cls", SOLVERS, ids=IDS)
@pytest.mark.parametrize("check_every", [1, 3])
def test_whole_batch_f_sees_frozen_rows_at_their_final_values(cls, check_every: int) -> None:
    # without separable=True, f gets all B rows every call; a finished row must keep the value it stopped at
    # (an iteration-keyed cache built inside f would otherwise store K/V of the wrong state for that row)
    B = 5
    bp = rowwise_tanh(B=B, D=8, seed=43)
    seen: list[torch.Tensor] = []

    def f(z):
        seen.append(z.clone())
        return bp.f(z)

    sol = fixed_point(f, bp.z0, cls(tol=1e-10, max_iter=200, check_every=check_every))
    assert sol.stats.all_converged and len(seen) == sol.stats.iterations
    assert len(set(sol.stats.nfe.tolist())) > 1
    for i in range(B):
        for k in range(int(sol.stats.nfe[i]), len(seen)):
            assert torch.equal(seen[k][i], sol.z[i]), (i, k)


# --------------------------------------------------------------------------------------------- max_iter


def _rising_map(z):
    """``g(z) = 0.1 + 0.1 (z - 1)^2 > 0``: no fixed point; Picard's residual falls until z passes 1, then
    rises."""
    return z + 0.1 + 0.1 * (z - 1) ** 2


@pytest.mark.parametrize("stop_mode", ["abs", "rel"])
def test_max_iter_returns_best_iterate_of_manual_picard_loop(stop_mode: str) -> None:
    z0 = torch.tensor([[-2.0, -2.0], [-0.5, -0.5], [0.3, 0.3]], dtype=F64)
    max_iter = 25
    sol = fixed_point(_rising_map, z0, Picard(tol=1e-3, stop_mode=stop_mode, max_iter=max_iter))
    for i in range(3):  # a manual Picard loop, best by the stop-mode residual (strictly lower wins)
        z = z0[i : i + 1]
        best, best_res, best_k, ress = None, math.inf, -1, []
        for k in range(max_iter):
            fz = _rising_map(z)
            a = float((fz - z).norm())
            r = a if stop_mode == "abs" else a / float(fz.norm())
            ress.append(r)
            if r < best_res:
                best, best_res, best_k, best_abs, best_rel = z, r, k, a, a / float(fz.norm())
            z = fz
        assert 0 < best_k < max_iter - 1 and ress[-1] > ress[best_k]  # residual went down, then up
        assert int(sol.stats.status[i]) == Status.MAX_ITER
        assert int(sol.stats.nfe[i]) == max_iter
        assert torch.equal(sol.z[i], best[0])
        assert math.isclose(float(sol.stats.abs_residual[i]), best_abs, rel_tol=1e-14)
        assert math.isclose(float(sol.stats.rel_residual[i]), best_rel, rel_tol=1e-14)
    assert sol.stats.iterations == max_iter
    with pytest.raises(SolverError, match="3 of 3 samples failed"):
        sol.raise_for_status()


@pytest.mark.parametrize("cls", SOLVERS, ids=IDS)
@pytest.mark.parametrize("check_every", [1, 4])
def test_max_iter_returns_lowest_residual_iterate_for_every_solver(cls, check_every: int) -> None:
    z0 = torch.tensor([[-2.0], [-0.5], [0.3]], dtype=F64)
    sol = fixed_point(
        _rising_map, z0, cls(tol=1e-3, stop_mode="abs", max_iter=25, check_every=check_every), trace=True
    )
    st = sol.stats
    assert st.status.tolist() == [Status.MAX_ITER] * 3 and st.nfe.tolist() == [25] * 3
    assert st.abs_trace.shape == (25, 3) and torch.isfinite(st.abs_trace).all()
    assert torch.equal(st.abs_residual, st.abs_trace.min(dim=0).values)
    abs_res, rel_res = _residuals(_rising_map, sol.z)
    assert torch.allclose(st.abs_residual, abs_res, rtol=1e-14, atol=0)
    assert torch.allclose(st.rel_residual, rel_res, rtol=1e-14, atol=0)


# ------------------------------------------------------------------------------------------- fixed budget


@pytest.mark.parametrize("cls", SOLVERS, ids=IDS)
@pytest.mark.parametrize("separable", [True, False], ids=["separable", "whole"])
def test_fixed_budget_mode(cls, separable: bool) -> None:
    bp = tanh_mlp(B=3, D=10)
    max_iter, calls = 7, []

    def f(z, rows=None):
        calls.append(z.shape[0])
        return bp.f(z, rows=rows)

    sol = fixed_point(
        f if separable else (lambda z: f(z)),
        bp.z0,
        cls(tol=None, max_iter=max_iter),
        separable=separable,
        throw=True,
    )  # BUDGET is not a failure
    st = sol.stats
    assert calls == [3] * max_iter and st.iterations == max_iter and st.rows_evaluated == 3 * max_iter
    assert st.status.tolist() == [Status.BUDGET] * 3 and st.nfe.tolist() == [max_iter] * 3
    if cls is Picard:
        zs = [bp.z0]
        for _ in range(max_iter):
            zs.append(bp.full(zs[-1]))
        assert torch.equal(sol.z, zs[max_iter])  # the step after the last evaluation
        abs_res, rel_res = _residuals(bp.full, zs[max_iter - 1])  # residuals of the last evaluated iterate
        assert torch.allclose(st.abs_residual, abs_res, rtol=1e-12, atol=0)
        assert torch.allclose(st.rel_residual, rel_res, rtol=1e-12, atol=0)


def test_fixed_budget_damped_picard_matches_manual_loop() -> None:
    bp = tanh_mlp(B=2, D=10)
    sol = fixed_point(bp.f, bp.z0, Picard(tol=None, max_iter=5, damping=0.3), separable=True)
    z = bp.z0
    for _ in range(5):
        z = z + 0.3 * (bp.full(z) - z)
    assert torch.allclose(sol.z, z, rtol=0, atol=1e-15)


@pytest.mark.parametrize("cls", SOLVERS, ids=IDS)
def test_fixed_budget_returns_the_step_after_the_last_evaluation(cls) -> None:
    a = torch.tensor([0.5, -0.7], dtype=F64)
    b = torch.randn(2, 6, generator=torch.Generator().manual_seed(5), dtype=F64)
    f = _scalar_linear(a, b)
    z0 = torch.zeros(2, 6, dtype=F64)

    def mk(n: int):
        return Anderson(tol=None, max_iter=n, lam=0.0) if cls is Anderson else cls(tol=None, max_iter=n)

    one = fixed_point(f, z0, mk(1), separable=True)
    assert torch.equal(one.z, f(z0))  # every solver's first step is a plain step
    two = fixed_point(f, z0, mk(2), separable=True)
    if cls is Picard:
        assert torch.equal(two.z, f(f(z0)))
    else:  # one secant step on a Jacobian a I lands on z* = b / (1 - a)
        assert torch.allclose(two.z, b / (1 - a[:, None]), rtol=0, atol=1e-14)
    assert two.stats.nfe.tolist() == [2, 2] and math.isclose(
        float(two.stats.abs_residual[0]), abs(0.5) * float(b[0].norm()), rel_tol=1e-12
    )  # residual of the last evaluated iterate z1 = b: ||a b + b - b|| = |a| ||b||


@pytest.mark.parametrize("cls", SOLVERS, ids=IDS)
def test_fixed_budget_freezes_non_finite_rows_only(cls) -> None:
    B, bad = 4, 1
    bp = rowwise_tanh(B=B, D=8, seed=51)

    def f(z, k, rows=None):
        out = bp.f(z, rows=rows)
        r = torch.arange(B) if rows is None else rows
        return torch.where((r == bad)[:, None], math.inf, out) if k >= 2 else out

    sol = fixed_point(f, bp.z0, cls(tol=None, max_iter=6), indexed=True, separable=True)
    ref = fixed_point(_only(bp.f, [0, 2, 3]), bp.z0[[0, 2, 3]], cls(tol=None, max_iter=6), separable=True)
    assert sol.stats.status.tolist() == [Status.BUDGET, Status.NON_FINITE, Status.BUDGET, Status.BUDGET]
    assert sol.stats.nfe.tolist() == [6, 3, 6, 6]
    assert torch.isfinite(sol.z).all()
    assert torch.equal(sol.z[[0, 2, 3]], ref.z)


# ------------------------------------------------------------------------------------------------ errors


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: Picard(tol=0.0), "tol=0.0"),
        (lambda: Anderson(tol=-1e-6), "tol=-1e-06"),
        (lambda: Broyden(tol=math.nan), "tol=nan"),
        (lambda: Picard(tol=math.inf), "tol=inf"),
        (lambda: Picard(tol="1e-4"), "tol='1e-4'"),
        (lambda: Picard(stop_mode="max"), "stop_mode='max'"),
        (lambda: Anderson(norm="l1"), "norm='l1'"),
        (lambda: Broyden(max_iter=0), "max_iter=0"),
        (lambda: Picard(max_iter=3.0), "max_iter=3.0"),
        (lambda: Picard(check_every=0), "check_every=0"),
        (lambda: Picard(damping=1.5), "damping=1.5"),
        (lambda: Anderson(m=0), "m=0"),
        (lambda: Anderson(beta=0.0), "beta=0.0"),
        (lambda: Anderson(beta=1.01), "beta=1.01"),
        (lambda: Anderson(lam=-1.0), "lam=-1.0"),
        (lambda: Broyden(memory=0), "memory=0"),
        (lambda: Broyden(step_size=0.0), "step_size=0.0"),
    ],
)
def test_bad_solver_values_raise_naming_the_field(make, match: str) -> None:
    with pytest.raises((ValueError, TypeError), match=match.replace("(", r"\(").replace(".", r"\.")):
        make()


def test_solvers_are_frozen() -> None:
    s = Anderson(m=3)
    with pytest.raises(AttributeError):
        s.m = 4  # type: ignore[misc]


def test_registry_get() -> None:
    with pytest.raises(ValueError, match=r"unknown solver 'nope'.*\['anderson', 'broyden', 'picard'\]"):
        solvers.get("nope")
    with pytest.raises(TypeError, match=r"\['mm'\]") as exc:
        solvers.get("anderson", mm=3)
    msg = str(exc.value)
    for opt in (
        "m",
        "lam",
        "beta",
        "restart_cond",
        "reject_ratio",
        "tol",
        "stop_mode",
        "norm",
        "max_iter",
        "check_every",
    ):
        assert f"'{opt}'" in msg, opt
    with pytest.raises(ValueError, match="m=0"):
        solvers.get("anderson", m=0)
    with pytest.raises(TypeError, match="damping"):
        solvers.get("broyden", damping=0.5)  # Picard's option, not Broyden's
    s = solvers.get("Broyden", memory=4, tol=1e-6)
    assert s == Broyden(memory=4, tol=1e-6)
    assert isinstance(solvers.get("picard"), Picard)


def test_f_returning_wrong_shape_or_dtype_raises_solver_error() -> None:
    z0 = torch.zeros(2, 3)
    expected = r"expected shape \(2, 3\), dtype torch\.float32; got shape \(2, 4\)"
    with pytest.raises(SolverError, match=expected):
        fixed_point(lambda z: torch.zeros(2, 4), z0)
    with pytest.raises(SolverError, match=r"got shape \(2, 3\), dtype torch\.float64"):
        fixed_point(lambda z: z.double(), z0)
    with pytest.raises(SolverError, match="got tuple"):
        fixed_point(lambda z: (z,), z0)

    def late(z, k):  # well-behaved until k = 2
        return (0.5 * z + 1) if k < 2 else (0.5 * z + 1)[:, :2]

    with pytest.raises(SolverError, match="k=2"):
        fixed_point(late, z0, Picard(tol=1e-12, max_iter=10), indexed=True)


def test_bad_problem_inputs() -> None:
    with pytest.raises(TypeError, match="floating point.*torch.int64"):
        fixed_point(lambda z: z, torch.zeros(2, 3, dtype=torch.int64))
    with pytest.raises(ValueError, match="non-empty batch"):
        fixed_point(lambda z: z, torch.zeros(0, 3))
    with pytest.raises(ValueError, match="non-empty batch"):
        fixed_point(lambda z: z, torch.tensor(1.0))
    with pytest.raises(TypeError, match="callable"):
        FixedPointProblem("f", torch.zeros(2, 3))
    with pytest.raises(TypeError, match="Solver"):
        fixed_point(lambda z: z, torch.zeros(2, 3), "anderson")


def test_throw_lists_failed_samples() -> None:
    a = torch.tensor([0.5, 1.05, 0.5, 1.2], dtype=F64)  # rows 1 and 3 expand: no convergence in 30 steps
    f = _scalar_linear(a, torch.ones(4, 2, dtype=F64))
    z0 = torch.zeros(4, 2, dtype=F64)
    with pytest.raises(SolverError) as exc:
        fixed_point(f, z0, Picard(tol=1e-6, max_iter=30), separable=True, throw=True)
    msg = str(exc.value)
    assert msg.startswith("2 of 4 samples failed")
    assert "sample 1: did not converge" in msg and "sample 3: did not converge" in msg
    assert "sample 0" not in msg and "sample 2" not in msg
    ok = fixed_point(_only(f, [0, 2]), z0[[0, 2]], Picard(tol=1e-6, max_iter=60), separable=True, throw=True)
    assert ok.stats.all_converged


# ------------------------------------------------------------------------------------------------ dtypes


@pytest.mark.parametrize("cls", SOLVERS, ids=IDS)
@pytest.mark.parametrize(
    "dtype",
    [torch.float16, torch.bfloat16, torch.float32, torch.float64],
    ids=["fp16", "bf16", "fp32", "fp64"],
)
def test_dtypes(cls, dtype: torch.dtype) -> None:
    half = dtype in (torch.float16, torch.bfloat16)
    tol = 1e-2 if half else (1e-5 if dtype == torch.float32 else 1e-8)
    bp = tanh_mlp(B=3, D=16, dtype=dtype)
    sol = fixed_point(bp.f, bp.z0, cls(tol=tol, max_iter=200), separable=True)
    assert sol.z.dtype == dtype and sol.z.shape == bp.z0.shape
    assert sol.stats.all_converged, sol.stats.summary()
    assert sol.stats.abs_residual.dtype == (F64 if dtype == F64 else torch.float32)
    # the returned iterate is near the float64 fixed point: re-measure on the float64 problem
    z = sol.z.double()
    _, rel = _residuals(tanh_mlp(B=3, D=16).full, z)
    assert bool((rel <= tol + 8 * torch.finfo(dtype).eps).all()), rel
    budget = fixed_point(bp.f, bp.z0, cls(tol=None, max_iter=5), separable=True)
    assert budget.z.dtype == dtype and bool((budget.stats.status == Status.BUDGET).all())


# ------------------------------------------------------------------------------------------------ traces


@pytest.mark.parametrize("cls", SOLVERS, ids=IDS)
@pytest.mark.parametrize("check_every", [1, 3])
def test_traces(cls, check_every: int) -> None:
    B = 5
    bp = rowwise_tanh(B=B, D=10, seed=61)
    sol = fixed_point(
        bp.f, bp.z0, cls(tol=1e-9, max_iter=200, check_every=check_every), separable=True, trace=True
    )
    st = sol.stats
    assert st.abs_trace.shape == st.rel_trace.shape == (st.iterations, B)
    assert st.abs_trace.dtype == F64
    for i in range(B):
        n = int(st.nfe[i])
        for tr, final in ((st.abs_trace, st.abs_residual), (st.rel_trace, st.rel_residual)):
            col = tr[:, i]
            assert torch.isfinite(col[:n]).all() and torch.isnan(col[n:]).all()
            assert int(st.status[i]) == Status.CONVERGED
            assert col[n - 1] == final[i]  # the last finite entry is the converged, returned iterate's
        assert float(st.rel_trace[n - 1, i]) <= 1e-9 < float(st.rel_trace[: n - 1, i].min())
    if cls is Picard:  # the trace is the residual sequence of a manual Picard loop
        z = bp.z0
        for k in range(st.iterations):
            abs_res, rel_res = _residuals(bp.full, z)
            live = k < st.nfe
            assert torch.allclose(st.abs_trace[k][live], abs_res[live], rtol=1e-12, atol=0)
            assert torch.allclose(st.rel_trace[k][live], rel_res[live], rtol=1e-12, atol=0)
            z = bp.full(z)
    no_trace = fixed_point(bp.f, bp.z0, cls(tol=1e-9, max_iter=200, check_every=check_every), separable=True)
    assert no_trace.stats.abs_trace is None and no_trace.stats.rel_trace is None
    assert torch.equal(no_trace.z, sol.z)


# ---------------------------------------------------------------------------------------------- doctests


@pytest.mark.parametrize(
    "module, has_examples",
    [
        ("deqgen.solvers", False),
        ("deqgen.solvers.base", False),
        ("deqgen.solvers.picard", True),
        ("deqgen.solvers.anderson", True),
        ("deqgen.solvers.broyden", True),
        ("deqgen.solve", True),
        ("deqgen.problem", True),
    ],
)
def test_solver_doctests(module: str, has_examples: bool) -> None:
    result = doctest.testmod(importlib.import_module(module), verbose=False, report=False)
    assert result.failed == 0
    if has_examples:
        assert result.attempted > 0


@pytest.mark.parametrize("cls", SOLVERS, ids=IDS)
def test_run_returns_the_structure_of_z0(cls) -> None:
    # a dict state {"a": (B, 2) float64, "b": (B, 3, 1) float32}: run() hands back the same keys, shapes and
    # dtypes, each leaf at the fixed point of its own linear map (a = 0.5 a + 1 -> 2, b = 0.25 b + 3 -> 4)
    z0 = {"a": torch.zeros(4, 2, dtype=F64), "b": torch.zeros(4, 3, 1)}

    def f(z):
        return {"a": 0.5 * z["a"] + 1.0, "b": 0.25 * z["b"] + 3.0}

    sol = solvers.run(FixedPointProblem(f, z0), cls(tol=1e-10, max_iter=200))
    assert isinstance(sol.z, dict) and set(sol.z) == {"a", "b"}
    assert sol.z["a"].shape == (4, 2) and sol.z["a"].dtype == F64
    assert sol.z["b"].shape == (4, 3, 1) and sol.z["b"].dtype == torch.float32
    assert torch.allclose(sol.z["a"], torch.full((4, 2), 2.0, dtype=F64), atol=1e-8)
    assert torch.allclose(sol.z["b"], torch.full((4, 3, 1), 4.0), atol=1e-5)
    same = fixed_point(f, z0, cls(tol=1e-10, max_iter=200))  # fixed_point returns the same structure
    assert torch.equal(same.z["a"], sol.z["a"]) and torch.equal(same.z["b"], sol.z["b"])
