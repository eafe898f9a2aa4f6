"""The tokenizer side of a recipe: load or train the multi-scale VQVAE, and turn images into token pyramids.

Transformers train on token pyramids ``(N, L)`` (``L = sum(p * p for p in patch_nums)``) and the teacher-forcing
input the frozen VQVAE derives from them; nothing here updates the VQVAE during transformer training.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from deqgen.models.viar.vqvae import MultiScaleVQVAE, VQVAEConfig

__all__ = ["load_tokenizer", "teacher_forcing", "tokenize", "train_tokenizer"]

logger = logging.getLogger(__name__)


def load_tokenizer(path: str | Path, config: VQVAEConfig | None = None) -> MultiScaleVQVAE:
    """A trained VQVAE from a ``deqgen convert`` / ``save_converted`` directory or an official ``.pth``.

    Args:
        path: a directory holding ``model.safetensors`` + ``config.json``, or an official VQVAE ``.pth``
            (read with ``weights_only=True``).
        config: the recipe's tokenizer config; the loaded tokenizer must have the same shapes.

    Raises:
        deqgen.models.viar.convert.CheckpointError: unreadable files or shapes that do not match ``config``.
    """
    from deqgen.models.viar.convert import CheckpointError, convert_vqvae, load_converted, read_official

    p = Path(path)
    if p.is_dir():
        vae = load_converted(p)
        if not isinstance(vae, MultiScaleVQVAE):
            raise CheckpointError(f"{p} holds a transformer, not a tokenizer (tokenizer.checkpoint)")
    else:
        sd, cfg = convert_vqvae(read_official(p), config, src=str(p))
        vae = MultiScaleVQVAE(cfg)
        vae.load_state_dict(sd, strict=True)
    if config is not None and vae.config != config:
        raise CheckpointError(f"tokenizer.checkpoint {p} was built with {vae.config}, the recipe asks for {config}")
    return vae.eval().requires_grad_(False)


def train_tokenizer(
    vae: MultiScaleVQVAE,
    images: Tensor,
    *,
    steps: int,
    lr: float,
    batch_size: int,
    generator: torch.Generator,
    on_step: Callable[[int, float, float], None] | None = None,
) -> list[float]:
    """Adam on reconstruction MSE + the VQ loss (straight-through), batches drawn with replacement.

    Args:
        vae: the tokenizer, trained in place.
        images: ``(N, C, H, W)`` float in ``[-1, 1]``.
        steps, lr, batch_size: optimizer steps, Adam learning rate, images per step.
        generator: the batch draws.
        on_step: called as ``on_step(step, recon_mse, vq_loss)`` after every step (progress, logging).

    Returns:
        The reconstruction MSE of every step.
    """
    opt = torch.optim.Adam(vae.parameters(), lr=lr)
    vae.train()
    losses: list[float] = []
    for step in range(steps):
        x = images[torch.randint(0, images.shape[0], (batch_size,), generator=generator)]
        out = vae(x)
        rec = F.mse_loss(out.recon, x)
        opt.zero_grad(set_to_none=True)
        (rec + out.vq_loss).backward()
        opt.step()
        losses.append(rec.item())
        if on_step is not None:
            on_step(step + 1, losses[-1], out.vq_loss.item())
    vae.eval()
    return losses


@torch.no_grad()
def tokenize(vae: MultiScaleVQVAE, images: Tensor, batch_size: int = 500) -> Tensor:
    """Token pyramids of ``images`` ``(N, C, H, W)``: ``(N, L)`` int64, scales concatenated coarse to fine."""
    vae.eval()
    out = [torch.cat(vae.img_to_indices(images[i : i + batch_size]), 1) for i in range(0, images.shape[0], batch_size)]
    return torch.cat(out)


@torch.no_grad()
def teacher_forcing(vae: MultiScaleVQVAE, idx_BL: Tensor) -> Tensor:
    """The transformer's teacher-forcing input ``(B, L - 1, Cvae)`` from token pyramids ``(B, L)``."""
    sizes = [p * p for p in vae.config.patch_nums]
    return vae.teacher_forcing_input(list(idx_BL.split(sizes, 1)))
