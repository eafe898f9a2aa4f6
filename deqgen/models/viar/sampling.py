"""Scale-by-scale sampling and zero-shot editing for VAR and VIAR.

:func:`generate` owns the next-scale loop, classifier-free guidance, the per-scale iteration schedule and the
KV cache's lifetime; the model only computes one scale's logits (``forward_scale``) and the tokenizer turns
tokens into the next scale's input (``next_scale_input``).

Randomness: one run seed is drawn from the caller's ``generator``; sample ``i`` gets a generator seeded from
(run seed, global index ``i``), so it draws the same random stream whatever the batch size
(see :func:`~deqgen.models.viar.logits.sample_tokens`).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from deqgen.models.viar.logits import apply_cfg, cfg_ramp, per_sample_generators, sample_tokens
from deqgen.models.viar.model import NextScaleTransformer
from deqgen.models.viar.schedules import Constant, Schedule, parse_schedule
from deqgen.models.viar.trunk import ImplicitTrunk, upsample_tokens
from deqgen.solvers.base import Solver

__all__ = ["EditSpec", "ScaleStats", "SampleResult", "generate", "token_masks"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class EditSpec:
    """Zero-shot editing: regenerate the tokens inside ``mask``, teacher-force the others from ``image``.

    In-painting: ``mask`` is the region to repaint. Out-painting: ``mask`` is everything outside the kept
    region. Class-conditional box editing: a box ``mask`` with the new class as the label.

    Attributes:
        image: ``(B, C, H, W)`` in ``[-1, 1]``, the image whose token pyramid fills the unmasked tokens.
        mask: ``(B, H, W)`` or ``(H, W)`` bool, ``True`` where new content is generated. At each scale a token
            is regenerated when any pixel of its cell is masked (area-downsampled mask > 0).
    """

    image: Tensor
    mask: Tensor


@dataclass(frozen=True)
class ScaleStats:
    """What one scale cost, per sample (the guided pair of a sample reported as its worst row).

    Attributes:
        scale: scale index.
        tokens: tokens of this scale per sample.
        iterations: ``(B,)`` implicit-block evaluations (0 for VAR).
        rel_residual: ``(B,)`` relative residual of the returned equilibrium (NaN for VAR).
        seconds: wall time of the scale (including the tokenizer step).
    """

    scale: int
    tokens: int
    iterations: Tensor
    rel_residual: Tensor
    seconds: float


@dataclass
class SampleResult:
    """Output of :func:`generate`.

    Attributes:
        images: ``(B, C, H, W)`` float in ``[0, 1]``.
        indices: token pyramid, one ``(B, p_s * p_s)`` int64 tensor per scale.
        stats: one :class:`ScaleStats` per scale.
        kv_bytes: bytes held by the KV caches at the end (the peak of a single batch).
    """

    images: Tensor
    indices: list[Tensor]
    stats: list[ScaleStats] = field(default_factory=list)
    kv_bytes: int = 0

    @property
    def total_iterations(self) -> Tensor:
        """``(B,)`` implicit-block evaluations summed over scales."""
        return torch.stack([s.iterations for s in self.stats]).sum(0)


def token_masks(mask: Tensor, patch_nums: tuple[int, ...]) -> list[Tensor]:
    """Per-scale token masks from a pixel mask: ``(B, H, W)`` bool -> ``[(B, p*p) bool]``.

    A token is ``True`` (regenerated) when any pixel of its cell is ``True``.
    """
    m = mask.float()[:, None]
    return [(F.adaptive_max_pool2d(m, (p, p)) > 0).flatten(1) for p in patch_nums]


def _check_inputs(model: NextScaleTransformer, vqvae: Any, labels: Tensor) -> None:
    if not isinstance(labels, Tensor) or labels.dim() != 1 or labels.dtype != torch.long:
        raise TypeError("labels must be an int64 tensor (B,) of class indices")
    qcfg = vqvae.config
    if tuple(qcfg.patch_nums) != tuple(model.cfg.patch_nums):
        raise ValueError(
            f"tokenizer patch_nums {tuple(qcfg.patch_nums)} differ from the model's {model.cfg.patch_nums}"
        )
    if qcfg.vocab_size != model.cfg.vocab_size or qcfg.z_channels != model.cfg.z_channels:
        raise ValueError(
            f"tokenizer (V={qcfg.vocab_size}, z={qcfg.z_channels}) does not match the model "
            f"(V={model.cfg.vocab_size}, z={model.cfg.z_channels})"
        )


@torch.no_grad()
def generate(
    model: NextScaleTransformer,
    vqvae: Any,
    labels: Tensor,
    *,
    schedule: Schedule | str | None = None,
    cfg_scale: float = 1.5,
    cfg_kind: Literal["linear", "constant"] = "linear",
    top_k: int = 0,
    top_p: float = 0.0,
    generator: torch.Generator | None = None,
    seed: int | None = None,
    sample_offset: int = 0,
    solver: Solver[Any] | None = None,
    cache: Literal["iteration", "lean"] = "iteration",
    warm_start: bool = False,
    edit: EditSpec | None = None,
) -> SampleResult:
    """Sample images scale by scale.

    Args:
        model: a VAR or VIAR :class:`~deqgen.models.viar.model.NextScaleTransformer` (put in eval mode).
        vqvae: the multi-scale tokenizer (``MultiScaleVQVAE``) with the model's ``patch_nums``.
        labels: ``(B,)`` int64 class indices.
        schedule: VIAR's per-scale iterations (a :mod:`~deqgen.models.viar.schedules` object or spec string
            such as ``"linear:10:5"``); default: the model's ``eval_iterations`` at every scale.
        cfg_scale: classifier-free guidance scale; ``0`` runs no unconditional rows.
        cfg_kind: ``"linear"`` ramps guidance from 0 at the first scale to ``cfg_scale`` at the last
            (official), ``"constant"`` applies ``cfg_scale`` at every scale.
        top_k: keep the ``top_k`` most likely tokens (0 = all).
        top_p: nucleus threshold (0 = off).
        generator: the random source; one run seed is drawn from it, per-sample seeds derive from it.
        seed: alternatively an int seed (ignored when ``generator`` is given).
        sample_offset: global index of the first sample, for sharded sampling with ``seed``.
        solver: VIAR's solver type (Picard = official, Anderson, Broyden); the schedule sets its budget or
            tolerance per scale.
        cache: ``"iteration"`` keeps the implicit block's K/V per iteration (equals teacher forcing for a
            constant schedule); ``"lean"`` keeps one per scale (less memory).
        warm_start: start each scale's fixed-point iteration from the previous scale's equilibrium,
            bilinearly upsampled, instead of the pre blocks' output.
        edit: zero-shot editing inputs (tokens outside the mask are teacher-forced).

    Returns:
        :class:`SampleResult`.
    """
    _check_inputs(model, vqvae, labels)
    dev = labels.device
    B, num_scales = labels.shape[0], model.cfg.num_scales
    pn = model.cfg.patch_nums
    implicit = isinstance(model.trunk, ImplicitTrunk)
    if schedule is None:
        spec = model.cfg.implicit
        schedule = Constant(spec.eval_iterations if spec is not None else 1)
    sched = parse_schedule(schedule)
    if generator is None:
        generator = torch.Generator().manual_seed(0 if seed is None else seed)
    gens = per_sample_generators(generator, B, offset=sample_offset, device=dev)

    gt: list[Tensor] | None = None
    tmask: list[Tensor] | None = None
    if edit is not None:
        gt = vqvae.img_to_indices(edit.image.to(dev))
        mask = edit.mask.to(dev)
        mask = mask.expand(B, *mask.shape[-2:]) if mask.dim() == 2 else mask
        tmask = token_masks(mask, pn)

    guided = cfg_scale != 0.0
    rows = torch.cat([labels, torch.full_like(labels, model.num_classes)]) if guided else labels
    cond = model.condition(rows)
    kv = model.new_cache(cache)
    side = vqvae.config.latent_size
    fhat = torch.zeros(
        B, model.cfg.z_channels, side, side, device=dev, dtype=vqvae.quantize.embedding.weight.dtype
    )
    feats: Tensor | None = None
    z_prev: Tensor | None = None
    indices: list[Tensor] = []
    stats: list[ScaleStats] = []
    for si in range(num_scales):
        t0 = time.perf_counter()
        s_solver = sched.solver_for_scale(si, num_scales, solver) if implicit else None
        z0 = upsample_tokens(z_prev, pn[si - 1], pn[si]) if (warm_start and z_prev is not None) else None
        logits, st = model.forward_scale(si, cond, feats, kv, solver=s_solver, z0=z0)
        if guided:
            logits = apply_cfg(logits[:B], logits[B:], cfg_ramp(si, num_scales, cfg_scale, cfg_kind))
        idx = sample_tokens(logits, top_k=top_k, top_p=top_p, generators=gens)
        if gt is not None and tmask is not None:
            idx = torch.where(tmask[si], idx, gt[si])
        indices.append(idx)
        h = vqvae.embed(si, idx)  # (B, Cvae, p_s, p_s)
        fhat, nxt = vqvae.next_scale_input(si, fhat, h)
        if si < num_scales - 1:
            feats = nxt.flatten(2).transpose(1, 2)
            feats = torch.cat([feats, feats]) if guided else feats
        sol = st.solution
        if sol is not None:
            z_prev = sol.z
            its = sol.stats.nfe.view(-1, B).max(0).values if guided else sol.stats.nfe
            rel = sol.stats.rel_residual.view(-1, B).amax(0) if guided else sol.stats.rel_residual
        else:
            its, rel = torch.zeros(B, dtype=torch.int64), torch.full((B,), float("nan"))
        stats.append(ScaleStats(si, pn[si] ** 2, its.cpu(), rel.float().cpu(), time.perf_counter() - t0))
    images = (vqvae.decode(fhat) + 1) / 2
    return SampleResult(images.clamp(0, 1), indices, stats, kv.nbytes())
