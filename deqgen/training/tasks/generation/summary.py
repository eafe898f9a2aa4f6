"""The generation task's summary: a sample grid per model, side by side, a loss plot and ``metrics.json``.

Files in the run directory: ``grid.png`` (a row per class, the models' samples side by side),
``samples/<name>.png`` and ``samples/<name>.safetensors`` (``images (N, C, H, W)`` in ``[0, 1]`` and
``labels (N,)``, class-major, for judges such as :mod:`deqgen.evaluation.digits_judge`), ``loss.png`` and
``metrics.json`` (per model: parameters, steps, training seconds, final loss, sampling speed, KV-cache bytes
and implicit iterations per scale).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import Tensor

from deqgen.files import atomic_file, atomic_write_text
from deqgen.images import save_grid
from deqgen.models.viar.convert import load_converted
from deqgen.models.viar.model import NextScaleTransformer
from deqgen.models.viar.sampling import generate
from deqgen.models.viar.vqvae import MultiScaleVQVAE
from deqgen.plots import matplotlib_available, new_figure, save_figure
from deqgen.training.task import TrainResult
from deqgen.training.tasks.generation.builders import build_schedule
from deqgen.training.tasks.generation.config import SamplingSection

__all__ = ["sample_grid", "summarize"]

logger = logging.getLogger(__name__)


@torch.no_grad()
def sample_grid(
    s: SamplingSection, model: NextScaleTransformer, vae: MultiScaleVQVAE, path: Path, device: torch.device
) -> dict[str, Any]:
    """The ``sampling`` grid of one model (rows = classes) as a PNG at ``path``.

    Returns:
        ``images (N, C, H, W)`` in ``[0, 1]`` and ``labels (N,)`` on the CPU, plus sampling speed, KV-cache
        bytes and mean implicit iterations per scale.
    """
    classes = list(s.classes) if s.classes is not None else list(range(min(model.num_classes, 10)))
    labels = torch.tensor(classes, device=device).repeat_interleave(s.samples_per_class)
    model.eval()
    t0 = time.perf_counter()
    res = generate(
        model,
        vae,
        labels,
        schedule=build_schedule(s.schedule) if model.cfg.implicit else None,
        cfg_scale=s.cfg_scale,
        top_k=s.top_k,
        top_p=s.top_p,
        generator=torch.Generator().manual_seed(s.seed),
    )
    seconds = time.perf_counter() - t0
    path.parent.mkdir(parents=True, exist_ok=True)
    save_grid(path, res.images.cpu(), nrow=s.samples_per_class)
    return {
        "images": res.images.cpu(),
        "labels": labels.cpu(),
        "sample_images_per_s": labels.numel() / seconds,
        "kv_cache_bytes": res.kv_bytes,
        "implicit_iterations_per_scale": [float(st.iterations.float().mean()) for st in res.stats],
    }


def summarize(s: SamplingSection, out: Path, vae: MultiScaleVQVAE, results: Sequence[TrainResult]) -> None:
    """``grid.png`` (models side by side), ``samples/*``, ``loss.png`` and ``metrics.json`` in ``out``."""
    summary: dict[str, Any] = {}
    grids = []
    for r in results:
        model = load_converted(r.export_dir)
        assert isinstance(model, NextScaleTransformer)
        sampled = sample_grid(s, model, vae, out / "samples" / f"{r.role.name}.png", torch.device("cpu"))
        images, labels = sampled.pop("images"), sampled.pop("labels")
        with atomic_file(out / "samples" / f"{r.role.name}.safetensors") as tmp:
            save_file({"images": images.contiguous(), "labels": labels.contiguous()}, str(tmp))
        grids.append(images)
        summary[r.role.name] = {
            "role": r.role.role,
            "parameters": r.parameters,
            "steps": r.steps,
            "train_seconds": r.seconds,
            "final_loss": _final_loss(r.losses),
            **sampled,
        }
    _side_by_side(out / "grid.png", grids, s.samples_per_class)
    _loss_plot(out / "loss.png", {r.role.name: r.losses for r in results})
    atomic_write_text(out / "metrics.json", json.dumps(summary, indent=2))
    logger.info("wrote %s, %s and %s", out / "grid.png", out / "loss.png", out / "metrics.json")


def _final_loss(losses: list[tuple[int, float]]) -> float | None:
    """The mean of the last tenth of the logged losses."""
    tail = [loss for _, loss in losses[-max(1, len(losses) // 10) :]]
    return sum(tail) / len(tail) if tail else None


def _side_by_side(path: Path, grids: list[Tensor], per_class: int) -> None:
    cols = min(per_class, 10)  # at most 10 per model and class side by side
    rows = [
        torch.cat([g[k * per_class : k * per_class + cols] for g in grids])
        for k in range(grids[0].shape[0] // per_class)
    ]
    save_grid(path, torch.cat(rows), nrow=cols * len(grids), pad=1)


def _loss_plot(path: Path, curves: dict[str, list[tuple[int, float]]]) -> None:
    if not matplotlib_available():
        logger.warning("matplotlib is not installed; no %s (pip install 'deqgen[recipes]')", path.name)
        return
    fig, ax = new_figure(figsize=(6, 4))
    for name, points in curves.items():
        ax.plot([x for x, _ in points], [y for _, y in points], label=name)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("cross-entropy")
    ax.legend()
    ax.grid(alpha=0.3)
    save_figure(fig, path)
