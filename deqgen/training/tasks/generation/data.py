"""The generation task's training images: real digits in memory, or an ImageNet-style folder."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from deqgen.data.digits import DigitsData, load_digits, split
from deqgen.data.image_folder import ImageFolder

__all__ = ["digit_splits", "image_folder", "pretokenized_size"]


def digit_splits(cfg: Any) -> tuple[DigitsData, ...]:
    """The recipe's real digits, split stratified by ``data.val_fraction`` with the run seed: ``(train, held)``
    (just ``(train,)`` when the fraction is 0). Training, ``deqgen pretokenize`` and the held-out digits
    judge all use this one split.

    Args:
        cfg: a :class:`~deqgen.training.tasks.generation.config.GenerationConfig` with ``data.kind: digits``.
    """
    d = cfg.data
    data = load_digits(d.source, side=d.image_size)
    parts = [1.0 - d.val_fraction, d.val_fraction] if d.val_fraction > 0 else [1.0]
    return split(data, parts, torch.Generator().manual_seed(cfg.training.seed))


def image_folder(cfg: Any, split_name: str = "train", *, random_crop: bool | None = None) -> ImageFolder:
    """The recipe's :class:`~deqgen.data.image_folder.ImageFolder` of ``data.root / split_name``.

    Raises:
        ValueError: ``data.root`` is not set.
    """
    d = cfg.data
    if d.root is None:
        raise ValueError("data.root is not set: image-folder data needs data.root (with train/ inside)")
    return ImageFolder(
        d.root / split_name,
        image_size=d.image_size,
        resize_shorter_side=d.resize_shorter_side,
        interpolation=d.interpolation,
        random_crop=d.random_crop if random_crop is None else random_crop,
        hflip=d.hflip,
        seed=cfg.training.seed,
    )


def pretokenized_size(path: str | Path) -> int | None:
    """The item count in a ``deqgen pretokenize`` folder's ``meta.json`` (``num_samples``; written by
    :func:`~deqgen.training.tasks.generation.tokens.write_pretokenized`), or None when it is unreadable
    (the dataset itself then reports the problem)."""
    try:
        return int(json.loads((Path(path) / "meta.json").read_text())["num_samples"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
