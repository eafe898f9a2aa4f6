"""``deqgen train``: one recipe YAML -> the task's models trained, exported and summarised.

Read top to bottom, one process per device (``torchrun`` starts several)::

    deqgen train recipes/mnist_cpu.yaml                                           # CPU, one process
    torchrun --standalone --nproc_per_node=8 -m deqgen train recipes/viar_imagenet.yaml --set data.root=...

:func:`main` joins the process group; :func:`run` writes the validated config into the run directory, sets
up logging and seeds, lets the task prepare its data (:meth:`~deqgen.training.task.Task.setup`), trains
each of the task's models with :func:`deqgen.training.engine.fit`, and lets rank 0 write the summary.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from deqgen.files import atomic_write_text
from deqgen.training import tasks
from deqgen.training.checkpoint import CheckpointManager
from deqgen.training.config import check_config_compatible
from deqgen.training.distributed import (
    DistInfo,
    barrier,
    init_distributed,
    seed_everything,
    seed_for_rank,
    teardown,
)
from deqgen.training.engine import check_batch_fits, fit
from deqgen.training.metrics import setup_logging
from deqgen.training.rundir import open_run_dir
from deqgen.training.schema import TrainConfig, config_to_yaml
from deqgen.training.task import Task, TrainResult

__all__ = ["main", "run"]

logger = logging.getLogger(__name__)


def main(cfg: TrainConfig, *, overwrite: bool = False) -> int:
    """The ``deqgen train`` entry point: run the recipe in this process (one of several under torchrun).

    Args:
        cfg: the validated recipe.
        overwrite: clear a previous run in ``logging.out_dir`` first (``--overwrite``).
    """
    dist = init_distributed(cfg.distributed.backend, timeout_minutes=cfg.distributed.timeout_minutes)
    try:
        run(cfg, dist, overwrite=overwrite)
    finally:
        teardown()
    return 0


def run(cfg: TrainConfig, dist: DistInfo | None = None, *, overwrite: bool = False) -> list[TrainResult]:
    """Train every model of the recipe's task; returns one :class:`TrainResult` per model.

    The run directory is checked and locked first (:func:`deqgen.training.rundir.open_run_dir`): nothing is
    written when it is busy, holds another run (without ``overwrite`` or a resume) or a different model.

    Raises:
        deqgen.training.rundir.RunDirError: ``logging.out_dir`` is a file, not writable, in use by another
            run, or not empty while neither resumed nor ``overwrite``.
        deqgen.training.checkpoint.CheckpointError: ``checkpoint.resume`` names a missing or damaged
            checkpoint (checked before anything is written).
        deqgen.training.checkpoint.CheckpointConfigMismatch: the checkpoint was trained with another model.
        ValueError: a warmup as long as the run, a batch larger than the data (both before anything is
            written when the task knows its data's size from the config), or
            ``training.activation_checkpointing`` for a task without it.
    """
    dist = dist or DistInfo()
    out = Path(cfg.logging.out_dir)
    task_class = tasks.get(cfg.task)
    check_task_options(cfg, task_class)
    check_batch_fits(cfg, task_class.dataset_size(cfg))  # before the run directory is touched
    verify_explicit_resume(cfg, dist)
    with open_run_dir(cfg, dist, check_config_compatible, overwrite=overwrite):
        write_config(cfg, dist, out)
        setup_logging(dist, cfg.logging.level, out / "train.log")
        seed_everything(seed_for_rank(cfg.training.seed, dist.rank))
        set_matmul_precision(cfg, dist)
        task = task_class.setup(cfg, dist, out)
        check_batch_fits(cfg, len(task.dataset()))  # before any model trains
        results = [
            fit(task, cfg, dist, out, role, i, check_config_compatible) for i, role in enumerate(task.roles())
        ]
        if dist.is_main:
            task.summarize(results)
        barrier()
    return results


def check_task_options(cfg: TrainConfig, task_class: type[Task]) -> None:
    """Refuse engine options the recipe's task cannot honour.

    Raises:
        ValueError: ``training.activation_checkpointing`` for a task without it.
    """
    if cfg.training.activation_checkpointing and not task_class.supports_activation_checkpointing:
        raise ValueError(
            f"training.activation_checkpointing=true: task {cfg.task!r} does not support it; "
            "set training.activation_checkpointing=false"
        )


def verify_explicit_resume(cfg: TrainConfig, dist: DistInfo) -> None:
    """A damaged explicit ``checkpoint.resume`` path fails before anything is written."""
    resume = cfg.checkpoint.resume
    if resume not in ("auto", "none") and dist.is_main:
        CheckpointManager(Path(resume).parent, dist=dist, verify_hash=cfg.checkpoint.verify_hash).verify(
            resume
        )


def write_config(cfg: TrainConfig, dist: DistInfo, out: Path) -> None:
    """Rank 0 writes the validated config as ``config.yaml`` (atomically: a kill leaves old or new)."""
    if dist.is_main:
        atomic_write_text(out / "config.yaml", config_to_yaml(cfg))
    barrier()


def set_matmul_precision(cfg: TrainConfig, dist: DistInfo) -> None:
    """TF32 matmuls on CUDA when ``precision.allow_tf32``."""
    if dist.device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = cfg.precision.allow_tf32
        torch.backends.cudnn.allow_tf32 = cfg.precision.allow_tf32
