"""Solver safeguards driven step by step, overflow handling, and CUDA checks (skipped without a GPU).

The main solver suite is ``tests/test_solvers.py``; this file holds what it does not cover."""

from __future__ import annotations

import doctest
import importlib
import math

import numpy as np
import pytest
import torch

from deqgen import Anderson, Broyden, FixedPointProblem, Picard, Status, fixed_point
from tests.problems import mixed, tanh_mlp

SOLVERS = [Picard, Anderson, Broyden]
F64 = torch.float64


def _scaled_norm(v: torch.Tensor) -> torch.Tensor:
    """l2 norm scaled by the largest entry: finite while the entries and the norm itself are."""
    peak = v.abs().max()
    return peak * torch.linalg.vector_norm(v / peak) if bool(torch.isfinite(peak)) else peak


@pytest.mark.parametrize("stop_mode", ["abs", "rel"])
def test_divergent_row_does_not_stall_the_batch(stop_mode: str) -> None:
    def f(z, rows=None):
        scale = torch.tensor([0.5, 3.0, 0.5])[slice(None) if rows is None else rows]
        return scale[:, None] * z + 1.0  # row 1 overflows to +inf after ~645 steps

    solver = Picard(tol=1e-10, max_iter=2000, stop_mode=stop_mode)
    sol = fixed_point(f, torch.zeros(3, 4, dtype=F64), solver, separable=True)
    assert sol.stats.status.tolist() == [Status.CONVERGED, Status.NON_FINITE, Status.CONVERGED]
    assert sol.stats.nfe[0] < 50 and torch.isfinite(sol.z).all()
    # row 1 stops at the first evaluation whose residual is not finite (manual Picard, same arithmetic)
    z, k = torch.zeros(1, 4, dtype=F64), 0
    while True:
        fz = 3.0 * z + 1.0
        g = _scaled_norm(fz - z)
        r = g / _scaled_norm(fz) if stop_mode == "rel" else g
        if not torch.isfinite(r):
            break
        z, k = fz, k + 1
    assert int(sol.stats.nfe[1]) == k + 1 < 2000
    assert torch.allclose(sol.z[0], torch.full((4,), 2.0, dtype=F64), atol=1e-9)


def test_solve_does_not_track_gradients() -> None:
    w = torch.tensor(0.5, requires_grad=True)
    sol = fixed_point(lambda z: w * z + 1, torch.zeros(2, 2), Anderson(tol=1e-6))
    assert not sol.z.requires_grad


def _drive(solver, zs: list[torch.Tensor], gs: list[torch.Tensor]):
    """Feed a solver a scripted sequence of (z, g) pairs; returns the list of proposed next iterates and the state."""
    state = solver.init(zs[0])
    outs = []
    for z, g in zip(zs, gs):
        z_next, state = solver.step(state, z, z + g, g, torch.linalg.vector_norm(g, dim=1))
        outs.append(z_next)
    return outs, state


def _anderson_trial(base_x, base_g, dX: list, dG: list, t: float) -> torch.Tensor:
    """Reference type-II Anderson trial from the base with lam = 0 (numpy least squares), step length t."""
    G = torch.stack(dG, 1).numpy()  # (D, n)
    gamma = torch.tensor(np.linalg.lstsq(G, base_g.numpy(), rcond=None)[0])
    C = torch.stack(dX, 1) + torch.stack(dG, 1)
    return base_x + t * (base_g - C @ gamma)


def test_anderson_rejected_step_keeps_its_base_learns_the_pair_and_backtracks() -> None:
    g = torch.Generator().manual_seed(0)
    z0, z1 = torch.randn(2, 6, generator=g, dtype=F64), torch.randn(2, 6, generator=g, dtype=F64)
    g0, g1 = torch.randn(2, 6, generator=g, dtype=F64), 0.5 * torch.randn(2, 6, generator=g, dtype=F64)
    solver = Anderson(lam=0.0, reject_ratio=2.0, shrink=0.5)
    outs, st = _drive(solver, [z0, z1], [g0, g1])
    z2 = outs[-1]
    # row 0: residual 100x larger at z2 -> rejected; row 1: smaller -> accepted
    g2 = torch.stack([100 * g1[0], 0.1 * g1[1]])
    z3, st3 = solver.step(st, z2, z2 + g2, g2, torch.linalg.vector_norm(g2, dim=1))
    assert torch.equal(st3.x_prev[0], z1[0]) and torch.equal(st3.x_prev[1], z2[1])
    assert st3.fails.tolist() == [1, 0] and st3.t.tolist() == [0.5, 1.0]
    assert st3.valid.sum(1).tolist() == [2, 2]  # the rejected trial's pair joined the history
    dX, dG = [z1[0] - z0[0], z2[0] - z1[0]], [g1[0] - g0[0], g2[0] - g1[0]]
    assert torch.allclose(z3[0], _anderson_trial(z1[0], g1[0], dX, dG, 0.5), rtol=0, atol=1e-10)
    dX, dG = [z1[1] - z0[1], z2[1] - z1[1]], [g1[1] - g0[1], g2[1] - g1[1]]
    assert torch.allclose(z3[1], _anderson_trial(z2[1], g2[1], dX, dG, 1.0), rtol=0, atol=1e-10)


def test_anderson_recovers_from_a_non_finite_trial() -> None:
    # the same map as for Broyden below: the first (plain) step lands at 16, where f is NaN; Anderson halves it
    def f(z):
        return torch.where(z.abs() > 3.0, math.nan, z + 8.0 * (2.0 - z))

    z0 = torch.zeros(1, 1, dtype=F64)
    sol = fixed_point(f, z0, Anderson(tol=1e-12, stop_mode="abs", max_iter=50), trace=True)
    assert int(sol.stats.status[0]) == Status.CONVERGED, sol.stats.summary()
    assert torch.isnan(sol.stats.abs_trace[1:4, 0]).all()
    assert abs(float(sol.z) - 2.0) < 1e-12 / 8


def test_broyden_rejected_step_learns_its_secant_pair_and_backtracks() -> None:
    g = torch.Generator().manual_seed(0)
    z0, z1 = torch.randn(2, 6, generator=g, dtype=F64), torch.randn(2, 6, generator=g, dtype=F64)
    g0, g1 = torch.randn(2, 6, generator=g, dtype=F64), 0.5 * torch.randn(2, 6, generator=g, dtype=F64)
    solver = Broyden(reject_ratio=2.0, shrink=0.5)
    outs, st = _drive(solver, [z0, z1], [g0, g1])
    z2 = outs[-1]
    # row 0: residual 100x larger at z2 -> rejected; row 1: smaller -> accepted
    g2 = torch.stack([100 * g1[0], 0.1 * g1[1]])
    z3, st3 = solver.step(st, z2, z2 + g2, g2, torch.linalg.vector_norm(g2, dim=1))
    assert torch.equal(st3.x_prev[0], z1[0]) and torch.equal(st3.x_prev[1], z2[1])
    assert st3.fails.tolist() == [1, 0] and st3.t.tolist() == [0.5, 1.0]
    # the rejected trial still taught the model: rebuild J^-1 ~ -I + sum u v^T and check the secant condition
    M = -torch.eye(6, dtype=F64) + torch.einsum("md,me->de", st3.U[0] * st3.valid[0, :, None], st3.V[0])
    assert torch.allclose(M @ (g2[0] - g1[0]), z2[0] - z1[0], rtol=0, atol=1e-12)
    # and the next trial is half a quasi-Newton step from the base with that model
    assert torch.allclose(z3[0], z1[0] - 0.5 * (M @ g1[0]), rtol=0, atol=1e-12)


def test_broyden_recovers_from_a_non_finite_trial() -> None:
    # F(z) = 8 (2 - z) with root 2, and f(z) = z + F(z) is NaN for |z| > 3. From z0 = 0 the plain first step
    # lands at 16 (NaN): Picard freezes the sample; Broyden halves the step, 16 -> 8 -> 4 (NaN) -> 2, the root.
    def f(z):
        return torch.where(z.abs() > 3.0, math.nan, z + 8.0 * (2.0 - z))

    z0 = torch.zeros(1, 1, dtype=F64)
    sol = fixed_point(f, z0, Broyden(tol=1e-12, stop_mode="abs", max_iter=50), trace=True)
    assert int(sol.stats.status[0]) == Status.CONVERGED, sol.stats.summary()
    assert torch.isnan(sol.stats.abs_trace[1:4, 0]).all() and int(sol.stats.nfe[0]) == 5
    assert torch.equal(sol.z, torch.full((1, 1), 2.0, dtype=F64))
    picard = fixed_point(f, z0, Picard(tol=1e-12, stop_mode="abs", max_iter=50))
    assert int(picard.stats.status[0]) == Status.NON_FINITE and int(picard.stats.nfe[0]) == 2


def test_anderson_keeps_only_the_newest_difference_when_ill_conditioned() -> None:
    # residual differences that are (nearly) parallel make the Gram matrix singular: the older one is dropped
    d = torch.randn(1, 8, dtype=F64, generator=torch.Generator().manual_seed(3))
    zs = [torch.zeros(1, 8, dtype=F64) + 0.1 * k * d for k in range(3)]
    gs = [d * (1.0 - 0.1 * k) + 1e-13 * k**2 for k in range(3)]
    solver = Anderson(m=5, lam=0.0, restart_cond=1e6, reject_ratio=math.inf)
    outs, st = _drive(solver, zs[:2], gs[:2])
    assert st.valid.sum().item() == 1  # one difference: well conditioned, kept
    outs, st = _drive(solver, zs, gs)
    assert st.valid.tolist() == [[False, True, False, False, False]]  # only the newest (slot 1) is left
    ref = _anderson_trial(zs[2][0], gs[2][0], [zs[2][0] - zs[1][0]], [gs[2][0] - gs[1][0]], 1.0)
    assert torch.allclose(outs[-1][0], ref, rtol=0, atol=1e-12)


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


def test_separable_problem_needs_tensor_injection() -> None:
    with pytest.raises(TypeError, match="x must be a batched tensor"):
        FixedPointProblem(lambda z, x, rows=None: z, torch.zeros(2, 3), x=(1, 2), separable=True)


@pytest.mark.parametrize("module", ["deqgen.layer", "deqgen.gradients"])
def test_doctests_outside_solvers(module: str) -> None:
    result = doctest.testmod(importlib.import_module(module), verbose=False)
    assert result.failed == 0
