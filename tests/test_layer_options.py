"""ImplicitLayer options: separable solves, residual traces, and fixed-point correction states (checked against
a hand-written Picard loop with JFB / implicit gradients at the same states)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
from torch import Tensor, nn

from deqgen import JFB, SJFB, Anderson, ImplicitDiff, ImplicitLayer, Picard, Unrolled, implicit_solve
from deqgen.regularization import fp_correction

F64 = torch.float64
B, D = 5, 4


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


class RowCell(nn.Module):
    """Row-wise f(z, x) = tanh(c * (z W^T) + x) with a per-row contraction c taken from x[:, 0]."""

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        W = torch.randn(D, D, generator=g, dtype=F64)
        self.W = nn.Parameter(W / torch.linalg.matrix_norm(W, 2))
        self.rows_seen = 0

    def forward(self, z: Tensor, x: tuple[Tensor, Tensor], k: int) -> Tensor:
        c, inj = x
        self.rows_seen += z.shape[0]
        return torch.tanh(c[:, None] * (z @ self.W.T) + inj)


def _x() -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.linspace(0.1, 0.95, B, dtype=F64), torch.randn(B, D, generator=g, dtype=F64)


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_separable_layer_evaluates_each_row_only_until_it_converges(mode: str) -> None:
    solver = Picard(tol=1e-10, max_iter=300)
    outs = {}
    for separable in (False, True):
        cell = RowCell()
        layer = ImplicitLayer(cell, JFB(), solver, solver, separable=separable, trace=True)
        layer.train(mode == "train")
        z, info = layer(_x(), torch.zeros(B, D, dtype=F64))
        stats = info.forward.stats
        outs[separable] = (z.detach(), stats.nfe)
        if separable:
            assert stats.rows_evaluated == int(stats.nfe.sum())  # rows_evaluated / B == mean NFE
            assert cell.rows_seen == stats.rows_evaluated + (B if mode == "train" else 0)  # + JFB's step
        else:
            assert stats.rows_evaluated == B * stats.iterations
        assert stats.abs_trace.shape == (stats.iterations, B)
    assert len(set(outs[True][1].tolist())) > 1
    torch.testing.assert_close(outs[True][0], outs[False][0], rtol=0, atol=1e-14)
    assert torch.equal(outs[True][1], outs[False][1])


def test_separable_layer_gradients_match_the_full_batch_layer() -> None:
    grads = []
    for separable in (False, True):
        cell = RowCell()
        x = _x()
        inj = x[1].clone().requires_grad_()
        layer = ImplicitLayer(cell, ImplicitDiff(), Picard(tol=1e-11, max_iter=400), separable=separable)
        z, _ = layer((x[0], inj), torch.zeros(B, D, dtype=F64))
        z.sin().sum().backward()
        grads.append((cell.W.grad.clone(), inj.grad.clone()))
    torch.testing.assert_close(grads[0][0], grads[1][0], rtol=1e-10, atol=1e-13)
    torch.testing.assert_close(grads[0][1], grads[1][1], rtol=1e-10, atol=1e-13)


def _reference_states(cell: RowCell, x, counts: list[int], max_iter: int) -> list[Tensor]:
    """Plain Picard by hand (fixed budget), keeping the iterate after each count (the last = the answer)."""
    z = torch.zeros(B, D, dtype=F64)
    kept = {}
    with torch.no_grad():
        for n in range(max_iter):
            if n in counts:
                kept[n] = z.clone()
            z = cell(z, x, n)
    return [kept.get(n, z) for n in counts], z


@pytest.mark.parametrize("kind", ["jfb", "implicit"])
def test_fixed_point_correction_equals_a_hand_written_reference(kind: str) -> None:
    max_iter, counts = 12, [3, 7, 12]
    x = _x()
    method = JFB(k=1) if kind == "jfb" else ImplicitDiff(Anderson(tol=1e-12, max_iter=200))
    cell = RowCell()
    layer = ImplicitLayer(cell, method, Picard(tol=None, max_iter=max_iter), states=counts)
    z, info = layer(x, torch.zeros(B, D, dtype=F64))
    assert len(info.states) == 3 and info.states[-1] is z
    target = torch.ones(B, D, dtype=F64)
    losses = [(s - target).pow(2).mean() for s in info.states]
    fp_correction(losses, gamma=0.8).backward()

    ref = RowCell()
    starts, z_final = _reference_states(ref, x, counts[:-1], max_iter)
    starts.append(z_final)
    ref_losses = []
    for start, n in zip(starts, counts, strict=True):
        if kind == "jfb":  # one recorded step from the state
            state = ref(start, x, n)
        else:  # exact IFT at the state: dL/dtheta = u^T df/dtheta with u = (I - J)^-T g, by dense solve
            zz = start.clone().requires_grad_()
            fz = ref(zz, x, n)
            J = torch.stack(
                [
                    torch.autograd.functional.jacobian(
                        lambda v, b=b: torch.tanh(x[0][b] * (v @ ref.W.T) + x[1][b]), start[b]
                    )
                    for b in range(B)
                ]
            )
            state = _IFT.apply(fz, J)
        ref_losses.append((state - target).pow(2).mean())
    total = sum(0.8 ** (2 - i) * loss for i, loss in enumerate(ref_losses))
    total.backward()
    torch.testing.assert_close(losses[0], ref_losses[0], rtol=1e-12, atol=0)
    torch.testing.assert_close(cell.W.grad, ref.W.grad, rtol=1e-9, atol=1e-12)


class _IFT(torch.autograd.Function):
    """Identity on fz; backward replaces g by (I - J)^-T g per row (dense, the textbook formula)."""

    @staticmethod
    def forward(ctx, fz: Tensor, J: Tensor) -> Tensor:
        ctx.save_for_backward(J)
        return fz.detach().clone()

    @staticmethod
    def backward(ctx, g: Tensor):
        (J,) = ctx.saved_tensors
        eye = torch.eye(J.shape[-1], dtype=J.dtype)
        u = torch.linalg.solve((eye - J).transpose(1, 2), g.unsqueeze(-1)).squeeze(-1)
        return u, None


def test_states_evenly_spaced_and_unsupported_methods() -> None:
    layer = ImplicitLayer(RowCell(), JFB(), Picard(tol=None, max_iter=10), states=2)
    z, info = layer(_x(), torch.zeros(B, D, dtype=F64))
    assert len(info.states) == 2 and info.states[1] is z and info.states[0].grad_fn is not None
    with pytest.raises(ValueError, match="fixed-point correction"):
        implicit_solve(RowCell(), _x(), torch.zeros(B, D, dtype=F64), Unrolled(k=2), Picard(), states=2)
    with pytest.raises(ValueError, match="fixed-point correction"):
        implicit_solve(
            RowCell(),
            _x(),
            torch.zeros(B, D, dtype=F64),
            SJFB(),
            Picard(),
            states=2,
            generator=torch.Generator(),
        )
    with pytest.raises(ValueError, match="states=0"):
        ImplicitLayer(RowCell(), JFB(), states=0)
