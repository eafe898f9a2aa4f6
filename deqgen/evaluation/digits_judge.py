"""The held-out judge of a digits run: a classifier the generators never saw scores their samples.

:func:`judge_run` reads the run's ``config.yaml``, rebuilds the held-out digits (the part of
:func:`~deqgen.training.tasks.generation.data.digit_splits` training did not use), trains a small CNN
(:func:`~deqgen.evaluation.digits_classifier.train_digits_classifier`) on them and scores each model's
sample grid (``samples/<name>.safetensors``, written by the generation task's summary): class accuracy, and
a Fréchet distance in the classifier's feature space against the held-out digits, next to the floor of real
training digits against the same reference. The scores are merged into the run's ``metrics.json``.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from deqgen.evaluation.digits_classifier import DigitsClassifier, class_accuracy, train_digits_classifier
from deqgen.evaluation.digits_run import CLASSIFIER_FILE, load_run_config
from deqgen.evaluation.frechet import fid_from_features
from deqgen.evaluation.report import ReportError
from deqgen.files import atomic_write_text
from deqgen.training.tasks.generation.data import digit_splits

__all__ = ["judge_run"]

logger = logging.getLogger(__name__)


def judge_run(run_dir: str | Path, *, classifier_epochs: int = 5) -> dict[str, Any]:
    """Train the held-out judge of ``run_dir``, score every model's samples, update ``metrics.json``.

    Args:
        run_dir: a finished ``deqgen train`` run of a digits recipe (``config.yaml``, ``metrics.json`` and
            ``samples/<name>.safetensors`` for each model in ``metrics.json``).
        classifier_epochs: the judge's training epochs (>= 1).

    Returns:
        The updated ``metrics.json``: per model ``class_accuracy`` and ``feature_fid_vs_heldout`` added;
        ``data``, ``classifier_accuracy_on_real_train`` and ``real_train_feature_fid_vs_heldout`` at the top.

    Raises:
        ReportError: not a digits run, no held-out part, or files missing (the message names them).
        ValueError: ``classifier_epochs < 1``.
    """
    if classifier_epochs < 1:
        raise ValueError(f"classifier_epochs={classifier_epochs}; use >= 1")
    run_dir = Path(run_dir)
    cfg = load_run_config(run_dir)
    metrics = _read_metrics(run_dir)
    train, held = digit_splits(cfg)
    clf = train_digits_classifier(
        held.images,
        held.labels,
        epochs=classifier_epochs,
        generator=torch.Generator().manual_seed(cfg.training.seed),
    )
    clf.save(run_dir / CLASSIFIER_FILE)
    with torch.no_grad():
        real = clf.features(held.images)
        floor = fid_from_features(clf.features(train.images), real)
    metrics.update(
        data=held.source,
        classifier_accuracy_on_real_train=class_accuracy(clf, train.images, train.labels),
        real_train_feature_fid_vs_heldout=floor,
    )
    for name in _model_names(metrics):
        metrics[name].update(_score_samples(clf, run_dir / "samples" / f"{name}.safetensors", real))
        logger.info(
            "%s: class accuracy %.3f, feature-FID %.2f (real digits: %.2f)",
            name,
            metrics[name]["class_accuracy"],
            metrics[name]["feature_fid_vs_heldout"],
            floor,
        )
    _write_json(run_dir / "metrics.json", metrics)
    return metrics


def _read_metrics(run_dir: Path) -> dict[str, Any]:
    path = run_dir / "metrics.json"
    if not path.is_file():
        raise ReportError(
            f"{run_dir}: no metrics.json; the run did not finish (rerun `deqgen train` on its "
            "config.yaml, which resumes)"
        )
    return json.loads(path.read_text())  # type: ignore[no-any-return]


def _model_names(metrics: dict[str, Any]) -> list[str]:
    """The models of the summary: its entries that carry a ``role``."""
    return [name for name, v in metrics.items() if isinstance(v, dict) and "role" in v]


def _score_samples(clf: DigitsClassifier, path: Path, real: torch.Tensor) -> dict[str, float]:
    """Class accuracy and feature-FID against ``real (N, D)`` of the sample file at ``path``."""
    if not path.is_file():
        raise ReportError(
            f"{path} is missing: the run's summary writes it; rerun `deqgen train` on the run's config.yaml"
        )
    grid = load_file(str(path))
    fake = grid["images"] * 2 - 1  # (N, C, H, W) from [0, 1] to the classifier's [-1, 1]
    with torch.no_grad():
        fid = fid_from_features(clf.features(fake), real)
    return {"class_accuracy": class_accuracy(clf, fake, grid["labels"]), "feature_fid_vs_heldout": fid}


def _write_json(path: Path, data: dict[str, Any]) -> None:
    atomic_write_text(path, json.dumps(data, indent=2))
