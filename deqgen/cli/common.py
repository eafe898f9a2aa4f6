"""Helpers shared by the ``deqgen`` subcommands: argument types and checks, devices and precision,
loading a converted model with its tokenizer, and batched generation with per-sample seeds."""

from __future__ import annotations

import argparse
import contextlib
from pathlib import Path
from typing import Any

import torch
from torch import Tensor


def _load_pair(model_dir: str, vqvae_dir: str):  # type: ignore[no-untyped-def]
    """The model and the tokenizer, each checked to be what its argument says (swapped folders are named).

    Raises:
        TypeError: ``model_dir`` is not a VAR/VIAR model or ``vqvae_dir`` not a tokenizer.
    """
    from deqgen.models.viar.convert import load_converted
    from deqgen.models.viar.model import NextScaleTransformer
    from deqgen.models.viar.vqvae import MultiScaleVQVAE

    model, vae = load_converted(model_dir), load_converted(vqvae_dir)
    if isinstance(model, MultiScaleVQVAE) and isinstance(vae, NextScaleTransformer):
        raise TypeError(f"MODEL {model_dir} holds a tokenizer and --vqvae {vqvae_dir} a model: swap them")
    if not isinstance(model, NextScaleTransformer):
        raise TypeError(
            f"MODEL {model_dir} holds a {type(model).__name__}, not a VAR/VIAR model (deqgen convert)"
        )
    if not isinstance(vae, MultiScaleVQVAE):
        raise TypeError(f"--vqvae {vqvae_dir} holds a {type(vae).__name__}, not a tokenizer (deqgen convert)")
    return model.eval(), vae.eval()


def _check_classes(flag: str, classes: list[int], num_classes: int) -> None:
    """Class ids must be real classes: ``num_classes`` itself is the null class used for guidance."""
    bad = [c for c in classes if not 0 <= c < num_classes]
    if bad:
        raise ValueError(
            f"{flag} {bad[0]}: the model has classes 0..{num_classes - 1} ({num_classes} is the "
            "null class used for guidance, not a class to sample)"
        )


def _positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _non_negative_int(text: str) -> int:
    """argparse type: an integer >= 0."""
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def _non_negative_float(text: str) -> float:
    """argparse type: a finite float >= 0."""
    value = float(text)
    if not 0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text}")
    return value


def _probability(text: str) -> float:
    """argparse type: a float in [0, 1]."""
    value = float(text)
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"must lie in [0, 1], got {text}")
    return value


def _check_image(path: Path) -> None:
    """Raise unless ``path`` is an image file Pillow can read (before any model is loaded)."""
    from PIL import Image, UnidentifiedImageError

    if not path.is_file():
        raise FileNotFoundError(f"--image {path}: no such file")
    try:
        with Image.open(path) as img:
            img.verify()
    except (UnidentifiedImageError, OSError, SyntaxError) as e:
        raise ValueError(
            f"--image {path} is not an image Pillow can read ({e}); give a PNG or JPEG"
        ) from None


def _check_out_png(out: Path) -> None:
    """``--out`` must name a file in an existing folder, not a folder."""
    if out.is_dir():
        raise ValueError(f"--out {out} is a directory; give a file name such as {out / 'grid.png'}")
    if not out.parent.is_dir():
        raise ValueError(f"--out {out}: the folder {out.parent} does not exist; create it first")


def _read_image(path: Path, side: int, channels: int) -> Tensor:
    try:
        from PIL import Image
    except ImportError:
        raise SystemExit("error: reading images needs Pillow: pip install 'deqgen[recipes]'") from None
    img = (
        Image.open(path)
        .convert("L" if channels == 1 else "RGB")
        .resize((side, side), Image.Resampling.LANCZOS)
    )
    t = torch.tensor(bytearray(img.tobytes()), dtype=torch.uint8).view(side, side, channels).permute(2, 0, 1)
    return t.float()[None] / 127.5 - 1


_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _device_args(p: argparse.ArgumentParser, *, batch_size: int | None) -> None:
    """``--device`` and ``--dtype`` (and ``--batch-size`` when ``batch_size`` gives its default)."""
    p.add_argument("--device", default=None, help="cpu, cuda or cuda:N; None: cuda when available")
    p.add_argument(
        "--dtype",
        default="fp32",
        choices=list(_DTYPES),
        help="autocast dtype of the forward passes (fp32: no autocast)",
    )
    if batch_size is not None:
        p.add_argument(
            "--batch-size",
            type=_positive_int,
            default=batch_size,
            help="samples per batch; images do not depend on it",
        )


def _resolve_device(name: str | None) -> torch.device:
    """``--device``, checked: a CUDA device needs CUDA here.

    Raises:
        ValueError: an unparsable device name, or CUDA asked for without CUDA.
    """
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device {name!r} is not a device; use cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: CUDA is not available on this machine; use --device cpu")
    return device


def _autocast(device: torch.device, dtype: str) -> contextlib.AbstractContextManager[Any]:
    """Autocast to ``--dtype`` on ``device`` (a no-op for fp32)."""
    return torch.autocast(device.type, dtype=_DTYPES[dtype], enabled=dtype != "fp32")


def _compile_for_sampling(model: Any, device: torch.device, dtype: str) -> None:
    """``--compile``: resolve the attention kernels for the dtype the blocks see, then compile the per-scale
    forward that :func:`~deqgen.models.viar.sampling.generate` calls."""
    model.prepare_attention(device, _DTYPES[dtype])
    model.forward_scale = torch.compile(model.forward_scale)


def _generate_in_batches(
    model: Any,
    vae: Any,
    labels: Tensor,
    batch_size: int,
    seed: int,
    edit_image: Tensor | None,
    edit_mask: Tensor | None,
    **kw: Any,
) -> Tensor:
    """Images ``(N, C, H, W)`` on the CPU, sampled ``batch_size`` at a time on the model's device.

    Sample ``i`` draws from its own generator seeded by ``(seed, i)`` (``sample_offset``), so an image does
    not depend on the batch size.
    """
    from deqgen.models.viar.sampling import EditSpec, generate

    device = next(model.parameters()).device
    images = []
    for start in range(0, labels.shape[0], batch_size):
        rows = slice(start, start + batch_size)
        edit = None if edit_image is None or edit_mask is None else EditSpec(edit_image[rows], edit_mask)
        res = generate(model, vae, labels[rows].to(device), seed=seed, sample_offset=start, edit=edit, **kw)
        images.append(res.images.float().cpu())
    return torch.cat(images)
