"""Gradient methods and ImplicitLayer (float64, tiny sizes).

Expected values come from outside the code under test: dense implicit-function-theorem gradients built from
``torch.linalg.solve`` on explicit Jacobians, closed-form derivatives of ``tanh``, central finite
differences, long unrolls and ``torch.autograd.gradcheck``.
"""

from __future__ import annotations

import doctest
import importlib
import logging
import threading
from collections.abc import Iterator

import pytest
import torch
from torch import Tensor, nn

from deqgen import Anderson, Broyden, Picard, SolverError, Status
from deqgen.gradients import (
    JFB,
    ROUNDING_FLOOR,
    SJFB,
    BackwardStatsRecorder,
    GradInfo,
    ImplicitDiff,
    Phantom,
    Unrolled,
    get,
    options,
)
from deqgen.layer import ImplicitLayer, implicit_solve

F64 = torch.float64
B, D = 3, 5
CONTRACTION = 0.6


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    # The CI box has 2 shared cores: multi-threaded LAPACK calls on tiny matrices (Anderson's Cholesky) then
    # spin for ~10 ms each. One thread makes these tests ~6x faster and changes no result.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


class Cell(nn.Module):
    """f(z, x, k) = tanh(W z + U x + b) with ||W||_2 = CONTRACTION; records each call's (k, grad enabled)."""

    def __init__(self, seed: int = 0, d: int = D, dtype: torch.dtype = F64) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        W = torch.randn(d, d, generator=g, dtype=F64)
        self.W = nn.Parameter((CONTRACTION * W / torch.linalg.matrix_norm(W, 2)).to(dtype))
        self.U = nn.Parameter((torch.randn(d, d, generator=g, dtype=F64) / d**0.5).to(dtype))
        self.b = nn.Parameter((0.1 * torch.randn(d, generator=g, dtype=F64)).to(dtype))
        self.calls: list[tuple[int, bool]] = []

    def forward(self, z: Tensor, x: Tensor, k: int) -> Tensor:
        self.calls.append((k, torch.is_grad_enabled()))
        return torch.tanh(z @ self.W.T + x @ self.U.T + self.b)


def _inputs(seed: int = 1, b: int = B, d: int = D) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, d, generator=g, dtype=F64), torch.zeros(b, d, dtype=F64)


def _weights(seed: int, b: int = B, d: int = D) -> Tensor:
    return torch.randn(b, d, generator=torch.Generator().manual_seed(seed), dtype=F64)


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


TIGHT = Anderson(tol=1e-14, stop_mode="abs", max_iter=200)
TIGHT_BACK = ImplicitDiff(Anderson(tol=1e-13, max_iter=200), throw=True)


def _plain_fixed_point(cell: Cell, x: Tensor, iters: int = 400) -> Tensor:
    """The fixed point by plain iteration far past convergence, independent of deqgen's solvers."""
    z = torch.zeros_like(x)
    with torch.no_grad():
        for _ in range(iters):
            z = torch.tanh(z @ cell.W.T + x @ cell.U.T + cell.b)
    return z


def _layer_grads(cell: Cell, method, x: Tensor, z0: Tensor, w: Tensor, solver=TIGHT) -> dict[str, Tensor]:
    layer = ImplicitLayer(cell, method, solver)
    cell.zero_grad()
    z, _ = layer(x, z0, _gen())
    (z * w).sum().backward()
    return {n: p.grad.clone() for n, p in cell.named_parameters()}


def _ift_reference(cell: Cell, x: Tensor, w: Tensor) -> dict[str, Tensor]:
    """Dense implicit-function-theorem gradient: u = (I - J)^-T w per sample, then u^T df/dtheta."""
    z = _plain_fixed_point(cell, x)
    cell.zero_grad()
    eye = torch.eye(x.shape[1], dtype=F64)
    for i in range(x.shape[0]):
        inj = x[i] @ cell.U.T + cell.b
        J = torch.autograd.functional.jacobian(lambda zi, inj=inj: torch.tanh(cell.W @ zi + inj), z[i])
        u = torch.linalg.solve((eye - J).T, w[i])
        torch.tanh(cell.W @ z[i] + inj).backward(u)
    return {n: p.grad.clone() for n, p in cell.named_parameters()}


def _max_err(a: dict[str, Tensor], b: dict[str, Tensor]) -> float:
    return max(float((a[n] - b[n]).abs().max()) for n in a)


# --- ImplicitDiff: exactness --------------------------------------------------------------------------------


def test_implicit_diff_gradcheck_wrt_injection_and_weight() -> None:
    cell = Cell(d=3)
    x, z0 = _inputs(b=2, d=3)
    W = cell.W.detach().clone().requires_grad_()
    x.requires_grad_()

    def solve(xx: Tensor, WW: Tensor) -> Tensor:
        def f(z: Tensor, inj: Tensor, k: int) -> Tensor:
            return torch.tanh(z @ WW.T + inj @ cell.U.T + cell.b)

        return implicit_solve(f, xx, z0, TIGHT_BACK, TIGHT)[0]

    assert torch.autograd.gradcheck(solve, (x, W), eps=1e-6, atol=1e-7, rtol=1e-6)


def test_implicit_diff_matches_dense_ift_and_long_unroll() -> None:
    cell = Cell()
    x, z0 = _inputs()
    w = _weights(2)
    ref = _ift_reference(cell, x, w)
    implicit = _layer_grads(cell, TIGHT_BACK, x, z0, w)
    unrolled = _layer_grads(cell, Unrolled(k=200), x, z0, w)
    assert _max_err(implicit, ref) <= 1e-9
    assert _max_err(unrolled, ref) <= 1e-6
    assert _max_err(implicit, unrolled) <= 1e-6


def test_implicit_diff_matches_finite_differences() -> None:
    cell = Cell()
    x, z0 = _inputs()
    w = _weights(3)
    x.requires_grad_()
    layer = ImplicitLayer(cell, TIGHT_BACK, TIGHT, eval_solver=TIGHT)
    z, _ = layer(x, z0)
    (z * w).sum().backward()
    eval_layer = layer.eval()

    def loss() -> float:
        return float((eval_layer(x.detach(), z0)[0] * w).sum())

    eps = 1e-6
    for tensor, grad, idx in [
        (cell.W, cell.W.grad, (0, 0)),
        (cell.W, cell.W.grad, (4, 2)),
        (cell.U, cell.U.grad, (1, 3)),
        (cell.b, cell.b.grad, (2,)),
        (x, x.grad, (1, 4)),
    ]:
        with torch.no_grad():
            tensor[idx] += eps
            up = loss()
            tensor[idx] -= 2 * eps
            down = loss()
            tensor[idx] += eps
        assert abs((up - down) / (2 * eps) - float(grad[idx])) <= 1e-7


@pytest.mark.parametrize("init", ["grad", "zero"])
def test_adjoint_start_point_does_not_change_the_answer(init: str) -> None:
    cell = Cell()
    x, z0 = _inputs()
    w = _weights(6)
    got = _layer_grads(cell, ImplicitDiff(Anderson(tol=1e-13, max_iter=200), init=init), x, z0, w)
    assert _max_err(got, _ift_reference(cell, x, w)) <= 1e-9


# --- JFB, Phantom, S-JFB, Unrolled --------------------------------------------------------------------------


def test_jfb_is_one_step_from_the_detached_fixed_point_closed_form() -> None:
    cell = Cell()
    x, z0 = _inputs()
    w = _weights(4)
    got = _layer_grads(cell, JFB(k=1), x, z0, w)
    # independent: d/dtheta sum(w * tanh(a)), a = W z* + U x + b with z* held fixed, by hand
    with torch.no_grad():
        z = _plain_fixed_point(cell, x)
        delta = w * (1 - torch.tanh(z @ cell.W.T + x @ cell.U.T + cell.b) ** 2)  # (B, D) = dL/da
    expected = {"W": delta.T @ z, "U": delta.T @ x, "b": delta.sum(0)}
    assert _max_err(got, expected) <= 1e-12
    assert _max_err(got, _ift_reference(cell, x, w)) > 1e-3  # JFB is biased: it drops (I - J)^-1


def test_phantom_approaches_implicit_as_k_grows() -> None:
    cell = Cell()
    x, z0 = _inputs()
    w = _weights(5)
    ref = _ift_reference(cell, x, w)
    errs = [_max_err(_layer_grads(cell, Phantom(k=k, damping=0.8), x, z0, w), ref) for k in (1, 5, 20, 60)]
    assert errs[0] > errs[1] > errs[2] > errs[3]
    assert errs[3] < 1e-8


def test_phantom_with_full_step_is_jfb() -> None:
    cell = Cell()
    x, z0 = _inputs()
    w = _weights(7)
    assert (
        _max_err(
            _layer_grads(cell, Phantom(k=3, damping=1.0), x, z0, w), _layer_grads(cell, JFB(k=3), x, z0, w)
        )
        == 0
    )


def test_sjfb_draws_are_reproducible_in_range_and_take_two_numbers() -> None:
    m = SJFB(no_grad=(0, 10), with_grad=(1, 12))
    assert m.draw(_gen(7)) == m.draw(_gen(7))
    g = _gen(8)
    draws = [m.draw(g) for _ in range(400)]
    assert {d[0] for d in draws} == set(range(11))  # both ends reached, nothing outside
    assert {d[1] for d in draws} == set(range(1, 13))
    g1, g2 = _gen(9), _gen(9)
    m.draw(g1)
    torch.randint(0, 2, (1,), generator=g2)
    torch.randint(0, 2, (1,), generator=g2)
    assert torch.equal(g1.get_state(), g2.get_state())  # the documented stream: two draws per call


def test_sjfb_runs_k1_without_grad_then_k2_recorded_with_continuing_indices() -> None:
    cell = Cell()
    x, z0 = _inputs()
    method = SJFB(no_grad=(2, 6), with_grad=(1, 4))
    k1, k2 = method.draw(_gen(11))
    layer = ImplicitLayer(cell, method, Picard(tol=1e-12, max_iter=100))  # S-JFB uses it as a fixed budget
    cell.calls.clear()
    z, info = layer(x, z0, _gen(11))
    assert (info.no_grad_steps, info.grad_steps) == (k1, k2)
    assert info.forward is not None and info.forward.stats.iterations == k1
    assert cell.calls == [(k, False) for k in range(k1)] + [(k1 + i, True) for i in range(k2)]
    zz = z0
    with torch.no_grad():  # the value is k1 + k2 plain iterations from z0
        for _ in range(k1 + k2):
            zz = torch.tanh(zz @ cell.W.T + x @ cell.U.T + cell.b)
    assert torch.allclose(z.detach(), zz, rtol=0, atol=1e-15)


@pytest.mark.parametrize("method", [JFB(k=2), Phantom(k=3), ImplicitDiff()], ids=lambda m: m.name)
def test_recorded_steps_continue_the_solver_count(method) -> None:
    cell = Cell()
    x, z0 = _inputs()
    cell.calls.clear()
    _, info = ImplicitLayer(cell, method, Picard(tol=1e-8, max_iter=100))(x, z0)
    n = info.forward.stats.iterations
    assert n > 3 and info.no_grad_steps == n
    assert cell.calls == [(k, False) for k in range(n)] + [(n + i, True) for i in range(info.grad_steps)]


def test_sjfb_needs_a_generator() -> None:
    layer = ImplicitLayer(Cell(), SJFB())
    x, z0 = _inputs()
    with pytest.raises(TypeError, match=r"torch.Generator\(\).manual_seed"):
        layer(x, z0)


@pytest.mark.parametrize("method", [JFB(), SJFB(), Phantom(), TIGHT_BACK, Unrolled(5)], ids=lambda m: m.name)
def test_gradients_reach_parameters_injection_and_the_model_around(method) -> None:
    cell, encoder = Cell(), nn.Linear(D, D, dtype=F64)
    inp, z0 = _inputs()
    z0.requires_grad_()
    z, info = ImplicitLayer(cell, method, TIGHT)(encoder(inp), z0, _gen())
    assert isinstance(info, GradInfo)
    z.square().sum().backward()
    for p in [*cell.parameters(), *encoder.parameters()]:
        assert p.grad is not None and float(p.grad.abs().sum()) > 0
    if isinstance(method, Unrolled):  # the only method whose output depends on z0
        assert z0.grad is not None and float(z0.grad.abs().sum()) > 0
    else:
        assert z0.grad is None


def test_unrolled_is_backprop_through_k_plain_steps() -> None:
    cell = Cell()
    x, z0 = _inputs()
    w = _weights(12)
    got = _layer_grads(cell, Unrolled(k=4), x, z0, w)
    cell.zero_grad()
    z = z0
    for _ in range(4):
        z = torch.tanh(z @ cell.W.T + x @ cell.U.T + cell.b)
    (z * w).sum().backward()
    assert _max_err(got, {n: p.grad for n, p in cell.named_parameters()}) <= 1e-15


# --- memory -------------------------------------------------------------------------------------------------


def _saved_bytes(run_step) -> int:
    saved = 0

    def pack(t: Tensor) -> Tensor:
        nonlocal saved
        saved += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        z = run_step()
    z.sum().backward()
    return saved


def test_no_grad_iterations_keep_nothing_for_backward() -> None:
    cell = Cell()
    x, z0 = _inputs()

    def deqgen_step(k1: int):
        layer = ImplicitLayer(cell, SJFB(no_grad=(k1, k1), with_grad=(2, 2)))
        return lambda: layer(x, z0, _gen())[0]

    def recorded_step(k1: int):  # the official VIAR pattern: the "no-grad" phase under a nullcontext
        def step():
            z = z0
            for k in range(k1 + 2):
                z = cell(z, x, k)
            return z

        return step

    ours = [_saved_bytes(deqgen_step(k1)) for k1 in (0, 4, 16)]
    theirs = [_saved_bytes(recorded_step(k1)) for k1 in (0, 4, 16)]
    assert ours[0] > 0 and ours[0] == ours[1] == ours[2]
    assert theirs[0] == ours[0] and theirs[2] > 8 * theirs[0]  # the measurement does see recorded iterations


# --- repeated use, tolerance, precision, failure reporting --------------------------------------------------


def _in_thread(fn, timeout: float) -> None:
    """Run ``fn`` and fail (instead of hanging the suite) if it takes longer than ``timeout`` seconds."""
    errors: list[BaseException] = []

    def target() -> None:
        try:
            fn()
        except Exception as e:  # noqa: BLE001 - any failure is re-raised in the test thread
            errors.append(e)

    t = threading.Thread(target=target, daemon=True)
    t.start()
    t.join(timeout)
    assert not t.is_alive(), f"did not finish in {timeout} s (a re-entrant backward hook hangs like this)"
    if errors:
        raise errors[0]


def test_implicit_diff_same_module_twice_per_step_is_fast_and_exact() -> None:
    cell = Cell()
    x, z0 = _inputs()
    rec = BackwardStatsRecorder()
    layer = ImplicitLayer(
        cell, ImplicitDiff(Anderson(tol=1e-13, max_iter=200), recorder=rec, throw=True), TIGHT
    )
    grads: dict[str, Tensor] = {}

    def step() -> None:  # weight-tied reuse, like a VIAR implicit block at every scale: the 2nd uses the 1st
        z1, _ = layer(x, z0)
        z2, _ = layer(x + 0.5 * z1, z0)
        (z1.sum() + 2 * z2.square().sum()).backward()
        grads.update({n: p.grad.clone() for n, p in cell.named_parameters()})

    _in_thread(step, timeout=30.0)  # a liveness guard, not a speed test: torchdeq's hook version hangs here
    assert len(rec.solutions) == 2 and rec.all_converged
    assert all(int(s.stats.nfe.max()) <= 60 for s in rec.solutions)
    cell.zero_grad()  # reference: the same two-call graph, differentiated through 200-step unrolls
    unrolled = ImplicitLayer(cell, Unrolled(k=200))
    z1, _ = unrolled(x, z0)
    z2, _ = unrolled(x + 0.5 * z1, z0)
    (z1.sum() + 2 * z2.square().sum()).backward()
    assert _max_err(grads, {n: p.grad for n, p in cell.named_parameters()}) <= 1e-9


def test_adjoint_tolerance_is_relative_to_the_incoming_gradient() -> None:
    cell = Cell()
    x, z0 = _inputs()
    w = _weights(13)
    rec = BackwardStatsRecorder()
    method = ImplicitDiff(Picard(tol=1e-7, stop_mode="abs", max_iter=200), recorder=rec)
    grads = [_layer_grads(cell, method, x, z0, s * w) for s in (1e-6, 1.0, 1e6)]
    nfes = [s.stats.nfe.tolist() for s in rec.solutions]
    assert nfes[0] == nfes[1] == nfes[2]  # an absolute test would take 0 steps at 1e-6 and many more at 1e6
    assert rec.all_converged
    ref = _ift_reference(cell, x, w)
    for s, g in zip((1e-6, 1.0, 1e6), grads):
        assert _max_err({n: v / s for n, v in g.items()}, ref) <= 1e-6


def test_adjoint_tolerance_floor_follows_the_compute_precision() -> None:
    method = ImplicitDiff(Anderson(tol=1e-10))
    assert method.adjoint_tol(torch.finfo(F64).eps) == 1e-10
    assert method.adjoint_tol(torch.finfo(torch.bfloat16).eps) == ROUNDING_FLOOR * 2**-7
    assert ImplicitDiff(Picard(tol=None, max_iter=5)).adjoint_tol(1e-3) is None  # a fixed budget stays one


def test_autocast_bf16_cpu_matches_float32_and_the_adjoint_converges() -> None:
    x, z0 = (t.float() for t in _inputs())
    w = _weights(14).float()
    rec = BackwardStatsRecorder()
    for method in (
        SJFB(no_grad=(6, 6), with_grad=(3, 3)),
        ImplicitDiff(Anderson(tol=1e-8, max_iter=50), recorder=rec),
    ):
        grads = {}
        for autocast in (False, True):
            cell = Cell(dtype=torch.float32)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                z, _ = ImplicitLayer(cell, method, Picard(tol=1e-3, max_iter=50))(x, z0, _gen())
            (z.float() * w).sum().backward()
            grads[autocast] = torch.cat([p.grad.flatten() for p in cell.parameters()])
        rel = float((grads[True] - grads[False]).norm() / grads[False].norm())
        assert rel < 3e-2, (method.name, rel)
    bf16 = rec.solutions[1]  # requested 1e-8, unreachable in bf16: the floor stops it at rounding level
    assert bf16.stats.all_converged and int(bf16.stats.nfe.max()) < 50


def test_adjoint_non_convergence_raises_or_is_reported(caplog: pytest.LogCaptureFixture) -> None:
    cell = Cell()
    x, z0 = _inputs()
    starved = Picard(tol=1e-12, max_iter=2)
    z, _ = ImplicitLayer(cell, ImplicitDiff(starved, throw=True), TIGHT)(x, z0)
    with pytest.raises(SolverError, match=r"(?s)adjoint solve u = J\^T u \+ g did not converge.*max_iter"):
        z.sum().backward()
    rec = BackwardStatsRecorder()
    z, _ = ImplicitLayer(cell, ImplicitDiff(starved, recorder=rec), TIGHT)(x, z0)
    z.sum().backward()
    assert (rec.solutions[0].stats.status == Status.MAX_ITER).all() and "max_iter" in rec.summary()
    with caplog.at_level(logging.WARNING, logger="deqgen.gradients"):
        z, _ = ImplicitLayer(cell, ImplicitDiff(starved), TIGHT)(x, z0)
        z.sum().backward()
    assert "did not converge" in caplog.text and "recorder=" in caplog.text


def test_implicit_diff_refuses_create_graph_instead_of_a_silently_wrong_second_derivative() -> None:
    cell = Cell()
    x, z0 = _inputs()
    x.requires_grad_()
    z, _ = ImplicitLayer(cell, TIGHT_BACK, TIGHT)(x, z0)
    with pytest.raises(RuntimeError, match="no double backward.*create_graph"):
        torch.autograd.grad(z.sum(), x, create_graph=True)


# --- layer modes and configuration --------------------------------------------------------------------------


def test_eval_mode_returns_the_detached_fixed_point_with_the_eval_solver() -> None:
    cell = Cell()
    x, z0 = _inputs()
    layer = ImplicitLayer(cell, SJFB(), eval_solver=Anderson(tol=1e-12, max_iter=100)).eval()
    z, info = layer(x, z0)
    assert not z.requires_grad and info.grad_steps == 0 and info.forward.stats.all_converged
    assert torch.allclose(z, _plain_fixed_point(cell, x), rtol=0, atol=1e-11)


def test_int_budgets_and_no_grad_in_training_mode() -> None:
    cell = Cell()
    x, z0 = _inputs()
    layer = ImplicitLayer(cell, JFB(), train_solver=4, eval_solver=3)
    cell.calls.clear()
    with torch.no_grad():
        layer(x, z0)  # no grad: the eval budget, even in training mode
    assert cell.calls == [(k, False) for k in range(3)]
    cell.calls.clear()
    layer(x, z0)
    assert cell.calls == [(k, False) for k in range(4)] + [(4, True)]
    with pytest.raises(ValueError, match="fixed budget"):
        ImplicitLayer(cell, eval_solver=0)


def test_implicit_solve_differentiates_in_eval_mode() -> None:
    cell = Cell().eval()
    x, z0 = _inputs()
    w = _weights(15)
    z, info = implicit_solve(cell, x, z0, TIGHT_BACK, TIGHT)
    (z * w).sum().backward()
    assert info.grad_steps == 1
    assert (
        _max_err({n: p.grad.clone() for n, p in cell.named_parameters()}, _ift_reference(cell, x, w)) <= 1e-9
    )


def test_registry_and_bad_values() -> None:
    assert get("sjfb", no_grad=(0, 3)).no_grad == (0, 3)
    assert get(" JFB ", k=2) == JFB(k=2)
    assert options("sjfb") == ("no_grad", "with_grad")
    built = get("implicit", solver={"name": "picard", "tol": 1e-5, "damping": 0.5})
    assert built.solver == Picard(tol=1e-5, damping=0.5)
    assert isinstance(get("implicit", solver="broyden").solver, Broyden)
    with pytest.raises(ValueError, match="unknown gradient method 'ift'; choose one of"):
        get("ift")
    with pytest.raises(TypeError, match=r"\['kk'\].*valid options"):
        get("jfb", kk=2)
    with pytest.raises(TypeError, match="no option"):
        get("implicit", solver={"name": "anderson", "mm": 3})
    with pytest.raises(ValueError, match="'name' key"):
        get("implicit", solver={"tol": 1e-3})
    with pytest.raises(ValueError, match="with_grad"):
        SJFB(with_grad=(0, 3))
    with pytest.raises(ValueError, match="no_grad"):
        SJFB(no_grad=(5, 2))
    with pytest.raises(ValueError, match="k=0"):
        JFB(k=0)
    with pytest.raises(ValueError, match="damping"):
        Phantom(damping=0.0)
    with pytest.raises(TypeError, match="Solver"):
        ImplicitDiff(solver="anderson")
    with pytest.raises(ValueError, match="init"):
        ImplicitDiff(init="warm")
    with pytest.raises(TypeError, match="GradientMethod"):
        ImplicitLayer(lambda z, x, k: z, gradient="jfb")
    with pytest.raises(TypeError, match="Solver"):
        ImplicitLayer(lambda z, x, k: z, train_solver="anderson")


@pytest.mark.parametrize("module", ["deqgen.gradients", "deqgen.layer"])
def test_doctests(module: str) -> None:
    result = doctest.testmod(importlib.import_module(module), verbose=False)
    assert result.attempted > 0 and result.failed == 0
