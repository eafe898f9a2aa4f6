"""Fitting one photograph with a DEQ implicit neural representation (:mod:`deqgen.models.inr`) and its explicit
twin: the ``inr`` training task.

The image is a scikit-learn sample photograph (``sklearn.datasets.load_sample_image``, shipped with the
package, so nothing is downloaded), area-downscaled to ``image.height x image.width`` with values in
``[0, 1]``. Every pixel is one sample ``(coordinate, rgb, index)``; the loss is the mean squared error and the
logged ``psnr`` is ``-10 log10(mse)`` of the batch. With ``warm_start`` the DEQ starts each pixel's solve from
that pixel's equilibrium of the previous visit (the amortisation of Huang et al., NeurIPS 2021, "(Implicit)^2");
the cache lives in the task and starts cold again after a resume. The summary renders every model on the full
grid (cold solves), and writes PSNR, the fit beside the original, and the DEQ's per-pixel NFE map.
"""

from __future__ import annotations

import importlib
import json
import logging
import math
import weakref
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn
from torch.utils.data import Dataset, TensorDataset

from deqgen.files import atomic_write_text
from deqgen.images import save_grid
from deqgen.models.inr import PRESETS, INRConfig, build_inr, pixel_grid
from deqgen.plots import matplotlib_available, new_figure, save_figure
from deqgen.training.distributed import DistInfo
from deqgen.training.schema import Section, TrainConfig
from deqgen.training.task import ModelRole, Randomness, StepOutput, TaskDefaults, TrainResult
from deqgen.training.tasks.deq_options import (
    DEQSection,
    layer_options,
    model_differences,
    plot_curves,
    regularized_loss,
    save_weights,
    solver_metrics,
)

__all__ = ["INRTask", "INRTaskConfig", "ImageSection", "evaluate_inr", "load_image", "psnr"]

logger = logging.getLogger(__name__)


class ImageSection(Section):
    """The photograph to fit."""

    name: Literal["china.jpg", "flower.jpg"] = Field("china.jpg", description="sklearn sample image")
    height: int = Field(64, ge=2, description="rows after area downscaling")
    width: int = Field(96, ge=2, description="columns after area downscaling")


class INRTaskConfig(TrainConfig):
    """One image-fitting run: a DEQ INR and, optionally, its explicit MLP twin."""

    task: Literal["inr"] = Field("inr", description="the task: implicit neural representation of one image")
    model: INRConfig = Field(default_factory=lambda: PRESETS["image"], description="the INR's shape")
    baseline: bool = Field(
        True, description="also train the explicit Fourier MLP of the same parameter count"
    )
    warm_start: bool = Field(True, description="start each pixel's solve at its previous equilibrium")
    deq: DEQSection = Field(default_factory=DEQSection, description="solvers, gradient, regularisation")
    image: ImageSection = Field(default_factory=ImageSection, description="the photograph")


def load_image(section: ImageSection) -> Tensor:
    """The sample photograph as ``(3, height, width)`` float32 in ``[0, 1]``.

    Raises:
        ImportError: scikit-learn (or Pillow, which it uses to read the JPEG) is not installed.
    """
    try:
        datasets = importlib.import_module("sklearn.datasets")
        pixels = datasets.load_sample_image(section.name)  # (H, W, 3) uint8
    except ImportError as e:
        raise ImportError(
            f"the inr task reads sklearn's sample images: pip install scikit-learn pillow ({e})"
        ) from e
    image = torch.from_numpy(np.asarray(pixels, dtype=np.float32) / 255.0).permute(2, 0, 1)
    return F.interpolate(image[None], size=(section.height, section.width), mode="area")[0].clamp(0, 1)


def psnr(mse: Tensor | float) -> float:
    """``-10 log10(mse)`` for images in ``[0, 1]``."""
    return -10.0 * math.log10(max(float(mse), 1e-12))


class INRTask(TaskDefaults):
    """A DEQ INR (and its explicit twin) fitted to one photograph; see the module docstring."""

    config_class: ClassVar[type[TrainConfig]] = INRTaskConfig

    def __init__(self, cfg: INRTaskConfig, dist: DistInfo, out_dir: Path, image: Tensor) -> None:
        self.cfg, self.dist, self.out_dir, self.image = cfg, dist, out_dir, image
        h, w = image.shape[-2:]
        self.coords = pixel_grid(h, w)  # (N, 2)
        self.rgb = image.permute(1, 2, 0).reshape(-1, 3)  # (N, 3), row-major like the grid
        self._equilibria: weakref.WeakKeyDictionary[nn.Module, Tensor] = weakref.WeakKeyDictionary()

    @classmethod
    def setup(cls, cfg: INRTaskConfig, dist: DistInfo, out_dir: Path) -> INRTask:
        """Load and downscale the photograph."""
        image = load_image(cfg.image)
        logger.info(
            "data: %s at %dx%d (%d pixels)",
            cfg.image.name,
            cfg.image.height,
            cfg.image.width,
            cfg.image.height * cfg.image.width,
        )
        return cls(cfg, dist, out_dir, image)

    @staticmethod
    def config_differences(saved: INRTaskConfig, current: INRTaskConfig) -> list[str]:
        """The model-shape fields that differ."""
        return model_differences(saved, current)

    def roles(self) -> list[ModelRole]:
        """``model`` (exported as ``deq_inr``), then ``baseline`` (``mlp``) when asked."""
        return [ModelRole("model", "deq_inr")] + ([ModelRole("baseline", "mlp")] if self.cfg.baseline else [])

    def build_model(self, role: ModelRole, generator: torch.Generator) -> nn.Module:
        """The DEQ INR with the recipe's solvers and gradient, or the explicit MLP."""
        return build_model(self.cfg, role.role, generator)

    def dataset(self) -> Dataset[Any]:
        """``(coordinate (2,), rgb (3,), pixel index)`` rows."""
        return TensorDataset(self.coords, self.rgb, torch.arange(len(self.rgb)))

    def loss(self, model: nn.Module, batch: Sequence[Tensor], rng: Randomness) -> StepOutput:
        """Mean squared error (plus the regularisation terms), batch PSNR, and the solve's NFE."""
        coords, rgb, index = batch
        bare = getattr(model, "module", model)
        cache = self._equilibria.get(bare) if self.cfg.warm_start else None
        z0 = None if cache is None else cache[index.to(cache.device)]
        pred, info = model(coords, z0, generator=rng.rank)
        mse = (pred - rgb).pow(2).mean()

        def state_loss(z: Tensor) -> Tensor:
            return (bare.readout(z) - rgb).pow(2).mean()

        loss, metrics = regularized_loss(mse, info, self.cfg.deq.regularization, state_loss, rng.rank)
        if self.cfg.warm_start and info is not None and info.forward is not None:
            self._remember(bare, index, info.forward.z)
        psnr_t = -10.0 * torch.log10(mse.detach().clamp_min(1e-12))
        return StepOutput(loss, {"mse": mse.detach(), "psnr": psnr_t, **metrics, **solver_metrics(info)})

    def _remember(self, model: nn.Module, index: Tensor, z: Tensor) -> None:
        cache = self._equilibria.get(model)
        if cache is None:
            cache = z.new_zeros(len(self.rgb), z.shape[-1])
            self._equilibria[model] = cache
        cache.index_copy_(0, index.to(cache.device), z.detach())

    def evaluate(self, role: ModelRole, model: nn.Module, step: int) -> None:
        """Log the full-image PSNR (cold solves) mid-run."""
        result = evaluate_inr(model, self.coords, self.rgb, self.dist.device)
        logger.info("%s step %d: PSNR %.2f dB", role.role, step, result["psnr"])

    def export(self, role: ModelRole, state: dict[str, Tensor], directory: Path) -> None:
        """``model.pt`` and ``config.json``."""
        save_weights(directory, state, self.cfg.model_dump(mode="json"), role.role)

    def summarize(self, results: Sequence[TrainResult]) -> None:
        """``metrics.json``; ``fit.png`` (original, then each model), ``nfe_map.png`` and ``psnr.png``."""
        report: dict[str, Any] = {}
        renders = [self.image]
        h, w = self.image.shape[-2:]
        for r in results:
            model = build_model(self.cfg, r.role.role, None)
            model.load_state_dict(torch.load(r.export_dir / "model.pt", weights_only=True))
            scores = evaluate_inr(model, self.coords, self.rgb, self.dist.device)
            renders.append(scores.pop("rgb").reshape(h, w, 3).permute(2, 0, 1).clamp(0, 1))
            nfe = scores.pop("nfe", None)
            if nfe is not None:
                _save_nfe_map(self.out_dir / f"nfe_map_{r.role.name}.png", nfe.reshape(h, w))
            report[r.role.name] = {
                **scores,
                "parameters": r.parameters,
                "steps": r.steps,
                "train_seconds": round(r.seconds, 2),
            }
            logger.info("%s: PSNR %.2f dB", r.role.name, scores["psnr"])
        atomic_write_text(self.out_dir / "metrics.json", json.dumps(report, indent=1))
        save_grid(self.out_dir / "fit.png", torch.stack(renders), nrow=len(renders))
        curves = {
            r.role.name: _metric_curve(self.out_dir / f"{r.role.role}_metrics.jsonl", "psnr") for r in results
        }
        plot_curves(self.out_dir / "psnr.png", curves, "batch PSNR (dB)")


def build_model(cfg: INRTaskConfig, role: str, generator: torch.Generator | None) -> nn.Module:
    """``role`` ``model``: the DEQ INR of ``cfg``; ``baseline``: its explicit MLP."""
    if role == "baseline":
        return build_inr(cfg.model, implicit=False, generator=generator)
    return build_inr(cfg.model, generator=generator, **layer_options(cfg.deq))


@torch.no_grad()
def evaluate_inr(
    model: nn.Module, coords: Tensor, rgb: Tensor, device: torch.device, chunk: int = 8192
) -> dict[str, Any]:
    """PSNR of the full render (cold solves from zero), and for a DEQ the per-pixel NFE ``(N,)``, its mean and
    max, and the converged fraction; ``rgb`` is the render ``(N, 3)``."""
    was_training = model.training
    model.eval()
    preds, nfe, converged = [], [], []
    for start in range(0, len(coords), chunk):
        pred, info = model(coords[start : start + chunk].to(device))
        preds.append(pred.cpu())
        if info is not None and info.forward is not None:
            nfe.append(info.forward.stats.nfe.cpu())
            converged.append(info.forward.stats.converged.cpu().float())
    model.train(was_training)
    render = torch.cat(preds)
    out: dict[str, Any] = {"psnr": psnr((render.clamp(0, 1) - rgb).pow(2).mean()), "rgb": render}
    if nfe:
        all_nfe = torch.cat(nfe)
        out.update(
            nfe=all_nfe,
            nfe_mean=float(all_nfe.float().mean()),
            nfe_max=int(all_nfe.max()),
            converged=float(torch.cat(converged).mean()),
        )
    return out


def _metric_curve(path: Path, key: str) -> list[tuple[int, float]]:
    if not path.is_file():
        return []
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [(int(r["step"]), float(r[key])) for r in rows if key in r]


def _save_nfe_map(path: Path, nfe_HW: Tensor) -> None:
    if not matplotlib_available():
        logger.warning("matplotlib is not installed; no %s (pip install 'deqgen[recipes]')", path.name)
        return
    fig, ax = new_figure(figsize=(4.2, 3))
    im = ax.imshow(nfe_HW.numpy(), cmap="magma")
    fig.colorbar(im, ax=ax, label="forward NFE")
    ax.set_axis_off()
    fig.tight_layout()
    save_figure(fig, path, dpi=120)
