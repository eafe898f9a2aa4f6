"""The model-agnostic optimizer loop: :func:`fit` trains one model of a :class:`~deqgen.training.task.Task`.

One optimizer step = ``global_batch_size`` samples = ``micro_batch_size`` per rank x ranks x accumulation
micro-batches. The task's shared random stream is rewound before every micro-batch, so every micro-batch on
every rank draws the same values (S-JFB's ``(k1, k2)``): 2 ranks x 1 micro-batch and 1 rank x 2
micro-batches compute the same update. Per-rank streams feed label dropout and drop-path masks.

Resume is exact: a checkpoint holds the weights, optimizer, scaler, the step, the epoch and the position in
it, and every RNG stream of every rank; ``checkpoint.resume: auto`` takes the newest checkpoint that verifies.

Read :func:`fit` top to bottom: build the model, plan the run's length, build the train state, resume, run
epochs, export. Each epoch runs :func:`optimizer_step` and then logs, checkpoints and evaluates on cadence.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from deqgen.evaluation.memory import peak_memory_bytes
from deqgen.files import atomic_write_text
from deqgen.training.checkpoint import (
    Checkpoint,
    CheckpointManager,
    ConfigCheck,
    gather_full_state,
    restore_rng_state,
    scatter_full_state,
)
from deqgen.training.distributed import (
    DistInfo,
    DistributedBatchSampler,
    all_reduce_mean,
    barrier,
    seed_for_rank,
    shard_fsdp2,
    shared_seed,
)
from deqgen.training.ema import EMA
from deqgen.training.lr_schedule import LRSchedule, WDSchedule, apply_schedules, build_schedules, param_groups
from deqgen.training.metrics import MetricLogger, make_metric_logger, progress_bar
from deqgen.training.schema import TrainConfig
from deqgen.training.task import LoaderOptions, ModelRole, Randomness, StepOutput, Task, TrainResult

__all__ = ["RunLength", "TrainState", "compile_model", "fit", "optimizer_step", "resume_for", "validate"]

logger = logging.getLogger(__name__)

_AUTOCAST = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class RunLength:
    """How long one model trains. ``accum`` micro-batches per optimizer step on each rank."""

    accum: int
    steps_per_epoch: int
    total: int
    warmup: int


@dataclass
class TrainState:
    """Everything a step changes; everything a checkpoint saves.

    Attributes:
        model: the bare model (what the task built).
        wrapped: the model under DDP / FSDP2 (``model`` itself in one process).
        optimizer: AdamW over ``param_groups``.
        scaler: fp16's GradScaler (disabled otherwise).
        rng: the per-rank and shared generators.
        step: optimizer steps done.
        epoch: the current epoch.
        position: optimizer steps done inside the epoch.
        ema: the moving average of ``model``'s weights (``training.ema_decay``), or None.
    """

    model: nn.Module
    wrapped: nn.Module
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    rng: Randomness
    step: int = 0
    epoch: int = 0
    position: int = 0
    ema: EMA | None = None


@dataclass
class _Loop:
    """The fixed collaborators of one model's loop (set up once in :func:`fit`)."""

    task: Task
    cfg: TrainConfig
    dist: DistInfo
    role: ModelRole
    length: RunLength
    dataset: Dataset[Any]
    validation: Dataset[Any] | None
    sampler: DistributedBatchSampler
    lr_at: LRSchedule
    wd_at: WDSchedule
    checkpoints: CheckpointManager
    metrics: MetricLogger
    bar: Any
    window_start: float = field(default_factory=time.perf_counter)
    window_samples: int = 0


def fit(
    task: Task,
    cfg: TrainConfig,
    dist: DistInfo,
    out: Path,
    role: ModelRole,
    index: int,
    check: ConfigCheck | None = None,
) -> TrainResult:
    """Train ``role`` of ``task`` to ``cfg.training``'s length, resuming when asked; export the final weights.

    Args:
        task: the model family.
        cfg: the validated recipe.
        dist: this process's distributed facts.
        out: the run directory.
        role: which of the task's models.
        index: its position in ``task.roles()`` (offsets its seeds).
        check: compares a resumed checkpoint's config with ``cfg``.

    Raises:
        ValueError: a warmup as long as the run, or a global batch larger than the data.
        deqgen.training.checkpoint.CheckpointError: an explicit resume path that is damaged.
    """
    generator = torch.Generator().manual_seed(shared_seed(cfg.training.seed) + index)
    model = task.build_model(role, generator).to(dist.device)
    parameters = sum(p.numel() for p in model.parameters())
    logger.info("%s (%s): %s parameters", role.role, role.name, f"{parameters:,}")
    dataset, sampler = _data(task, cfg, dist, index)
    length = plan_length(cfg, dist, len(sampler), len(dataset))
    state = build_state(task, cfg, dist, model, index)
    checkpoints = _checkpoint_manager(cfg, dist, out, role, check)
    metrics_file = out / f"{role.role}_metrics.jsonl"
    resume(state, checkpoints.load(resume_for(cfg, role.role)), dist, metrics_file)
    lr_at, wd_at = build_schedules(cfg.optim, cfg.training.global_batch_size, length.total, length.warmup)
    t_start = time.perf_counter()
    metrics = make_metric_logger(
        cfg.logging, dist, out, prefix=f"{role.role}_", run_config=cfg.model_dump(mode="json")
    )
    bar = progress_bar(
        length.total, dist, enabled=cfg.logging.progress_bar, desc=role.role, initial=state.step
    )
    with bar, metrics:  # the metric files are closed even when a step raises
        loop = _Loop(task, cfg, dist, role, length, dataset, task.validation_set(), sampler, lr_at, wd_at,
                     checkpoints, metrics, bar)  # fmt: skip
        state.wrapped.train()
        while state.step < length.total:
            run_epoch(loop, state)
    seconds = time.perf_counter() - t_start
    export_dir = _export(task, role, state, dist, out, seconds)
    return TrainResult(role, state.step, parameters, export_dir, read_losses(metrics_file), seconds)


def _data(task: Task, cfg: TrainConfig, dist: DistInfo, index: int) -> tuple[Any, DistributedBatchSampler]:
    """The task's training set, checked against the global batch, and this rank's batch sampler over it."""
    dataset = task.dataset()
    check_batch_fits(cfg, len(dataset))
    sampler = DistributedBatchSampler(
        len(dataset),
        cfg.training.micro_batch_size,
        rank=dist.rank,
        world_size=dist.world_size,
        seed=cfg.training.seed + index,
    )
    return dataset, sampler


def _checkpoint_manager(
    cfg: TrainConfig, dist: DistInfo, out: Path, role: ModelRole, check: ConfigCheck | None
) -> CheckpointManager:
    """The checkpoints of ``role`` under ``out/checkpoints/<role>``."""
    return CheckpointManager(
        out / "checkpoints" / role.role,
        cfg.checkpoint.keep_last,
        dist,
        config=cfg,
        check=check,
        verify_hash=cfg.checkpoint.verify_hash,
    )


def plan_length(cfg: TrainConfig, dist: DistInfo, batches_per_epoch: int, num_samples: int) -> RunLength:
    """Accumulation, steps per epoch, total and warmup steps.

    Raises:
        ValueError: the global batch is larger than the data, or the warmup is not shorter than the run.
    """
    accum = cfg.grad_accum_steps(dist.world_size)
    steps_per_epoch = batches_per_epoch // accum
    if steps_per_epoch < 1:
        raise ValueError(_batch_too_large(cfg, num_samples))
    total, warmup = cfg.total_steps(steps_per_epoch), cfg.warmup_steps(steps_per_epoch)
    if warmup >= total:
        raise ValueError(
            f"optim.warmup_steps/warmup_epochs give {warmup} warmup steps, not fewer than the run's "
            f"{total} optimizer steps ({steps_per_epoch} per epoch): shorten the warmup"
        )
    return RunLength(accum, steps_per_epoch, total, warmup)


def check_batch_fits(cfg: TrainConfig, num_samples: int | None) -> None:
    """Raise before any step when one optimizer step needs more samples than the training set has
    (nothing to check while ``num_samples`` is unknown: None).

    Raises:
        ValueError: names ``training.global_batch_size`` and ``training.micro_batch_size``.
    """
    if num_samples is not None and cfg.training.global_batch_size > num_samples:
        raise ValueError(_batch_too_large(cfg, num_samples))


def _batch_too_large(cfg: TrainConfig, num_samples: int) -> str:
    t = cfg.training
    return (
        f"training.global_batch_size={t.global_batch_size} "
        f"(training.micro_batch_size={t.micro_batch_size} per rank and micro-batch) is larger than the "
        f"{num_samples} training samples: lower "
        "training.global_batch_size (and training.micro_batch_size with it), or train on more data"
    )


def build_state(task: Task, cfg: TrainConfig, dist: DistInfo, model: nn.Module, index: int) -> TrainState:
    """Wrap the model (before the optimizer: FSDP2 replaces the parameters by sharded ones), then AdamW,
    the GradScaler and the random streams. The EMA copies the plain model first (``training.ema_decay``)."""
    ema = EMA(model, cfg.training.ema_decay) if cfg.training.ema_decay is not None else None
    compile_model(model, cfg, dist)
    wrapped = wrap(task, model, cfg, dist)
    groups = param_groups(model, cfg.optim.no_weight_decay, cfg.optim.no_weight_decay_1d)
    fused = cfg.optim.fused and dist.device.type == "cuda"
    optimizer = torch.optim.AdamW(
        groups, lr=0.0, betas=cfg.optim.betas, eps=cfg.optim.eps, fused=fused or None
    )
    p = cfg.precision
    scaler = torch.amp.GradScaler(
        dist.device.type,
        init_scale=p.grad_scaler_init_scale,
        growth_interval=p.grad_scaler_growth_interval,
        enabled=p.dtype == "fp16",
    )
    seed = cfg.training.seed
    rng = Randomness(
        rank=torch.Generator(dist.device).manual_seed(seed_for_rank(seed, dist.rank) + index),
        shared=torch.Generator().manual_seed(shared_seed(seed) + index),
    )
    return TrainState(model, wrapped, optimizer, scaler, rng, ema=ema)


def resume(state: TrainState, ckpt: Checkpoint | None, dist: DistInfo, metrics_file: Path) -> None:
    """Load a checkpoint into ``state`` (nothing when ``ckpt`` is None); drop the metric lines logged
    after it (all of them when starting from nothing), so the log holds every step once."""
    if ckpt is not None:
        _load_checkpoint(state, ckpt)
    if dist.is_main:
        truncate_metrics(metrics_file, state.step)


def _load_checkpoint(state: TrainState, ckpt: Checkpoint) -> None:
    scatter_full_state(state.wrapped, ckpt.model_state, state.optimizer, ckpt.train_state["optimizer"])
    if ckpt.train_state.get("scaler"):
        state.scaler.load_state_dict(ckpt.train_state["scaler"])
    state.step, state.epoch = ckpt.step, int(ckpt.train_state["epoch"])
    state.position = int(ckpt.train_state["position"])
    if ckpt.rng_state is not None:
        restore_rng_state(ckpt.rng_state, _generators(state))
    if state.ema is not None:
        _load_ema(state.ema, state.model, ckpt)


def _load_ema(ema: EMA, model: nn.Module, ckpt: Checkpoint) -> None:
    """The checkpoint's EMA, or (saved without one) an average restarted at the loaded weights."""
    saved = ckpt.train_state.get("ema")
    if saved:
        ema.load_state_dict(saved)
    else:
        logger.warning(
            "%s has no EMA (saved with training.ema_decay=null); the EMA restarts at its weights", ckpt.path
        )
        ema.copy_from(model)


def resume_for(cfg: TrainConfig, role: str) -> str:
    """``checkpoint.resume`` for one model. An explicit checkpoint belongs to one model: the one whose folder
    it sits in (``.../checkpoints/baseline/ckpt_*`` is the baseline's), else the main model; the other
    models resume ``auto``."""
    resume_path = cfg.checkpoint.resume
    if resume_path in ("auto", "none"):
        return resume_path
    owner = "baseline" if Path(resume_path).resolve().parent.name == "baseline" else "model"
    return resume_path if role == owner else "auto"


def run_epoch(loop: _Loop, state: TrainState) -> None:
    """The optimizer steps left in the current epoch (or in the run), then the epoch's end."""
    loop.sampler.set_epoch(state.epoch)
    if hasattr(loop.dataset, "set_epoch"):
        loop.dataset.set_epoch(state.epoch)
    loop.sampler.set_start_batch(state.position * loop.length.accum)
    options = _loader_options(loop.task.loader_options(), loop.dist)
    batches = iter(DataLoader(loop.dataset, batch_sampler=loop.sampler, **options))
    while state.step < loop.length.total and state.position < loop.length.steps_per_epoch:
        lr, wd = loop.lr_at(state.step), loop.wd_at(state.step)
        apply_schedules(state.optimizer, lr, wd)
        sums = optimizer_step(loop.task, state, batches, loop.length.accum, loop.dist, loop.cfg)
        state.step, state.position = state.step + 1, state.position + 1
        loop.window_samples += loop.cfg.training.global_batch_size
        loop.bar.update(1)
        _after_step(loop, state, {**sums, "lr": lr, "wd": wd})
    if state.position >= loop.length.steps_per_epoch:
        state.epoch, state.position = state.epoch + 1, 0
        every = loop.cfg.checkpoint.every_n_epochs
        if every is not None and state.epoch % every == 0 and state.step < loop.length.total:
            save(loop, state)


def optimizer_step(
    task: Task,
    state: TrainState,
    batches: Iterator[Sequence[Tensor]],
    accum: int,
    dist: DistInfo,
    cfg: TrainConfig,
) -> dict[str, Tensor | float]:
    """Forward/backward ``accum`` micro-batches (gradients synchronised on the last one only), then unscale,
    clip, step and zero. Returns the micro-batch mean of the task's metrics, ``loss`` and ``grad_norm``, as
    device tensors (read only when logging: no host sync per step)."""
    autocast = _AUTOCAST[cfg.precision.dtype]
    shared_state = state.rng.shared.get_state()
    sums: dict[str, Tensor | float] = {}
    for i in range(accum):
        batch = [t.to(dist.device, non_blocking=True) for t in next(batches)]
        state.rng.shared.set_state(shared_state)
        with (
            _no_sync(state.wrapped, i == accum - 1),
            torch.autocast(dist.device.type, dtype=autocast, enabled=autocast is not None),
        ):
            out = task.loss(state.wrapped, batch, state.rng)
        state.scaler.scale(out.loss / accum).backward()
        _accumulate(sums, out, accum)
    sums["grad_norm"] = _clip_and_step(state, cfg.optim.clip_grad_norm)
    if state.ema is not None:
        state.ema.update(state.model)
    return sums


def _accumulate(sums: dict[str, Tensor | float], out: StepOutput, accum: int) -> None:
    for name, value in {"loss": out.loss.detach(), **out.metrics}.items():
        value = value.detach() if isinstance(value, Tensor) else value
        sums[name] = sums.get(name, 0.0) + value / accum


def _clip_and_step(state: TrainState, clip: float | None) -> Tensor:
    """Unscale, clip the global gradient norm (``inf`` when ``clip`` is None), step, zero; the norm."""
    state.scaler.unscale_(state.optimizer)
    params = [p for p in state.wrapped.parameters() if p.grad is not None]
    norm = torch.nn.utils.clip_grad_norm_(params, clip if clip is not None else math.inf)
    state.scaler.step(state.optimizer)
    state.scaler.update()
    state.optimizer.zero_grad(set_to_none=True)
    return norm.full_tensor() if hasattr(norm, "full_tensor") else norm


def _after_step(loop: _Loop, state: TrainState, values: dict[str, Tensor | float]) -> None:
    """Validate at the end of an epoch; log, checkpoint and evaluate when their cadence says so."""
    cfg = loop.cfg
    val = _validation_row(loop, state) if state.position == loop.length.steps_per_epoch else {}
    if val or state.step % cfg.logging.log_every_n_steps == 0 or state.step == loop.length.total:
        _log_step(loop, state, values, val)
    every = cfg.checkpoint.every_n_steps
    if state.step == loop.length.total or (every is not None and state.step % every == 0):
        save(loop, state)
    if cfg.evaluation.every_n_steps is not None and state.step % cfg.evaluation.every_n_steps == 0:
        _evaluate(loop, state)


def _log_step(
    loop: _Loop, state: TrainState, values: dict[str, Tensor | float], val: dict[str, float]
) -> None:
    now = time.perf_counter()
    row = all_reduce_mean({k: float(v) for k, v in values.items()}, loop.dist)
    row.update(
        samples_per_s=loop.window_samples / (now - loop.window_start),
        peak_mem_gb=peak_memory_bytes(loop.dist.device) / 2**30,
        epoch=state.epoch,
        **val,
    )
    loop.metrics.log(state.step, row)
    loop.bar.set_postfix(loss=f"{row['loss']:.3f}")
    loop.window_start, loop.window_samples = now, 0


def save(loop: _Loop, state: TrainState) -> None:
    """Checkpoint ``state`` (every rank calls this; rank 0 writes the weights)."""
    model_state, optim_state = gather_full_state(state.wrapped, state.optimizer)
    train_state = {
        "optimizer": optim_state,
        "scaler": state.scaler.state_dict() if state.scaler.is_enabled() else {},
        "epoch": state.epoch,
        "position": state.position,
        "role": loop.role.role,
    }
    if state.ema is not None and loop.dist.is_main:
        train_state["ema"] = state.ema.state_dict()
    loop.checkpoints.save(
        state.step, model_state if loop.dist.is_main else {}, train_state, generators=_generators(state)
    )


def _evaluate(loop: _Loop, state: TrainState) -> None:
    """``evaluation.every_n_steps``: rank 0 evaluates mid-run (not under FSDP2, whose sharded weights every
    rank would have to gather)."""
    if loop.dist.is_distributed and loop.cfg.distributed.strategy == "fsdp2":
        logger.warning("evaluation.every_n_steps: skipped under FSDP2; evaluate the exported model instead")
    elif loop.dist.is_main:
        loop.task.evaluate(loop.role, state.ema.module if state.ema is not None else state.model, state.step)
    barrier()
    state.wrapped.train()


def _validation_row(loop: _Loop, state: TrainState) -> dict[str, float]:
    """End of an epoch: ``val_*`` of the trained model and, with an EMA, ``val_ema_*`` (empty without a
    validation set)."""
    if loop.validation is None:
        return {}
    row = validate(loop.task, state.wrapped, loop.validation, loop.cfg, loop.dist)
    if state.ema is not None:
        ema_row = validate(loop.task, state.ema.module, loop.validation, loop.cfg, loop.dist)
        row.update({"val_ema_" + k.removeprefix("val_"): v for k, v in ema_row.items()})
    return row


def validate(
    task: Task, model: nn.Module, data: Dataset[Any], cfg: TrainConfig, dist: DistInfo
) -> dict[str, float]:
    """The mean :meth:`Task.loss` and metrics of ``model`` over ``data``, as ``val_<name>``.

    Eval mode and no gradients; micro-batches of ``training.micro_batch_size``, the items split over the
    ranks and every value weighted by its batch's size (the result is the mean over all items). The task
    gets fixed random streams and the global RNGs are restored afterwards, so validating never changes the
    training's randomness (exact resume holds).
    """
    mine = list(range(dist.rank, len(data), dist.world_size))
    size = cfg.training.micro_batch_size
    batches = [mine[i : i + size] for i in range(0, len(mine), size)]
    loader = DataLoader(data, batch_sampler=batches, **_loader_options(task.loader_options(), dist))
    seed = shared_seed(cfg.training.seed)
    rng = Randomness(
        rank=torch.Generator(dist.device).manual_seed(seed), shared=torch.Generator().manual_seed(seed)
    )
    autocast = _AUTOCAST[cfg.precision.dtype]
    sums: dict[str, float] = {}
    training = model.training
    model.eval()
    with torch.random.fork_rng(devices=[dist.device] if dist.device.type == "cuda" else []), torch.no_grad():
        for batch in loader:
            batch = [t.to(dist.device, non_blocking=True) for t in batch]
            with torch.autocast(dist.device.type, dtype=autocast, enabled=autocast is not None):
                out = task.loss(model, batch, rng)
            n = len(batch[0])
            for name, value in {"loss": out.loss, **out.metrics, "_items": 1.0}.items():
                sums[name] = sums.get(name, 0.0) + float(value) * n
    model.train(training)
    totals = _all_reduce_sum(sums, dist)
    items = totals.pop("_items")
    return {f"val_{name}": value / items for name, value in totals.items()}


def _all_reduce_sum(values: dict[str, float], dist: DistInfo) -> dict[str, float]:
    """Sum scalars over ranks (in float64; every rank passes the same keys in the same order)."""
    import torch.distributed as tdist

    if not (dist.is_distributed and tdist.is_available() and tdist.is_initialized()):
        return dict(values)
    t = torch.tensor(list(values.values()), dtype=torch.float64, device=dist.device)
    tdist.all_reduce(t)
    return dict(zip(values, t.tolist()))


def _export(
    task: Task, role: ModelRole, state: TrainState, dist: DistInfo, out: Path, seconds: float
) -> Path:
    """Rank 0 exports the final weights (the EMA's when there is one) to ``out/<role.name>``."""
    export_dir = out / role.name
    model_state = state.ema.state_dict() if state.ema is not None else gather_full_state(state.wrapped)[0]
    if dist.is_main:
        task.export(role, model_state, export_dir)
        logger.info("%s: %d steps in %.0f s; exported %s", role.role, state.step, seconds, export_dir)
    barrier()
    return export_dir


def _generators(state: TrainState) -> dict[str, torch.Generator]:
    return {"rank": state.rng.rank, "shared": state.rng.shared}


def _loader_options(options: LoaderOptions, dist: DistInfo) -> dict[str, Any]:
    """DataLoader keyword arguments from the task's :class:`LoaderOptions` (pinning only on CUDA)."""
    pin = options.pin_memory and dist.device.type == "cuda"
    return {"num_workers": options.num_workers, "pin_memory": pin}


def wrap(task: Task, model: nn.Module, cfg: TrainConfig, dist: DistInfo) -> nn.Module:
    """DDP or FSDP2 over the process group; the bare model in a single process."""
    if not dist.is_distributed:
        return model
    if cfg.distributed.strategy == "fsdp2":
        return shard_fsdp2(model, task.shard_units(model))  # implicit layers: one gather per solve
    from torch.nn.parallel import DistributedDataParallel

    ids = [dist.device.index] if dist.device.type == "cuda" else None
    return DistributedDataParallel(
        model,
        device_ids=ids,
        find_unused_parameters=cfg.distributed.find_unused_parameters,
        broadcast_buffers=cfg.distributed.broadcast_buffers,
    )


def compile_model(model: nn.Module, cfg: TrainConfig, dist: DistInfo) -> None:
    """``training.compile``: resolve the attention kernels for the autocast dtype (a model's
    ``prepare_attention``, when it has one), then compile its forward in place (``nn.Module.compile``: the
    state-dict keys stay as they are, so checkpoints do not change)."""
    if not cfg.training.compile:
        return
    dtype = _AUTOCAST[cfg.precision.dtype] or next(model.parameters()).dtype
    prepare = getattr(model, "prepare_attention", None)
    if callable(prepare):
        prepare(dist.device, dtype)
    model.compile()
    logger.info("training.compile: %s compiled for %s, %s", type(model).__name__, dist.device, dtype)


@contextlib.contextmanager
def _no_sync(model: nn.Module, sync: bool) -> Iterator[None]:
    """Skip the gradient all-reduce of a micro-batch that is not the step's last (DDP ``no_sync``, FSDP2's
    ``set_requires_gradient_sync``)."""
    if sync:
        yield
    elif hasattr(model, "no_sync"):
        with model.no_sync():
            yield
    elif hasattr(model, "set_requires_gradient_sync"):
        model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            model.set_requires_gradient_sync(True)
    else:
        yield


def truncate_metrics(path: Path, step: int) -> None:
    """Drop lines an interrupted run logged after the checkpoint we resume from (they are recomputed)."""
    if not path.is_file():
        return
    keep = [line for line in path.read_text().splitlines() if line.strip() and _step_of_row(line) <= step]
    atomic_write_text(path, "".join(line + "\n" for line in keep))


def _step_of_row(line: str) -> float:
    """The step of one metrics line; a line cut short by a kill counts as after every step (dropped)."""
    try:
        return int(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return math.inf


def read_losses(path: Path) -> list[tuple[int, float]]:
    """``(step, loss)`` of every line of a metrics JSONL file (empty when it does not exist)."""
    if not path.is_file():
        return []
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [(int(r["step"]), float(r["loss"])) for r in rows]
