"""The tokenizer side of a recipe: load or train the multi-scale VQVAE, and turn images into token pyramids.

Transformers train on token pyramids ``(N, L)`` (``L = sum(p * p for p in patch_nums)``) and the teacher-forcing
input the frozen VQVAE derives from them; nothing here updates the VQVAE during transformer training.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset

from deqgen.files import atomic_write_text, move_dir_into_place
from deqgen.models.viar.vqvae import MultiScaleVQVAE, VQVAEConfig
from deqgen.training.tasks.generation.config import tokenizer_config
from deqgen.training.tasks.generation.data import digit_splits, image_folder

__all__ = [
    "PretokenizedDataset",
    "load_tokenizer",
    "pretokenize_recipe",
    "teacher_forcing",
    "tokenize",
    "train_tokenizer",
    "write_pretokenized",
]

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
        raise CheckpointError(
            f"tokenizer.checkpoint {p} was built with {vae.config}, the recipe asks for {config}"
        )
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
    out = [
        torch.cat(vae.img_to_indices(images[i : i + batch_size]), 1)
        for i in range(0, images.shape[0], batch_size)
    ]
    return torch.cat(out)


@torch.no_grad()
def teacher_forcing(vae: MultiScaleVQVAE, idx_BL: Tensor) -> Tensor:
    """The transformer's teacher-forcing input ``(B, L - 1, Cvae)`` from token pyramids ``(B, L)``."""
    sizes = [p * p for p in vae.config.patch_nums]
    return vae.teacher_forcing_input(list(idx_BL.split(sizes, 1)))


# ---- pre-tokenized datasets ---------------------------------------------------------------------------------

_TOKENS, _LABELS, _META, _PROGRESS = "tokens.npy", "labels.npy", "meta.json", "progress.json"


def _tokenizer_fingerprint(vae: MultiScaleVQVAE) -> dict[str, Any]:
    """The tokenizer config plus a checksum of its codebook: tokens from another tokenizer are refused."""
    import dataclasses

    book = vae.state_dict()["quantize.embedding.weight"].detach().double().cpu()
    return {
        "config": json.loads(json.dumps(dataclasses.asdict(vae.config))),
        "codebook_sum": float(book.sum()),
        "codebook_abs_sum": float(book.abs().sum()),
    }


def write_pretokenized(
    path: str | Path,
    vae: MultiScaleVQVAE,
    dataset: Dataset[tuple[Tensor, int]],
    *,
    batch_size: int = 256,
    num_workers: int = 0,
    device: torch.device | str = "cpu",
    progress: Callable[[int], None] | None = None,
    flush_every: int = 20,
) -> Path:
    """Encode ``dataset`` once with the frozen tokenizer into a memory-mapped token-pyramid folder.

    Layout of ``path``: ``tokens.npy`` ``(N, L)`` int16 (int32 when ``V > 32767``), ``labels.npy`` ``(N,)``
    int64, ``meta.json`` (patch sizes, tokenizer fingerprint). Writing goes to ``path.partial/`` and is
    renamed into place at the end; an interrupted run continues from its last flushed batch when called again.
    Each image is encoded as the dataset returns it (use a centre crop: training then sees one fixed crop
    per image instead of a new random crop each epoch, the price of not running the encoder every step).

    Args:
        path: the output folder (must not exist yet).
        vae: the frozen tokenizer.
        dataset: ``(image (C, H, W) in [-1, 1], label)`` items in a fixed order.
        batch_size, num_workers: the encoding DataLoader.
        device: where to encode.
        progress: called with the number of rows done after each batch.
        flush_every: batches between progress flushes (the resume granularity).

    Returns:
        ``path``.

    Raises:
        FileExistsError: ``path`` exists.
    """
    import numpy as np
    from torch.utils.data import DataLoader, Subset

    path = Path(path)
    if path.exists():
        raise FileExistsError(f"{path} exists; remove it or choose another data.pretokenized path")
    part = path.with_name(path.name + ".partial")
    n, L = len(dataset), sum(p * p for p in vae.config.patch_nums)
    dtype = np.int16 if vae.config.vocab_size <= np.iinfo(np.int16).max else np.int32
    meta = {
        "num_samples": n,
        "seq_len": L,
        "patch_nums": list(vae.config.patch_nums),
        "vocab_size": vae.config.vocab_size,
        "dtype": np.dtype(dtype).name,
        "tokenizer": _tokenizer_fingerprint(vae),
    }
    done = 0
    if (
        (part / _META).is_file()
        and json.loads((part / _META).read_text()) == meta
        and (part / _PROGRESS).is_file()
    ):
        done = int(json.loads((part / _PROGRESS).read_text())["rows"])
        tokens = np.load(part / _TOKENS, mmap_mode="r+")
        labels = np.load(part / _LABELS, mmap_mode="r+")
        logger.info("pretokenize: continuing %s at row %d of %d", part, done, n)
    else:
        part.mkdir(parents=True, exist_ok=True)
        tokens = np.lib.format.open_memmap(part / _TOKENS, mode="w+", dtype=dtype, shape=(n, L))
        labels = np.lib.format.open_memmap(part / _LABELS, mode="w+", dtype=np.int64, shape=(n,))
        atomic_write_text(part / _META, json.dumps(meta, indent=1))
    vae = vae.to(device).eval()
    loader = DataLoader(Subset(dataset, range(done, n)), batch_size=batch_size, num_workers=num_workers)
    for b, (x, y) in enumerate(loader):
        idx = tokenize(vae, x.to(device), batch_size)
        tokens[done : done + idx.shape[0]] = idx.cpu().numpy().astype(dtype)
        labels[done : done + idx.shape[0]] = y.numpy()
        done += idx.shape[0]
        if (b + 1) % flush_every == 0 or done == n:
            tokens.flush()
            labels.flush()
            atomic_write_text(part / _PROGRESS, json.dumps({"rows": done}))
        if progress is not None:
            progress(done)
    del tokens, labels
    move_dir_into_place(part, path)
    logger.info("pretokenize: wrote %d token pyramids (L = %d) to %s", n, L, path)
    return path


class PretokenizedDataset(Dataset[tuple[Tensor, Tensor]]):
    """The folder :func:`write_pretokenized` wrote, memory-mapped: items ``(idx (L,) int64, label int64)``.

    Args:
        path: the folder.
        vae: the recipe's tokenizer; the tokens must come from it (config and codebook fingerprint).

    Raises:
        FileNotFoundError: not a complete pre-tokenized folder.
        ValueError: written by another tokenizer.
    """

    def __init__(self, path: str | Path, vae: MultiScaleVQVAE) -> None:
        import numpy as np

        path = Path(path)
        if not (path / _META).is_file():
            raise FileNotFoundError(
                f"data.pretokenized {path} has no {_META}: not a (complete) pre-tokenized "
                "folder; write it with deqgen pretokenize"
            )
        meta = json.loads((path / _META).read_text())
        if meta["tokenizer"] != _tokenizer_fingerprint(vae):
            raise ValueError(
                f"data.pretokenized {path} was written by another tokenizer than tokenizer.checkpoint "
                "(config or codebook differ); pre-tokenize again"
            )
        self.tokens = np.load(path / _TOKENS, mmap_mode="r")
        self.labels = np.load(path / _LABELS, mmap_mode="r")

    def __len__(self) -> int:
        return int(self.tokens.shape[0])

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor]:
        return torch.from_numpy(self.tokens[i].astype("int64")), torch.tensor(int(self.labels[i]))


def pretokenize_recipe(cfg: Any, out: str | Path, *, batch_size: int = 256) -> Path:
    """``deqgen pretokenize``: encode a recipe's training images with its ``tokenizer.checkpoint``.

    Image folders are read with a centre crop (``data.random_crop`` is ignored); digits use the recipe's
    training split. Point ``data.pretokenized`` at ``out`` to train on the result.

    Args:
        cfg: the validated :class:`~deqgen.training.tasks.generation.config.GenerationConfig`.
        out: the folder to write (must not exist).
        batch_size: images per encoder batch.
    """
    from torch.utils.data import TensorDataset

    if cfg.tokenizer.checkpoint is None:
        raise ValueError("pretokenize needs a trained tokenizer: set tokenizer.checkpoint")
    vae = load_tokenizer(cfg.tokenizer.checkpoint, tokenizer_config(cfg.tokenizer))
    if cfg.data.kind == "digits":
        train = digit_splits(cfg)[0]
        dataset: Dataset[Any] = TensorDataset(train.images, train.labels)
    else:
        dataset = image_folder(cfg, "train", random_crop=False)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    return write_pretokenized(
        out, vae, dataset, batch_size=batch_size, num_workers=cfg.data.num_workers, device=device
    )
