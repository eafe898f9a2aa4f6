"""Class-conditional next-scale generation (VIAR, VAR) as a :class:`~deqgen.training.task.Task`.

:meth:`GenerationTask.setup` prepares the frozen tokenizer (loaded from ``tokenizer.checkpoint``, or trained
on rank 0 and saved to ``out_dir/tokenizer``; a rerun loads it) and the training set (digits tokenized once
in memory, pre-tokenized pyramids, or an image folder tokenized batch by batch). The task then trains the
``model`` and the optional ``baseline`` on the same tokens with teacher forcing and cross-entropy, and its
summary samples the ``sampling`` grid of every model (:mod:`~deqgen.training.tasks.generation.summary`).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import Dataset, TensorDataset

from deqgen.models.viar.blocks import AdaLNBlock
from deqgen.models.viar.convert import CheckpointError, save_converted
from deqgen.models.viar.model import NextScaleTransformer, build_model
from deqgen.models.viar.vqvae import MultiScaleVQVAE, VQVAEConfig
from deqgen.training.distributed import DistInfo, barrier, shared_seed
from deqgen.training.metrics import progress_bar
from deqgen.training.task import LoaderOptions, ModelRole, Randomness, StepOutput, TaskDefaults, TrainResult
from deqgen.training.tasks.generation import summary
from deqgen.training.tasks.generation.builders import build_gradient, build_solvers
from deqgen.training.tasks.generation.checkpointing import checkpoint_explicit_blocks
from deqgen.training.tasks.generation.config import (
    GenerationConfig,
    tokenizer_config,
    transformer_config,
)
from deqgen.training.tasks.generation.data import digit_splits, image_folder, pretokenized_size
from deqgen.training.tasks.generation.tokens import (
    PretokenizedDataset,
    load_tokenizer,
    teacher_forcing,
    tokenize,
    train_tokenizer,
)

__all__ = ["GenerationTask", "model_differences"]

logger = logging.getLogger(__name__)

#: TransformerConfig / ImplicitSpec fields a resumed run may change (they do not change parameter shapes).
_TRAINING_ONLY = frozenset(
    {
        "drop_path_rate",
        "dropout",
        "cond_drop_prob",
        "init_adaln",
        "init_adaln_gamma",
        "init_head",
        "norm_eps",
        "train_no_grad",
        "train_with_grad",
        "eval_iterations",
    }
)


class GenerationTask(TaskDefaults):
    """VIAR (and a VAR baseline) on VQVAE token pyramids; the first task of :mod:`deqgen.training.tasks`."""

    config_class: ClassVar[type[GenerationConfig]] = GenerationConfig
    supports_activation_checkpointing: ClassVar[bool] = True

    def __init__(
        self,
        cfg: GenerationConfig,
        dist: DistInfo,
        out_dir: Path,
        vae: MultiScaleVQVAE,
        data: Dataset[Any],
        validation: Dataset[Any] | None = None,
    ) -> None:
        self.cfg, self.dist, self.out_dir, self.vae, self.data = cfg, dist, out_dir, vae, data
        self.validation = validation

    @classmethod
    def setup(cls, cfg: GenerationConfig, dist: DistInfo, out_dir: Path) -> GenerationTask:
        """The frozen tokenizer, the training set (``(idx (L,), label)`` or ``(image, label)`` rows) and,
        for digits with ``data.val_fraction > 0``, the held-out digits as token rows."""
        images = labels = None
        splits = digit_splits(cfg) if cfg.data.kind == "digits" else ()
        if splits and cfg.data.pretokenized is None:
            train = splits[0]
            images, labels = train.images, train.labels
            logger.info("data: %d training digits (%s, %d px)", len(train), train.source, cfg.data.image_size)
        vae = _tokenizer(cfg, dist, out_dir, images).to(dist.device)
        validation = None
        if len(splits) > 1:
            held = splits[1]
            validation = TensorDataset(tokenize(vae, held.images.to(dist.device)).cpu(), held.labels)
            logger.info("data: %d held-out digits for validation", len(held))
        return cls(cfg, dist, out_dir, vae, _dataset(cfg, dist, vae, images, labels), validation)

    @classmethod
    def dataset_size(cls, cfg: GenerationConfig) -> int | None:
        """Training items, from the config alone: the pre-tokenized folder's count, the digits' training
        split or the images under ``data.root/train`` (None: a pre-tokenized folder without its metadata)."""
        if cfg.data.pretokenized is not None:
            return pretokenized_size(cfg.data.pretokenized)
        if cfg.data.kind == "digits":
            return len(digit_splits(cfg)[0])
        return len(image_folder(cfg, "train"))

    @staticmethod
    def config_differences(saved: GenerationConfig, current: GenerationConfig) -> list[str]:
        """The model-shape fields (model, baseline, tokenizer) that differ, as ``path: checkpoint X, run Y``.

        Training settings (lr, batch, schedules, drop rates, S-JFB ranges) may change on resume.
        """
        out = model_differences("model", saved.model, current.model)
        out += model_differences("baseline", saved.baseline, current.baseline)
        old, new = tokenizer_config(saved.tokenizer), tokenizer_config(current.tokenizer)
        return out + _field_differences("tokenizer", old, new)

    def roles(self) -> list[ModelRole]:
        """``model``, then ``baseline`` when the recipe has one; exported as ``viar``/``var`` when their kinds
        differ, else under their role names."""
        sections = [("model", self.cfg.model)] + (
            [("baseline", self.cfg.baseline)] if self.cfg.baseline else []
        )
        kinds = ["var" if s.implicit is None else "viar" for _, s in sections]
        unique = len(set(kinds)) == len(kinds)
        return [ModelRole(role, kind if unique else role) for (role, _), kind in zip(sections, kinds)]

    def build_model(self, role: ModelRole, generator: torch.Generator) -> nn.Module:
        """The role's :class:`NextScaleTransformer` with the recipe's gradient method and solvers."""
        section = self._section(role)
        train_solver, eval_solver = build_solvers(self.cfg) if section.implicit is not None else (None, None)
        model = build_model(
            transformer_config(section),
            gradient=build_gradient(self.cfg, section),
            train_solver=train_solver,
            eval_solver=eval_solver,
            attention_backend=self.cfg.attention.backend,
            generator=generator,
        )
        if self.cfg.training.activation_checkpointing:
            count = checkpoint_explicit_blocks(model)
            logger.info(
                "training.activation_checkpointing: %d explicit blocks of %s recompute in backward",
                count,
                role.role,
            )
        return model

    def dataset(self) -> Dataset[Any]:
        """Token pyramids ``(idx (L,), label)`` or images ``(image (C, H, W), label)``."""
        return self.data

    def validation_set(self) -> Dataset[Any] | None:
        """The held-out digits' token pyramids (``data.val_fraction > 0``), else None."""
        return self.validation

    def loader_options(self) -> LoaderOptions:
        """``data.num_workers`` and ``data.pin_memory``."""
        return LoaderOptions(num_workers=self.cfg.data.num_workers, pin_memory=self.cfg.data.pin_memory)

    def shard_units(self, model: nn.Module) -> list[nn.Module]:
        """The AdaLN transformer blocks."""
        return [m for m in model.modules() if isinstance(m, AdaLNBlock)]

    def loss(self, model: nn.Module, batch: Sequence[Tensor], rng: Randomness) -> StepOutput:
        """Teacher-forced cross-entropy over every token of the pyramid, token accuracy and S-JFB's counts."""
        x, labels = batch
        with torch.no_grad():
            idx = x if x.dtype == torch.int64 else torch.cat(self.vae.img_to_indices(x), 1)
            feats = teacher_forcing(self.vae, idx)
        logits, stats = model(labels, feats, generator=rng.rank, shared_generator=rng.shared)
        loss = F.cross_entropy(
            logits.flatten(0, 1).float(), idx.flatten(), label_smoothing=self.cfg.training.label_smoothing
        )
        acc = (logits.detach().argmax(-1) == idx).float().mean()
        return StepOutput(loss, {"acc": acc, "k1": float(stats.no_grad_steps), "k2": float(stats.grad_steps)})

    def evaluate(self, role: ModelRole, model: nn.Module, step: int) -> None:
        """A sample grid of ``model`` in ``samples/<role>_step<step>.png``."""
        assert isinstance(model, NextScaleTransformer)
        path = self.out_dir / "samples" / f"{role.role}_step{step:08d}.png"
        summary.sample_grid(self.cfg.sampling, model, self.vae, path, self.dist.device)

    def export(self, role: ModelRole, state: dict[str, Tensor], directory: Path) -> None:
        """A ``load_converted`` directory (``deqgen sample`` reads it)."""
        section = self._section(role)
        save_converted(
            directory, state, "var" if section.implicit is None else "viar", transformer_config(section)
        )

    def summarize(self, results: Sequence[TrainResult]) -> None:
        """``grid.png``, ``loss.png`` and ``metrics.json`` in the run directory."""
        summary.summarize(self.cfg.sampling, self.out_dir, self.vae.cpu(), results)

    def _section(self, role: ModelRole) -> Any:
        return self.cfg.model if role.role == "model" else self.cfg.baseline


def model_differences(section: str, old: Any, new: Any) -> list[str]:
    """The shape-relevant fields of two ``model``/``baseline`` sections that differ."""
    if old is None or new is None:
        if (old is None) != (new is None):
            kinds = ["absent" if c is None else ("VIAR" if c.implicit else "VAR") for c in (old, new)]
            return [f"{section}: checkpoint {kinds[0]}, run {kinds[1]}"]
        return []
    a, b = transformer_config(old), transformer_config(new)
    out = _field_differences(section, a, b, skip={"implicit"})
    if (a.implicit is None) != (b.implicit is None):
        kinds = ["VAR (implicit null)" if c.implicit is None else "VIAR" for c in (a, b)]
        out.append(f"{section}.implicit: checkpoint {kinds[0]}, run {kinds[1]}")
    elif a.implicit is not None:
        out += _field_differences(f"{section}.implicit", a.implicit, b.implicit)
    return out


def _field_differences(
    prefix: str, old: Any, new: Any, skip: frozenset[str] | set[str] = frozenset()
) -> list[str]:
    return [
        f"{prefix}.{f.name}: checkpoint {getattr(old, f.name)!r}, run {getattr(new, f.name)!r}"
        for f in dataclasses.fields(old)
        if f.name not in _TRAINING_ONLY | skip and getattr(old, f.name) != getattr(new, f.name)
    ]


def _tokenizer(
    cfg: GenerationConfig, dist: DistInfo, out_dir: Path, images: Tensor | None
) -> MultiScaleVQVAE:
    """Load ``tokenizer.checkpoint``, or train on rank 0 (reusing ``out_dir/tokenizer``) and load everywhere."""
    tok_cfg = tokenizer_config(cfg.tokenizer)
    if cfg.tokenizer.checkpoint is not None:
        return load_tokenizer(cfg.tokenizer.checkpoint, tok_cfg)
    path = out_dir / "tokenizer"
    if dist.is_main:
        try:
            load_tokenizer(path, tok_cfg)
            logger.info("tokenizer: reusing %s", path)
        except CheckpointError:
            if images is None:
                raise ValueError(
                    "tokenizer.train needs in-memory data (data.kind: digits); for image folders "
                    "give tokenizer.checkpoint"
                ) from None
            _train_and_save_tokenizer(cfg, dist, tok_cfg, images, path)
    barrier()
    return load_tokenizer(path, tok_cfg)


def _train_and_save_tokenizer(
    cfg: GenerationConfig, dist: DistInfo, tok_cfg: VQVAEConfig, images: Tensor, path: Path
) -> None:
    t = cfg.tokenizer.train
    assert t is not None
    g = torch.Generator().manual_seed(shared_seed(cfg.training.seed))
    vae = MultiScaleVQVAE(tok_cfg)
    vae.init_weights(g)
    with progress_bar(t.steps, dist, enabled=cfg.logging.progress_bar, desc="tokenizer") as bar:
        losses = train_tokenizer(
            vae,
            images,
            steps=t.steps,
            lr=t.lr,
            batch_size=t.batch_size,
            generator=g,
            on_step=_TokenizerProgress(bar, cfg.logging.log_every_n_steps, t.steps),
        )
    save_converted(path, vae.state_dict(), "vqvae", tok_cfg)
    logger.info("tokenizer: trained %d steps (final recon MSE %.4f), saved %s", t.steps, losses[-1], path)


@dataclasses.dataclass(frozen=True)
class _TokenizerProgress:
    """``on_step`` of :func:`train_tokenizer`: advance the bar, log every ``every`` steps and the last."""

    bar: Any
    every: int
    steps: int

    def __call__(self, step: int, rec: float, vq: float) -> None:
        self.bar.update(1)
        if step % self.every == 0 or step == self.steps:
            logger.info("tokenizer step %d/%d  recon %.4f  vq %.4f", step, self.steps, rec, vq)


def _dataset(
    cfg: GenerationConfig, dist: DistInfo, vae: MultiScaleVQVAE, images: Tensor | None, labels: Tensor | None
) -> Dataset[Any]:
    if cfg.data.pretokenized is not None:  # token pyramids written once by ``deqgen pretokenize``
        tokens = PretokenizedDataset(cfg.data.pretokenized, vae)
        logger.info("data: %d pre-tokenized images from %s", len(tokens), cfg.data.pretokenized)
        return tokens
    if images is not None:  # small, in-memory data: tokenize once
        assert labels is not None
        return TensorDataset(tokenize(vae, images.to(dist.device)).cpu(), labels)
    folder = image_folder(cfg, "train")
    logger.info("data: %d images in %d classes under %s", len(folder), len(folder.classes), folder.root)
    return folder
