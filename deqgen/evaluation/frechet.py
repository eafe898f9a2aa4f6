"""Feature-space sample-quality metrics in torch: Fréchet distance (FID), Inception Score, improved precision/recall.

These functions take features (or class probabilities) that some extractor already produced, so they work with
any network: Inception-v3 pool_3 features for the standard numbers, a small digits classifier for the CPU demo.

Numerics:

- Statistics are accumulated in float64 with Chan et al.'s pairwise update (:class:`RunningStatistics`), so
  streaming batches gives the same mean and covariance as one pass, without the cancellation of the
  ``E[xx^T] - mu mu^T`` formula.
- ``tr sqrt(S1 S2)`` is the sum of the square roots of the eigenvalues of ``S1 S2``, as torch-fidelity and
  torchmetrics compute it (neither calls ``scipy.linalg.sqrtm``). By default those eigenvalues come from the
  symmetric PSD matrix ``S1^1/2 S2 S1^1/2`` (same spectrum) via ``eigh``: real by construction, faster than a
  general ``eigvals``, and fine with singular covariances. Tiny negative eigenvalues from round-off are clamped
  to 0.
"""

from __future__ import annotations

import logging
import math
from typing import Literal, NamedTuple

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "PrecisionRecall",
    "RunningStatistics",
    "feature_statistics",
    "fid_from_features",
    "frechet_distance",
    "inception_score",
    "precision_recall",
    "trace_sqrt_product",
]

logger = logging.getLogger(__name__)

ArrayLike = Tensor | np.ndarray
SqrtMethod = Literal["eigh", "eigvals"]


def _as_float64(x: ArrayLike, name: str) -> Tensor:
    tensor = torch.as_tensor(x).detach().to(device="cpu", dtype=torch.float64)
    if not torch.isfinite(tensor).all():
        raise ValueError(f"{name} contains NaN or inf; check the features that produced it")
    return tensor


class RunningStatistics:
    """Streaming mean and covariance of feature rows, in float64 (Chan et al. 1979 pairwise update).

    Example:
        >>> import torch
        >>> stats = RunningStatistics()
        >>> for batch in torch.randn(100, 4, dtype=torch.float64).split(30):
        ...     stats.update(batch)
        >>> stats.count
        100
    """

    def __init__(self) -> None:
        self.count = 0
        self._mean: Tensor | None = None
        self._scatter: Tensor | None = None  # sum over rows of (x - mean)(x - mean)^T, (D, D)

    def update(self, features: ArrayLike) -> None:
        """Add a batch of rows.

        Args:
            features: ``(B, D)`` any real dtype; converted to float64 on CPU. ``B == 0`` is a no-op.
        """
        batch = _as_float64(features, "features")
        if batch.dim() != 2:
            raise ValueError(
                f"RunningStatistics.update expects (B, D) features, got shape {tuple(batch.shape)}"
            )
        if self._mean is not None and batch.shape[1] != self._mean.shape[0]:
            raise ValueError(f"feature dim changed from {self._mean.shape[0]} to {batch.shape[1]}")
        n_b = batch.shape[0]
        if n_b == 0:
            return
        mean_b = batch.mean(dim=0)
        centred = batch - mean_b
        scatter_b = centred.T @ centred
        if self._mean is None or self._scatter is None:
            self.count, self._mean, self._scatter = n_b, mean_b, scatter_b
            return
        n_a, n = self.count, self.count + n_b
        delta = mean_b - self._mean
        self._mean = self._mean + delta * (n_b / n)
        self._scatter = self._scatter + scatter_b + torch.outer(delta, delta) * (n_a * n_b / n)
        self.count = n

    @property
    def mean(self) -> Tensor:
        """``(D,)`` float64 mean of all rows seen."""
        if self._mean is None:
            raise ValueError("RunningStatistics has seen no rows yet; call update() first")
        return self._mean

    def covariance(self) -> Tensor:
        """``(D, D)`` float64 unbiased covariance (divides by ``N - 1``, like ``np.cov``)."""
        if self._scatter is None or self.count < 2:
            raise ValueError(f"a covariance needs at least 2 rows, got {self.count}")
        return self._scatter / (self.count - 1)


def feature_statistics(features: ArrayLike, *, chunk_size: int = 8192) -> tuple[Tensor, Tensor]:
    """Mean and covariance of a feature matrix, in float64.

    Args:
        features: ``(N, D)`` any real dtype, ``N >= 2``. Processed ``chunk_size`` rows at a time so only one chunk
            is ever held in float64.
        chunk_size: rows per chunk.

    Returns:
        ``(mu, sigma)``: ``(D,)`` and ``(D, D)`` float64 on CPU; ``sigma`` is the unbiased (``N - 1``) covariance.
    """
    features = torch.as_tensor(features)
    if features.dim() != 2:
        raise ValueError(f"feature_statistics expects (N, D) features, got shape {tuple(features.shape)}")
    stats = RunningStatistics()
    for chunk in features.split(chunk_size):
        stats.update(chunk)
    return stats.mean, stats.covariance()


def _psd_sqrt(sigma: Tensor) -> Tensor:
    eigenvalues, eigenvectors = torch.linalg.eigh(sigma)
    return (eigenvectors * eigenvalues.clamp(min=0).sqrt()) @ eigenvectors.T


def trace_sqrt_product(sigma1: ArrayLike, sigma2: ArrayLike, *, method: SqrtMethod = "eigh") -> float:
    """``tr((S1 S2)^1/2)`` = sum of the square roots of the eigenvalues of ``S1 S2``, for PSD ``S1``, ``S2``.

    Args:
        sigma1: ``(D, D)`` symmetric PSD.
        sigma2: ``(D, D)`` symmetric PSD.
        method: ``"eigh"`` (default) takes the eigenvalues of ``S1^1/2 S2 S1^1/2`` with a symmetric solver;
            ``"eigvals"`` takes those of ``S1 S2`` with a general solver and keeps the real parts, exactly as
            torch-fidelity does. Both clamp negative round-off to 0.

    Returns:
        The trace, a Python float (float64 precision).
    """
    s1, s2 = _as_float64(sigma1, "sigma1"), _as_float64(sigma2, "sigma2")
    if method == "eigh":
        root1 = _psd_sqrt((s1 + s1.T) / 2)
        middle = root1 @ ((s2 + s2.T) / 2) @ root1
        eigenvalues = torch.linalg.eigvalsh((middle + middle.T) / 2)
    elif method == "eigvals":
        eigenvalues = torch.linalg.eigvals(s1 @ s2).real
    else:
        raise ValueError(f"trace_sqrt_product got method={method!r}; use 'eigh' or 'eigvals'")
    return float(eigenvalues.clamp(min=0).sqrt().sum())


def frechet_distance(
    mu1: ArrayLike, sigma1: ArrayLike, mu2: ArrayLike, sigma2: ArrayLike, *, method: SqrtMethod = "eigh"
) -> float:
    """Fréchet distance between the Gaussians ``N(mu1, sigma1)`` and ``N(mu2, sigma2)``.

    ``||mu1 - mu2||^2 + tr(S1) + tr(S2) - 2 tr((S1 S2)^1/2)``, computed in float64 (see
    :func:`trace_sqrt_product`). FID is this on Inception pool_3 statistics.

    Args:
        mu1: ``(D,)`` mean of the first set.
        sigma1: ``(D, D)`` covariance of the first set (PSD; may be singular).
        mu2: ``(D,)`` mean of the second set.
        sigma2: ``(D, D)`` covariance of the second set.
        method: how to get ``tr((S1 S2)^1/2)``; see :func:`trace_sqrt_product`.

    Returns:
        The distance as a Python float, clamped at 0 (round-off can make it slightly negative).
    """
    m1, m2 = _as_float64(mu1, "mu1"), _as_float64(mu2, "mu2")
    s1, s2 = _as_float64(sigma1, "sigma1"), _as_float64(sigma2, "sigma2")
    dim = m1.shape[0] if m1.dim() == 1 else -1
    if m1.shape != m2.shape or dim < 0 or s1.shape != (dim, dim) or s2.shape != (dim, dim):
        raise ValueError(
            "frechet_distance expects mu (D,) and sigma (D, D) for both sets, got "
            f"mu1 {tuple(m1.shape)}, sigma1 {tuple(s1.shape)}, mu2 {tuple(m2.shape)}, sigma2 {tuple(s2.shape)}"
        )
    diff = m1 - m2
    distance = (
        float(diff @ diff) + float(s1.trace() + s2.trace()) - 2.0 * trace_sqrt_product(s1, s2, method=method)
    )
    return max(distance, 0.0)


def fid_from_features(features1: ArrayLike, features2: ArrayLike, *, method: SqrtMethod = "eigh") -> float:
    """Fréchet distance between the Gaussian fits of two feature sets.

    Args:
        features1: ``(N1, D)``, ``N1 >= 2``.
        features2: ``(N2, D)``, ``N2 >= 2``.
        method: see :func:`trace_sqrt_product`.

    Returns:
        The distance, a Python float.
    """
    mu1, sigma1 = feature_statistics(features1)
    mu2, sigma2 = feature_statistics(features2)
    return frechet_distance(mu1, sigma1, mu2, sigma2, method=method)


def inception_score(
    probs: ArrayLike, splits: int = 10, *, generator: torch.Generator | None = None
) -> tuple[float, float]:
    """Inception Score ``exp(E_x KL(p(y|x) || p(y)))``, averaged over ``splits`` disjoint parts.

    Args:
        probs: ``(N, K)`` class probabilities (rows are non-negative and sum to 1), e.g. a softmax output.
        splits: number of parts (contiguous, as in torch-fidelity and the ADM evaluator). Each part needs
            enough samples for its marginal ``p(y)`` to be meaningful.
        generator: if given, rows are shuffled with it before splitting (ADM shuffles; torch-fidelity shuffles
            with a fixed seed). ``None`` keeps the given order.

    Returns:
        ``(mean, std)`` over the parts; std is the population standard deviation (``np.std``), as both
        reference implementations report.
    """
    p = _as_float64(probs, "probs")
    if p.dim() != 2 or p.shape[0] < splits or splits < 1:
        raise ValueError(
            f"inception_score needs (N, K) probs with N >= splits >= 1, got {tuple(p.shape)}, {splits=}"
        )
    if (p < 0).any() or not torch.allclose(p.sum(dim=1), torch.ones(p.shape[0], dtype=p.dtype), atol=1e-3):
        raise ValueError(
            "inception_score expects probabilities (rows >= 0 summing to 1); apply softmax to logits"
        )
    if generator is not None:
        p = p[torch.randperm(p.shape[0], generator=generator)]
    scores = []
    for part in torch.tensor_split(p, splits):
        marginal = part.mean(dim=0, keepdim=True)
        # xlogy gives 0 * log 0 = 0 for classes a sample (or the whole part) never predicts.
        kl = (torch.special.xlogy(part, part) - torch.special.xlogy(part, marginal)).sum(dim=1)
        scores.append(math.exp(float(kl.mean())))
    return float(np.mean(scores)), float(np.std(scores))


class PrecisionRecall(NamedTuple):
    """Improved precision and recall (Kynkäänniemi et al. 2019), both in ``[0, 1]``."""

    precision: float
    recall: float


def _pairwise_sq_dists(a: Tensor, b: Tensor) -> Tensor:
    """``(A, B)`` squared Euclidean distances, clamped at 0 (the norm expansion can round below it)."""
    return ((a * a).sum(dim=1, keepdim=True) - 2.0 * (a @ b.T) + (b * b).sum(dim=1)).clamp_(min=0)


def _knn_sq_radii(points: Tensor, k: int, chunk_size: int) -> Tensor:
    """Squared distance of each row to its k-th nearest other row, ``(N,)``; memory ``O(chunk_size^2)``."""
    radii = []
    for rows in points.split(chunk_size):
        best = None  # (R, k+1) smallest distances so far; the row itself contributes the 0.
        for cols in points.split(chunk_size):
            dists = _pairwise_sq_dists(rows, cols)
            merged = dists if best is None else torch.cat([best, dists], dim=1)
            best = merged.topk(min(k + 1, merged.shape[1]), dim=1, largest=False).values
        assert best is not None
        radii.append(best[:, k])
    return torch.cat(radii)


def _fraction_inside(queries: Tensor, centres: Tensor, sq_radii: Tensor, chunk_size: int) -> float:
    """Fraction of query rows within the k-NN ball of at least one centre row."""
    inside = 0
    for rows in queries.split(chunk_size):
        hit = torch.zeros(rows.shape[0], dtype=torch.bool, device=rows.device)
        for cols, col_radii in zip(centres.split(chunk_size), sq_radii.split(chunk_size)):
            hit |= (_pairwise_sq_dists(rows, cols) <= col_radii).any(dim=1)
        inside += int(hit.sum())
    return inside / queries.shape[0]


def precision_recall(
    real_features: ArrayLike, fake_features: ArrayLike, k: int = 3, *, chunk_size: int = 4096
) -> PrecisionRecall:
    """Improved precision/recall of Kynkäänniemi et al. (NeurIPS 2019), as in the ADM evaluator (k=3).

    Each set's manifold is the union of balls around its points, each ball's radius the distance to the point's
    k-th nearest neighbour in the same set. Precision is the fraction of fake points inside the real manifold;
    recall the fraction of real points inside the fake manifold. Distances are computed in blocks of
    ``chunk_size x chunk_size`` so memory stays bounded for 50k x 50k. The work runs on the inputs' device in
    their floating dtype (at least float32), using the ``|a|^2 - 2 a.b + |b|^2`` expansion (a matmul per block).

    Args:
        real_features: ``(N_r, D)``, ``N_r > k``.
        fake_features: ``(N_f, D)``, ``N_f > k``.
        k: neighbourhood size.
        chunk_size: block side for the distance computations.

    Returns:
        :class:`PrecisionRecall` ``(precision, recall)``.
    """
    real = torch.as_tensor(real_features).detach()
    fake = torch.as_tensor(fake_features).detach()
    dtype = torch.promote_types(torch.promote_types(real.dtype, fake.dtype), torch.float32)
    real, fake = real.to(dtype), fake.to(device=real.device, dtype=dtype)
    if real.dim() != 2 or fake.dim() != 2 or real.shape[1] != fake.shape[1]:
        raise ValueError(
            f"precision_recall expects (N, D) features, got {tuple(real.shape)} and {tuple(fake.shape)}"
        )
    if k < 1 or min(real.shape[0], fake.shape[0]) <= k:
        raise ValueError(
            f"precision_recall needs k >= 1 and more than k rows per set, got {k=}, "
            f"{real.shape[0]} real and {fake.shape[0]} fake rows"
        )
    real_radii = _knn_sq_radii(real, k, chunk_size)
    fake_radii = _knn_sq_radii(fake, k, chunk_size)
    precision = _fraction_inside(fake, real, real_radii, chunk_size)
    recall = _fraction_inside(real, fake, fake_radii, chunk_size)
    return PrecisionRecall(precision, recall)
