"""The engine's half of a recipe schema: YAML -> ``key=value`` overrides -> a validated, frozen config.

Every section is a pydantic model with ``extra="forbid"`` (a misspelt key is an error) and ``frozen=True``
(config is read-only after validation). :class:`TrainConfig` holds the sections every task shares
(``optim``, ``training``, ``precision``, ``distributed``, ``logging``, ``checkpoint``, ``evaluation``); a
task's config class subclasses it and adds its own sections (the generation task adds ``model``,
``tokenizer``, ``data``, ...). :func:`validate_config` and the helpers below work on any such class;
:func:`deqgen.training.config.load_config` picks the class from the YAML's ``task`` field.

Precision: ``fp16`` on a CPU device is an **error** (``device="cpu"``): CPU fp16 autocast is slow and needs
a GradScaler for no benefit; use ``bf16`` or ``fp32`` there.
"""

from __future__ import annotations

import os
import re
from collections.abc import Collection, Sequence
from pathlib import Path
from typing import Any, Literal, TypeVar

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
from pydantic_core import InitErrorDetails, PydanticCustomError

from deqgen.training.schema_text import (
    config_reference_markdown,
    config_to_yaml,
    format_validation_error,
    submodel,
    type_name,
)

__all__ = [
    "OFFICIAL_NO_WEIGHT_DECAY",
    "CheckpointSection",
    "ConfigError",
    "DistributedSection",
    "EvaluationSection",
    "LoggingSection",
    "OptimSection",
    "PrecisionSection",
    "Section",
    "TrainConfig",
    "TrainingSection",
    "WandbSection",
    "config_error",
    "config_reference_markdown",
    "config_to_yaml",
    "format_validation_error",
    "parse_override",
    "read_yaml",
    "selected_sections",
    "type_name",
    "validate_config",
]

#: Parameter-name substrings exempt from weight decay in the official VAR/VIAR trainer (besides 1-D tensors
#: and biases).
OFFICIAL_NO_WEIGHT_DECAY: tuple[str, ...] = (
    "cls_token",
    "start_token",
    "task_token",
    "cfg_uncond",
    "pos_embed",
    "pos_1LC",
    "pos_start",
    "start_pos",
    "lvl_embed",
    "gamma",
    "beta",
    "ada_gss",
    "moe_bias",
    "scale_mul",
)

C = TypeVar("C", bound="TrainConfig")


class ConfigError(Exception):
    """An invalid recipe config. The message names the file, every bad field's dotted path, its value and
    what is allowed."""


class Section(BaseModel):
    """Base of every config section: unknown keys are errors, values are read-only."""

    model_config = ConfigDict(extra="forbid", frozen=True)


# ---- sections ---------------------------------------------------------------------------------------


class OptimSection(Section):
    """AdamW with a warmup + decay lr schedule and a cosine weight-decay schedule."""

    lr_per_256: float = Field(
        1e-4, gt=0, description="base lr per 256 images; peak = lr_per_256 * global / 256"
    )
    betas: tuple[float, float] = Field((0.9, 0.95), description="AdamW betas (official (0.9, 0.95))")
    eps: float = Field(1e-8, gt=0, description="AdamW epsilon")
    weight_decay: float = Field(0.05, ge=0, description="weight decay at step 0")
    weight_decay_end: float = Field(
        0.05, ge=0, description="weight decay at the last step (cosine from start)"
    )
    clip_grad_norm: float | None = Field(
        2.0, gt=0, description="max global grad norm after unscaling; null = off"
    )
    warmup_epochs: float | None = Field(
        None, ge=0, description="linear warmup length in epochs (or warmup_steps)"
    )
    warmup_steps: int | None = Field(
        None, ge=0, description="linear warmup length in steps (or warmup_epochs)"
    )
    warmup_start_ratio: float = Field(0.005, ge=0, le=1, description="warmup starts at this fraction of peak")
    schedule: Literal["lin0", "cosine", "constant"] = Field(
        "lin0", description="after warmup: lin0 = hold peak, then linear to end_ratio*peak; cosine; constant"
    )
    hold_fraction: float = Field(
        0.05, ge=0, lt=1, description="lin0: fraction of the post-warmup span at peak"
    )
    end_ratio: float = Field(0.01, ge=0, le=1, description="final lr over peak (official wpe 0.01)")
    no_weight_decay: tuple[str, ...] = Field(
        OFFICIAL_NO_WEIGHT_DECAY, description="parameter-name substrings exempt from weight decay"
    )
    no_weight_decay_1d: bool = Field(True, description="also exempt 1-D tensors and biases (official)")
    fused: bool = Field(False, description="fused AdamW kernel (official: on, CUDA)")

    @field_validator("betas")
    @classmethod
    def _betas_in_range(cls, v: tuple[float, float]) -> tuple[float, float]:
        if not all(0.0 <= b < 1.0 for b in v):
            raise ValueError(f"betas must lie in [0, 1), got {v}")
        return v


class TrainingSection(Section):
    """Batch sizes, length, seed."""

    global_batch_size: int = Field(512, ge=1, description="images per optimizer step over all ranks")
    micro_batch_size: int = Field(
        64, ge=1, description="images per forward per rank; accumulation is derived"
    )
    epochs: int | None = Field(None, ge=1, description="training length in epochs (or max_steps)")
    max_steps: int | None = Field(None, ge=1, description="training length in optimizer steps (or epochs)")
    seed: int = Field(
        0, ge=0, description="run seed (per-rank streams and the shared S-JFB stream derive from it)"
    )
    label_smoothing: float = Field(0.0, ge=0, lt=1, description="cross-entropy label smoothing (official 0)")
    compile: bool = Field(
        False,
        description="torch.compile the model's forward (kernels resolved first); "
        "a GPU speed option, about 1.0x on CPU",
    )
    ema_decay: float | None = Field(
        None,
        gt=0,
        lt=1,
        description="keep an EMA of the weights with this decay (e.g. 0.9999); samples and export use it; "
        "null = off; not with fsdp2",
    )
    activation_checkpointing: bool = Field(
        False,
        description="recompute the explicit blocks' activations in "
        "backward (less memory, more compute); generation task only",
    )


class PrecisionSection(Section):
    """Numeric precision. fp16 is refused on CPU devices (see module docs)."""

    dtype: Literal["fp32", "bf16", "fp16"] = Field(
        "fp32", description="autocast dtype; fp16 adds a GradScaler"
    )
    grad_scaler_init_scale: float = Field(
        2048.0, gt=0, description="fp16 GradScaler initial scale (official 2^11)"
    )
    grad_scaler_growth_interval: int = Field(1000, ge=1, description="fp16 GradScaler growth interval")
    allow_tf32: bool = Field(True, description="TF32 matmuls on CUDA (official on)")


class DistributedSection(Section):
    """Process group and model wrapping."""

    backend: Literal["auto", "nccl", "gloo"] = Field("auto", description="auto: nccl with CUDA, gloo on CPU")
    strategy: Literal["ddp", "fsdp2"] = Field("ddp", description="data parallelism wrapper")
    find_unused_parameters: bool = Field(False, description="DDP find_unused_parameters (official False)")
    broadcast_buffers: bool = Field(False, description="DDP broadcast_buffers (official False)")
    timeout_minutes: float = Field(30.0, gt=0, description="collective timeout")


class WandbSection(Section):
    """Weights & Biases run options (``logging.wandb``); the run lives under ``out_dir/wandb``."""

    project: str = Field("deqgen", min_length=1, description="wandb project name")
    mode: Literal["online", "offline", "disabled"] = Field(
        "offline", description="offline writes the run locally (wandb sync uploads it later)"
    )


class LoggingSection(Section):
    """Metric sinks (rank 0 only)."""

    out_dir: Path = Field(Path("runs/default"), description="run directory: metrics, checkpoints, samples")
    log_every_n_steps: int = Field(50, ge=1, description="metrics cadence")
    jsonl: bool = Field(True, description="write out_dir/metrics.jsonl")
    tensorboard: bool = Field(False, description="write TensorBoard events to out_dir/tb (needs tensorboard)")
    wandb: WandbSection | None = Field(
        None, description="also log to Weights & Biases (needs wandb); null = off"
    )
    progress_bar: bool = Field(True, description="tqdm bar when attached to a terminal")
    level: Literal["DEBUG", "INFO", "WARNING"] = Field("INFO", description="stdout logging level on rank 0")


class CheckpointSection(Section):
    """Checkpoint cadence, retention and resume."""

    every_n_steps: int | None = Field(None, ge=1, description="save every n optimizer steps; null = off")
    every_n_epochs: int | None = Field(None, ge=1, description="save every n epochs; null = off")
    keep_last: int = Field(3, ge=1, description="complete checkpoints kept; older ones are deleted")
    resume: str = Field("auto", description="auto (newest complete), none, or a checkpoint directory")
    verify_hash: bool = Field(True, description="check sha256 of every file before resuming")


class EvaluationSection(Section):
    """Periodic evaluation during training (what it measures is the task's business)."""

    every_n_steps: int | None = Field(None, ge=1, description="evaluate every n steps; null = off")


class TrainConfig(Section):
    """The sections the training engine reads; a task's config subclasses it with its own sections."""

    task: str = Field("generation", description="the task (model family) to train; see deqgen.training.tasks")
    optim: OptimSection = Field(default_factory=OptimSection, description="optimizer and schedules")
    training: TrainingSection = Field(default_factory=TrainingSection, description="batch, length, seed")
    precision: PrecisionSection = Field(default_factory=PrecisionSection, description="numeric precision")
    distributed: DistributedSection = Field(default_factory=DistributedSection, description="DDP / FSDP2")
    logging: LoggingSection = Field(default_factory=LoggingSection, description="metric sinks")
    checkpoint: CheckpointSection = Field(default_factory=CheckpointSection, description="checkpoints")
    evaluation: EvaluationSection = Field(
        default_factory=EvaluationSection, description="periodic evaluation"
    )

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

    def task_errors(self, check_paths: bool | Collection[str]) -> list[InitErrorDetails]:
        """Cross-field errors of the task's own sections; a task's config overrides this (none here)."""
        return []

    @model_validator(mode="after")
    def _cross_field(self, info: ValidationInfo) -> TrainConfig:
        ctx = info.context or {}
        errors = _run_errors(self, ctx.get("world_size", 1), ctx.get("device"))
        errors += _resume_errors(self, ctx.get("check_paths", True))
        errors += self.task_errors(ctx.get("check_paths", True))
        if errors:
            raise ValidationError.from_exception_data(type(self).__name__, errors)
        return self


def config_error(path: str, value: Any, message: str) -> InitErrorDetails:
    """One validation error at dotted ``path`` (``"model.depth"``) for :meth:`TrainConfig.task_errors`."""
    return InitErrorDetails(
        type=PydanticCustomError("recipe", message), loc=tuple(path.split(".")), input=value
    )


def selected_sections(check_paths: bool | Collection[str], known: Collection[str]) -> set[str]:
    """The sections whose paths to check: all of ``known`` (True), none (False) or the given subset.

    Raises:
        ValueError: ``check_paths`` names a section outside ``known``.
    """
    if check_paths is True:
        return set(known)
    if check_paths is False:
        return set()
    unknown = set(check_paths) - set(known)
    if unknown:
        raise ValueError(f"check_paths names unknown sections {sorted(unknown)}; use {sorted(known)}")
    return set(check_paths)


def _resume_errors(cfg: TrainConfig, check_paths: bool | Collection[str]) -> list[InitErrorDetails]:
    resume = cfg.checkpoint.resume
    if resume not in ("auto", "none") and not resume.strip():
        return [config_error("checkpoint.resume", resume, "use auto, none or a checkpoint directory")]
    check = check_paths is True or (not isinstance(check_paths, bool) and "checkpoint" in check_paths)
    if check and resume not in ("auto", "none") and not Path(resume).is_dir():
        return [
            config_error(
                "checkpoint.resume", resume, "not a checkpoint directory; use auto, none or an existing path"
            )
        ]
    return []


def _batch_message(t: TrainingSection, world_size: int) -> str:
    per_round = t.micro_batch_size * world_size
    return (
        f"global_batch_size={t.global_batch_size} is not a multiple of micro_batch_size * world_size = "
        f"{t.micro_batch_size} * {world_size} = {per_round}; use a multiple of {per_round} or change "
        "micro_batch_size"
    )


def _run_errors(cfg: TrainConfig, world_size: int, device: str | None) -> list[InitErrorDetails]:
    out: list[InitErrorDetails] = []
    t = cfg.training
    if t.global_batch_size % (t.micro_batch_size * world_size):
        out.append(
            config_error("training.global_batch_size", t.global_batch_size, _batch_message(t, world_size))
        )
    if (t.epochs is None) == (t.max_steps is None):
        out.append(
            config_error(
                "training.epochs", t.epochs, "set exactly one of training.epochs and training.max_steps"
            )
        )
    if cfg.optim.warmup_epochs is not None and cfg.optim.warmup_steps is not None:
        out.append(
            config_error(
                "optim.warmup_epochs", cfg.optim.warmup_epochs, "set warmup_epochs or warmup_steps, not both"
            )
        )
    warmup_epochs = cfg.optim.warmup_epochs
    if t.epochs is not None and warmup_epochs is not None and warmup_epochs >= t.epochs:
        out.append(
            config_error(
                "optim.warmup_epochs", cfg.optim.warmup_epochs, f"must be below training.epochs = {t.epochs}"
            )
        )
    if (
        t.max_steps is not None
        and cfg.optim.warmup_steps is not None
        and cfg.optim.warmup_steps >= t.max_steps
    ):
        out.append(
            config_error(
                "optim.warmup_steps",
                cfg.optim.warmup_steps,
                f"must be below training.max_steps = {t.max_steps}",
            )
        )
    if t.ema_decay is not None and cfg.distributed.strategy == "fsdp2":
        out.append(
            config_error(
                "training.ema_decay",
                t.ema_decay,
                "an EMA of FSDP2-sharded weights is not supported: use "
                "distributed.strategy=ddp or set training.ema_decay=null",
            )
        )
    if cfg.precision.dtype == "fp16" and device is not None and not str(device).startswith("cuda"):
        out.append(
            config_error(
                "precision.dtype", "fp16", f"fp16 is not supported on device {device!r}; use bf16 or fp32"
            )
        )
    return out


# ---- YAML and overrides ------------------------------------------------------------------------------------------


class _Loader(yaml.SafeLoader):
    """SafeLoader that also reads ``1e-4`` (no dot) as a float, as YAML 1.2 does."""


def _construct_unique_mapping(loader: _Loader, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
    """A mapping whose keys must be unique: YAML would silently keep the last of two equal keys."""
    seen: dict[Any, yaml.Node] = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=True)  # type: ignore[no-untyped-call]
        if key in seen:
            first = seen[key].start_mark.line + 1
            raise yaml.constructor.ConstructorError(
                None,
                None,
                f"duplicate key {key!r} (first on line {first}); keep one of them",
                key_node.start_mark,
            )
        seen[key] = key_node
    return yaml.SafeLoader.construct_mapping(loader, node, deep=deep)


_Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_unique_mapping)
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


def _apply_override(
    schema: type[BaseModel], data: dict[str, Any], keys: tuple[str, ...], value: Any, raw: str
) -> None:
    cls: type[BaseModel] | None = schema
    node = data
    for depth, key in enumerate(keys):
        if cls is not None and key not in cls.model_fields:
            where = ".".join(keys[:depth]) or "the top level"
            raise ConfigError(
                f"override {raw!r}: unknown key {'.'.join(keys[: depth + 1])!r}; valid keys at "
                f"{where}: {', '.join(cls.model_fields)}"
            )
        if depth == len(keys) - 1:
            node[key] = value
            return
        cls = submodel(cls.model_fields[key].annotation) if cls is not None else None
        if not isinstance(node.get(key), dict):
            node[key] = {}
        node = node[key]


def read_yaml(text: str, source: str) -> dict[str, Any]:
    """The top-level mapping of a recipe's YAML ``text`` (``1e-4`` reads as a float, as in YAML 1.2).

    Raises:
        ConfigError: not valid YAML, or the top level is not a mapping.
    """
    try:
        data = yaml.load(text, Loader=_Loader) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{source}: not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: the top level must be a mapping of sections, got {type(data).__name__}")
    return data


def validate_config(
    schema: type[C],
    data: dict[str, Any],
    overrides: Sequence[str] = (),
    *,
    source: str = "<string>",
    check_paths: bool | Collection[str] = True,
    world_size: int | None = None,
    device: str | None = None,
) -> C:
    """Apply ``dotted.key=value`` overrides to ``data`` (in order) and validate it as ``schema``.

    Args:
        schema: the task's config class (a :class:`TrainConfig` subclass).
        data: the YAML's top-level mapping (changed in place by the overrides).
        overrides: ``dotted.key=value`` strings; values are read as YAML (``3``, ``1e-4``, ``[1, 2]``,
            ``null``, ``true``). A key the schema lacks is an error listing the valid keys at that level.
        source: names the YAML in error messages.
        check_paths: check that path fields exist: ``True`` (all), ``False`` (none), or a subset of section
            names such as ``{"tokenizer", "checkpoint"}``.
        world_size: ranks the global batch is split over (default: ``$WORLD_SIZE`` or 1).
        device: the training device if known (``"cpu"``, ``"cuda:0"``); fp16 on CPU is then an error.

    Returns:
        The validated, frozen config.

    Raises:
        ConfigError: a bad override or invalid fields (the message lists every bad field with its dotted
            path, value and the allowed values or type).
    """
    overridden: dict[str, str] = {}
    for raw in overrides:
        keys, value = parse_override(raw)
        _apply_override(schema, data, keys, value, raw)
        overridden[".".join(keys)] = raw
    if world_size is None:
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
    context = {"check_paths": check_paths, "world_size": world_size, "device": device}
    try:
        return schema.model_validate(data, context=context)
    except ValidationError as e:
        raise ConfigError(format_validation_error(e, source, overridden, schema)) from None
