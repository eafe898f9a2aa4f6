"""Typed configuration of the next-scale transformers (VAR and VIAR) and the named presets.

A :class:`TransformerConfig` with ``implicit=None`` describes VAR (an explicit stack of ``depth`` AdaLN
blocks); with an :class:`ImplicitSpec` it describes VIAR (``pre_depth`` blocks, one implicit block iterated
to a fixed point, ``post_depth`` blocks). :func:`deqgen.models.viar.model.build_trunk` is the only place that
turns the config into one trunk or the other.

Sizing follows the official code: width ``C = 64 * depth``, ``depth`` heads of 64 channels, MLP ratio 4,
drop-path rate ``0.1 * depth / 24`` spread linearly over the nominal ``depth`` blocks, and init constants
computed from ``C`` and ``depth`` (see :meth:`VIARTransformer.init_weights
<deqgen.models.viar.model.VIARTransformer.init_weights>`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

__all__ = [
    "PATCH_NUMS_256",
    "PATCH_NUMS_512",
    "PATCH_NUMS_1024",
    "ImplicitSpec",
    "TransformerConfig",
    "PRESETS",
    "preset",
]

PATCH_NUMS_256: tuple[int, ...] = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)
PATCH_NUMS_512: tuple[int, ...] = (1, 2, 3, 4, 6, 9, 13, 18, 24, 32)
PATCH_NUMS_1024: tuple[int, ...] = (1, 2, 3, 4, 5, 7, 9, 12, 16, 21, 27, 36, 48, 64)


def _check_range(name: str, pair: tuple[int, int], low: int) -> None:
    if len(pair) != 2 or not all(isinstance(v, int) for v in pair):
        raise ValueError(f"{name} must be an inclusive integer range (lo, hi), got {pair!r}")
    if pair[0] < low or pair[1] < pair[0]:
        raise ValueError(f"{name}={pair!r} must satisfy {low} <= lo <= hi")


@dataclass(frozen=True)
class ImplicitSpec:
    """VIAR's implicit trunk: ``pre_depth`` blocks, one weight-tied block solved to a fixed point, then
    ``post_depth`` blocks.

    Attributes:
        pre_depth: explicit blocks before the implicit block (official ``--p_depth``, 5 at d30).
        post_depth: explicit blocks after it (the official code ties it to ``pre_depth``; here it is free).
        train_no_grad: S-JFB's inclusive range for ``k1``, the no-grad iterations (official ``(0, 10)``).
        train_with_grad: S-JFB's inclusive range for ``k2``, the recorded iterations (official ``(1, 12)``).
        eval_iterations: fixed iteration count in eval mode when no solver is given (official 10).
        weight_norm: reparametrise the implicit block's and the fusion MLP's Linear weights as
            ``g * v / ||v||`` (row norms), as torchdeq's ``norm`` module offers, to help contraction.
    """

    pre_depth: int = 5
    post_depth: int = 5
    train_no_grad: tuple[int, int] = (0, 10)
    train_with_grad: tuple[int, int] = (1, 12)
    eval_iterations: int = 10
    weight_norm: bool = False

    def __post_init__(self) -> None:
        for name in ("train_no_grad", "train_with_grad"):  # JSON/YAML give lists; tuples compare equal
            value = getattr(self, name)
            if isinstance(value, (list, tuple)):
                object.__setattr__(self, name, tuple(value))
        if self.pre_depth < 0 or self.post_depth < 0:
            raise ValueError(
                f"pre_depth and post_depth must be >= 0, got {self.pre_depth}, {self.post_depth}"
            )
        _check_range("train_no_grad", tuple(self.train_no_grad), 0)
        _check_range("train_with_grad", tuple(self.train_with_grad), 1)
        if self.eval_iterations < 1:
            raise ValueError(f"eval_iterations must be >= 1, got {self.eval_iterations}")


@dataclass(frozen=True)
class TransformerConfig:
    """A next-scale class-conditional transformer over a multi-scale token pyramid.

    Attributes:
        depth: nominal depth. Sets the default width (``64 * depth``), heads (``depth``), drop-path rate and
            the init scaling. For VAR it is the number of blocks.
        embed_dim: width ``C`` (default ``64 * depth``).
        num_heads: attention heads (default ``depth``); ``embed_dim`` must divide evenly.
        mlp_ratio: FFN hidden width over ``C``.
        patch_nums: side of each scale's token grid, coarse to fine; ``L = sum(p * p)`` tokens.
        vocab_size: tokenizer codebook size ``V`` (logits per position).
        z_channels: tokenizer latent channels ``Cvae`` (teacher-forcing input width).
        num_classes: class count; index ``num_classes`` is the null (unconditional) class.
        drop_path_rate: largest stochastic-depth rate (default ``0.1 * depth / 24``), spread as
            ``linspace(0, rate, depth)`` over block indices.
        dropout: dropout in attention output and FFN.
        attn_l2_norm: L2-normalise q and k per head with a learned per-head scale (official default).
        shared_aln: one model-level AdaLN projection plus a per-block learned offset (the 512-px d36 model).
        norm_eps: LayerNorm epsilon.
        cond_drop_prob: label dropout to the null class in training (classifier-free guidance).
        init_adaln: factor on the AdaLN scale/shift rows at init.
        init_adaln_gamma: factor on the AdaLN gamma rows at init (official ``alng``; blocks start near identity).
        init_head: factor on the output head at init.
        implicit: ``None`` for VAR; an :class:`ImplicitSpec` for VIAR.
    """

    depth: int = 16
    embed_dim: int | None = None
    num_heads: int | None = None
    mlp_ratio: float = 4.0
    patch_nums: tuple[int, ...] = PATCH_NUMS_256
    vocab_size: int = 4096
    z_channels: int = 32
    num_classes: int = 1000
    drop_path_rate: float | None = None
    dropout: float = 0.0
    attn_l2_norm: bool = True
    shared_aln: bool = False
    norm_eps: float = 1e-6
    cond_drop_prob: float = 0.1
    init_adaln: float = 0.5
    init_adaln_gamma: float = 1e-5
    init_head: float = 0.02
    implicit: ImplicitSpec | None = None

    def __post_init__(self) -> None:
        if self.depth < 1:
            raise ValueError(f"depth must be >= 1, got {self.depth}")
        object.__setattr__(self, "patch_nums", tuple(int(p) for p in self.patch_nums))
        if not self.patch_nums or any(p < 1 for p in self.patch_nums):
            raise ValueError(
                f"patch_nums must be a non-empty tuple of positive ints, got {self.patch_nums!r}"
            )
        if any(b <= a for a, b in zip(self.patch_nums, self.patch_nums[1:])):
            raise ValueError(f"patch_nums must increase strictly (coarse to fine), got {self.patch_nums!r}")
        if self.embed_dim is None:
            object.__setattr__(self, "embed_dim", 64 * self.depth)
        if self.num_heads is None:
            object.__setattr__(self, "num_heads", self.depth)
        if self.drop_path_rate is None:
            object.__setattr__(self, "drop_path_rate", 0.1 * self.depth / 24)
        assert self.embed_dim is not None and self.num_heads is not None
        if self.embed_dim % self.num_heads:
            raise ValueError(f"embed_dim={self.embed_dim} is not divisible by num_heads={self.num_heads}")
        if not 0.0 <= self.cond_drop_prob < 1.0:
            raise ValueError(f"cond_drop_prob must be in [0, 1), got {self.cond_drop_prob}")
        if self.implicit is not None:
            if isinstance(self.implicit, dict):
                object.__setattr__(self, "implicit", ImplicitSpec(**self.implicit))
            spec = self.implicit
            assert isinstance(spec, ImplicitSpec)
            if spec.pre_depth + spec.post_depth >= self.depth + 1:
                raise ValueError(
                    f"implicit.pre_depth + implicit.post_depth = {spec.pre_depth + spec.post_depth} leaves no "
                    f"room for the implicit block in a nominal depth of {self.depth}"
                )

    # ---- derived sizes -------------------------------------------------------------------------------
    @property
    def width(self) -> int:
        """``C``, the residual-stream width."""
        assert self.embed_dim is not None
        return self.embed_dim

    @property
    def heads(self) -> int:
        """Attention heads: ``num_heads``, or ``depth`` when it was left ``None``."""
        assert self.num_heads is not None
        return self.num_heads

    @property
    def num_scales(self) -> int:
        """``len(patch_nums)``, the number of scales."""
        return len(self.patch_nums)

    @property
    def seq_len(self) -> int:
        """``L = sum(p * p)``, tokens over all scales."""
        return sum(p * p for p in self.patch_nums)

    @property
    def init_std(self) -> float:
        """Standard deviation of every Linear/Embedding at init: ``sqrt(1 / (3 C))``."""
        return math.sqrt(1.0 / (3 * self.width))

    def drop_path_rates(self) -> list[float]:
        """Stochastic-depth rate for each nominal block index ``0..depth-1``."""
        rate = float(self.drop_path_rate or 0.0)
        if self.depth == 1:
            return [0.0]
        return [rate * i / (self.depth - 1) for i in range(self.depth)]

    def block_indices(self) -> dict[str, list[int]]:
        """Nominal block index of each block, which sets its drop-path rate.

        VAR: ``{"blocks": [0..depth-1]}``. VIAR (as the official code): pre blocks ``0..pre-1``, the
        implicit block ``depth // 2``, post blocks ``depth-post..depth-1``.
        """
        if self.implicit is None:
            return {"blocks": list(range(self.depth))}
        pre, post = self.implicit.pre_depth, self.implicit.post_depth
        return {
            "pre_blocks": list(range(pre)),
            "implicit_block": [self.depth // 2],
            "post_blocks": list(range(self.depth - post, self.depth)),
        }

    def with_(self, **changes: object) -> TransformerConfig:
        """A copy with some fields changed (re-validated)."""
        return replace(self, **changes)  # type: ignore[arg-type]


def _var(depth: int, **kw: object) -> TransformerConfig:
    return TransformerConfig(depth=depth, **kw)  # type: ignore[arg-type]


def _viar(depth: int, **kw: object) -> TransformerConfig:
    return TransformerConfig(depth=depth, implicit=ImplicitSpec(pre_depth=5, post_depth=5), **kw)  # type: ignore[arg-type]


_TINY = dict(
    depth=4, embed_dim=64, num_heads=2, patch_nums=(1, 2, 3, 4), vocab_size=64, z_channels=8, num_classes=10
)

#: Named configurations. ``var_d*`` / ``viar_d*`` are the official 256-px models (VIAR with pre = post = 5);
#: ``*_tiny`` are for tests (matching the tiny VQVAE fixture: V 64, z 8, patch_nums (1, 2, 3, 4)).
PRESETS: dict[str, TransformerConfig] = {
    **{f"var_d{d}": _var(d) for d in (16, 20, 24, 30)},
    **{f"viar_d{d}": _viar(d) for d in (16, 20, 24, 30)},
    "var_tiny": TransformerConfig(**_TINY),  # type: ignore[arg-type]
    "viar_tiny": TransformerConfig(**_TINY, implicit=ImplicitSpec(pre_depth=1, post_depth=1)),  # type: ignore[arg-type]
}


def preset(name: str, **changes: object) -> TransformerConfig:
    """The preset ``name`` with optional field changes, e.g. ``preset("viar_d16", num_classes=10)``.

    Raises:
        KeyError: an unknown name (the message lists the presets).
    """
    try:
        cfg = PRESETS[name]
    except KeyError:
        raise KeyError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}") from None
    return cfg.with_(**changes) if changes else cfg
