"""deqgen's solvers inside torchdeq's DEQ core, checked against torchdeq's own solvers and closed forms."""

from __future__ import annotations

import pytest
import torch

torchdeq = pytest.importorskip("torchdeq")

from deqgen.interop.torchdeq import register_torchdeq_solvers, torchdeq_solver  # noqa: E402

D, B = 12, 5


def _layer(seed: int = 0) -> tuple[torch.nn.Linear, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    lin = torch.nn.Linear(D, D, dtype=torch.float64)
    with torch.no_grad():
        W = torch.randn(D, D, generator=g, dtype=torch.float64)
        lin.weight.copy_(0.7 * W / torch.linalg.matrix_norm(W, 2))
        lin.bias.copy_(torch.randn(D, generator=g, dtype=torch.float64))
    x = torch.randn(B, D, generator=g, dtype=torch.float64)
    return lin, x


def _ift_reference(lin: torch.nn.Linear, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """d(sum z*)/dW from the implicit function theorem, with dense Jacobians (independent of any solver)."""
    W, b = lin.weight.detach(), lin.bias.detach()
    grad = torch.zeros_like(W)
    for i in range(B):
        pre = W @ z[i] + b + x[i]
        s = 1 - torch.tanh(pre) ** 2  # f = tanh(W z + b + x)
        J = s[:, None] * W  # df/dz
        u = torch.linalg.solve((torch.eye(D, dtype=W.dtype) - J).T, torch.ones(D, dtype=W.dtype))
        grad += torch.outer(u * s, z[i])  # df/dW contracted with u
    return grad


def test_registration_names_and_strict_options() -> None:
    names = register_torchdeq_solvers()
    assert names == ("deqgen_picard", "deqgen_anderson", "deqgen_broyden")
    from torchdeq.solver import get_solver

    assert get_solver("deqgen_anderson").__name__ == "deqgen_anderson"
    with pytest.raises(TypeError, match="bogus"):
        torchdeq_solver("anderson")(torch.tanh, torch.zeros(2, 3), bogus=1)
    with pytest.raises(ValueError, match="unknown deqgen solver"):
        torchdeq_solver("newton")


@pytest.mark.parametrize("name", ["picard", "anderson", "broyden"])
def test_adapter_matches_torchdeq_native_solver(name: str) -> None:
    lin, x = _layer()

    def f(z: torch.Tensor) -> torch.Tensor:
        return torch.tanh(lin(z) + x)

    z0 = torch.zeros(B, D, dtype=torch.float64)
    native = {"picard": "fixed_point_iter", "anderson": "anderson", "broyden": "broyden"}[name]
    with torch.no_grad():
        z_ours, traj, info = torchdeq_solver(name)(f, z0, max_iter=200, tol=1e-10, stop_mode="abs")
        z_ref, _, _ = torchdeq.solver.get_solver(native)(f, z0, max_iter=200, tol=1e-10, stop_mode="abs")
    assert traj == []
    assert torch.allclose(z_ours, z_ref, rtol=0, atol=1e-9)
    # the stats follow torchdeq's layout: (B,) lowest residuals, (B, K) traces, per-sample step counts
    assert info["abs_lowest"].shape == (B,) and bool((info["abs_lowest"] <= 1e-10).all())
    assert info["abs_trace"].shape[0] == B and not torch.isnan(info["abs_trace"]).any()
    assert torch.allclose((f(z_ours) - z_ours).norm(dim=1), info["abs_lowest"], rtol=1e-6, atol=0)


@pytest.mark.parametrize("f_solver", ["deqgen_anderson", "deqgen_broyden"])
def test_get_deq_ift_training_gradients_match_closed_form(f_solver: str) -> None:
    register_torchdeq_solvers()
    lin, x = _layer(1)
    deq = torchdeq.get_deq(
        f_solver=f_solver,
        b_solver="deqgen_picard",
        f_max_iter=100,
        b_max_iter=200,
        f_tol=1e-11,
        b_tol=1e-11,
        ift=True,
    )
    deq.train()
    z_out, info = deq(lambda z: torch.tanh(lin(z) + x), torch.zeros(B, D, dtype=torch.float64))
    z_star = z_out[-1]
    z_star.sum().backward()
    expected = _ift_reference(lin, x, z_star.detach())
    assert torch.allclose(lin.weight.grad, expected, rtol=0, atol=1e-9)


def test_get_deq_indexing_core_returns_requested_states() -> None:
    register_torchdeq_solvers()
    lin, x = _layer(2)
    deq = torchdeq.get_deq(
        core="indexing", f_solver="deqgen_picard", f_max_iter=30, f_tol=1e-12, n_states=2, grad=1
    )
    deq.train()
    z_out, _ = deq(lambda z: torch.tanh(lin(z) + x), torch.zeros(B, D, dtype=torch.float64))
    assert len(z_out) == 2
    # The first segment makes 15 evaluations, at f^0(0) .. f^14(0), and returns the best of them, f^14(0)
    # (residuals decrease); torchdeq's one tracked step (grad=1) then gives f^15(0).
    z = torch.zeros(B, D, dtype=torch.float64)
    with torch.no_grad():
        for _ in range(15):
            z = torch.tanh(lin(z) + x)
    assert torch.allclose(z_out[0].detach(), z, rtol=0, atol=1e-14)
    assert (
        z_out[0].detach() - torch.tanh(lin(z) + x)
    ).abs().max() > 1e-11  # one more step is distinguishable
