"""A trained digits run, loaded for evaluation from what the run itself saved.

``deqgen train`` writes the validated recipe into the run directory as ``config.yaml``; everything here is
derived from that file: the held-out digits are the split training used
(:func:`~deqgen.training.tasks.generation.data.digit_splits`), the sampler settings are its ``sampling``
section, and the exported models sit under ``viar/`` and ``var/`` (the generation task names its exports by
kind when the model and the baseline differ in kind).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from torch import Tensor

from deqgen.evaluation.digits_classifier import DigitsClassifier
from deqgen.evaluation.report import ReportError
from deqgen.models.viar.convert import CheckpointError, load_converted
from deqgen.models.viar.model import NextScaleTransformer
from deqgen.models.viar.trunk import ImplicitTrunk
from deqgen.models.viar.vqvae import MultiScaleVQVAE
from deqgen.training.config import load_config
from deqgen.training.schema import ConfigError, TrainConfig
from deqgen.training.tasks.generation.config import GenerationConfig
from deqgen.training.tasks.generation.data import digit_splits

__all__ = ["CLASSIFIER_FILE", "DigitsRun", "check_digits_recipe", "load_digits_run", "load_run_config"]

logger = logging.getLogger(__name__)

#: The held-out judge of :mod:`deqgen.evaluation.digits_judge`, relative to the run directory.
CLASSIFIER_FILE = "classifier.safetensors"

_NEEDED = (
    "config.yaml",
    CLASSIFIER_FILE,
    "classifier.json",
    "tokenizer/config.json",
    "tokenizer/model.safetensors",
    "viar/config.json",
    "viar/model.safetensors",
    "var/config.json",
    "var/model.safetensors",
)


@dataclass
class DigitsRun:
    """A trained digits run with its judge, loaded.

    Attributes:
        run_dir: the run directory (``logging.out_dir`` of the run).
        cfg: the run's own validated recipe, read from ``config.yaml``.
        viar: the implicit model (eval mode); ``var``: the same-width explicit baseline (eval mode).
        vqvae: the tokenizer (eval mode).
        classifier: the digits judge trained on the held-out digits.
        heldout: ``(N, 1, H, W)`` held-out real digits in ``[-1, 1]`` (never seen by the generators);
            ``heldout_labels`` ``(N,)`` int64.
        train: ``(M, 1, H, W)`` the generators' training digits; ``train_labels`` ``(M,)``.
    """

    run_dir: Path
    cfg: GenerationConfig
    viar: NextScaleTransformer
    var: NextScaleTransformer
    vqvae: MultiScaleVQVAE
    classifier: DigitsClassifier
    heldout: Tensor
    heldout_labels: Tensor
    train: Tensor
    train_labels: Tensor


def load_run_config(run_dir: Path) -> GenerationConfig:
    """The run's ``config.yaml``, validated (paths are not checked: the run may have moved).

    Raises:
        ReportError: the file is missing, does not validate, or is not a digits VIAR-vs-VAR run.
    """
    path = run_dir / "config.yaml"
    if not path.is_file():
        raise ReportError(
            f"{run_dir} is not a training run: no config.yaml; make one with "
            f"`deqgen demo recipes/mnist_cpu.yaml --out {run_dir}`"
        )
    try:
        cfg = load_config(path, check_paths=False, world_size=1)
    except ConfigError as err:
        raise ReportError(f"{path} does not validate any more:\n{err}") from None
    return check_digits_recipe(cfg, str(path))


def check_digits_recipe(cfg: TrainConfig, source: str) -> GenerationConfig:
    """``cfg`` itself if it trains a VIAR and a VAR baseline on digits with a held-out part; else raise.

    Raises:
        ReportError: names the offending field and the value to use.
    """
    if not isinstance(cfg, GenerationConfig):
        raise ReportError(f"{source}: task {cfg.task!r}; the digits judge and report need task: generation")
    if cfg.data.kind != "digits" or cfg.data.pretokenized is not None:
        raise ReportError(
            f"{source}: data.kind={cfg.data.kind!r}, data.pretokenized={cfg.data.pretokenized}; "
            "the digits judge needs data.kind: digits without pretokenized data"
        )
    if cfg.data.val_fraction <= 0:
        raise ReportError(
            f"{source}: data.val_fraction={cfg.data.val_fraction}; the judge trains on the "
            "held-out digits: use data.val_fraction > 0 (mnist_cpu.yaml holds out 0.2)"
        )
    if cfg.model.implicit is None or cfg.baseline is None or cfg.baseline.implicit is not None:
        raise ReportError(
            f"{source}: the report compares a VIAR (model.implicit set) with a VAR baseline "
            "(baseline set, baseline.implicit null), as recipes/mnist_cpu.yaml does"
        )
    return cfg


def load_digits_run(run_dir: str | Path) -> DigitsRun:
    """Load the models, the judge and the held-out digits of a judged digits run (``deqgen demo``'s output).

    Raises:
        ReportError: files missing or unreadable, or a run of another kind (the message says which and how to
            make a complete one).
    """
    run_dir = Path(run_dir)
    missing = [n for n in _NEEDED if not (run_dir / n).is_file()]
    if missing:
        raise ReportError(
            f"{run_dir} is not a finished, judged digits run: missing {', '.join(missing)}; make "
            f"one with `deqgen demo recipes/mnist_cpu.yaml --out {run_dir}`"
        )
    cfg = load_run_config(run_dir)
    try:
        viar, var, vqvae = (load_converted(run_dir / n).eval() for n in ("viar", "var", "tokenizer"))
        classifier = DigitsClassifier.load(run_dir / CLASSIFIER_FILE)
    except (CheckpointError, KeyError, ValueError, OSError) as err:
        raise ReportError(f"{run_dir}: cannot load the run ({err})") from err
    if not isinstance(viar, NextScaleTransformer) or not isinstance(viar.trunk, ImplicitTrunk):
        raise ReportError(f"{run_dir / 'viar'} does not hold a VIAR model")
    if not isinstance(var, NextScaleTransformer) or isinstance(var.trunk, ImplicitTrunk):
        raise ReportError(f"{run_dir / 'var'} does not hold a VAR model")
    if not isinstance(vqvae, MultiScaleVQVAE):
        raise ReportError(f"{run_dir / 'tokenizer'} does not hold a VQVAE tokenizer")
    train, held = digit_splits(cfg)
    return DigitsRun(
        run_dir, cfg, viar, var, vqvae, classifier, held.images, held.labels, train.images, train.labels
    )
