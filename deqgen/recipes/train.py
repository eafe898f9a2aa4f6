"""``deqgen train``: one recipe YAML -> a tokenizer (loaded or trained), the model, its baseline, samples.

Read top to bottom, one process per device (``torchrun`` starts several)::

    deqgen train recipes/mnist_cpu.yaml                                           # CPU, one process
    torchrun --standalone --nproc_per_node=8 -m deqgen train recipes/viar_imagenet.yaml --set data.root=...

1. join the process group (:func:`~deqgen.recipes.distributed.init_distributed`), set up logging and seeds;
2. the data: real digits (in memory) or an ImageNet-style folder (decoded by DataLoader workers);
3. the tokenizer: loaded from ``tokenizer.checkpoint``, or trained on rank 0 and saved to ``out_dir/tokenizer``
   (a rerun loads it instead of training again); digits are tokenized once, folders batch by batch;
4. for the model and then the baseline: build, wrap (DDP or FSDP2), resume from the newest complete
   checkpoint, and run the optimizer loop below; save checkpoints atomically; export the final weights as
   a ``load_converted`` directory (``out_dir/viar``, ``out_dir/var``; ``model``/``baseline`` when both are
   the same kind);
5. rank 0 samples the ``sampling`` grid from every model and writes ``grid.png``, ``loss.png`` and
   ``metrics.json``.

One optimizer step = ``global_batch_size`` images = ``micro_batch_size`` per rank x ranks x accumulation
micro-batches. S-JFB's ``(k1, k2)`` are drawn once per optimizer step from a stream every rank shares, so
every micro-batch on every rank unrolls the same counts: 2 ranks x 1 micro-batch and 1 rank x 2
micro-batches compute the same update. Label dropout and drop-path masks come from per-rank streams.

Resume is exact: a checkpoint holds the weights, optimizer, scaler, the step, the epoch and the position in
it, and every RNG stream of every rank; ``--resume auto`` takes the newest checkpoint that verifies.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import resource
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

from deqgen.models.viar.convert import save_converted
from deqgen.models.viar.model import NextScaleTransformer, build_model
from deqgen.models.viar.vqvae import MultiScaleVQVAE
from deqgen.recipes.checkpoint import (
    CheckpointManager,
    gather_full_state,
    restore_rng_state,
    scatter_full_state,
)
from deqgen.recipes.config import (
    ModelSection,
    RecipeConfig,
    build_baseline_config,
    build_gradient,
    build_model_config,
    build_schedule,
    build_solvers,
    build_tokenizer_config,
    config_to_yaml,
)
from deqgen.recipes.distributed import (
    DistInfo,
    DistributedBatchSampler,
    all_reduce_mean,
    barrier,
    init_distributed,
    seed_everything,
    seed_for_rank,
    shared_seed,
    teardown,
)
from deqgen.recipes.logging_utils import (
    JsonlSink,
    MetricLogger,
    StdoutSink,
    TensorBoardSink,
    progress_bar,
    setup_logging,
)
from deqgen.recipes.lr_schedule import apply_schedules, build_schedules, param_groups
from deqgen.recipes.tokens import load_tokenizer, teacher_forcing, tokenize, train_tokenizer

__all__ = ["TrainResult", "digit_splits", "image_folder", "main", "run"]

logger = logging.getLogger(__name__)

_AUTOCAST = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class TrainResult:
    """What one model's training left behind.

    Attributes:
        role: ``model`` or ``baseline``.
        name: the export directory's name (``viar``, ``var``, or the role).
        steps: optimizer steps done.
        parameters: parameter count.
        export_dir: the ``load_converted`` directory of the final weights.
        losses: ``(step, loss)`` of every logged step of the whole run (rank 0; read from the metrics file).
        seconds: wall time of this process's training (not counting earlier, resumed-from runs).
        samples: rank 0: the ``sampling`` grid's images ``(N, C, H, W)`` in ``[0, 1]``, class-major.
        sample_labels: their classes ``(N,)``.
    """

    role: str
    name: str
    steps: int
    parameters: int
    export_dir: Path
    losses: list[tuple[int, float]] = field(default_factory=list)
    seconds: float = 0.0
    samples: Tensor | None = None
    sample_labels: Tensor | None = None


def main(cfg: RecipeConfig) -> int:
    """The ``deqgen train`` entry point: run the recipe in this process (one of several under torchrun)."""
    info = init_distributed(cfg.distributed.backend, timeout_minutes=cfg.distributed.timeout_minutes)
    try:
        run(cfg, info)
    finally:
        teardown()
    return 0


def run(cfg: RecipeConfig, info: DistInfo | None = None) -> list[TrainResult]:
    """Train everything the recipe asks for; returns one :class:`TrainResult` per transformer.

    Raises:
        deqgen.recipes.checkpoint.CheckpointError: ``checkpoint.resume`` names a missing or damaged checkpoint
            (checked before anything is written).
        deqgen.recipes.checkpoint.CheckpointConfigMismatch: the checkpoint was trained with another model.
        ValueError: a warmup as long as the run, or a batch larger than the data.
    """
    info = info or DistInfo()
    out = Path(cfg.logging.out_dir)
    if cfg.checkpoint.resume not in ("auto", "none") and info.is_main:  # a damaged explicit path: fail first
        CheckpointManager(Path(cfg.checkpoint.resume).parent, dist=info,
                          verify_hash=cfg.checkpoint.verify_hash).verify(cfg.checkpoint.resume)
    if info.is_main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.yaml").write_text(config_to_yaml(cfg))
    barrier()
    setup_logging(info, cfg.logging.level, out / "train.log")
    seed_everything(seed_for_rank(cfg.training.seed, info.rank))
    if info.device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = cfg.precision.allow_tf32
        torch.backends.cudnn.allow_tf32 = cfg.precision.allow_tf32

    # ---- data and tokenizer ------------------------------------------------------------------------------
    vae, dataset = _tokens_and_data(cfg, info, out)

    # ---- transformers ----------------------------------------------------------------------------------------
    sections = [("model", cfg.model)] + ([("baseline", cfg.baseline)] if cfg.baseline is not None else [])
    kinds = ["var" if s.implicit is None else "viar" for _, s in sections]
    results = []
    for i, (role, section) in enumerate(sections):
        name = kinds[i] if len(set(kinds)) == len(kinds) else role
        results.append(_train_one(cfg, info, out, role, name, i, section, vae, dataset))

    # ---- samples and summary ---------------------------------------------------------------------------------
    if info.is_main:
        _summarize(cfg, out, vae, results)
    barrier()
    return results


# ---- step 2-3: data and tokenizer ------------------------------------------------------------------------------

def _tokens_and_data(cfg: RecipeConfig, info: DistInfo, out: Path) -> tuple[MultiScaleVQVAE, Dataset[Any]]:
    """The frozen tokenizer and the training set: ``(idx (L,), label)`` rows, or ``(image, label)`` rows."""
    tok_cfg = build_tokenizer_config(cfg)
    images = labels = None
    if cfg.data.kind == "digits" and cfg.data.pretokenized is None:
        train = digit_splits(cfg)[0]
        images, labels = train.images, train.labels
        logger.info("data: %d training digits (%s, %d px)", len(train), train.source, cfg.data.image_size)

    if cfg.tokenizer.checkpoint is not None:
        vae = load_tokenizer(cfg.tokenizer.checkpoint, tok_cfg)
    else:
        vae = _trained_tokenizer(cfg, info, out, tok_cfg, images)
    vae = vae.to(info.device)

    if cfg.data.pretokenized is not None:  # token pyramids written once by ``deqgen pretokenize``
        from deqgen.recipes.tokens import PretokenizedDataset

        tokens = PretokenizedDataset(cfg.data.pretokenized, vae)
        logger.info("data: %d pre-tokenized images from %s", len(tokens), cfg.data.pretokenized)
        return vae, tokens
    if images is not None:  # small, in-memory data: tokenize once
        assert labels is not None
        return vae, TensorDataset(tokenize(vae, images.to(info.device)).cpu(), labels)
    folder = image_folder(cfg, "train")
    logger.info("data: %d images in %d classes under %s", len(folder), len(folder.classes), folder.root)
    return vae, folder


def digit_splits(cfg: RecipeConfig) -> tuple[Any, ...]:
    """The recipe's real digits, split stratified by ``data.val_fraction`` with the run seed: ``(train, held)``
    :class:`~deqgen.data.digits.DigitsData` (just ``(train,)`` when the fraction is 0). Training,
    ``deqgen pretokenize`` and the CPU demo's held-out classifier all use this one split."""
    from deqgen.data.digits import load_digits, split

    d = cfg.data
    data = load_digits(d.source, side=d.image_size)
    parts = [1.0 - d.val_fraction, d.val_fraction] if d.val_fraction > 0 else [1.0]
    return split(data, parts, torch.Generator().manual_seed(cfg.training.seed))


def image_folder(cfg: RecipeConfig, split: str = "train", *, random_crop: bool | None = None) -> Any:
    """The recipe's :class:`~deqgen.data.image_folder.ImageFolder` of ``data.root / split``."""
    from deqgen.data.image_folder import ImageFolder

    d = cfg.data
    if d.root is None:
        raise ValueError("data.root is not set: image-folder data needs data.root (with train/ inside)")
    return ImageFolder(d.root / split, image_size=d.image_size, resize_shorter_side=d.resize_shorter_side,
                       interpolation=d.interpolation, random_crop=d.random_crop if random_crop is None else random_crop,
                       hflip=d.hflip, seed=cfg.training.seed)


def _trained_tokenizer(
    cfg: RecipeConfig, info: DistInfo, out: Path, tok_cfg: Any, images: Tensor | None
) -> MultiScaleVQVAE:
    """Train the tokenizer on rank 0 (or reuse ``out/tokenizer`` from an earlier run), then load it everywhere."""
    from deqgen.models.viar.convert import CheckpointError

    path = out / "tokenizer"
    if info.is_main:
        try:
            load_tokenizer(path, tok_cfg)
            logger.info("tokenizer: reusing %s", path)
        except CheckpointError:
            if images is None:
                raise ValueError("tokenizer.train needs in-memory data (data.kind: digits); for image folders "
                                 "give tokenizer.checkpoint") from None
            _train_and_save_tokenizer(cfg, info, tok_cfg, images, path)
    barrier()
    return load_tokenizer(path, tok_cfg)


def _train_and_save_tokenizer(cfg: RecipeConfig, info: DistInfo, tok_cfg: Any, images: Tensor, path: Path) -> None:
    t = cfg.tokenizer.train
    assert t is not None
    g = torch.Generator().manual_seed(shared_seed(cfg.training.seed))
    vae = MultiScaleVQVAE(tok_cfg)
    vae.init_weights(g)
    bar = progress_bar(t.steps, info, enabled=cfg.logging.progress_bar, desc="tokenizer")

    def on_step(step: int, rec: float, vq: float) -> None:
        bar.update(1)
        if step % cfg.logging.log_every_n_steps == 0 or step == t.steps:
            logger.info("tokenizer step %d/%d  recon %.4f  vq %.4f", step, t.steps, rec, vq)

    with bar:
        losses = train_tokenizer(vae, images, steps=t.steps, lr=t.lr, batch_size=t.batch_size, generator=g,
                                 on_step=on_step)
    save_converted(path, vae.state_dict(), "vqvae", tok_cfg)
    logger.info("tokenizer: trained %d steps (final recon MSE %.4f), saved %s", t.steps, losses[-1], path)


# ---- step 4: one transformer ------------------------------------------------------------------------------------

def _train_one(
    cfg: RecipeConfig,
    info: DistInfo,
    out: Path,
    role: str,
    name: str,
    index: int,
    section: ModelSection,
    vae: MultiScaleVQVAE,
    dataset: Dataset[Any],
) -> TrainResult:
    t = cfg.training
    tcfg = build_model_config(cfg) if role == "model" else build_baseline_config(cfg)
    assert tcfg is not None
    train_solver, eval_solver = build_solvers(cfg) if section.implicit is not None else (None, None)
    model = build_model(
        tcfg, gradient=build_gradient(cfg, section), train_solver=train_solver, eval_solver=eval_solver,
        attention_backend=cfg.attention.backend, generator=torch.Generator().manual_seed(shared_seed(t.seed) + index),
    ).to(info.device)
    parameters = sum(p.numel() for p in model.parameters())
    logger.info("%s (%s): %s parameters", role, name, f"{parameters:,}")

    accum = cfg.grad_accum_steps(info.world_size)
    sampler = DistributedBatchSampler(len(dataset), t.micro_batch_size, rank=info.rank, world_size=info.world_size,
                                      seed=t.seed + index)
    steps_per_epoch = len(sampler) // accum
    if steps_per_epoch < 1:
        raise ValueError(f"training.global_batch_size={t.global_batch_size} is larger than the {len(dataset)} "
                         "training samples: lower it")
    total, warmup = cfg.total_steps(steps_per_epoch), cfg.warmup_steps(steps_per_epoch)
    if warmup >= total:
        raise ValueError(f"optim.warmup_steps/warmup_epochs give {warmup} warmup steps, not fewer than the run's "
                         f"{total} optimizer steps ({steps_per_epoch} per epoch): shorten the warmup")
    lr_at, wd_at = build_schedules(cfg.optim, t.global_batch_size, total, warmup)
    wrapped = _wrap(model, cfg, info)  # before the optimizer: FSDP2 replaces the parameters by sharded ones
    groups = param_groups(model, cfg.optim.no_weight_decay, cfg.optim.no_weight_decay_1d)
    fused = cfg.optim.fused and info.device.type == "cuda"
    opt = torch.optim.AdamW(groups, lr=lr_at(0), betas=cfg.optim.betas, eps=cfg.optim.eps, fused=fused or None)
    scaler = torch.amp.GradScaler(info.device.type, init_scale=cfg.precision.grad_scaler_init_scale,
                                  growth_interval=cfg.precision.grad_scaler_growth_interval,
                                  enabled=cfg.precision.dtype == "fp16")
    g_rank = torch.Generator(info.device).manual_seed(seed_for_rank(t.seed, info.rank) + index)
    g_shared = torch.Generator().manual_seed(shared_seed(t.seed) + index)  # S-JFB counts: the same on every rank
    generators = {"rank": g_rank, "shared": g_shared}

    ckpts = CheckpointManager(out / "checkpoints" / role, cfg.checkpoint.keep_last, info, config=cfg,
                              verify_hash=cfg.checkpoint.verify_hash)
    step, epoch, position = 0, 0, 0
    ckpt = ckpts.load(_resume_for(cfg, role))
    if ckpt is not None:
        scatter_full_state(wrapped, ckpt.model_state, opt, ckpt.train_state["optimizer"])
        if ckpt.train_state.get("scaler"):
            scaler.load_state_dict(ckpt.train_state["scaler"])
        step, epoch, position = ckpt.step, int(ckpt.train_state["epoch"]), int(ckpt.train_state["position"])
        if ckpt.rng_state is not None:
            restore_rng_state(ckpt.rng_state, generators)
        if info.is_main:
            _truncate_metrics(out / f"{role}_metrics.jsonl", step)

    metrics = _metric_logger(cfg, info, out, role)
    loader_kw: dict[str, Any] = {"num_workers": cfg.data.num_workers,
                                 "pin_memory": cfg.data.pin_memory and info.device.type == "cuda"}
    autocast = _AUTOCAST[cfg.precision.dtype]
    bar = progress_bar(total, info, enabled=cfg.logging.progress_bar, desc=role, initial=step)
    t_start, t_window, window_images = time.perf_counter(), time.perf_counter(), 0
    wrapped.train()

    def save(at: int) -> None:
        model_state, optim_state = gather_full_state(wrapped, opt)
        ckpts.save(at, model_state if info.is_main else {},
                   {"optimizer": optim_state, "scaler": scaler.state_dict() if scaler.is_enabled() else {},
                    "epoch": epoch, "position": position, "role": role}, generators=generators)

    with bar, metrics:  # the metric files are closed even when a step raises
        while step < total:
            sampler.set_epoch(epoch)
            if hasattr(dataset, "set_epoch"):
                dataset.set_epoch(epoch)
            sampler.set_start_batch(position * accum)
            batches = iter(DataLoader(dataset, batch_sampler=sampler, **loader_kw))
            while step < total and position < steps_per_epoch:
                lr, wd = lr_at(step), wd_at(step)
                apply_schedules(opt, lr, wd)
                sums = _optimizer_step(wrapped, batches, accum, vae, info, autocast, scaler, g_rank, g_shared,
                                       t.label_smoothing)
                grad_norm = _clip_and_step(wrapped, opt, scaler, cfg.optim.clip_grad_norm)
                step, position = step + 1, position + 1
                window_images += t.global_batch_size
                bar.update(1)
                if step % cfg.logging.log_every_n_steps == 0 or step == total:
                    now = time.perf_counter()
                    row = all_reduce_mean({"loss": float(sums["loss"]), "acc": float(sums["acc"])}, info)
                    row.update(lr=lr, wd=wd, grad_norm=float(grad_norm), k1=sums["k1"], k2=sums["k2"],
                               images_per_s=window_images / (now - t_window), peak_mem_gb=_peak_memory_gb(info),
                               epoch=epoch)
                    metrics.log(step, row)
                    bar.set_postfix(loss=f"{row['loss']:.3f}")
                    t_window, window_images = now, 0
                every = cfg.checkpoint.every_n_steps
                if step == total or (every is not None and step % every == 0):
                    save(step)
                if cfg.evaluation.every_n_steps is not None and step % cfg.evaluation.every_n_steps == 0:
                    _periodic_samples(cfg, info, wrapped, vae, out / "samples" / f"{role}_step{step:08d}.png")
            if position >= steps_per_epoch:
                epoch, position = epoch + 1, 0
                every_ep = cfg.checkpoint.every_n_epochs
                if every_ep is not None and epoch % every_ep == 0 and step < total:
                    save(step)
    seconds = time.perf_counter() - t_start
    export = out / name
    model_state, _ = gather_full_state(wrapped)
    if info.is_main:
        save_converted(export, model_state, "var" if section.implicit is None else "viar", tcfg)
        logger.info("%s: %d steps in %.0f s; exported %s", role, step, seconds, export)
    barrier()
    return TrainResult(role, name, step, parameters, export, _read_losses(out / f"{role}_metrics.jsonl"), seconds)


def _resume_for(cfg: RecipeConfig, role: str) -> str:
    """``checkpoint.resume`` for one model. An explicit checkpoint belongs to one model: the baseline when it
    sits in a ``baseline`` folder (``.../checkpoints/baseline/ckpt_*``), else the main model; the other model
    resumes ``auto``."""
    resume = cfg.checkpoint.resume
    if resume in ("auto", "none"):
        return resume
    owner = "baseline" if Path(resume).resolve().parent.name == "baseline" else "model"
    return resume if role == owner else "auto"


def _optimizer_step(
    model: nn.Module,
    batches: Iterator[Any],
    accum: int,
    vae: MultiScaleVQVAE,
    info: DistInfo,
    autocast: torch.dtype | None,
    scaler: torch.amp.GradScaler,
    g_rank: torch.Generator,
    g_shared: torch.Generator,
    label_smoothing: float,
) -> dict[str, Any]:
    """Forward/backward ``accum`` micro-batches (gradients synchronised on the last one only).

    The shared stream is rewound before every micro-batch, so all of them draw the step's ``(k1, k2)``.
    """
    shared_state = g_shared.get_state()
    loss_sum = acc_sum = torch.zeros((), device=info.device)
    k1 = k2 = 0
    for i in range(accum):
        x, labels = next(batches)
        x, labels = x.to(info.device, non_blocking=True), labels.to(info.device, non_blocking=True)
        with torch.no_grad():
            idx = x if x.dtype == torch.int64 else torch.cat(vae.img_to_indices(x), 1)
            feats = teacher_forcing(vae, idx)
        g_shared.set_state(shared_state)
        sync = i == accum - 1
        with _no_sync(model, sync), torch.autocast(info.device.type, dtype=autocast, enabled=autocast is not None):
            logits, stats = model(labels, feats, generator=g_rank, shared_generator=g_shared)
            loss = F.cross_entropy(logits.flatten(0, 1).float(), idx.flatten(), label_smoothing=label_smoothing)
        scaler.scale(loss / accum).backward()
        loss_sum = loss_sum + loss.detach() / accum
        acc_sum = acc_sum + (logits.detach().argmax(-1) == idx).float().mean() / accum
        k1, k2 = stats.no_grad_steps, stats.grad_steps
    return {"loss": loss_sum, "acc": acc_sum, "k1": k1, "k2": k2}  # tensors stay on the device until logged


def _clip_and_step(
    model: nn.Module, opt: torch.optim.Optimizer, scaler: torch.amp.GradScaler, clip: float | None
) -> Tensor:
    """Unscale, clip the global gradient norm (``inf`` when ``clip`` is None), step, zero. Returns the norm
    as a device tensor (read it only when logging: no host sync per step)."""
    scaler.unscale_(opt)
    params = [p for p in model.parameters() if p.grad is not None]
    norm = torch.nn.utils.clip_grad_norm_(params, clip if clip is not None else math.inf)
    scaler.step(opt)
    scaler.update()
    opt.zero_grad(set_to_none=True)
    return norm.full_tensor() if hasattr(norm, "full_tensor") else norm


def _wrap(model: nn.Module, cfg: RecipeConfig, info: DistInfo) -> nn.Module:
    """DDP or FSDP2 over the process group; the bare model in a single process."""
    if not info.is_distributed:
        return model
    if cfg.distributed.strategy == "fsdp2":
        from torch.distributed.fsdp import fully_shard

        for block in [m for m in model.modules() if type(m).__name__ == "AdaLNBlock"]:
            fully_shard(block)
        return fully_shard(model)  # type: ignore[no-any-return]
    from torch.nn.parallel import DistributedDataParallel

    ids = [info.device.index] if info.device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=ids, find_unused_parameters=cfg.distributed.find_unused_parameters,
                                   broadcast_buffers=cfg.distributed.broadcast_buffers)


def _periodic_samples(cfg: RecipeConfig, info: DistInfo, wrapped: nn.Module, vae: MultiScaleVQVAE, path: Path) -> None:
    """``evaluation.every_n_steps``: rank 0 samples the ``sampling`` grid mid-run (not under FSDP2, whose
    sharded weights every rank would have to gather)."""
    if info.is_distributed and cfg.distributed.strategy == "fsdp2":
        logger.warning("evaluation.every_n_steps: periodic samples are skipped under FSDP2; sample the exported "
                       "model with deqgen sample")
    else:
        inner = getattr(wrapped, "module", wrapped)
        assert isinstance(inner, NextScaleTransformer)
        _sample_grid(cfg, info, inner, vae, path)
    barrier()
    wrapped.train()


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


def _peak_memory_gb(info: DistInfo) -> float:
    """Peak allocated CUDA memory, or this process's peak resident set size on CPU (GB)."""
    if info.device.type == "cuda":
        return torch.cuda.max_memory_allocated(info.device) / 2**30
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / (2**30 if sys.platform == "darwin" else 2**20)


# ---- metrics files --------------------------------------------------------------------------------------------

def _metric_logger(cfg: RecipeConfig, info: DistInfo, out: Path, role: str) -> MetricLogger:
    """Rank 0: stdout plus ``out/<role>_metrics.jsonl`` (and TensorBoard under ``out/tb/<role>``)."""
    if not info.is_main:
        return MetricLogger()
    sinks: list[Any] = [StdoutSink()]
    if cfg.logging.jsonl:
        sinks.append(JsonlSink(out / f"{role}_metrics.jsonl"))
    if cfg.logging.tensorboard:
        sinks.append(TensorBoardSink(out / "tb" / role))
    return MetricLogger(sinks)


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop lines an interrupted run logged after the checkpoint we resume from (they are recomputed)."""
    if not path.is_file():
        return
    keep = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= step]
    tmp = path.with_suffix(".jsonl.tmp")
    tmp.write_text("".join(line + "\n" for line in keep))
    os.replace(tmp, path)


def _read_losses(path: Path) -> list[tuple[int, float]]:
    if not path.is_file():
        return []
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [(int(r["step"]), float(r["loss"])) for r in rows]


# ---- step 5: samples and summary --------------------------------------------------------------------------------

@torch.no_grad()
def _sample_grid(cfg: RecipeConfig, info: DistInfo, model: NextScaleTransformer, vae: MultiScaleVQVAE,
                 path: Path) -> dict[str, Any]:
    """Rank 0: the ``sampling`` grid of one model (rows = classes) as a PNG; returns speed and cache size."""
    if not info.is_main:
        return {}
    from deqgen.images import save_grid
    from deqgen.models.viar.sampling import generate

    s = cfg.sampling
    classes = list(s.classes) if s.classes is not None else list(range(min(model.num_classes, 10)))
    labels = torch.tensor(classes, device=info.device).repeat_interleave(s.samples_per_class)
    model.eval()
    t0 = time.perf_counter()
    res = generate(model, vae, labels, schedule=build_schedule(s.schedule) if model.cfg.implicit else None,
                   cfg=s.cfg, top_k=s.top_k, top_p=s.top_p, generator=torch.Generator().manual_seed(s.seed))
    seconds = time.perf_counter() - t0
    path.parent.mkdir(parents=True, exist_ok=True)
    save_grid(path, res.images.cpu(), nrow=s.samples_per_class)
    return {"images": res.images.cpu(), "labels": labels.cpu(), "sample_images_per_s": labels.numel() / seconds,
            "kv_cache_bytes": res.kv_bytes,
            "implicit_iterations_per_scale": [float(st.iterations.float().mean()) for st in res.stats]}


def _summarize(cfg: RecipeConfig, out: Path, vae: MultiScaleVQVAE, results: list[TrainResult]) -> None:
    """``grid.png`` (models side by side), ``loss.png`` and ``metrics.json`` in ``out``."""
    from deqgen.images import save_grid
    from deqgen.models.viar.convert import load_converted

    summary: dict[str, Any] = {}
    grids = []
    for r in results:
        model = load_converted(r.export_dir)
        assert isinstance(model, NextScaleTransformer)
        s = _sample_grid(cfg, DistInfo(), model, vae.cpu(), out / "samples" / f"{r.name}.png")
        r.samples, r.sample_labels = s.pop("images"), s.pop("labels")
        grids.append(r.samples)
        tail = [loss for _, loss in r.losses[-max(1, len(r.losses) // 10):]]
        summary[r.name] = {"role": r.role, "parameters": r.parameters, "steps": r.steps, "train_seconds": r.seconds,
                           "final_loss": sum(tail) / len(tail) if tail else None, **s}
    n = cfg.sampling.samples_per_class
    cols = min(n, 10)  # at most 10 per model and class side by side
    rows = [torch.cat([g[k * n : k * n + cols] for g in grids]) for k in range(grids[0].shape[0] // n)]
    save_grid(out / "grid.png", torch.cat(rows), nrow=cols * len(grids), pad=1)
    _loss_plot(out / "loss.png", {r.name: r.losses for r in results})
    tmp = out / "metrics.json.tmp"
    tmp.write_text(json.dumps(summary, indent=2))
    os.replace(tmp, out / "metrics.json")
    logger.info("wrote %s, %s and %s", out / "grid.png", out / "loss.png", out / "metrics.json")


def _loss_plot(path: Path, curves: dict[str, list[tuple[int, float]]]) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        logger.warning("matplotlib is not installed; no %s (pip install 'deqgen[recipes]')", path.name)
        return
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, points in curves.items():
        ax.plot([x for x, _ in points], [y for _, y in points], label=name)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("cross-entropy")
    ax.legend()
    ax.grid(alpha=0.3)
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=100, bbox_inches="tight", format="png")
    plt.close(fig)
    os.replace(tmp, path)
