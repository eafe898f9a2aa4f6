"""FID / IS / KID / precision-recall: torch-fidelity with local Inception weights, or any ``nn.Module`` extractor.

Two paths:

- :func:`compute_fidelity_metrics` wraps ``torch_fidelity.calculate_metrics`` with the standard
  ``inception-v3-compat`` extractor. deqgen never downloads: the weights file
  ``weights-inception-2015-12-05-6726825d.pth`` must already be on disk and is passed as
  ``feature_extractor_weights_path``. torch-fidelity (and the torchvision it imports) is an optional dependency,
  ``pip install 'deqgen[eval]'``, imported only when this function runs.
- :class:`FeatureFIDMetric` works with any feature extractor module and needs no extra package: it streams
  batches through the module and accumulates float64 statistics, like torchmetrics' ``FrechetInceptionDistance``
  with a custom ``feature=`` module. Tests and the CPU digits demo use it with a small digits classifier.
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import Dataset

from deqgen.evaluation.frechet import (
    PrecisionRecall,
    RunningStatistics,
    frechet_distance,
    precision_recall,
)
from deqgen.evaluation.npz import read_samples_npz

__all__ = [
    "INCEPTION_WEIGHTS_FILENAME",
    "INCEPTION_WEIGHTS_URL",
    "FeatureFIDMetric",
    "UInt8ImageDataset",
    "compute_fidelity_metrics",
    "extract_features",
    "resolve_inception_weights",
]

logger = logging.getLogger(__name__)

INCEPTION_WEIGHTS_FILENAME = "weights-inception-2015-12-05-6726825d.pth"
INCEPTION_WEIGHTS_URL = "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/weights-inception-2015-12-05-6726825d.pth"

ImageSet = str | Path | np.ndarray | Tensor


def resolve_inception_weights(
    feature_extractor_weights_path: str | Path | None, *, argument: str = "feature_extractor_weights_path="
) -> Path:
    """Check that the Inception-v3 weights file is on disk; never downloads.

    Args:
        feature_extractor_weights_path: path to ``weights-inception-2015-12-05-6726825d.pth`` (or ``None``).
        argument: how the caller's user passes the path, named in the error (the CLI: ``"--inception-weights "``).

    Returns:
        The path, resolved.

    Raises:
        FileNotFoundError: the argument is ``None`` or the file does not exist; the message names the file, where
            to get it and which argument to pass.
    """
    how = (
        f"deqgen never downloads weights: fetch {INCEPTION_WEIGHTS_FILENAME} on a machine with internet "
        f"({INCEPTION_WEIGHTS_URL}), copy it to this machine, and pass "
        f"{argument}/path/to/{INCEPTION_WEIGHTS_FILENAME}"
    )
    if feature_extractor_weights_path is None:
        raise FileNotFoundError(
            f"FID/IS need the Inception-v3 weights file {INCEPTION_WEIGHTS_FILENAME}; {how}"
        )
    path = Path(feature_extractor_weights_path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(
            f"Inception-v3 weights not found at {path} (expected the file {INCEPTION_WEIGHTS_FILENAME}); {how}"
        )
    return path.resolve()


class UInt8ImageDataset(Dataset):
    """uint8 images as the ``(3, H, W)`` uint8 tensors torch-fidelity reads from a ``Dataset``.

    Args:
        images: ``(N, H, W, 3)`` uint8 numpy (ADM npz layout) or ``(N, 3, H, W)`` uint8 tensor.
    """

    def __init__(self, images: np.ndarray | Tensor) -> None:
        if isinstance(images, np.ndarray):
            if images.dtype != np.uint8 or images.ndim != 4 or images.shape[3] != 3:
                raise ValueError(
                    f"numpy images must be uint8 (N, H, W, 3), got {images.dtype} {images.shape}"
                )
            images = torch.from_numpy(images).permute(0, 3, 1, 2)
        if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(
                f"tensor images must be uint8 (N, 3, H, W), got {images.dtype} {tuple(images.shape)}"
            )
        self.images = images

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def __getitem__(self, index: int) -> Tensor:
        return self.images[index].contiguous()


def _as_fidelity_input(images: ImageSet, name: str) -> str | UInt8ImageDataset:
    if isinstance(images, (str, Path)):
        path = Path(images)
        if path.is_dir():
            return str(path)
        if path.is_file() and path.suffix == ".npz":
            return UInt8ImageDataset(read_samples_npz(path))
        raise FileNotFoundError(f"{name}={path} is neither an image folder nor an existing .npz sample file")
    return UInt8ImageDataset(images)


def _import_torch_fidelity() -> Any:
    try:
        return importlib.import_module("torch_fidelity")
    except ImportError as err:
        raise ImportError(
            f"compute_fidelity_metrics needs torch-fidelity, which failed to import ({err}). Install it with "
            "`pip install 'deqgen[eval]'`; it also imports torchvision, whose build must match your torch. "
            "FeatureFIDMetric needs neither."
        ) from err


def compute_fidelity_metrics(
    input1: ImageSet,
    input2: ImageSet | None = None,
    *,
    feature_extractor_weights_path: str | Path | None,
    isc: bool = True,
    fid: bool = True,
    kid: bool = False,
    prc: bool = False,
    batch_size: int = 64,
    cuda: bool = False,
    **kwargs: Any,
) -> dict[str, float]:
    """Standard Inception metrics via torch-fidelity, with local weights only.

    ``input1`` is the generated set (IS is computed on it); ``input2`` the reference set for FID / KID / P-R.
    The weights check runs first, so a missing file fails fast, before torch-fidelity is imported or any
    network access could be tried.

    Args:
        input1: generated images: an image folder, an ADM ``.npz`` (``arr_0`` uint8 NHWC), a uint8 numpy
            ``(N, H, W, 3)`` array or a uint8 tensor ``(N, 3, H, W)``.
        input2: reference images, same forms; needed for ``fid``, ``kid`` and ``prc``.
        feature_extractor_weights_path: local ``weights-inception-2015-12-05-6726825d.pth``.
        isc: Inception Score of ``input1``.
        fid: Fréchet Inception Distance.
        kid: Kernel Inception Distance (needs at least ``kid_subset_size`` images per set, default 1000).
        prc: improved precision / recall (k=3 on Inception features).
        batch_size: images per forward pass.
        cuda: run the extractor on the GPU.
        **kwargs: passed on to ``torch_fidelity.calculate_metrics`` (e.g. ``kid_subset_size``, ``verbose``).

    Returns:
        torch-fidelity's dict, e.g. ``inception_score_mean``, ``inception_score_std``,
        ``frechet_inception_distance``, ``kernel_inception_distance_mean``, ``precision``, ``recall``, ``f_score``.

    Raises:
        FileNotFoundError: weights missing (see :func:`resolve_inception_weights`) or an input path missing.
        ImportError: torch-fidelity is not installed or does not import.
    """
    weights = resolve_inception_weights(feature_extractor_weights_path)
    if input2 is None and (fid or kid or prc):
        raise ValueError(
            "fid, kid and prc compare two sets; pass input2 (the reference images) or only isc=True"
        )
    first = _as_fidelity_input(input1, "input1")
    second = None if input2 is None else _as_fidelity_input(input2, "input2")
    torch_fidelity = _import_torch_fidelity()
    options: dict[str, Any] = {
        "feature_extractor": "inception-v3-compat",
        "feature_extractor_weights_path": str(weights),
        "cache": False,  # no writes under $TORCH_HOME
        "save_cpu_ram": True,  # no DataLoader worker processes
        "verbose": False,
    }
    options.update(kwargs)
    metrics = torch_fidelity.calculate_metrics(
        input1=first,
        input2=second,
        isc=isc,
        fid=fid,
        kid=kid,
        prc=prc,
        batch_size=batch_size,
        cuda=cuda,
        **options,
    )
    return {key: float(value) for key, value in metrics.items()}


def extract_features(
    extractor: Callable[[Tensor], Tensor],
    images: Tensor | Iterable[Tensor],
    *,
    batch_size: int = 256,
    device: torch.device | str | None = None,
) -> Tensor:
    """Run ``extractor`` over images in batches, without gradients.

    Args:
        extractor: maps ``(B, C, H, W)`` to ``(B, D)`` features. An ``nn.Module``, or a bound method of one such
            as ``classifier.features``, is put in eval mode.
        images: ``(N, C, H, W)`` tensor (split into ``batch_size`` rows) or an iterable of such batches.
        batch_size: rows per forward pass when ``images`` is a tensor.
        device: where to run; default: the extractor's parameters' device, else CPU.

    Returns:
        ``(N, D)`` float32 features on CPU.
    """
    return torch.cat(list(_feature_batches(extractor, images, batch_size=batch_size, device=device)))


def _feature_batches(
    extractor: Callable[[Tensor], Tensor],
    images: Tensor | Iterable[Tensor],
    *,
    batch_size: int,
    device: torch.device | str | None,
) -> Iterable[Tensor]:
    # A module, or a bound method of one (e.g. ``classifier.features``): run it in eval mode on its device.
    owner = extractor if isinstance(extractor, nn.Module) else getattr(extractor, "__self__", None)
    if isinstance(owner, nn.Module):
        owner.eval()
        if device is None:
            device = next((p.device for p in owner.parameters()), torch.device("cpu"))
    batches = images.split(batch_size) if isinstance(images, Tensor) else images
    with torch.no_grad():
        for batch in batches:
            features = extractor(batch.to(device or "cpu"))
            if features.dim() != 2:
                raise ValueError(
                    f"the feature extractor must return (B, D), got shape {tuple(features.shape)}"
                )
            yield features.float().cpu()


class FeatureFIDMetric:
    """Fréchet distance in the feature space of any ``nn.Module``, accumulated batch by batch.

    Statistics are float64 (:class:`~deqgen.evaluation.frechet.RunningStatistics`), so memory is ``O(D^2)``
    however many images pass through. Precomputed reference statistics (e.g. an ADM reference batch's
    ``mu``/``sigma``) can be set instead of real images. With ``keep_features=True`` the features are also kept
    so :meth:`precision_recall` can run.

    Args:
        extractor: ``(B, C, H, W) -> (B, D)``; e.g. :meth:`DigitsClassifier.features`, or a small random CNN.
        batch_size: rows per forward pass.
        device: where the extractor runs (default: its parameters' device). A module extractor (or the module
            of a bound method) is put in eval mode.
        keep_features: keep all features on CPU for precision / recall.

    Example:
        >>> import torch
        >>> net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 8))
        >>> metric = FeatureFIDMetric(net)
        >>> metric.update(torch.randn(64, 1, 4, 4), real=True)
        >>> metric.update(torch.randn(64, 1, 4, 4), real=False)
        >>> metric.compute() >= 0.0
        True
    """

    def __init__(
        self,
        extractor: Callable[[Tensor], Tensor],
        *,
        batch_size: int = 256,
        device: torch.device | str | None = None,
        keep_features: bool = False,
    ) -> None:
        self.extractor = extractor
        self.batch_size = batch_size
        self.device = device
        self.keep_features = keep_features
        self._stats = {True: RunningStatistics(), False: RunningStatistics()}
        self._features: dict[bool, list[Tensor]] = {True: [], False: []}
        self._reference: tuple[Tensor, Tensor] | None = None

    def update(self, images: Tensor | Iterable[Tensor], *, real: bool) -> None:
        """Add images to the real or the generated set.

        Args:
            images: ``(N, C, H, W)`` float (whatever the extractor expects), or an iterable of batches.
            real: ``True`` for the reference set, ``False`` for generated samples.
        """
        if real and self._reference is not None:
            raise ValueError(
                "reference statistics were set with set_real_statistics(); reset() to use real images"
            )
        for features in _feature_batches(
            self.extractor, images, batch_size=self.batch_size, device=self.device
        ):
            self._stats[real].update(features)
            if self.keep_features:
                self._features[real].append(features)

    def set_real_statistics(self, mu: Tensor | np.ndarray, sigma: Tensor | np.ndarray) -> None:
        """Use precomputed reference statistics ``mu (D,)``, ``sigma (D, D)`` instead of real images."""
        self._reference = (
            torch.as_tensor(mu, dtype=torch.float64),
            torch.as_tensor(sigma, dtype=torch.float64),
        )

    def real_statistics(self) -> tuple[Tensor, Tensor]:
        """``(mu (D,), sigma (D, D))`` float64 of the reference set."""
        if self._reference is not None:
            return self._reference
        return self._stats[True].mean, self._stats[True].covariance()

    def fake_statistics(self) -> tuple[Tensor, Tensor]:
        """``(mu (D,), sigma (D, D))`` float64 of the generated set."""
        return self._stats[False].mean, self._stats[False].covariance()

    def compute(self) -> float:
        """The Fréchet distance between the two sets (each needs at least 2 images)."""
        return frechet_distance(*self.real_statistics(), *self.fake_statistics())

    def precision_recall(self, k: int = 3) -> PrecisionRecall:
        """Improved precision / recall on the kept features (needs ``keep_features=True`` and real images)."""
        if not self.keep_features or not self._features[True] or not self._features[False]:
            raise ValueError("precision_recall needs keep_features=True and both real and generated images")
        return precision_recall(torch.cat(self._features[True]), torch.cat(self._features[False]), k)

    def reset(self, *, keep_real: bool = False) -> None:
        """Forget the generated set, and the reference set too unless ``keep_real``."""
        self._stats[False] = RunningStatistics()
        self._features[False] = []
        if not keep_real:
            self._stats[True] = RunningStatistics()
            self._features[True] = []
            self._reference = None
