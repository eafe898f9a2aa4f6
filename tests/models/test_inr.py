"""The DEQ implicit neural representation: shapes, a separable solve that converges at init, gradients
(implicit vs a long unroll, JFB), the explicit twin's parity, and warm starts from a previous equilibrium."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace

import pytest
import torch

from deqgen import JFB, Anderson, ImplicitDiff, Picard, Unrolled
from deqgen.models.inr import DEQINR, PRESETS, ExplicitMLP, build_inr, pixel_grid

TINY = PRESETS["tiny"]
F64 = torch.float64


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _model(**kw: object) -> DEQINR:
    kw.setdefault("train_solver", Picard(tol=1e-6, max_iter=100))
    model = build_inr(TINY, generator=torch.Generator().manual_seed(3), **kw)  # type: ignore[arg-type]
    assert isinstance(model, DEQINR)
    return model


def test_pixel_grid_is_row_major_pixel_centres() -> None:
    grid = pixel_grid(2, 4)
    assert grid.shape == (8, 2)
    torch.testing.assert_close(grid[0], torch.tensor([-0.5, -0.75]))  # (y, x) of the top-left pixel centre
    torch.testing.assert_close(grid[-1], torch.tensor([0.5, 0.75]))
    torch.testing.assert_close(grid[1], torch.tensor([-0.5, -0.25]))  # x moves fastest


def test_separable_solve_converges_and_counts_rows_per_pixel() -> None:
    model = _model(gradient=JFB()).eval()
    rgb, info = model(pixel_grid(6, 8))
    assert rgb.shape == (48, 3)
    stats = info.forward.stats
    assert stats.all_converged, stats.summary()
    assert stats.rows_evaluated == int(stats.nfe.sum())  # separable: converged pixels cost nothing more


def test_explicit_twin_has_the_same_parameters_and_frequencies() -> None:
    for cfg in (TINY, PRESETS["image"]):
        deq = build_inr(cfg, generator=torch.Generator().manual_seed(0))
        mlp = build_inr(cfg, implicit=False, generator=torch.Generator().manual_seed(0))
        assert isinstance(mlp, ExplicitMLP)
        assert sum(p.numel() for p in deq.parameters()) == sum(p.numel() for p in mlp.parameters())
        torch.testing.assert_close(deq.features.freqs, mlp.features.freqs)
    rgb, info = mlp(pixel_grid(3, 3))
    assert rgb.shape == (9, 3) and info is None


def _grads(model: torch.nn.Module, coords: torch.Tensor, target: torch.Tensor) -> dict[str, torch.Tensor]:
    model.zero_grad()
    rgb, _ = model(coords)
    (rgb - target).pow(2).mean().backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_implicit_gradient_matches_a_long_unroll_and_jfb_reaches_every_parameter() -> None:
    coords = pixel_grid(4, 5).to(F64)
    target = torch.rand(20, 3, generator=torch.Generator().manual_seed(0), dtype=F64)
    tight = Anderson(tol=1e-12, max_iter=200)
    imp = _model(gradient=ImplicitDiff(solver=Picard(tol=1e-13, max_iter=400)), train_solver=tight).double()
    unr = _model(gradient=Unrolled(k=150), train_solver=tight).double()
    jfb = _model(gradient=JFB(k=1), train_solver=tight).double()
    g_imp, g_unr, g_jfb = (_grads(m, coords, target) for m in (imp, unr, jfb))
    names = [n for n, _ in imp.named_parameters()]
    assert set(g_imp) == set(g_unr) == set(g_jfb) == set(names)
    for n in names:
        scale = g_unr[n].abs().max().clamp_min(1e-12)
        assert float((g_imp[n] - g_unr[n]).abs().max() / scale) < 1e-6, n
    w = "layer.f.linear.parametrizations.weight.original1"
    assert float((g_jfb[w] - g_imp[w]).abs().max() / g_imp[w].abs().max()) > 1e-3  # JFB is approximate


def test_warm_start_from_the_equilibrium_needs_one_evaluation() -> None:
    model = _model(gradient=JFB(), train_solver=Picard(tol=1e-5, max_iter=100)).eval()
    coords = pixel_grid(5, 5)
    _, cold = model(coords)
    _, warm = model(coords, z0_NH=cold.forward.z)
    assert int(cold.forward.stats.nfe.min()) > 2
    assert int(warm.forward.stats.nfe.max()) == 1 and warm.forward.stats.all_converged


def test_relu_cell_solves_to_its_own_fixed_point() -> None:
    cfg = replace(TINY, activation="relu")
    model = build_inr(
        cfg,
        gradient=JFB(),
        train_solver=Picard(tol=1e-6, max_iter=100),
        generator=torch.Generator().manual_seed(3),
    ).eval()
    assert isinstance(model, DEQINR)
    coords = pixel_grid(4, 6)
    _, info = model(coords)
    assert info.forward.stats.all_converged, info.forward.stats.summary()
    z = info.forward.z
    u = model.inject(model.features(coords))
    with torch.no_grad():
        torch.testing.assert_close(torch.relu(model.layer.f.linear(z) + u), z, atol=1e-5, rtol=1e-5)
        assert not torch.allclose(torch.tanh(model.layer.f.linear(z) + u), z, atol=1e-3)  # not the tanh cell
    with pytest.raises(ValueError, match="activation"):
        replace(TINY, activation="gelu")  # type: ignore[arg-type]
