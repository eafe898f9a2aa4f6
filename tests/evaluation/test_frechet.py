"""Fréchet distance against scipy's sqrtm closed form, IS edge cases, and improved precision/recall."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from deqgen.evaluation.frechet import (
    RunningStatistics,
    feature_statistics,
    fid_from_features,
    frechet_distance,
    inception_score,
    precision_recall,
    trace_sqrt_product,
)

scipy_linalg = pytest.importorskip("scipy.linalg")


def _random_spd(dim: int, generator: torch.Generator, ridge: float = 0.1) -> torch.Tensor:
    a = torch.randn(dim, dim, generator=generator, dtype=torch.float64)
    return a @ a.T / dim + ridge * torch.eye(dim, dtype=torch.float64)


def _closed_form_scipy(mu1: np.ndarray, s1: np.ndarray, mu2: np.ndarray, s2: np.ndarray) -> float:
    """||mu1 - mu2||^2 + tr(S1 + S2 - 2 (S1^1/2 S2 S1^1/2)^1/2), matrix square roots by scipy.linalg.sqrtm."""
    root1 = np.real(scipy_linalg.sqrtm(s1))
    cross = np.real(scipy_linalg.sqrtm(root1 @ s2 @ root1))
    return float(np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2.0 * np.trace(cross))


def test_identical_feature_sets_give_zero() -> None:
    feats = torch.randn(500, 16, generator=torch.Generator().manual_seed(0)) * 3 + 1
    assert fid_from_features(feats, feats) <= 1e-6
    assert fid_from_features(feats, feats, method="eigvals") <= 1e-6


@pytest.mark.parametrize("method", ["eigh", "eigvals"])
def test_exact_gaussians_match_scipy_sqrtm(method: str) -> None:
    gen = torch.Generator().manual_seed(1)
    dim = 12
    mu1, mu2 = (
        torch.randn(dim, generator=gen, dtype=torch.float64),
        torch.randn(dim, generator=gen, dtype=torch.float64),
    )
    s1, s2 = _random_spd(dim, gen), _random_spd(dim, gen)
    expected = _closed_form_scipy(mu1.numpy(), s1.numpy(), mu2.numpy(), s2.numpy())
    got = frechet_distance(mu1, s1, mu2, s2, method=method)  # type: ignore[arg-type]
    assert got == pytest.approx(expected, rel=1e-8)
    # numpy inputs work too.
    assert frechet_distance(mu1.numpy(), s1.numpy(), mu2.numpy(), s2.numpy()) == pytest.approx(
        expected, rel=1e-8
    )


def test_empirical_samples_approach_the_exact_distance() -> None:
    gen = torch.Generator().manual_seed(2)
    dim, n = 4, 200_000
    mu1, mu2 = torch.zeros(dim, dtype=torch.float64), torch.full((dim,), 0.5, dtype=torch.float64)
    s1, s2 = _random_spd(dim, gen), _random_spd(dim, gen)
    x1 = mu1 + torch.randn(n, dim, generator=gen, dtype=torch.float64) @ torch.linalg.cholesky(s1).T
    x2 = mu2 + torch.randn(n, dim, generator=gen, dtype=torch.float64) @ torch.linalg.cholesky(s2).T
    exact = _closed_form_scipy(mu1.numpy(), s1.numpy(), mu2.numpy(), s2.numpy())
    # Sampling error of the mean/covariance estimates at n=200k is O(1e-3) here; 2% is a loose bound.
    assert fid_from_features(x1, x2) == pytest.approx(exact, rel=2e-2)


def test_diagonal_covariances_match_hand_formula_including_singular() -> None:
    a = torch.tensor([1.0, 4.0, 0.0, 2.5, 0.0], dtype=torch.float64)  # zeros: singular covariance
    b = torch.tensor([9.0, 1.0, 3.0, 2.5, 0.0], dtype=torch.float64)
    mu1, mu2 = torch.tensor([0.0, 1.0, 2.0, 0.0, 0.0]), torch.tensor([1.0, 1.0, 0.0, 0.0, 0.0])
    expected = float(((mu1 - mu2) ** 2).sum() + ((a.sqrt() - b.sqrt()) ** 2).sum())
    for method in ("eigh", "eigvals"):
        got = frechet_distance(mu1, torch.diag(a), mu2, torch.diag(b), method=method)  # type: ignore[arg-type]
        assert got == pytest.approx(expected, rel=1e-12)


def test_rank_deficient_empirical_covariance_is_finite() -> None:
    # 10 samples in 32 dimensions: both covariances have rank <= 9.
    gen = torch.Generator().manual_seed(3)
    a, b = torch.randn(10, 32, generator=gen), torch.randn(10, 32, generator=gen)
    value = fid_from_features(a, b)
    assert np.isfinite(value) and value > 0
    assert fid_from_features(a, a) <= 1e-6


def test_trace_sqrt_product_methods_agree() -> None:
    gen = torch.Generator().manual_seed(4)
    s1, s2 = _random_spd(20, gen, ridge=1e-3), _random_spd(20, gen, ridge=1e-3)
    assert trace_sqrt_product(s1, s2) == pytest.approx(trace_sqrt_product(s1, s2, method="eigvals"), rel=1e-9)


def test_streaming_statistics_match_numpy_with_a_large_offset() -> None:
    # The E[xx^T] - mu mu^T formula would lose about 8 digits to cancellation at this offset.
    feats = torch.randn(1000, 6, generator=torch.Generator().manual_seed(5), dtype=torch.float64) + 1e4
    stats = RunningStatistics()
    for batch in feats.split(77):
        stats.update(batch)
    np.testing.assert_allclose(stats.mean.numpy(), feats.numpy().mean(axis=0), rtol=1e-14)
    np.testing.assert_allclose(
        stats.covariance().numpy(), np.cov(feats.numpy(), rowvar=False), rtol=1e-9, atol=1e-12
    )
    mu, sigma = feature_statistics(feats.float(), chunk_size=100)
    assert mu.dtype == sigma.dtype == torch.float64 and sigma.shape == (6, 6)


def test_bad_shapes_and_values_are_rejected() -> None:
    eye = torch.eye(3)
    with pytest.raises(ValueError, match=r"mu \(D,\)"):
        frechet_distance(torch.zeros(3), eye, torch.zeros(4), eye)
    with pytest.raises(ValueError, match="NaN"):
        frechet_distance(torch.tensor([0.0, float("nan"), 0.0]), eye, torch.zeros(3), eye)
    with pytest.raises(ValueError, match="at least 2 rows"):
        feature_statistics(torch.zeros(1, 3))


def test_inception_score_one_hot_uniform_is_k_and_constant_is_one() -> None:
    k, splits = 10, 5
    labels = torch.arange(k * 20) % k  # every split sees every class equally often
    one_hot = torch.nn.functional.one_hot(labels, k).double()
    mean, std = inception_score(one_hot, splits=splits)
    assert mean == pytest.approx(k, rel=1e-12) and std == pytest.approx(0.0, abs=1e-12)
    constant = torch.softmax(torch.randn(1, k, generator=torch.Generator().manual_seed(0)), dim=1).repeat(
        200, 1
    )
    mean, std = inception_score(constant, splits=splits)
    assert mean == pytest.approx(1.0, abs=1e-6) and std == pytest.approx(0.0, abs=1e-6)


def test_inception_score_shuffle_is_reproducible_and_validates() -> None:
    probs = torch.softmax(torch.randn(300, 7, generator=torch.Generator().manual_seed(1)), dim=1)
    first = inception_score(probs, 3, generator=torch.Generator().manual_seed(0))
    assert first == inception_score(probs, 3, generator=torch.Generator().manual_seed(0))
    assert 1.0 < first[0] < 7.0
    with pytest.raises(ValueError, match="softmax"):
        inception_score(torch.randn(30, 7), 3)


def test_precision_recall_identical_sets_are_one() -> None:
    feats = torch.randn(300, 8, generator=torch.Generator().manual_seed(0))
    assert precision_recall(feats, feats) == (1.0, 1.0)


def test_precision_recall_far_clusters_are_zero() -> None:
    gen = torch.Generator().manual_seed(1)
    real, fake = torch.randn(200, 8, generator=gen), torch.randn(250, 8, generator=gen) + 100.0
    assert precision_recall(real, fake) == (0.0, 0.0)


def test_precision_recall_half_covered_and_chunking_invariant() -> None:
    gen = torch.Generator().manual_seed(2)
    real = torch.randn(400, 4, generator=gen)
    fake = torch.cat([torch.randn(200, 4, generator=gen), torch.randn(200, 4, generator=gen) + 50.0])
    result = precision_recall(real, fake, k=3)
    # Half of the fakes lie far outside the real manifold; the other half mostly inside it.
    assert 0.4 <= result.precision <= 0.5
    assert result.recall > 0.8
    assert precision_recall(real, fake, k=3, chunk_size=37) == result
