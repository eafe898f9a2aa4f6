"""ImageNet-style class folders (``root/<class>/<image>``) with the official VAR/VIAR training pipeline.

Train: resize the shorter side to ``resize_shorter_side`` (LANCZOS by default), random crop ``image_size``,
scale to ``[-1, 1]``; no flip unless asked. Val: the same with a centre crop. Pillow does the decoding; no
torchvision needed. Crops and flips are drawn from ``(seed, epoch, index)``, so a resumed run, any number of
DataLoader workers and any rank layout see the same crop for the same sample in the same epoch.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

__all__ = ["IMAGE_EXTENSIONS", "ImageFolder"]

#: File suffixes (lower case) read as images.
IMAGE_EXTENSIONS: tuple[str, ...] = (".jpeg", ".jpg", ".png", ".bmp", ".webp", ".tif", ".tiff")

_FILTERS = {"lanczos": "LANCZOS", "bicubic": "BICUBIC", "bilinear": "BILINEAR"}


class ImageFolder(Dataset[tuple[Tensor, int]]):
    """``root/<class name>/<file>`` images; classes are the sorted sub-folder names, labels their positions.

    Args:
        root: the split folder (e.g. ``imagenet/train``).
        image_size: output side ``S``.
        resize_shorter_side: the shorter side is resized to this before cropping (``>= S``).
        interpolation: ``lanczos`` (official), ``bicubic`` or ``bilinear``.
        random_crop: random crop (train) or centre crop (val).
        hflip: random horizontal flip with probability 1/2.
        seed: the run seed (crops depend on ``(seed, epoch, index)`` only).

    Items are ``(image (3, S, S) float32 in [-1, 1], label int)``.

    Raises:
        FileNotFoundError: ``root`` is missing or holds no class folder with images.
    """

    def __init__(
        self,
        root: str | Path,
        *,
        image_size: int = 256,
        resize_shorter_side: int = 288,
        interpolation: str = "lanczos",
        random_crop: bool = True,
        hflip: bool = False,
        seed: int = 0,
    ) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"image folder {self.root} does not exist")
        if interpolation not in _FILTERS:
            raise ValueError(f"interpolation {interpolation!r}: use one of {sorted(_FILTERS)}")
        if resize_shorter_side < image_size:
            raise ValueError(f"resize_shorter_side={resize_shorter_side} must be >= image_size={image_size}")
        self.classes: list[str] = sorted(p.name for p in self.root.iterdir() if p.is_dir())
        self.samples: list[tuple[Path, int]] = [
            (f, label)
            for label, name in enumerate(self.classes)
            for f in sorted((self.root / name).iterdir())
            if f.suffix.lower() in IMAGE_EXTENSIONS
        ]
        if not self.samples:
            raise FileNotFoundError(
                f"image folder {self.root} has no class sub-folders with images "
                f"({', '.join(IMAGE_EXTENSIONS)})"
            )
        self.image_size, self.resize_shorter_side = image_size, resize_shorter_side
        self.interpolation, self.random_crop, self.hflip = interpolation, random_crop, hflip
        self.seed, self.epoch = seed, 0

    def __len__(self) -> int:
        return len(self.samples)

    @property
    def labels(self) -> Sequence[int]:
        """The label of every sample, in order."""
        return [label for _, label in self.samples]

    def set_epoch(self, epoch: int) -> None:
        """Select the crops of ``epoch`` (call before iterating, in the main process)."""
        self.epoch = epoch

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        from PIL import Image

        path, label = self.samples[index]
        with Image.open(path) as im:
            img = im.convert("RGB")
        w, h = img.size
        r = self.resize_shorter_side / min(w, h)
        size = (max(self.resize_shorter_side, round(w * r)), max(self.resize_shorter_side, round(h * r)))
        img = img.resize(size, getattr(Image.Resampling, _FILTERS[self.interpolation]))
        S, (W, H) = self.image_size, img.size
        rng = np.random.default_rng([self.seed, self.epoch, index])
        if self.random_crop:
            x0, y0 = int(rng.integers(0, W - S + 1)), int(rng.integers(0, H - S + 1))
        else:
            x0, y0 = (W - S) // 2, (H - S) // 2
        img = img.crop((x0, y0, x0 + S, y0 + S))
        if self.hflip and rng.random() < 0.5:
            img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        t = torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8).view(S, S, 3).permute(2, 0, 1)
        return t.float() / 127.5 - 1.0, label
