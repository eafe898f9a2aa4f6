"""Structured states (tuple / list / dict of tensors): the same answers, NFE and gradients as the same problem
packed into one tensor by hand, with per-sample freezing, separable evaluation and NaN isolation intact.

The reference is an independent hand-packed map: it slices a flat ``(B, D)`` tensor into the two resolutions
with explicit offsets, applies the same cell and concatenates; it does not use :mod:`deqgen.tree`.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import deqgen
from deqgen import (
    JFB,
    SJFB,
    Anderson,
    Broyden,
    FixedPointProblem,
    ImplicitDiff,
    ImplicitLayer,
    Picard,
    Status,
    run,
)
from deqgen.tree import spec_of, take

F64 = torch.float64
B, C = 3, 2
N_A, N_B = C * 8 * 8, 2 * C * 4 * 4


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


class TwoScale(nn.Module):
    """A two-resolution cell: ``a: (B, C, 8, 8)``, ``b: (B, 2C, 4, 4)``, each branch mixes in the other."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.conv_a = nn.Conv2d(C, C, 3, padding=1).double()
        self.conv_b = nn.Conv2d(2 * C, 2 * C, 3, padding=1).double()
        self.down = nn.Conv2d(C, 2 * C, 3, stride=2, padding=1).double()
        self.up = nn.Conv2d(2 * C, C, 1).double()

    def branches(self, a: Tensor, b: Tensor, xa: Tensor, xb: Tensor) -> tuple[Tensor, Tensor]:
        a_new = torch.tanh(0.3 * self.conv_a(a) + 0.2 * F.interpolate(self.up(b), scale_factor=2.0) + xa)
        b_new = torch.tanh(0.3 * self.conv_b(b) + 0.2 * self.down(a) + xb)
        return a_new, b_new

    def forward(self, z: tuple[Tensor, Tensor], x: tuple[Tensor, Tensor], k: int) -> tuple[Tensor, Tensor]:
        return self.branches(z[0], z[1], x[0], x[1])


def hand_packed(cell: TwoScale):
    """``f(z_flat, x, k)`` on ``(n, N_A + N_B)``: the reference packing, written out by hand."""

    def f(z: Tensor, x: tuple[Tensor, Tensor], k: int) -> Tensor:
        n = z.shape[0]
        a = z[:, :N_A].reshape(n, C, 8, 8)
        b = z[:, N_A:].reshape(n, 2 * C, 4, 4)
        a_new, b_new = cell.branches(a, b, x[0], x[1])
        return torch.cat([a_new.reshape(n, -1), b_new.reshape(n, -1)], dim=1)

    return f


def _inputs(seed: int = 1, scale: float = 1.0) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    return (
        scale * torch.randn(B, C, 8, 8, generator=g, dtype=F64),
        scale * torch.randn(B, 2 * C, 4, 4, generator=g, dtype=F64),
    )


def _zeros() -> tuple[Tensor, Tensor]:
    return torch.zeros(B, C, 8, 8, dtype=F64), torch.zeros(B, 2 * C, 4, 4, dtype=F64)


def _flat(t: tuple[Tensor, Tensor]) -> Tensor:
    return torch.cat([t[0].reshape(B, -1), t[1].reshape(B, -1)], dim=1)


@pytest.mark.parametrize("solver", [Picard(tol=1e-10, max_iter=80), Anderson(tol=1e-10), Broyden(tol=1e-10)])
def test_fixed_point_structured_equals_hand_packed(solver) -> None:
    cell, x = TwoScale(), _inputs()
    sol = deqgen.fixed_point(lambda z, k: cell(z, x, k), _zeros(), solver, indexed=True, trace=True)
    ref = deqgen.fixed_point(
        lambda z, k: hand_packed(cell)(z, x, k), _flat(_zeros()), solver, indexed=True, trace=True
    )
    assert isinstance(sol.z, tuple) and sol.z[0].shape == (B, C, 8, 8) and sol.z[1].shape == (B, 2 * C, 4, 4)
    torch.testing.assert_close(_flat(sol.z), ref.z, rtol=0, atol=1e-13)
    assert torch.equal(sol.stats.nfe, ref.stats.nfe) and sol.stats.iterations == ref.stats.iterations
    assert torch.equal(sol.stats.status, ref.stats.status) and bool(sol.stats.converged.all())
    torch.testing.assert_close(
        sol.stats.abs_trace, ref.stats.abs_trace, rtol=1e-9, atol=1e-15, equal_nan=True
    )


def _layer_grads(method, structured: bool, seed: int = 0) -> tuple[Tensor, dict[str, Tensor], Tensor]:
    cell = TwoScale(seed)
    xa, xb = (t.requires_grad_() for t in _inputs())
    solver = Anderson(tol=1e-11, max_iter=60)
    f = cell if structured else hand_packed(cell)
    layer = ImplicitLayer(f, method, solver)
    z0 = _zeros() if structured else _flat(_zeros())
    z, _ = layer((xa, xb), z0, torch.Generator().manual_seed(7))
    zf = _flat(z) if structured else z
    w = torch.linspace(-1, 1, zf.shape[1], dtype=F64)
    (zf * w).sin().sum().backward()
    grads = {n: p.grad.clone() for n, p in cell.named_parameters()}
    return zf.detach(), grads, torch.cat([xa.grad.flatten(), xb.grad.flatten()])


@pytest.mark.parametrize(
    "method",
    [ImplicitDiff(Anderson(tol=1e-11, max_iter=80)), JFB(k=2), SJFB(no_grad=(2, 6), with_grad=(1, 3))],
    ids=["implicit", "jfb", "sjfb"],
)
def test_layer_gradients_structured_equal_hand_packed(method) -> None:
    z, grads, gx = _layer_grads(method, structured=True)
    z_ref, grads_ref, gx_ref = _layer_grads(method, structured=False)
    torch.testing.assert_close(z, z_ref, rtol=0, atol=1e-12)
    torch.testing.assert_close(gx, gx_ref, rtol=1e-9, atol=1e-12)
    for name, g in grads.items():
        assert g.abs().max() > 0
        torch.testing.assert_close(g, grads_ref[name], rtol=1e-9, atol=1e-12, msg=name)


def test_mixed_dtypes_pack_in_the_widest_and_cast_back() -> None:
    seen: list[tuple[torch.dtype, torch.dtype]] = []

    def f(z: dict[str, Tensor]) -> dict[str, Tensor]:
        seen.append((z["coarse"].dtype, z["fine"].dtype))
        return {"coarse": 0.5 * z["coarse"] + 1.0, "fine": 0.25 * z["fine"] + 3.0}

    z0 = {"coarse": torch.zeros(2, 3, dtype=torch.float32), "fine": torch.zeros(2, 4, 4, dtype=F64)}
    sol = deqgen.fixed_point(f, z0, Anderson(tol=1e-12))
    assert set(seen) == {(torch.float32, F64)}
    assert sol.z["coarse"].dtype == torch.float32 and sol.z["fine"].dtype == F64
    torch.testing.assert_close(sol.z["coarse"], torch.full((2, 3), 2.0))  # exact fixed points: 2 and 4
    torch.testing.assert_close(sol.z["fine"], torch.full((2, 4, 4), 4.0, dtype=F64))
    problem = FixedPointProblem(f, z0)
    assert problem.z0.shape == (2, 3 + 16) and problem.z0.dtype == F64


def test_separable_structured_skips_converged_rows_and_is_batch_invariant() -> None:
    c = torch.tensor([0.2, 0.6, 0.95], dtype=F64)

    def f(z: tuple[Tensor, Tensor], rows: Tensor | None = None) -> tuple[Tensor, Tensor]:
        ci = take(c, rows)
        return torch.tanh(ci[:, None] * z[0] + 1.0), torch.tanh(ci[:, None, None] * z[1] - 0.5)

    z0 = (torch.zeros(3, 5, dtype=F64), torch.zeros(3, 2, 2, dtype=F64))
    sol = deqgen.fixed_point(f, z0, Picard(tol=1e-9, max_iter=400), separable=True)
    assert sol.stats.rows_evaluated / 3 == pytest.approx(sol.stats.nfe.double().mean().item())
    assert len(set(sol.stats.nfe.tolist())) == 3  # the rows converged at different counts
    for b in range(3):
        alone = deqgen.fixed_point(
            lambda z, rows=None, b=b: (torch.tanh(c[b] * z[0] + 1.0), torch.tanh(c[b] * z[1] - 0.5)),
            (z0[0][b : b + 1], z0[1][b : b + 1]),
            Picard(tol=1e-9, max_iter=400),
        )
        assert int(alone.stats.nfe[0]) == int(sol.stats.nfe[b])
        torch.testing.assert_close(alone.z[0][0], sol.z[0][b], rtol=0, atol=0)
        torch.testing.assert_close(alone.z[1][0], sol.z[1][b], rtol=0, atol=0)


def test_nan_in_one_leaf_of_one_sample_isolates_that_sample() -> None:
    def f(z: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
        b = 0.5 * z[1] + 1.0
        b = torch.where(torch.arange(3)[:, None] == 1, b / 0.0 * 0.0, b)  # sample 1 turns NaN
        return 0.5 * z[0] + 2.0, b

    sol = deqgen.fixed_point(
        f, (torch.zeros(3, 2, dtype=F64), torch.zeros(3, 4, dtype=F64)), Anderson(tol=1e-10)
    )
    assert sol.stats.status.tolist() == [Status.CONVERGED, Status.NON_FINITE, Status.CONVERGED]
    torch.testing.assert_close(sol.z[0][[0, 2]], torch.full((2, 2), 4.0, dtype=F64))
    assert torch.isfinite(sol.z[1]).all()  # the best finite iterate (z0) is returned for the NaN sample


def test_run_returns_the_structure() -> None:
    z0 = [torch.zeros(2, 3), torch.zeros(2, 1)]
    problem = FixedPointProblem(lambda z: [0.5 * z[0] + 1.0, 0.5 * z[1] - 1.0], z0)
    assert problem.z0.shape == (2, 4)  # the loop sees a plain (B, D) tensor problem
    z = run(problem, Picard(tol=1e-7, max_iter=100)).z
    assert isinstance(z, list)
    torch.testing.assert_close(z[0], torch.full((2, 3), 2.0), atol=1e-6, rtol=0)
    torch.testing.assert_close(z[1], torch.full((2, 1), -2.0), atol=1e-6, rtol=0)


def test_structure_errors_name_the_leaf() -> None:
    with pytest.raises(ValueError, match="batch dim 0"):
        spec_of((torch.zeros(2, 3), torch.zeros(3, 3)))
    with pytest.raises(TypeError, match=r"z0\[1\]"):
        spec_of((torch.zeros(2, 3), 5))
    with pytest.raises(ValueError, match=r"f's output\[1\] has shape \(2, 2\)"):
        deqgen.fixed_point(lambda z: (z[0], z[1][:, :2]), (torch.zeros(2, 3), torch.zeros(2, 3)))
    with pytest.raises(TypeError, match="structure of z0"):
        deqgen.fixed_point(lambda z: z[0], (torch.zeros(2, 3), torch.zeros(2, 3)))
