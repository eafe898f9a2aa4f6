"""Gradient methods and ImplicitLayer, against finite differences, dense implicit-function-theorem gradients and
manual reference computations (float64)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from deqgen import Anderson, Picard
from deqgen.gradients import JFB, SJFB, GradInfo, ImplicitDiff, Phantom, Unrolled, get
from deqgen.layer import ImplicitLayer

F64 = torch.float64
B, D = 3, 5


class Cell(nn.Module):
    """f(z, x, k) = tanh(W z + U x + b), ||W||_2 = 0.6."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        W = torch.randn(D, D, generator=g, dtype=F64)
        self.W = nn.Parameter(0.6 * W / torch.linalg.matrix_norm(W, 2))
        self.U = nn.Parameter(torch.randn(D, D, generator=g, dtype=F64) / D**0.5)
        self.b = nn.Parameter(0.1 * torch.randn(D, generator=g, dtype=F64))
        self.calls: list[tuple[int, bool]] = []

    def forward(self, z: torch.Tensor, x: torch.Tensor, k: int) -> torch.Tensor:
        self.calls.append((k, torch.is_grad_enabled()))
        return torch.tanh(z @ self.W.T + x @ self.U.T + self.b)


def _inputs(seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, D, generator=g, dtype=F64), torch.zeros(B, D, dtype=F64)


TIGHT = Anderson(tol=1e-14, stop_mode="abs", max_iter=200)
TIGHT_BACK = ImplicitDiff(Anderson(tol=1e-13, max_iter=200))


def _grads(cell: Cell, method, x: torch.Tensor, z0: torch.Tensor, weights: torch.Tensor) -> dict[str, torch.Tensor]:
    layer = ImplicitLayer(cell, method, TIGHT)
    cell.zero_grad()
    z, _ = layer(x, z0, torch.Generator().manual_seed(0))
    (z * weights).sum().backward()
    return {n: p.grad.clone() for n, p in cell.named_parameters()}


def _ift_reference(cell: Cell, x: torch.Tensor, weights: torch.Tensor) -> dict[str, torch.Tensor]:
    """Dense implicit-function-theorem gradient: u = (I - J)^-T w per sample, then u^T df/dtheta."""
    z = torch.zeros(B, D, dtype=F64)
    with torch.no_grad():
        for _ in range(500):  # an independent solve: plain iteration far past convergence
            z = torch.tanh(z @ cell.W.T + x @ cell.U.T + cell.b)
    cell.zero_grad()
    for i in range(B):
        J = torch.autograd.functional.jacobian(lambda zi: torch.tanh(cell.W @ zi + cell.U @ x[i] + cell.b), z[i])
        u = torch.linalg.solve((torch.eye(D, dtype=F64) - J).T, weights[i])
        out = torch.tanh(cell.W @ z[i] + cell.U @ x[i] + cell.b)
        out.backward(u)
    return {n: p.grad.clone() for n, p in cell.named_parameters()}


def _max_err(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return max(float((a[n] - b[n]).abs().max()) for n in a)


def test_implicit_diff_gradcheck() -> None:
    cell = Cell()
    layer = ImplicitLayer(cell, TIGHT_BACK, TIGHT)
    x, z0 = _inputs()
    x.requires_grad_()
    assert torch.autograd.gradcheck(lambda xx: layer(xx, z0)[0], (x,), eps=1e-6, atol=1e-7, rtol=1e-6)


def test_implicit_diff_matches_dense_ift_and_long_unroll() -> None:
    cell = Cell()
    x, z0 = _inputs()
    w = torch.randn(B, D, generator=torch.Generator().manual_seed(2), dtype=F64)
    ref = _ift_reference(cell, x, w)
    implicit = _grads(cell, TIGHT_BACK, x, z0, w)
    unrolled = _grads(cell, Unrolled(k=200), x, z0, w)
    assert _max_err(implicit, ref) <= 1e-9
    assert _max_err(unrolled, ref) <= 1e-6
    assert _max_err(implicit, unrolled) <= 1e-6


def test_implicit_diff_matches_finite_differences() -> None:
    cell = Cell()
    x, z0 = _inputs()
    w = torch.randn(B, D, generator=torch.Generator().manual_seed(3), dtype=F64)
    grads = _grads(cell, TIGHT_BACK, x, z0, w)
    layer = ImplicitLayer(cell, TIGHT_BACK, TIGHT, eval_solver=TIGHT).eval()
    eps = 1e-6
    for i, j in [(0, 0), (1, 3), (4, 2)]:
        with torch.no_grad():
            cell.W[i, j] += eps
            up = (layer(x, z0)[0] * w).sum()
            cell.W[i, j] -= 2 * eps
            down = (layer(x, z0)[0] * w).sum()
            cell.W[i, j] += eps
        assert abs(float((up - down) / (2 * eps)) - float(grads["W"][i, j])) <= 1e-7


def test_jfb_is_one_step_from_the_detached_fixed_point() -> None:
    cell = Cell()
    x, z0 = _inputs()
    w = torch.randn(B, D, generator=torch.Generator().manual_seed(4), dtype=F64)
    got = _grads(cell, JFB(k=1), x, z0, w)
    # independent: fixed point by plain iteration, then one recorded application of f
    z = z0
    with torch.no_grad():
        for _ in range(500):
            z = torch.tanh(z @ cell.W.T + x @ cell.U.T + cell.b)
    cell.zero_grad()
    (torch.tanh(z @ cell.W.T + x @ cell.U.T + cell.b) * w).sum().backward()
    expected = {n: p.grad.clone() for n, p in cell.named_parameters()}
    assert _max_err(got, expected) <= 1e-12
    assert _max_err(got, _ift_reference(cell, x, w)) > 1e-3  # JFB is biased: it drops (I - J)^-1


def test_phantom_approaches_implicit_as_k_grows() -> None:
    cell = Cell()
    x, z0 = _inputs()
    w = torch.randn(B, D, generator=torch.Generator().manual_seed(5), dtype=F64)
    ref = _ift_reference(cell, x, w)
    errs = [_max_err(_grads(cell, Phantom(k=k, damping=0.8), x, z0, w), ref) for k in (1, 5, 20, 60)]
    assert errs[0] > errs[1] > errs[2] > errs[3] and errs[3] < 1e-8


def test_sjfb_draws_are_reproducible_and_in_range() -> None:
    m = SJFB(no_grad=(0, 10), with_grad=(1, 12))
    a = [m.draw(torch.Generator().manual_seed(7)) for _ in range(3)]
    assert a[0] == a[1] == a[2]
    g = torch.Generator().manual_seed(8)
    draws = [m.draw(g) for _ in range(400)]
    k1s, k2s = {d[0] for d in draws}, {d[1] for d in draws}
    assert k1s == set(range(0, 11)) and k2s == set(range(1, 13))  # both ends reached, nothing outside


def test_sjfb_runs_k1_without_grad_then_k2_recorded_with_continuing_indices() -> None:
    cell = Cell()
    x, z0 = _inputs()
    gen_seed = 11
    k1, k2 = SJFB(no_grad=(2, 6), with_grad=(1, 4)).draw(torch.Generator().manual_seed(gen_seed))
    layer = ImplicitLayer(cell, SJFB(no_grad=(2, 6), with_grad=(1, 4)), Picard(tol=None, max_iter=1))
    cell.calls.clear()
    z, info = layer(x, z0, torch.Generator().manual_seed(gen_seed))
    assert (info.no_grad_steps, info.grad_steps) == (k1, k2)
    assert cell.calls == [(k, False) for k in range(k1)] + [(k1 + i, True) for i in range(k2)]
    # the value is k1 + k2 plain iterations from z0
    zz = z0
    with torch.no_grad():
        for _ in range(k1 + k2):
            zz = torch.tanh(zz @ cell.W.T + x @ cell.U.T + cell.b)
    assert torch.allclose(z.detach(), zz, rtol=0, atol=1e-15)


def _saved_tensor_count(method, k1: int) -> int:
    cell = Cell()
    x, z0 = _inputs()
    layer = ImplicitLayer(cell, method(k1), Picard(tol=None, max_iter=1))
    count = 0

    def pack(t):
        nonlocal count
        count += 1
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        z, _ = layer(x, z0, torch.Generator().manual_seed(0))
    z.sum().backward()
    return count


def test_no_grad_iterations_keep_nothing_for_backward() -> None:
    def sjfb(k1: int) -> SJFB:
        return SJFB(no_grad=(k1, k1), with_grad=(2, 2))

    counts = [_saved_tensor_count(sjfb, k1) for k1 in (0, 4, 16)]
    assert counts[0] > 0 and counts[0] == counts[1] == counts[2]


@pytest.mark.parametrize("method", [JFB(), SJFB(), Phantom(), TIGHT_BACK, Unrolled(5)], ids=lambda m: m.name)
def test_every_method_reaches_parameters_and_injection(method) -> None:
    cell = Cell()
    x, z0 = _inputs()
    x.requires_grad_()
    z, info = ImplicitLayer(cell, method, TIGHT)(x, z0, torch.Generator().manual_seed(0))
    assert isinstance(info, GradInfo)
    z.sum().backward()
    assert x.grad is not None and float(x.grad.abs().sum()) > 0
    assert all(p.grad is not None and float(p.grad.abs().sum()) > 0 for p in cell.parameters())


def test_implicit_diff_twice_per_step_and_recorder() -> None:
    cell = Cell()
    x1, z0 = _inputs(1)
    x2, _ = _inputs(2)
    solutions = []
    layer = ImplicitLayer(cell, ImplicitDiff(Anderson(tol=1e-13, max_iter=200), recorder=solutions.append), TIGHT)
    z1, _ = layer(x1, z0)
    z2, _ = layer(x2, z0)
    (z1.sum() + 2 * z2.sum()).backward()
    both = {n: p.grad.clone() for n, p in cell.named_parameters()}
    assert len(solutions) == 2 and all(s.stats.all_converged for s in solutions)
    cell.zero_grad()
    layer(x1, z0)[0].sum().backward()
    (2 * layer(x2, z0)[0].sum()).backward()
    sep = {n: p.grad.clone() for n, p in cell.named_parameters()}
    assert _max_err(both, sep) <= 1e-12


def test_eval_mode_returns_detached_fixed_point() -> None:
    cell = Cell()
    x, z0 = _inputs()
    layer = ImplicitLayer(cell, SJFB(), eval_solver=Anderson(tol=1e-12, max_iter=100)).eval()
    z, info = layer(x, z0)
    assert not z.requires_grad and info.grad_steps == 0 and info.forward.stats.all_converged
    with torch.no_grad():
        assert torch.allclose(cell(z, x, 0), z, rtol=0, atol=1e-11)


def test_autocast_bf16_cpu() -> None:
    cell = Cell().float()
    x, z0 = (t.float() for t in _inputs())
    for method in (SJFB(), ImplicitDiff(Anderson(tol=1e-3, max_iter=50))):
        cell.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            z, _ = ImplicitLayer(cell, method, Picard(tol=1e-3, max_iter=50))(x, z0, torch.Generator().manual_seed(0))
        z.float().sum().backward()
        assert all(torch.isfinite(p.grad).all() for p in cell.parameters())


def test_registry_and_bad_values() -> None:
    assert get("sjfb", no_grad=(0, 3)).no_grad == (0, 3)
    assert isinstance(get("Implicit"), ImplicitDiff)
    with pytest.raises(ValueError, match="unknown gradient method 'ift'"):
        get("ift")
    with pytest.raises(TypeError, match=r"\['kk'\].*valid options"):
        get("jfb", kk=2)
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
    with pytest.raises(TypeError, match="GradientMethod"):
        ImplicitLayer(lambda z, x, k: z, gradient="jfb")
