"""Solvers and the run loop, checked against exact solutions, manual loops and scipy."""

from __future__ import annotations

import doctest
import importlib
import math

import numpy as np
import pytest
import torch

from deqgen import (
    Anderson,
    Broyden,
    FixedPointProblem,
    Picard,
    SolverError,
    Status,
    fixed_point,
    run,
    solvers,
)
from tests.problems import attention, linear, mixed, tanh_mlp

SOLVERS = [Picard, Anderson, Broyden]
F64 = torch.float64


def _rowwise_map(B: int, D: int, seed: int, spread: tuple[float, float] = (0.3, 0.95)):
    """Per-row contraction tanh(c_b * W_b z_b + x_b) built from per-row ops only (bmm, elementwise), so every
    row's arithmetic is bitwise independent of which other rows are in the batch."""
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(B, D, D, generator=g, dtype=F64)
    W = W / torch.linalg.matrix_norm(W, 2)[:, None, None]
    c = torch.linspace(*spread, B, dtype=F64)[torch.randperm(B, generator=g)]
    x = torch.randn(B, D, generator=g, dtype=F64)

    def f(z, rows=None):
        idx = slice(None) if rows is None else rows
        return torch.tanh(c[idx, None] * torch.bmm(W[idx], z.unsqueeze(-1)).squeeze(-1) + x[idx])

    return f


# ---------------------------------------------------------------- accuracy against independent references


@pytest.mark.parametrize("cls", SOLVERS)
def test_linear_exact_solution_float64(cls) -> None:
    bp = linear(B=6, D=24)
    sol = run(FixedPointProblem(bp.f, bp.z0, separable=True), cls(tol=1e-12, stop_mode="abs", max_iter=400))
    assert sol.stats.all_converged
    # ||z - z*|| <= ||f(z) - z|| / (1 - ||A||) for a contraction with ||A|| = 0.9
    err = (sol.z - bp.exact).norm(dim=1)
    assert bool((err <= 1e-12 / (1 - 0.9) * 1.001).all()), err.max()
    resid = (bp.f(sol.z) - sol.z).norm(dim=1)
    assert torch.allclose(resid, sol.stats.abs_residual, rtol=1e-6, atol=1e-14)  # rounding of f on a subset


@pytest.mark.parametrize("cls", SOLVERS)
@pytest.mark.parametrize(
    "make",
    [
        lambda: tanh_mlp(B=5, D=40),
        lambda: mixed(B=7, D=40),
        lambda: attention(B=2, L=8, C=16, heads=2),
    ],
    ids=["tanh_mlp", "mixed", "attention"],
)
def test_converges_on_problem_bank(cls, make) -> None:
    bp = make()
    sol = run(FixedPointProblem(bp.f, bp.z0, separable=True), cls(tol=1e-9, max_iter=300))
    assert sol.stats.all_converged, sol.stats.summary()
    fz = bp.full(sol.z).flatten(1)
    rel = (fz - sol.z.flatten(1)).norm(dim=1) / fz.norm(dim=1)
    assert bool((rel <= 1e-9).all())
    assert torch.allclose(rel, sol.stats.rel_residual, rtol=1e-6, atol=0)


@pytest.mark.parametrize("cls", SOLVERS)
def test_agrees_with_scipy(cls) -> None:
    scipy_opt = pytest.importorskip("scipy.optimize")
    bp = tanh_mlp(B=1, D=16, seed=7)

    def g_np(v: np.ndarray) -> np.ndarray:
        z = torch.from_numpy(v).reshape(1, -1)
        return (bp.full(z) - z).numpy().ravel()

    ref = scipy_opt.root(g_np, np.zeros(16), method="hybr", tol=1e-14).x
    sol = fixed_point(bp.f, bp.z0, cls(tol=1e-13, stop_mode="abs", max_iter=500), separable=True)
    assert np.allclose(sol.z.numpy().ravel(), ref, rtol=0, atol=1e-11)


# ---------------------------------------------------------------- per-sample semantics


@pytest.mark.parametrize("cls", SOLVERS)
@pytest.mark.parametrize("separable", [True, False])
@pytest.mark.parametrize("check_every", [1, 3])
def test_batch_invariance(cls, separable: bool, check_every: int) -> None:
    B, D = 6, 20
    f = _rowwise_map(B, D, seed=3)
    solver = cls(tol=1e-11, max_iter=300, check_every=check_every)
    z0 = torch.zeros(B, D, dtype=F64)
    full = run(FixedPointProblem(f if separable else (lambda z: f(z)), z0, separable=separable), solver)
    assert full.stats.all_converged
    nfe = set()
    for i in range(B):
        row = torch.tensor([i])
        alone = run(FixedPointProblem(lambda z, rows=None, r=row: f(z, rows=r), z0[i : i + 1], separable=True),
                    cls(tol=1e-11, max_iter=300))
        assert (alone.z - full.z[i : i + 1]).abs().max() <= 1e-10
        assert int(alone.stats.nfe[0]) == int(full.stats.nfe[i])
        nfe.add(int(alone.stats.nfe[0]))
    assert len(nfe) > 1  # the rows really need different iteration counts


@pytest.mark.parametrize("cls", SOLVERS)
@pytest.mark.parametrize("separable", [True, False])
def test_nan_row_is_frozen_and_leaves_other_rows_bit_identical(cls, separable: bool) -> None:
    B, D, bad = 5, 12, 2
    f = _rowwise_map(B, D, seed=4)

    def f_nan(z, rows=None):
        out = f(z, rows=rows)
        r = torch.arange(B) if rows is None else rows
        return torch.where((r == bad)[:, None], torch.full_like(out, math.nan), out)

    z0 = torch.zeros(B, D, dtype=F64)
    keep = [i for i in range(B) if i != bad]
    solver = cls(tol=1e-10, max_iter=200)
    with_nan = run(FixedPointProblem(f_nan if separable else (lambda z: f_nan(z)), z0, separable=separable), solver)
    # reference: the same rows without the bad one, solved with the same arithmetic per row
    fk = _rowwise_map(B, D, seed=4)
    ref = run(
        FixedPointProblem(lambda z, rows=None: fk(z, rows=torch.tensor(keep) if rows is None else torch.tensor(keep)[rows]),
                          z0[keep], separable=True),
        solver,
    )
    assert int(with_nan.stats.status[bad]) == Status.NON_FINITE
    assert torch.isfinite(with_nan.z).all()
    assert torch.equal(with_nan.z[keep], ref.z)
    assert torch.equal(with_nan.stats.nfe[keep], ref.stats.nfe)
    assert bool((with_nan.stats.status[keep] == Status.CONVERGED).all())


@pytest.mark.parametrize("stop_mode", ["abs", "rel"])
def test_divergent_row_does_not_stall_the_batch(stop_mode: str) -> None:
    def f(z, rows=None):
        scale = torch.tensor([0.5, 3.0, 0.5])[slice(None) if rows is None else rows]
        return scale[:, None] * z + 1.0  # row 1 overflows to +inf after ~650 steps

    solver = Picard(tol=1e-10, max_iter=2000, stop_mode=stop_mode)
    sol = fixed_point(f, torch.zeros(3, 4, dtype=F64), solver, separable=True)
    assert sol.stats.status.tolist() == [Status.CONVERGED, Status.NON_FINITE, Status.CONVERGED]
    assert sol.stats.nfe[0] < 50 and torch.isfinite(sol.z).all()
    # row 1 stops at the first evaluation whose residual is not finite (manual Picard, same arithmetic)
    z, k = torch.zeros(1, 4, dtype=F64), 0
    while True:
        fz = 3.0 * z + 1.0
        g = torch.linalg.vector_norm(fz - z)
        r = g / torch.linalg.vector_norm(fz) if stop_mode == "rel" else g
        if not torch.isfinite(r):
            break
        z, k = fz, k + 1
    assert int(sol.stats.nfe[1]) == k + 1 < 2000
    assert torch.allclose(sol.z[0], torch.full((4,), 2.0, dtype=F64), atol=1e-9)


def test_abs_and_rel_stopping_follow_their_definitions() -> None:
    # f(z) = 0.5 z + b with a large b: rel residual ||g||/||f(z)|| is far below abs residual ||g||
    b = torch.full((1, 8), 1000.0, dtype=F64)

    def f(z):
        return 0.5 * z + b

    z0 = torch.zeros(1, 8, dtype=F64)
    s_abs = fixed_point(f, z0, Picard(tol=1e-3, stop_mode="abs", max_iter=200))
    s_rel = fixed_point(f, z0, Picard(tol=1e-3, stop_mode="rel", max_iter=200))
    # closed form: z_k = 2b (1 - 0.5^k), g_k = 0.5^k b, ||g_k|| = 0.5^k ||b||; k starts at 0
    nb = float(b.norm())
    k_abs = math.ceil(math.log2(nb / 1e-3))
    k_rel = next(k for k in range(200) if 0.5**k * nb / (2 * nb * (1 - 0.5 ** (k + 1))) <= 1e-3)
    assert int(s_abs.stats.nfe) == k_abs + 1 and int(s_rel.stats.nfe) == k_rel + 1
    for s in (s_abs, s_rel):
        fz = f(s.z)
        assert torch.allclose(s.stats.abs_residual, (fz - s.z).norm(dim=1), rtol=1e-12)
        assert torch.allclose(s.stats.rel_residual, (fz - s.z).norm(dim=1) / fz.norm(dim=1), rtol=1e-12)
    s_inf = fixed_point(f, z0, Picard(tol=1e-3, stop_mode="abs", norm="inf", max_iter=200))
    assert torch.allclose(s_inf.stats.abs_residual, (f(s_inf.z) - s_inf.z).abs().amax(dim=1), rtol=1e-12)


@pytest.mark.parametrize("cls", SOLVERS)
@pytest.mark.parametrize("with_x", [False, True])
def test_indexed_f_receives_iteration_numbers_and_rows(cls, with_x: bool) -> None:
    B, D = 4, 6
    f_row = _rowwise_map(B, D, seed=5)
    calls: list[tuple[int, list[int] | None]] = []
    x = torch.arange(B, dtype=F64)[:, None] * torch.ones(B, D, dtype=F64)

    def f(z, *args, rows=None):
        k = args[-1]
        if with_x:
            xr = args[0]
            expect = x if rows is None else x[rows]
            assert torch.equal(xr, expect)
        calls.append((k, None if rows is None else rows.tolist()))
        return f_row(z, rows=rows)

    sol = run(
        FixedPointProblem(f, torch.zeros(B, D, dtype=F64), x=x if with_x else None, indexed=True, separable=True),
        cls(tol=1e-10, max_iter=200),
    )
    assert [k for k, _ in calls] == list(range(len(calls)))  # k = 0, 1, 2, ...
    assert calls[0][1] is None  # all rows at first
    seen_rows = [list(range(B)) if r is None else r for _, r in calls]
    for i in range(B):  # a row is passed exactly nfe times, and never after it stopped
        passes = [j for j, r in enumerate(seen_rows) if i in r]
        assert len(passes) == int(sol.stats.nfe[i]) and passes == list(range(len(passes)))
    assert sol.stats.rows_evaluated == sum(len(r) for r in seen_rows)
    assert sol.stats.iterations == len(calls)


def test_max_iter_returns_best_iterate() -> None:
    # A map whose Picard residual falls, then grows: f(z) = z + step(k) with step shrinking then growing.
    steps = [8.0, 4.0, 2.0, 1.0, 0.5, 1.0, 2.0, 4.0]

    def f(z, k):
        return z + steps[k]

    z0 = torch.zeros(1, 1, dtype=F64)
    sol = run(FixedPointProblem(f, z0, indexed=True), Picard(tol=1e-3, stop_mode="abs", max_iter=len(steps)))
    # manual Picard: z_{k+1} = f(z_k, k); residual at z_k is steps[k]; best is k = 4
    z, best_z, best_r = 0.0, None, math.inf
    for k, s in enumerate(steps):
        if s < best_r:
            best_z, best_r = z, s
        z = z + s
    assert int(sol.stats.status[0]) == Status.MAX_ITER
    assert float(sol.z) == best_z and float(sol.stats.abs_residual) == best_r
    assert int(sol.stats.nfe[0]) == len(steps)
    with pytest.raises(SolverError, match="sample 0"):
        sol.raise_for_status()


@pytest.mark.parametrize("cls", SOLVERS)
def test_fixed_budget_mode(cls) -> None:
    bp = tanh_mlp(B=3, D=10)
    calls = []

    def f(z):
        calls.append(1)
        return bp.full(z)

    sol = fixed_point(f, bp.z0, cls(tol=None, max_iter=7))
    assert len(calls) == 7 and sol.stats.iterations == 7
    assert bool((sol.stats.status == Status.BUDGET).all()) and sol.stats.nfe.tolist() == [7, 7, 7]
    if cls is Picard:
        z = bp.z0
        for _ in range(7):
            z = bp.full(z)
        assert torch.equal(sol.z, z)
        # residuals are those of the last evaluated iterate z_6
        z6 = bp.z0
        for _ in range(6):
            z6 = bp.full(z6)
        assert torch.allclose(sol.stats.abs_residual, (bp.full(z6) - z6).norm(dim=1), rtol=1e-12)
    sol.raise_for_status()  # BUDGET is not a failure


def test_fixed_budget_freezes_non_finite_rows() -> None:
    def f(z):
        out = 0.5 * z + 1
        out[1] = math.inf
        return out

    sol = fixed_point(f, torch.zeros(3, 2, dtype=F64), Picard(tol=None, max_iter=5))
    assert sol.stats.status.tolist() == [Status.BUDGET, Status.NON_FINITE, Status.BUDGET]
    assert sol.stats.nfe.tolist() == [5, 1, 5] and torch.isfinite(sol.z).all()


@pytest.mark.parametrize("cls", SOLVERS)
def test_check_every_does_not_change_results(cls) -> None:
    bp = mixed(B=6, D=24)
    a = fixed_point(bp.f, bp.z0, cls(tol=1e-8, max_iter=300), separable=True)
    b = fixed_point(bp.f, bp.z0, cls(tol=1e-8, max_iter=300, check_every=4), separable=True)
    assert torch.equal(a.stats.nfe, b.stats.nfe) and torch.equal(a.stats.status, b.stats.status)
    assert (a.z - b.z).abs().max() <= 1e-12
    assert b.stats.rows_evaluated >= a.stats.rows_evaluated  # finished rows wait for the next check


def test_traces_are_unpadded() -> None:
    bp = mixed(B=5, D=16)
    sol = fixed_point(bp.f, bp.z0, Anderson(tol=1e-8, max_iter=200), separable=True, trace=True)
    st = sol.stats
    assert st.abs_trace.shape == st.rel_trace.shape == (st.iterations, 5)
    for i in range(5):
        n = int(st.nfe[i])
        col = st.rel_trace[:, i]
        assert torch.isfinite(col[:n]).all() and torch.isnan(col[n:]).all()
        assert col[n - 1] == st.rel_residual[i]  # converged: the last evaluation is the returned iterate


# ---------------------------------------------------------------- dtypes


@pytest.mark.parametrize("cls", SOLVERS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_dtypes(cls, dtype: torch.dtype) -> None:
    bp = tanh_mlp(B=3, D=16, dtype=dtype)
    tol = 2e-2 if dtype in (torch.float16, torch.bfloat16) else 1e-5
    sol = fixed_point(bp.f, bp.z0, cls(tol=tol, max_iter=100), separable=True)
    assert sol.z.dtype == dtype and sol.stats.all_converged
    # re-measure the residual of the returned iterate in float64 on the float64 problem
    f64 = tanh_mlp(B=3, D=16).full
    z = sol.z.double()
    fz = f64(z)
    rel = (fz - z).norm(dim=1) / fz.norm(dim=1)
    rounding = 2 * torch.finfo(dtype).eps  # storing z in `dtype` perturbs it by this much relative
    assert bool((rel <= tol + 4 * rounding).all()), rel


# ---------------------------------------------------------------- errors


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: Picard(tol=0.0), "tol"),
        (lambda: Picard(tol=-1e-3), "tol"),
        (lambda: Picard(tol=math.nan), "tol"),
        (lambda: Picard(tol="1e-3"), "tol"),
        (lambda: Picard(stop_mode="max"), "stop_mode"),
        (lambda: Picard(norm="l1"), "norm"),
        (lambda: Picard(max_iter=0), "max_iter"),
        (lambda: Picard(max_iter=2.5), "max_iter"),
        (lambda: Picard(check_every=0), "check_every"),
        (lambda: Picard(damping=0.0), "damping"),
        (lambda: Anderson(m=0), "m=0"),
        (lambda: Anderson(beta=1.5), "beta"),
        (lambda: Anderson(lam=-1.0), "lam"),
        (lambda: Anderson(restart_cond=0.5), "restart_cond"),
        (lambda: Broyden(memory=0), "memory"),
        (lambda: Broyden(step_size=2.0), "step_size"),
    ],
)
def test_bad_solver_values_are_named(make, match: str) -> None:
    with pytest.raises((ValueError, TypeError), match=match):
        make()


def test_registry_errors_name_the_key() -> None:
    with pytest.raises(ValueError, match="unknown solver 'nope'.*anderson"):
        solvers.get("nope")
    with pytest.raises(TypeError, match=r"\['mm'\].*valid options.*'m'"):
        solvers.get("anderson", mm=3)
    s = solvers.get("Anderson", m=3, tol=1e-6)
    assert isinstance(s, Anderson) and s.m == 3 and s.tol == 1e-6
    assert "memory" in solvers.options("broyden")


def test_f_returning_wrong_shape_or_dtype() -> None:
    z0 = torch.zeros(2, 3)
    with pytest.raises(SolverError, match=r"expected shape \(2, 3\).*got shape \(2, 4\)"):
        fixed_point(lambda z: torch.zeros(2, 4), z0)
    with pytest.raises(SolverError, match="dtype torch.float64"):
        fixed_point(lambda z: z.double(), z0)
    with pytest.raises(SolverError, match="got list"):
        fixed_point(lambda z: [z], z0)


def test_bad_problem_inputs() -> None:
    with pytest.raises(TypeError, match="floating"):
        FixedPointProblem(lambda z: z, torch.zeros(2, 3, dtype=torch.int64))
    with pytest.raises(ValueError, match="batch"):
        FixedPointProblem(lambda z: z, torch.zeros(0, 3))
    with pytest.raises(TypeError, match="callable"):
        FixedPointProblem(3, torch.zeros(2, 3))
    with pytest.raises(ValueError, match="x has shape"):
        FixedPointProblem(lambda z, x, rows=None: z, torch.zeros(2, 3), x=torch.zeros(5, 3), separable=True)
    with pytest.raises(TypeError, match="x must be a batched tensor"):
        FixedPointProblem(lambda z, x, rows=None: z, torch.zeros(2, 3), x=(1, 2), separable=True)
    with pytest.raises(TypeError, match="Solver"):
        run(FixedPointProblem(lambda z: z, torch.zeros(2, 3)), "anderson")


def test_throw_lists_failed_samples() -> None:
    def f(z):
        return torch.cat([0.5 * z[:1] + 1, 1.1 * z[1:] + 1])  # row 1 diverges slowly: max_iter

    with pytest.raises(SolverError, match=r"1 of 2 samples failed:\n  sample 1: did not converge"):
        fixed_point(f, torch.zeros(2, 3, dtype=F64), Picard(tol=1e-8, max_iter=60), throw=True)


def test_solve_does_not_track_gradients() -> None:
    w = torch.tensor(0.5, requires_grad=True)
    sol = fixed_point(lambda z: w * z + 1, torch.zeros(2, 2), Anderson(tol=1e-6))
    assert not sol.z.requires_grad


# ---------------------------------------------------------------- doctests


@pytest.mark.parametrize(
    "module",
    ["deqgen.problem", "deqgen.solve", "deqgen.solvers.picard", "deqgen.solvers.anderson", "deqgen.solvers.broyden",
     "deqgen.layer"],
)
def test_doctests(module: str) -> None:
    result = doctest.testmod(importlib.import_module(module), verbose=False)
    assert result.attempted > 0 and result.failed == 0


# ---------------------------------------------------------------- safeguards, driven step by step


def _drive(solver, zs: list[torch.Tensor], gs: list[torch.Tensor]):
    """Feed a solver a scripted sequence of (z, g) pairs; returns the list of proposed next iterates and the state."""
    state = solver.init(zs[0])
    outs = []
    for z, g in zip(zs, gs):
        z_next, state = solver.step(state, z, z + g, g, torch.linalg.vector_norm(g, dim=1))
        outs.append(z_next)
    return outs, state


@pytest.mark.parametrize("cls", [Anderson, Broyden])
def test_rejected_step_returns_to_previous_iterate(cls) -> None:
    g = torch.Generator().manual_seed(0)
    z0, z1 = torch.randn(2, 6, generator=g, dtype=F64), torch.randn(2, 6, generator=g, dtype=F64)
    g0, g1 = torch.randn(2, 6, generator=g, dtype=F64), 0.5 * torch.randn(2, 6, generator=g, dtype=F64)
    outs, st = _drive(cls(reject_ratio=2.0), [z0, z1], [g0, g1])
    assert bool(st.accelerated.all())  # the step from z1 used the history
    z2 = outs[-1]
    # row 0: residual 100x larger at z2 -> rejected; row 1: smaller -> accepted
    g2 = torch.stack([100 * g1[0], 0.1 * g1[1]])
    z3, st3 = cls(reject_ratio=2.0).step(st, z2, z2 + g2, g2, torch.linalg.vector_norm(g2, dim=1))
    step_size = 1.0
    assert torch.allclose(z3[0], z1[0] + step_size * g1[0], rtol=0, atol=1e-14)  # plain step from z1
    assert not bool(st3.valid[0].any()) and not bool(st3.accelerated[0])  # history cleared
    assert bool(st3.valid[1].any())
    assert torch.equal(st3.x_prev[0], z1[0]) and torch.equal(st3.x_prev[1], z2[1])


def test_anderson_restarts_on_ill_conditioned_history() -> None:
    # residual differences that are (nearly) parallel make the Gram matrix singular -> restart
    d = torch.randn(1, 8, dtype=F64)
    zs = [torch.zeros(1, 8, dtype=F64) + 0.1 * k * d for k in range(3)]
    gs = [d * (1.0 - 0.1 * k) + 1e-13 * k**2 for k in range(3)]
    solver = Anderson(m=5, restart_cond=1e6, reject_ratio=math.inf)
    outs, st = _drive(solver, zs[:2], gs[:2])
    assert bool(st.valid.any())  # one difference: well conditioned, kept
    outs, st = _drive(solver, zs, gs)
    assert not bool(st.valid.any())  # the second, parallel difference: restart
    assert torch.allclose(outs[-1], zs[-1] + gs[-1], rtol=0, atol=1e-14)  # the plain step


@pytest.mark.parametrize("cls", [Anderson, Broyden])
def test_rejections_keep_batch_invariance(cls) -> None:
    # reject_ratio=1 rejects every accelerated step that raises the residual at all: exercise that path
    B, D = 5, 16
    f = _rowwise_map(B, D, seed=8, spread=(0.8, 0.99))
    solver = cls(tol=1e-10, max_iter=400, reject_ratio=1.0)
    z0 = torch.zeros(B, D, dtype=F64)
    full = run(FixedPointProblem(f, z0, separable=True), solver)
    assert full.stats.all_converged
    for i in range(B):
        r = torch.tensor([i])
        alone = run(FixedPointProblem(lambda z, rows=None, r=r: f(z, rows=r), z0[i : i + 1], separable=True), solver)
        assert (alone.z - full.z[i : i + 1]).abs().max() <= 1e-10 and int(alone.stats.nfe[0]) == int(full.stats.nfe[i])


# ---------------------------------------------------------------- CUDA (skipped without a GPU)


@pytest.mark.gpu
@pytest.mark.parametrize("cls", SOLVERS)
def test_cuda_fixed_budget_makes_no_host_sync(cls) -> None:
    bp = tanh_mlp(B=4, D=32, dtype=torch.float32)
    z0 = bp.z0.cuda()
    W = torch.randn(32, 32, device="cuda") * 0.1
    fixed_point(lambda z: torch.tanh(z @ W), z0, cls(tol=None, max_iter=3))  # warm-up (allocations, kernels)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        sol = fixed_point(lambda z: torch.tanh(z @ W), z0, cls(tol=None, max_iter=10))
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert sol.z.is_cuda and bool((sol.stats.status == Status.BUDGET).all())


@pytest.mark.gpu
@pytest.mark.parametrize("cls", SOLVERS)
def test_cuda_matches_cpu(cls) -> None:
    bp = mixed(B=6, D=24)
    cpu = fixed_point(bp.f, bp.z0, cls(tol=1e-10, max_iter=300), separable=True)
    f_cuda = mixed(B=6, D=24)

    def f(z, rows=None):
        return f_cuda.f(z.cpu(), rows=None if rows is None else rows.cpu()).cuda()

    gpu = fixed_point(f, bp.z0.cuda(), cls(tol=1e-10, max_iter=300), separable=True)
    assert torch.equal(gpu.stats.nfe.cpu(), cpu.stats.nfe) and (gpu.z.cpu() - cpu.z).abs().max() < 1e-9
