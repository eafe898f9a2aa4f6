"""The next-scale transformer: embeddings -> trunk -> AdaLN head. VAR and VIAR differ only in the trunk.

``build_model(cfg)`` assembles it; :func:`build_trunk` is the only place that chooses between
:class:`~deqgen.models.viar.trunk.ExplicitTrunk` (VAR) and :class:`~deqgen.models.viar.trunk.ImplicitTrunk`
(VIAR).

Token layout (as the official code): scales run coarse to fine, row-major inside a scale; the first
``patch_nums[0]**2`` positions hold the class (start-of-sequence) embedding, the other ``L - first_l``
positions the word embedding of the tokenizer's teacher-forcing features. Logits at position ``i`` predict
token ``i``.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import torch
from torch import Tensor, nn

from deqgen.gradients import SJFB, GradientMethod
from deqgen.models.viar.blocks import AdaLNBlock, AdaLNHead, SharedAdaLN
from deqgen.models.viar.config import TransformerConfig, preset
from deqgen.models.viar.trunk import ExplicitTrunk, FusionMLP, ImplicitTrunk, TrunkCache, TrunkStats
from deqgen.nn.attention import AttentionBackend
from deqgen.nn.masks import block_causal_bias, level_index, scale_slices
from deqgen.solvers.base import Solver
from deqgen.solvers.picard import Picard

__all__ = ["NextScaleTransformer", "build_trunk", "build_model"]

logger = logging.getLogger(__name__)


def _block(cfg: TransformerConfig, index: int, backend: AttentionBackend | str) -> AdaLNBlock:
    return AdaLNBlock(
        cfg.width,
        cfg.heads,
        mlp_ratio=cfg.mlp_ratio,
        drop_path=cfg.drop_path_rates()[index],
        dropout=cfg.dropout,
        norm_eps=cfg.norm_eps,
        l2_norm=cfg.attn_l2_norm,
        shared_aln=cfg.shared_aln,
        backend=backend,
    )


def build_trunk(
    cfg: TransformerConfig,
    *,
    gradient: GradientMethod | None = None,
    train_solver: Solver[Any] | int | None = None,
    eval_solver: Solver[Any] | int | None = None,
    attention_backend: AttentionBackend | str = "auto",
) -> ExplicitTrunk | ImplicitTrunk:
    """VAR's explicit stack if ``cfg.implicit`` is ``None``, else VIAR's pre/implicit/post trunk.

    Args:
        cfg: the transformer config.
        gradient: VIAR's training gradient (default ``SJFB`` with ``cfg.implicit``'s ranges).
        train_solver: VIAR's forward solver in training (default Picard; S-JFB uses fixed counts anyway).
        eval_solver: VIAR's solver in eval mode (default ``cfg.implicit.eval_iterations`` fixed Picard
            applications, the official behaviour).
        attention_backend: attention kernel for every block.
    """
    idx = cfg.block_indices()
    if cfg.implicit is None:
        return ExplicitTrunk([_block(cfg, i, attention_backend) for i in idx["blocks"]])
    spec = cfg.implicit
    grad = (
        gradient if gradient is not None else SJFB(no_grad=spec.train_no_grad, with_grad=spec.train_with_grad)
    )
    return ImplicitTrunk(
        [_block(cfg, i, attention_backend) for i in idx["pre_blocks"]],
        _block(cfg, idx["implicit_block"][0], attention_backend),
        FusionMLP(cfg.width),
        [_block(cfg, i, attention_backend) for i in idx["post_blocks"]],
        gradient=grad,
        train_solver=train_solver
        if train_solver is not None
        else Picard(tol=None, max_iter=spec.eval_iterations),
        eval_solver=eval_solver if eval_solver is not None else spec.eval_iterations,
        weight_norm=spec.weight_norm,
    )


class NextScaleTransformer(nn.Module):
    """Class-conditional next-scale prediction over a multi-scale token pyramid (VAR / VIAR).

    Args:
        cfg: sizes and constants.
        trunk: the block stack, from :func:`build_trunk`.

    Attributes (official checkpoint names):
        class_emb: ``Embedding(num_classes + 1, C)``; the last row is the null class used for guidance.
        pos_start: ``(1, first_l, C)`` start-of-sequence position embedding.
        pos_1LC: ``(1, L, C)`` absolute position embedding.
        lvl_embed: ``Embedding(num_scales, C)`` scale (level) embedding.
        word_embed: ``Linear(z_channels, C)`` on the tokenizer features.
        shared_ada_lin: the shared-AdaLN projection (only with ``cfg.shared_aln``).
        head_nm, head: AdaLN before the output head, and ``Linear(C, vocab_size)``.
    """

    def __init__(self, cfg: TransformerConfig, trunk: ExplicitTrunk | ImplicitTrunk) -> None:
        super().__init__()
        self.cfg = cfg
        C, L = cfg.width, cfg.seq_len
        self.first_l = cfg.patch_nums[0] ** 2
        self.num_classes = cfg.num_classes
        self.class_emb = nn.Embedding(cfg.num_classes + 1, C)
        self.pos_start = nn.Parameter(torch.zeros(1, self.first_l, C))
        self.pos_1LC = nn.Parameter(torch.zeros(1, L, C))
        self.lvl_embed = nn.Embedding(cfg.num_scales, C)
        self.word_embed = nn.Linear(cfg.z_channels, C)
        self.shared_ada_lin = SharedAdaLN(C) if cfg.shared_aln else None
        self.trunk = trunk
        self.head_nm = AdaLNHead(C, cfg.norm_eps)
        self.head = nn.Linear(C, cfg.vocab_size)
        dev = self.pos_1LC.device  # built on the CPU, then moved (meta tensors cannot repeat_interleave)
        self.register_buffer(
            "lvl_1L", level_index(cfg.patch_nums, device="cpu").unsqueeze(0).to(dev), persistent=False
        )
        self.register_buffer(
            "attn_bias", block_causal_bias(cfg.patch_nums, device="cpu").to(dev), persistent=False
        )
        self.slices = scale_slices(cfg.patch_nums)

    # ---- init ------------------------------------------------------------------------------------------
    @torch.no_grad()
    def init_weights(self, generator: torch.Generator | None = None) -> None:
        """The official initialisation, from ``cfg``'s constants.

        * every Linear / Embedding weight and the position embeddings ~ N(0, std), ``std = sqrt(1/(3C))``
          (the official truncation at +-2 is never reached at these stds); biases 0;
        * ``head`` weight x ``init_head`` (0.02); ``head_nm``'s Linear weight x ``init_adaln`` (0.5);
        * in every block: ``attn.proj`` and ``ffn.fc2`` weights / ``sqrt(2 depth)`` (nominal depth), the AdaLN
          rows of scale/shift x ``init_adaln`` and of gamma x ``init_adaln_gamma`` (blocks start near the
          identity). The fusion MLP of VIAR gets the plain N(0, std) init (no residual scaling), as the
          official code.
        """
        cfg, std = self.cfg, self.cfg.init_std
        for m in self.modules():
            if isinstance(m, nn.Linear):
                w = m.parametrizations.weight.original1 if hasattr(m, "parametrizations") else m.weight
                w.normal_(0.0, std, generator=generator)
                if m.bias is not None:
                    m.bias.zero_()
            elif isinstance(m, nn.Embedding):
                m.weight.normal_(0.0, std, generator=generator)
        for p in (self.pos_start, self.pos_1LC):
            p.normal_(0.0, std, generator=generator)
        self.head.weight.mul_(cfg.init_head)
        self.head_nm.ada_lin[-1].weight.mul_(cfg.init_adaln)
        C = cfg.width
        for blk in self.blocks():
            _weight(blk.attn.proj).div_(math.sqrt(2 * cfg.depth))
            _weight(blk.ffn.fc2).div_(math.sqrt(2 * cfg.depth))
            if blk.shared_aln:
                blk.ada_gss[:, :, 2:].mul_(cfg.init_adaln)
                blk.ada_gss[:, :, :2].mul_(cfg.init_adaln_gamma)
            else:
                w = _weight(blk.ada_lin[-1])
                w[2 * C :].mul_(cfg.init_adaln)
                w[: 2 * C].mul_(cfg.init_adaln_gamma)
            blk.attn.q_bias.zero_()
            blk.attn.v_bias.zero_()
            if blk.attn.l2_norm:
                blk.attn.scale_mul_1H11.fill_(math.log(4.0))
        if isinstance(self.trunk, ImplicitTrunk) and self.trunk.weight_norm:
            _reset_weight_norm_gains(self.trunk)

    def blocks(self) -> list[AdaLNBlock]:
        """Every AdaLN block in trunk order (VIAR: pre, implicit, post)."""
        return [m for m in self.trunk.modules() if isinstance(m, AdaLNBlock)]

    # ---- embeddings ------------------------------------------------------------------------------------
    def condition(self, labels: Tensor) -> Tensor:
        """Class embedding ``(B,) -> (B, C)``; label ``num_classes`` is the null class."""
        if labels.dtype != torch.long:
            raise TypeError(f"labels must be int64 class indices (B,), got {labels.dtype}")
        _check_labels(labels, self.num_classes)
        return self.class_emb(labels)

    def prepare_attention(self, device: torch.device | str, dtype: torch.dtype) -> None:
        """Resolve every block's attention kernel for ``device`` and ``dtype`` now.

        Call it before ``torch.compile`` (with the autocast dtype when training under autocast): the
        kernels are then plain calls in the traced graph. Without it the first call resolves them, which
        is fine in eager mode.

        Args:
            device: where the model runs.
            dtype: the attention inputs' dtype (the parameters' dtype, or the autocast dtype).
        """
        for blk in self.blocks():
            blk.attn.attend.prepare(device=device, dtype=dtype, head_dim=blk.attn.head_dim)

    def block_condition(self, cond_BC: Tensor) -> Tensor:
        """What the blocks' AdaLN takes: the class embedding, or the shared-AdaLN output."""
        return cond_BC if self.shared_ada_lin is None else self.shared_ada_lin(cond_BC)

    def embed(self, cond_BC: Tensor, feats_BlCv: Tensor | None, scale: int | None = None) -> Tensor:
        """Token embeddings with level and position embeddings added.

        Args:
            cond_BC: ``(B, C)`` class embedding.
            feats_BlCv: tokenizer features ``(B, n, Cvae)`` after the start positions: all of them
                (``n = L - first_l``, teacher forcing, ``scale=None``) or one scale's (``scale >= 1``);
                ``None`` at scale 0.
            scale: ``None`` for the whole sequence, else the scale index.

        Returns:
            ``(B, L, C)`` or ``(B, n_scale, C)``.
        """
        B = cond_BC.shape[0]
        sos = cond_BC.unsqueeze(1).expand(B, self.first_l, -1) + self.pos_start.expand(B, -1, -1)
        if scale is None:
            x = (
                torch.cat((sos, self.word_embed(feats_BlCv.to(self.word_embed.weight.dtype))), dim=1)
                if feats_BlCv is not None
                else sos
            )
            sl = slice(0, x.shape[1])
        elif scale == 0:
            x, sl = sos, self.slices[0]
        else:
            if feats_BlCv is None:
                raise ValueError(f"scale {scale} needs the tokenizer's next-scale input features")
            x, sl = self.word_embed(feats_BlCv.to(self.word_embed.weight.dtype)), self.slices[scale]
        if x.shape[1] != sl.stop - sl.start:
            raise ValueError(f"expected {sl.stop - sl.start} tokens for positions {sl}, got {x.shape[1]}")
        return x + self.lvl_embed(self.lvl_1L[:, sl]).expand(B, -1, -1) + self.pos_1LC[:, sl]

    def logits(self, x_BLC: Tensor, cond_BC: Tensor) -> Tensor:
        """AdaLN head: ``(B, L, C) -> (B, L, V)`` logits, at least float32 (float64 in a float64 model)."""
        dt = self.head.weight.dtype
        out = self.head(self.head_nm(x_BLC.to(dt), cond_BC.to(dt)))
        return out if out.dtype == torch.float64 else out.float()

    # ---- training forward ------------------------------------------------------------------------------
    def forward(
        self,
        labels: Tensor,
        feats_BlCv: Tensor,
        *,
        generator: torch.Generator | None = None,
        shared_generator: torch.Generator | None = None,
    ) -> tuple[Tensor, TrunkStats]:
        """Teacher-forced forward over the whole pyramid.

        Args:
            labels: ``(B,)`` int64 class indices. In training each is replaced by the null class with
                probability ``cfg.cond_drop_prob`` (never in eval mode).
            feats_BlCv: ``(B, L - first_l, Cvae)`` teacher-forcing input from the tokenizer.
            generator: random source for label dropout, drop masks and (without ``shared_generator``) the
                gradient method's draws.
            shared_generator: random source for the gradient method's draws only (S-JFB's ``k1``, ``k2``);
                data-parallel training gives every rank the same stream so all ranks run the same counts.

        Returns:
            ``(logits (B, L, V) float32, trunk stats)``.
        """
        if feats_BlCv.dim() != 3 or feats_BlCv.shape[1:] != (
            self.cfg.seq_len - self.first_l,
            self.cfg.z_channels,
        ):
            raise ValueError(
                f"feats_BlCv must be (B, {self.cfg.seq_len - self.first_l}, {self.cfg.z_channels}), "
                f"got {tuple(feats_BlCv.shape)}"
            )
        if self.training and self.cfg.cond_drop_prob > 0:
            drop = (
                torch.rand(labels.shape, generator=generator, device=labels.device) < self.cfg.cond_drop_prob
            )
            labels = torch.where(drop, torch.full_like(labels, self.num_classes), labels)
        cond = self.condition(labels)
        x = self.embed(cond, feats_BlCv)
        L = x.shape[1]
        x, stats = self.trunk(
            x,
            self.block_condition(cond),
            mask=self.attn_bias[:L, :L].to(x.dtype),
            generator=generator,
            shared_generator=shared_generator,
        )
        return self.logits(x, cond), stats

    # ---- cached (sampling) forward ---------------------------------------------------------------------
    def new_cache(self, policy: str = "iteration", missing: str = "last") -> TrunkCache:
        """KV caches for one batch of scale-by-scale sampling (see :meth:`ImplicitTrunk.new_cache`)."""
        return self.trunk.new_cache(policy, missing)  # type: ignore[arg-type]

    def forward_scale(
        self,
        scale: int,
        cond_BC: Tensor,
        feats_BnCv: Tensor | None,
        cache: TrunkCache,
        *,
        solver: Solver[Any] | None = None,
        z0: Tensor | None = None,
    ) -> tuple[Tensor, TrunkStats]:
        """Logits of one scale given the coarser ones (cached).

        Args:
            scale: ``s``, called in order 0, 1, ... with the same ``cache``.
            cond_BC: ``(B, C)`` class embedding (:meth:`condition`).
            feats_BnCv: ``(B, n_s, Cvae)`` the tokenizer's next-scale input (``None`` at scale 0).
            cache: from :meth:`new_cache`.
            solver: VIAR's implicit solver at this scale (ignored by VAR).
            z0: VIAR's start iterate ``(B, n_s, C)`` (default the pre blocks' output).

        Returns:
            ``(logits (B, n_s, V) float32, trunk stats)``.
        """
        x = self.embed(cond_BC, feats_BnCv, scale)
        x, stats = self.trunk.forward_cached(
            x, self.block_condition(cond_BC), scale=scale, cache=cache, solver=solver, z0=z0
        )
        return self.logits(x, cond_BC), stats


def _check_labels(labels: Tensor, num_classes: int) -> None:
    """Raise when a label is outside ``[0, num_classes]``, without a host sync where one would cost.

    On the CPU in eager mode the check reads the tensor and raises ``ValueError``. On an accelerator, or
    while ``torch.compile`` traces, it is a device-side assertion (``RuntimeError`` with the same message,
    raised when the device reaches it), so the forward neither waits for the device nor breaks the graph.
    """
    bad = (labels < 0) | (labels > num_classes)
    msg = f"labels must lie in [0, {num_classes}] ({num_classes} = null class)"
    if labels.device.type == "cpu" and not torch.compiler.is_compiling():
        if bool(bad.any()):
            raise ValueError(msg)
    else:
        torch._assert_async(~bad.any(), msg)


def _weight(lin: nn.Linear) -> Tensor:
    """The tensor holding a Linear's direction (``v`` under weight norm)."""
    return lin.parametrizations.weight.original1 if hasattr(lin, "parametrizations") else lin.weight


@torch.no_grad()
def _reset_weight_norm_gains(trunk: ImplicitTrunk) -> None:
    """Set ``g = |v|`` row-wise so a weight-normalised Linear starts equal to its plain init."""
    for m in trunk.map.modules():
        if isinstance(m, nn.Linear) and hasattr(m, "parametrizations"):
            v = m.parametrizations.weight.original1
            m.parametrizations.weight.original0.copy_(v.norm(dim=1, keepdim=True))


def build_model(
    cfg: TransformerConfig | str,
    *,
    gradient: GradientMethod | None = None,
    train_solver: Solver[Any] | int | None = None,
    eval_solver: Solver[Any] | int | None = None,
    attention_backend: AttentionBackend | str = "auto",
    init: bool = True,
    generator: torch.Generator | None = None,
) -> NextScaleTransformer:
    """VAR or VIAR from a config or a preset name (``"var_d30"``, ``"viar_d16"``, ``"viar_tiny"`` ...).

    Build on the meta device with ``with torch.device("meta"): build_model(..., init=False)`` to count
    parameters without allocating them.

    Args:
        cfg: a :class:`TransformerConfig` or a preset name.
        gradient, train_solver, eval_solver, attention_backend: see :func:`build_trunk`.
        init: apply :meth:`NextScaleTransformer.init_weights`.
        generator: random source for the init.
    """
    if isinstance(cfg, str):
        cfg = preset(cfg)
    trunk = build_trunk(
        cfg,
        gradient=gradient,
        train_solver=train_solver,
        eval_solver=eval_solver,
        attention_backend=attention_backend,
    )
    model = NextScaleTransformer(cfg, trunk)
    if init:
        model.init_weights(generator)
    return model
