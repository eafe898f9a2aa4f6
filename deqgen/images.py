"""Writing image grids as PNG (Pillow, which the ``recipes`` extra brings through matplotlib)."""

from __future__ import annotations

import math
import os
from pathlib import Path

import torch
from torch import Tensor

from deqgen.files import atomic_file

__all__ = ["save_grid"]


def save_grid(path: str | os.PathLike[str], images: Tensor, nrow: int, pad: int = 2) -> Path:
    """Tile ``(N, C, H, W)`` images in ``[0, 1]`` (C = 1 or 3), ``nrow`` per row, white ``pad`` pixels
    between them, and write a PNG atomically (:func:`deqgen.files.atomic_file`).

    Raises:
        ImportError: Pillow is not installed (the message says what to install).
    """
    try:
        from PIL import Image
    except ImportError:
        raise ImportError("writing PNGs needs Pillow: pip install 'deqgen[recipes]'") from None
    n, c, h, w = images.shape
    rows = math.ceil(n / nrow)
    grid = torch.ones(c, rows * (h + pad) + pad, nrow * (w + pad) + pad)
    for i in range(n):
        r, col = divmod(i, nrow)
        y, x = pad + r * (h + pad), pad + col * (w + pad)
        grid[:, y : y + h, x : x + w] = images[i].detach().float().cpu()
    arr = (grid.clamp(0, 1) * 255).round().to(torch.uint8)
    arr = arr[0].numpy() if c == 1 else arr.permute(1, 2, 0).numpy()
    path = Path(path)
    with atomic_file(path) as tmp:  # ordinary permissions under the user's umask
        Image.fromarray(arr).save(tmp, format="PNG")
    return path
