"""The multiscale DEQ classifier: shapes, convergence at a random init, gradients (implicit vs a long unroll,
JFB), the explicit twin's parameter parity, and dropout masks that follow the rows of a separable solve."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

import pytest
import torch

from deqgen import JFB, Anderson, ImplicitDiff, Picard, Unrolled
from deqgen.models.mdeq import PRESETS, ExplicitCNN, MDEQClassifier, MDEQConfig, build_classifier

TINY = PRESETS["tiny"]
F64 = torch.float64


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _images(
    cfg: MDEQConfig, batch: int = 4, seed: int = 0, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, cfg.in_channels, cfg.image_size, cfg.image_size, generator=g).to(dtype)


def _model(cfg: MDEQConfig = TINY, **kw: object) -> MDEQClassifier:
    kw.setdefault("train_solver", Anderson(tol=1e-5, max_iter=60))
    model = build_classifier(cfg, generator=torch.Generator().manual_seed(1), **kw)  # type: ignore[arg-type]
    assert isinstance(model, MDEQClassifier)
    return model


@pytest.mark.parametrize("channels", [(8, 16), (8, 16, 16)])
def test_shapes_and_convergence_at_random_init(channels: tuple[int, ...]) -> None:
    cfg = dataclasses.replace(TINY, channels=channels)
    model = _model(cfg, gradient=JFB()).eval()
    logits, info = model(_images(cfg, batch=6))
    assert logits.shape == (6, cfg.num_classes)
    z = info.forward.z
    assert isinstance(z, tuple) and len(z) == len(channels)
    assert [tuple(t.shape) for t in z] == [(6, c, s, s) for c, s in zip(channels, cfg.sides)]
    stats = info.forward.stats
    assert stats.all_converged, stats.summary()
    assert float(stats.rel_residual.max()) <= 1e-5


def test_explicit_twin_has_the_same_parameter_count() -> None:
    for cfg in (TINY, PRESETS["digits"]):
        deq, cnn = build_classifier(cfg), build_classifier(cfg, implicit=False)
        assert isinstance(cnn, ExplicitCNN)
        n_deq = sum(p.numel() for p in deq.parameters())
        assert n_deq == sum(p.numel() for p in cnn.parameters())
        assert n_deq > 1000
    logits, info = build_classifier(TINY, implicit=False)(_images(TINY))
    assert logits.shape == (4, 10) and info is None


def _grads(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
    model.zero_grad()
    logits, _ = model(images)
    torch.nn.functional.cross_entropy(logits, labels).backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_implicit_gradient_matches_a_long_unroll_and_jfb_reaches_every_parameter() -> None:
    images, labels = _images(TINY, dtype=F64), torch.tensor([0, 1, 2, 3])
    tight = Anderson(tol=1e-12, max_iter=200)
    implicit = _model(
        gradient=ImplicitDiff(solver=Picard(tol=1e-12, max_iter=300)), train_solver=tight
    ).double()
    unrolled = _model(gradient=Unrolled(k=120), train_solver=tight).double()
    jfb = _model(gradient=JFB(k=1), train_solver=tight).double()
    g_imp, g_unr, g_jfb = (_grads(m.train(), images, labels) for m in (implicit, unrolled, jfb))
    names = [n for n, _ in implicit.named_parameters()]
    assert set(g_imp) == set(g_unr) == set(g_jfb) == set(names)  # every parameter gets a gradient
    for n in names:
        assert torch.isfinite(g_jfb[n]).all()
        scale = g_unr[n].abs().max().clamp_min(1e-12)
        assert float((g_imp[n] - g_unr[n]).abs().max() / scale) < 1e-6, n
    cell = [n for n in names if n.startswith("layer.")]
    gap = max(float((g_jfb[n] - g_imp[n]).abs().max() / g_imp[n].abs().max().clamp_min(1e-12)) for n in cell)
    assert gap > 1e-3  # JFB drops (I - J)^-1: a different (approximate) gradient, not a copy


def test_separable_training_with_dropout_keeps_each_rows_mask() -> None:
    cfg = dataclasses.replace(TINY, dropout=0.3)
    images = _images(cfg, batch=8, dtype=F64)
    outs = {}
    for separable in (False, True):
        model = _model(cfg, gradient=JFB(), separable=separable).double().train()
        logits, info = model(images, generator=torch.Generator().manual_seed(7))
        outs[separable] = (logits.detach(), info.forward.stats)
    (full, s_full), (sep, s_sep) = outs[False], outs[True]
    torch.testing.assert_close(sep, full, rtol=0, atol=1e-9)
    assert s_sep.rows_evaluated == int(s_sep.nfe.sum()) < s_full.rows_evaluated
