"""Image classification with a multiscale DEQ (:mod:`deqgen.models.mdeq`) and its explicit twin: the
``classification`` training task.

:meth:`ClassificationTask.setup` loads real digits (:func:`deqgen.data.load_digits`) and splits them,
stratified with the run seed, into training and held-out parts. The task trains the ``model`` (the MDEQ) and,
with ``baseline: true``, the one-pass explicit CNN of the same parameter count, on the same batches in the same
order with cross-entropy (plus fixed-point correction and Jacobian regularisation when asked). Its summary
scores every model on the held-out digits: accuracy, forward NFE and converged fraction, a confusion matrix and
the hardest digits, all in ``metrics.json`` and PNGs in the run directory.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn
from torch.utils.data import Dataset, TensorDataset

from deqgen.data.digits import DigitsData, load_digits, split
from deqgen.files import atomic_write_text
from deqgen.images import save_grid
from deqgen.models.mdeq import PRESETS, MDEQConfig, build_classifier
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

__all__ = ["ClassificationConfig", "ClassificationTask", "DigitsSection", "evaluate_classifier"]

logger = logging.getLogger(__name__)


class DigitsSection(Section):
    """Real handwritten digits (offline) and their held-out split."""

    source: Literal["mnist5k", "sklearn", "auto"] = Field(
        "mnist5k", description="deqgen.data.load_digits source"
    )
    held_out_fraction: float = Field(0.2, gt=0, lt=1, description="stratified held-out share")
    limit: int | None = Field(None, ge=20, description="use only the first n digits (tests); null = all")
    eval_batch_size: int = Field(250, ge=1, description="held-out batch size in the summary")


class ClassificationConfig(TrainConfig):
    """One classification run: an MDEQ and, optionally, its explicit CNN twin on real digits."""

    task: Literal["classification"] = Field("classification", description="the task: image classification")
    model: MDEQConfig = Field(default_factory=lambda: PRESETS["digits"], description="the MDEQ's shape")
    baseline: bool = Field(True, description="also train the explicit CNN of the same parameter count")
    separable: bool = Field(True, description="stop evaluating digits whose solve converged")
    deq: DEQSection = Field(default_factory=DEQSection, description="solvers, gradient, regularisation")
    data: DigitsSection = Field(default_factory=DigitsSection, description="the digits")


class ClassificationTask(TaskDefaults):
    """An MDEQ (and its explicit twin) on digits; see the module docstring."""

    config_class: ClassVar[type[TrainConfig]] = ClassificationConfig

    def __init__(
        self,
        cfg: ClassificationConfig,
        dist: DistInfo,
        out_dir: Path,
        train: DigitsData,
        held_out: DigitsData,
    ) -> None:
        self.cfg, self.dist, self.out_dir, self.train, self.held_out = cfg, dist, out_dir, train, held_out

    @classmethod
    def setup(cls, cfg: ClassificationConfig, dist: DistInfo, out_dir: Path) -> ClassificationTask:
        """Load the digits at the model's image size and split them with the run seed."""
        data = load_digits(cfg.data.source, side=cfg.model.image_size)
        if cfg.data.limit is not None:
            data = data.subset(torch.arange(min(cfg.data.limit, len(data))))
        fractions = (1.0 - cfg.data.held_out_fraction, cfg.data.held_out_fraction)
        train, held_out = split(data, fractions, torch.Generator().manual_seed(cfg.training.seed))
        logger.info("data: %d training / %d held-out digits (%s)", len(train), len(held_out), data.source)
        return cls(cfg, dist, out_dir, train, held_out)

    @staticmethod
    def config_differences(saved: ClassificationConfig, current: ClassificationConfig) -> list[str]:
        """The model-shape fields that differ (a resumed run may change everything else)."""
        return model_differences(saved, current)

    def roles(self) -> list[ModelRole]:
        """``model`` (exported as ``mdeq``), then ``baseline`` (``cnn``) when asked."""
        return [ModelRole("model", "mdeq")] + ([ModelRole("baseline", "cnn")] if self.cfg.baseline else [])

    def build_model(self, role: ModelRole, generator: torch.Generator) -> nn.Module:
        """The MDEQ with the recipe's solvers and gradient, or the explicit CNN."""
        return build_model(self.cfg, role.role, generator)

    def dataset(self) -> Dataset[Any]:
        """``(image (1, S, S), label)`` rows."""
        return TensorDataset(self.train.images, self.train.labels)

    def loss(self, model: nn.Module, batch: Sequence[Tensor], rng: Randomness) -> StepOutput:
        """Cross-entropy (with fixed-point correction and Jacobian regularisation when asked), accuracy and
        the solve's NFE / converged fraction."""
        images, labels = batch
        logits, info = model(images, generator=rng.rank)
        smoothing = self.cfg.training.label_smoothing
        loss = F.cross_entropy(logits, labels, label_smoothing=smoothing)
        head = _unwrap(model).head if info is not None else None

        def state_loss(z: Any) -> Tensor:
            assert head is not None
            return F.cross_entropy(head(z), labels, label_smoothing=smoothing)

        loss, metrics = regularized_loss(loss, info, self.cfg.deq.regularization, state_loss, rng.rank)
        acc = (logits.detach().argmax(-1) == labels).float().mean()
        return StepOutput(loss, {"acc": acc, **metrics, **solver_metrics(info)})

    def evaluate(self, role: ModelRole, model: nn.Module, step: int) -> None:
        """Log the held-out accuracy mid-run."""
        result = evaluate_classifier(model, self.held_out, self.cfg.data.eval_batch_size, self.dist.device)
        logger.info("%s step %d: held-out accuracy %.4f", role.role, step, result["accuracy"])

    def export(self, role: ModelRole, state: dict[str, Tensor], directory: Path) -> None:
        """``model.pt`` and ``config.json``."""
        save_weights(directory, state, self.cfg.model_dump(mode="json"), role.role)

    def summarize(self, results: Sequence[TrainResult]) -> None:
        """Held-out scores of every model in ``metrics.json``; ``confusion.png``, ``hardest.png`` and
        ``accuracy.png`` (training accuracy over steps)."""
        report: dict[str, Any] = {}
        for r in results:
            model = build_model(self.cfg, r.role.role, None)
            model.load_state_dict(torch.load(r.export_dir / "model.pt", weights_only=True))
            scores = evaluate_classifier(
                model, self.held_out, self.cfg.data.eval_batch_size, self.dist.device
            )
            confusion = scores.pop("confusion")
            hardest = scores.pop("hardest")
            report[r.role.name] = {
                **scores,
                "parameters": r.parameters,
                "steps": r.steps,
                "train_seconds": round(r.seconds, 2),
            }
            _save_confusion(self.out_dir / f"confusion_{r.role.name}.png", confusion)
            _save_hardest(self.out_dir / f"hardest_{r.role.name}.png", self.held_out, hardest)
            logger.info("%s: held-out accuracy %.4f", r.role.name, scores["accuracy"])
        atomic_write_text(self.out_dir / "metrics.json", json.dumps(report, indent=1))
        curves = {
            r.role.name: _metric_curve(self.out_dir / f"{r.role.role}_metrics.jsonl", "acc") for r in results
        }
        plot_curves(self.out_dir / "accuracy.png", curves, "training accuracy")


def build_model(cfg: ClassificationConfig, role: str, generator: torch.Generator | None) -> nn.Module:
    """``role`` ``model``: the MDEQ of ``cfg``; ``baseline``: its explicit twin."""
    if role == "baseline":
        return build_classifier(cfg.model, implicit=False, generator=generator)
    return build_classifier(cfg.model, generator=generator, separable=cfg.separable, **layer_options(cfg.deq))


@torch.no_grad()
def evaluate_classifier(
    model: nn.Module, data: DigitsData, batch_size: int, device: torch.device
) -> dict[str, Any]:
    """Held-out accuracy, forward NFE and converged fraction (DEQ only), the confusion matrix ``(K, K)``
    (rows: true class) and the indices of the 16 digits with the lowest true-class probability."""
    was_training = model.training
    model.eval()
    preds, true_prob, nfe, converged = [], [], [], []
    for start in range(0, len(data), batch_size):
        images = data.images[start : start + batch_size].to(device)
        labels = data.labels[start : start + batch_size].to(device)
        logits, info = model(images)
        preds.append(logits.argmax(-1).cpu())
        true_prob.append(logits.softmax(-1).gather(1, labels[:, None]).squeeze(1).cpu())
        if info is not None and info.forward is not None:
            nfe.append(info.forward.stats.nfe.cpu().float())
            converged.append(info.forward.stats.converged.cpu().float())
    model.train(was_training)
    pred, labels = torch.cat(preds), data.labels
    k = data.num_classes
    confusion = torch.bincount(labels * k + pred, minlength=k * k).reshape(k, k)
    out: dict[str, Any] = {
        "accuracy": float((pred == labels).float().mean()),
        "held_out": len(data),
        "confusion": confusion,
        "hardest": torch.cat(true_prob).argsort()[:16],
    }
    if nfe:
        all_nfe = torch.cat(nfe)
        out.update(
            nfe_mean=float(all_nfe.mean()),
            nfe_max=int(all_nfe.max()),
            converged=float(torch.cat(converged).mean()),
        )
    return out


def _unwrap(model: nn.Module) -> Any:
    return getattr(model, "module", model)


def _metric_curve(path: Path, key: str) -> list[tuple[int, float]]:
    if not path.is_file():
        return []
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [(int(r["step"]), float(r[key])) for r in rows if key in r]


def _save_confusion(path: Path, confusion: Tensor) -> None:
    if not matplotlib_available():
        logger.warning("matplotlib is not installed; no %s (pip install 'deqgen[recipes]')", path.name)
        return
    fig, ax = new_figure(figsize=(4, 4))
    ax.imshow(confusion.numpy(), cmap="Blues")
    k = confusion.shape[0]
    for i in range(k):
        for j in range(k):
            if int(confusion[i, j]):
                ax.text(j, i, str(int(confusion[i, j])), ha="center", va="center", fontsize=6)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_xticks(range(k))
    ax.set_yticks(range(k))
    fig.tight_layout()
    save_figure(fig, path, dpi=120)


def _save_hardest(path: Path, data: DigitsData, indices: Tensor) -> None:
    save_grid(path, (data.images[indices] + 1) / 2, nrow=8)
