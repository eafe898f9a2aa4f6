"""The one interface between the training engine and a model family: a :class:`Task`.

The engine (:mod:`deqgen.training.engine`) owns the optimizer loop, accumulation, precision, DDP/FSDP2,
checkpoints, schedules and metric sinks, and knows nothing of any model. A task owns everything
family-specific: its config sections, the data, the models it trains (a model and, optionally, a baseline),
the loss and metrics of one micro-batch, and the run's summary (samples, predictions, plots).

A classifier fits as a task whose batches are ``(images, labels)`` and whose loss is a cross-entropy; an
implicit neural representation as one whose dataset yields coordinate batches of one image. Model states
(tuples in a multiscale DEQ) stay inside the model: the engine only sees a loss and scalar metrics.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Protocol

import torch
from torch import Tensor, nn
from torch.utils.data import Dataset

from deqgen.training.distributed import DistInfo
from deqgen.training.schema import TrainConfig

__all__ = ["LoaderOptions", "ModelRole", "Randomness", "StepOutput", "Task", "TaskDefaults", "TrainResult"]


@dataclass(frozen=True)
class ModelRole:
    """One model a task trains.

    Attributes:
        role: ``model`` or ``baseline``: names its checkpoint folder and metrics file.
        name: its export directory's name under the run directory (e.g. ``viar``, ``var``).
    """

    role: str
    name: str


@dataclass(frozen=True)
class Randomness:
    """The random streams of one optimizer step, handed to :meth:`Task.loss`.

    Attributes:
        rank: this rank's stream (label dropout, drop-path masks).
        shared: the same on every rank and rewound before every micro-batch, so all of them draw the same
            values (S-JFB's ``(k1, k2)``).
    """

    rank: torch.Generator
    shared: torch.Generator


@dataclass
class StepOutput:
    """What :meth:`Task.loss` returns for one micro-batch.

    Attributes:
        loss: the scalar to differentiate (before dividing by the accumulation count).
        metrics: scalars to log, as 0-d device tensors or numbers; the engine averages them over the step's
            micro-batches and reads them only when it logs (no host sync per step).
    """

    loss: Tensor
    metrics: dict[str, Tensor | float] = field(default_factory=dict)


@dataclass(frozen=True)
class LoaderOptions:
    """DataLoader settings of a task's training (and validation) batches.

    Attributes:
        num_workers: worker processes (0: load in the training process).
        pin_memory: page-locked host batches (honoured on CUDA only).
    """

    num_workers: int = 0
    pin_memory: bool = False


@dataclass
class TrainResult:
    """What one model's training left behind.

    Attributes:
        role: the :class:`ModelRole` trained.
        steps: optimizer steps done.
        parameters: parameter count.
        export_dir: the directory :meth:`Task.export` wrote the final weights to.
        losses: ``(step, loss)`` of every logged step of the whole run (rank 0; read from the metrics file).
        seconds: wall time of this process's training (not counting earlier, resumed-from runs).
    """

    role: ModelRole
    steps: int
    parameters: int
    export_dir: Path
    losses: list[tuple[int, float]] = field(default_factory=list)
    seconds: float = 0.0


class Task(Protocol):
    """A model family as the engine sees it. :meth:`setup` builds one; the engine calls the rest."""

    #: The pydantic config class of this task's recipes (a :class:`TrainConfig` subclass).
    config_class: ClassVar[type[TrainConfig]]

    #: Whether :meth:`build_model` honours ``training.activation_checkpointing``.
    supports_activation_checkpointing: ClassVar[bool]

    @classmethod
    def setup(cls, cfg: Any, dist: DistInfo, out_dir: Path) -> Task:
        """Prepare what every model of the run shares (data, a frozen tokenizer, ...); every rank calls it."""
        ...

    @staticmethod
    def config_differences(saved: Any, current: Any) -> list[str]:
        """The model-shape fields that differ between a checkpoint's config and the run's (for resume)."""
        ...

    def roles(self) -> Sequence[ModelRole]:
        """The models to train, in order."""
        ...

    def build_model(self, role: ModelRole, generator: torch.Generator) -> nn.Module:
        """A freshly initialised model of ``role`` (initialised from ``generator``, the same on every rank)."""
        ...

    def dataset(self) -> Dataset[Any]:
        """The training set; items are tuples of tensors, collated into the batches :meth:`loss` receives."""
        ...

    @classmethod
    def dataset_size(cls, cfg: Any) -> int | None:
        """The training set's length, known from ``cfg`` alone (before :meth:`setup` writes anything), so a
        global batch larger than the data is refused first; None when only :meth:`setup` can tell."""
        ...

    def validation_set(self) -> Dataset[Any] | None:
        """Held-out items shaped like :meth:`dataset`'s; the engine logs their mean :meth:`loss` and metrics
        (``val_*``) at the end of every epoch. None: no validation."""
        ...

    def loader_options(self) -> LoaderOptions:
        """DataLoader workers and pinning for :meth:`dataset` and :meth:`validation_set`."""
        ...

    def shard_units(self, model: nn.Module) -> list[nn.Module]:
        """The submodules FSDP2 shards one by one before the root (e.g. the transformer blocks)."""
        ...

    def loss(self, model: nn.Module, batch: Sequence[Tensor], rng: Randomness) -> StepOutput:
        """Forward one micro-batch (already on the device) and return its loss and metrics."""
        ...

    def evaluate(self, role: ModelRole, model: nn.Module, step: int) -> None:
        """``evaluation.every_n_steps``: rank 0 evaluates the unwrapped ``model`` mid-run."""
        ...

    def export(self, role: ModelRole, state: dict[str, Tensor], directory: Path) -> None:
        """Rank 0: write the final weights ``state`` of ``role`` to ``directory`` in a loadable form."""
        ...

    def summarize(self, results: Sequence[TrainResult]) -> None:
        """Rank 0, after training: samples or predictions, plots and a ``metrics.json`` in the run directory."""
        ...


class TaskDefaults:
    """Base class of the tasks: the defaults of the optional :class:`Task` hooks (no size known before
    setup, no validation set, in-process unpinned loading, no activation checkpointing)."""

    supports_activation_checkpointing: ClassVar[bool] = False

    @classmethod
    def dataset_size(cls, cfg: Any) -> int | None:
        """Unknown before :meth:`Task.setup` (the engine checks the batch against the data after it)."""
        return None

    def validation_set(self) -> Dataset[Any] | None:
        """No held-out set: no ``val_*`` metrics."""
        return None

    def loader_options(self) -> LoaderOptions:
        """No worker processes, no pinning."""
        return LoaderOptions()

    def shard_units(self, model: nn.Module) -> list[nn.Module]:
        """Nothing below the root is sharded on its own (small models)."""
        return []
