"""The CPU shortcuts of the solver loop give bitwise the results of its general, sync-free path.

On CPU a host read is free, so the loop and the solvers read masks (``known_false``/``known_true``: no row
rejected, every row improved, every norm in range, every pivot well conditioned) and skip the passes that
would change nothing. On an accelerator, and while ``torch.compile`` traces, those reads answer "not known" and
the general path runs. Here the "not known" answers are forced on CPU and every solve is compared, bit for bit,
with the one that took the shortcuts: a shortcut that changed a single rounding would fail.
"""

from __future__ import annotations

import math

import pytest
import torch

from deqgen import Anderson, Broyden, Picard, fixed_point
from deqgen.solvers import anderson, broyden, numerics, rows, safeguards
from deqgen.solvers.numerics import residual_norms
from tests.problems import mixed, rowwise_tanh

F64 = torch.float64


def _general_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make every CPU shortcut answer "not known", as it does on an accelerator."""
    for module in (anderson, broyden, numerics, rows, safeguards):
        for name in ("known_false", "known_true"):
            if hasattr(module, name):
                monkeypatch.setattr(module, name, lambda mask: False)
    monkeypatch.setattr(numerics, "_known_within", lambda n, low: False)
    monkeypatch.setattr(anderson, "_known_well_conditioned", lambda pivots, info, cond: False)


def _solve_both(monkeypatch: pytest.MonkeyPatch, solve):
    fast = solve()
    with monkeypatch.context() as m:
        _general_path(m)
        general = solve()
    return fast, general


def _assert_same(fast, general) -> None:
    assert torch.equal(fast.z, general.z)
    assert torch.equal(fast.stats.nfe, general.stats.nfe)
    assert torch.equal(fast.stats.status, general.stats.status)
    assert torch.equal(fast.stats.abs_residual, general.stats.abs_residual)
    assert torch.equal(fast.stats.rel_residual, general.stats.rel_residual)
    for a, b in (
        (fast.stats.abs_trace, general.stats.abs_trace),
        (fast.stats.rel_trace, general.stats.rel_trace),
    ):
        torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)  # NaN where a row was not evaluated
    assert fast.stats.rows_evaluated == general.stats.rows_evaluated


@pytest.mark.parametrize("cls", [Picard, Anderson, Broyden], ids=["picard", "anderson", "broyden"])
@pytest.mark.parametrize("dtype", [torch.float32, F64], ids=["f32", "f64"])
def test_shortcuts_change_no_bit_on_a_contraction(monkeypatch: pytest.MonkeyPatch, cls, dtype) -> None:
    bp = mixed(B=12, D=48, dtype=dtype)
    solver = cls(tol=1e-6 if dtype == torch.float32 else 1e-11, max_iter=bp.max_iter)
    fast, general = _solve_both(
        monkeypatch, lambda: fixed_point(bp.f, bp.z0, solver, separable=True, trace=True)
    )
    assert fast.stats.all_converged
    assert len(set(fast.stats.nfe.tolist())) > 2  # rows leave the working set at different iterations
    _assert_same(fast, general)


def _rising_map(z: torch.Tensor, rows=None) -> torch.Tensor:
    """No fixed point and a residual that grows along the secant direction: steps get rejected."""
    return z + 1.0 + 0.5 * z.square()


@pytest.mark.parametrize("cls", [Anderson, Broyden], ids=["anderson", "broyden"])
def test_shortcuts_change_no_bit_when_steps_are_rejected(monkeypatch: pytest.MonkeyPatch, cls) -> None:
    # rejections on some rows and full steps on others, then restarts: the mixed case of every shortcut
    z0 = torch.tensor([[-2.0, 0.7], [-0.5, 2.0], [0.3, -1.0], [1.5, 0.0]], dtype=F64)
    solver = cls(tol=1e-3, stop_mode="abs", max_iter=25, reject_ratio=1.0)
    fast, general = _solve_both(
        monkeypatch, lambda: fixed_point(_rising_map, z0, solver, separable=True, trace=True)
    )
    _assert_same(fast, general)


def test_anderson_shortcuts_with_restarts_and_a_small_memory(monkeypatch: pytest.MonkeyPatch) -> None:
    # m = 2 fills the ring at once (the 'every slot valid' shortcut); restart_cond = 10 forces restarts
    bp = rowwise_tanh(B=6, D=16, dtype=F64)
    solver = Anderson(m=2, restart_cond=10.0, tol=1e-12, max_iter=200)
    fast, general = _solve_both(
        monkeypatch, lambda: fixed_point(bp.f, bp.z0, solver, separable=True, trace=True)
    )
    assert fast.stats.all_converged
    _assert_same(fast, general)


@pytest.mark.parametrize("dtype", [torch.float32, F64], ids=["f32", "f64"])
@pytest.mark.parametrize("ord", [2.0, math.inf], ids=["l2", "inf"])
def test_residual_norms_of_a_row_do_not_depend_on_the_other_rows(dtype, ord: float) -> None:
    # the one-division shortcut holds only when every norm of the batch is in range; a row with a huge, a tiny
    # or a zero f(z) sends the whole batch down the general path, which must give the other rows the same bits
    g = torch.Generator().manual_seed(0)
    fz = torch.randn(5, 32, generator=g, dtype=dtype)
    z = fz + 1e-3 * torch.randn(5, 32, generator=g, dtype=dtype)
    ref = residual_norms(fz - z, fz, ord, dtype)
    info = torch.finfo(dtype)
    odd_rows = [info.max / 2, info.tiny / 4, 0.0, math.inf]  # overflowing l2 norm, subnormal, zero, infinite
    general = 0
    for value in odd_rows:
        fz2 = torch.cat([fz, torch.full((1, 32), value, dtype=dtype)])
        z2 = torch.cat([z, torch.zeros(1, 32, dtype=dtype)])
        abs_, rel, finite = residual_norms(fz2 - z2, fz2, ord, dtype)
        assert torch.equal(abs_[:5], ref[0]) and torch.equal(rel[:5], ref[1])
        if finite is not None:  # the general path: finiteness per row
            general += 1
            assert bool(finite[:5].all())
    assert ref[2] is None  # the shortcut: every row known to be finite
    assert general >= 2  # and the odd rows did send the batch down the general path
