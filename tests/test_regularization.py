"""Jacobian regularisation and spectral radius against exact dense Jacobians in float64 (from
``torch.autograd.functional.jacobian`` and ``torch.linalg.eigvals``), and the layer's reuse of its recorded step."""

from __future__ import annotations

import math
from collections.abc import Iterator

import pytest
import torch
from torch import Tensor, nn

from deqgen import JFB, Anderson, ImplicitDiff, ImplicitLayer, Phantom, Unrolled
from deqgen.regularization import fp_correction, jac_reg, spectral_radius

F64 = torch.float64
B, D = 3, 6


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _tanh_map(seed: int = 0, symmetric: bool = False) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(D, D, generator=g, dtype=F64) / D**0.5
    if symmetric:
        W = (W + W.T) / 2
    x = torch.randn(B, D, generator=g, dtype=F64)
    return W, x


def _exact_jacobians(W: Tensor, x: Tensor, z: Tensor) -> list[Tensor]:
    return [
        torch.autograd.functional.jacobian(lambda zb, b=b: torch.tanh(zb @ W.T + x[b]), z[b].detach())
        for b in range(z.shape[0])
    ]


def test_hutchinson_mean_is_the_exact_frobenius_norm_within_3_standard_errors() -> None:
    W, x = _tanh_map()
    z = torch.randn(B, D, dtype=F64, generator=torch.Generator().manual_seed(5)).requires_grad_()
    fz = torch.tanh(z @ W.T + x)
    exact = torch.stack([J.pow(2).sum() / D for J in _exact_jacobians(W, x, z)])
    gen = torch.Generator().manual_seed(1)
    draws = torch.stack([jac_reg(fz, z, generator=gen).detach() for _ in range(3000)])  # (N, B)
    mean, se = draws.mean(0), draws.std(0) / math.sqrt(draws.shape[0])
    assert (se > 0).all()
    assert ((mean - exact).abs() <= 3 * se).all(), (mean, exact, se)
    # the average over vecs is the same estimator: its mean agrees too, with less spread per call
    many = jac_reg(fz, z, vecs=3000, generator=torch.Generator().manual_seed(2)).detach()
    assert ((many - exact).abs() <= 3 * draws.std(0) / math.sqrt(3000)).all()


def test_jac_reg_is_differentiable_in_the_weights() -> None:
    W, x = _tanh_map()
    z0 = torch.randn(B, D, dtype=F64, generator=torch.Generator().manual_seed(5))

    def estimate(Wp: Tensor) -> Tensor:
        z = z0.clone().requires_grad_()
        return jac_reg(torch.tanh(z @ Wp.T + x), z, vecs=2, generator=torch.Generator().manual_seed(3))

    assert torch.autograd.gradcheck(estimate, (W.clone().requires_grad_(),))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_power_method_matches_eigvals(seed: int) -> None:
    # J = diag(sech^2) W with W symmetric is similar to a symmetric matrix: real eigenvalues, and the power
    # method converges to the largest modulus
    W, x = _tanh_map(seed, symmetric=True)
    z = torch.randn(B, D, dtype=F64, generator=torch.Generator().manual_seed(seed + 10)).requires_grad_()
    fz = torch.tanh(z @ W.T + x)
    exact = torch.stack([torch.linalg.eigvals(J).abs().max() for J in _exact_jacobians(W, x, z)])
    rho = spectral_radius(fz, z, n_iters=400, generator=torch.Generator().manual_seed(0))
    # seed 2, row 2 has eigenvalues 0.4405 and -0.4390: the estimate may sit between them (0.34 % apart)
    torch.testing.assert_close(rho, exact, rtol=4e-3, atol=0)


def test_power_method_on_a_nonsymmetric_linear_map() -> None:
    g = torch.Generator().manual_seed(3)
    V = torch.randn(D, D, generator=g, dtype=F64)
    A = V @ torch.diag(torch.tensor([0.9, -0.5, 0.4, 0.3, 0.2, 0.1], dtype=F64)) @ torch.linalg.inv(V)
    z = torch.randn(2, D, dtype=F64, generator=g).requires_grad_()
    rho = spectral_radius(z @ A.T, z, n_iters=300, generator=g)
    torch.testing.assert_close(rho, torch.full((2,), torch.linalg.eigvals(A).abs().max().item(), dtype=F64))


class Cell(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        W, _ = _tanh_map(4)
        self.W = nn.Parameter(0.8 * W / torch.linalg.matrix_norm(W, 2))
        self.calls = 0

    def forward(self, z: Tensor, x: Tensor, k: int) -> Tensor:
        self.calls += int(torch.is_grad_enabled())
        return torch.tanh(z @ self.W.T + x)


@pytest.mark.parametrize("method", [ImplicitDiff(), JFB(), Phantom(k=3)], ids=["implicit", "jfb", "phantom"])
def test_layer_reuses_its_recorded_step_for_jac_reg(method) -> None:
    _, x = _tanh_map()
    counts = []
    for jacobian in (False, True):
        cell = Cell()
        layer = ImplicitLayer(cell, method, Anderson(tol=1e-12, max_iter=100), jacobian=jacobian)
        z, info = layer(x, torch.zeros(B, D, dtype=F64))
        counts.append(cell.calls)
    assert counts[0] == counts[1]  # no extra evaluation of f
    fz, z_in = info.jacobian_step
    torch.testing.assert_close(z_in.detach(), info.forward.z, rtol=0, atol=0)  # taken at the solve's answer
    exact = torch.stack([J.pow(2).sum() / D for J in _exact_jacobians(cell.W.detach(), x, z_in)])
    est = jac_reg(fz, z_in, vecs=4000, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(est.detach(), exact, rtol=0.1, atol=0)
    (est.mean() + z.sum()).backward()  # the penalty and the main loss backpropagate together
    assert cell.W.grad is not None and torch.isfinite(cell.W.grad).all()


def test_no_jacobian_step_without_a_no_grad_solve() -> None:
    _, x = _tanh_map()
    layer = ImplicitLayer(Cell(), Unrolled(k=5), jacobian=True)
    _, info = layer(x, torch.zeros(B, D, dtype=F64))
    assert info.jacobian_step is None


def test_fp_correction_weights_and_errors() -> None:
    losses = [torch.tensor(1.0), torch.tensor(10.0), torch.tensor(100.0)]
    assert fp_correction(losses, gamma=0.5).item() == pytest.approx(0.25 * 1 + 0.5 * 10 + 100)
    with pytest.raises(ValueError, match="gamma"):
        fp_correction(losses, gamma=0.0)
    with pytest.raises(ValueError, match="requires_grad"):
        jac_reg(torch.zeros(2, 3), torch.zeros(2, 3))
