"""Report part 3: convergence of the implicit block. Per scale, the relative residual
``|f(z_k) - z_k| / |f(z_k)|`` and the cosine similarity between iterate ``z_k`` and the last iterate ``z_K``,
from the iterates the sampler's own solver produces (a forward hook on the implicit map records them); the
last residual is checked against the solver's statistics (:func:`solver_gap`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from deqgen.evaluation.report import CacheKind
from deqgen.models.viar.model import NextScaleTransformer
from deqgen.models.viar.sampling import generate
from deqgen.models.viar.trunk import ImplicitTrunk

__all__ = ["ConvergenceCurve", "convergence_curves", "solver_gap"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ConvergenceCurve:
    """Per-iteration convergence of the implicit block at one scale.

    ``R`` rows: every row the implicit block solved (with guidance, the conditional and the unconditional row
    of each sample). ``K`` evaluations of the map; iterates ``z_0`` (the start) to ``z_K`` (the last).

    Attributes:
        scale: scale index; ``tokens`` its token count.
        rel_residual: ``(K, R)`` float64, ``|f(z_k) - z_k| / |f(z_k)|`` (L2 over the scale's tokens and
            channels), ``k = 0 .. K-1``.
        cosine: ``(K + 1, R)`` float64, cosine similarity of ``z_k`` and ``z_K`` (flattened per row).
        solver_rel_residual: ``(R,)`` the relative residual the solver itself reported for the last
            evaluation (its :class:`~deqgen.stats.SolverStats`), for cross-checking ``rel_residual[-1]``.
    """

    scale: int
    tokens: int
    rel_residual: Tensor
    cosine: Tensor
    solver_rel_residual: Tensor

    def mean_rel_residual(self) -> list[float]:
        """``K`` values: the relative residual at each ``k``, averaged over rows."""
        return [float(v) for v in self.rel_residual.mean(1)]

    def mean_cosine(self) -> list[float]:
        """``K + 1`` values: ``cosine(z_k, z_K)`` at each ``k``, averaged over rows."""
        return [float(v) for v in self.cosine.mean(1)]


def convergence_curves(
    model: NextScaleTransformer,
    vqvae: Any,
    labels: Tensor,
    *,
    iterations: int,
    cache: CacheKind = "iteration",
    cfg_scale: float = 0.0,
    top_k: int = 0,
    top_p: float = 0.0,
    seed: int = 0,
) -> list[ConvergenceCurve]:
    """Sample with ``constant:iterations`` Picard and record every iterate of the implicit block.

    A forward hook on the implicit map (``model.trunk.map``) sees each call ``f(z_k, x, k)``: its input
    ``z_k`` and output ``f(z_k) = z_{k+1}`` (plain Picard). The hook is removed before returning.

    Args:
        model: a VIAR in eval mode.
        vqvae: its tokenizer.
        labels: ``(B,)`` int64.
        iterations: ``K``, map evaluations per scale.
        cache, top_k, top_p, seed: as :func:`~deqgen.models.viar.sampling.generate`.
        cfg_scale: the classifier-free guidance scale (``generate``'s ``cfg_scale``).

    Returns:
        One :class:`ConvergenceCurve` per scale.
    """
    trunk = model.trunk
    if not isinstance(trunk, ImplicitTrunk):
        raise TypeError("convergence curves need a VIAR model (an ImplicitTrunk)")
    calls: dict[int, list[tuple[Tensor, Tensor]]] = {}

    def hook(_module: torch.nn.Module, args: tuple[Any, ...], output: Tensor) -> None:
        z, x, _k = args
        calls.setdefault(x.scale, []).append(
            (z.detach().double().flatten(1), output.detach().double().flatten(1))
        )

    handle = trunk.map.register_forward_hook(hook)
    try:
        res = generate(
            model,
            vqvae,
            labels,
            schedule=f"constant:{iterations}",
            cfg_scale=cfg_scale,
            top_k=top_k,
            top_p=top_p,
            seed=seed,
            cache=cache,
        )
    finally:
        handle.remove()
    B = labels.numel()
    curves = []
    for s, st in enumerate(res.stats):
        seq = calls[s]
        zs = [z for z, _ in seq] + [seq[-1][1]]  # z_0 .. z_K
        rel = torch.stack([(fz - z).norm(dim=1) / fz.norm(dim=1).clamp_min(1e-300) for z, fz in seq])
        cos = torch.stack([F.cosine_similarity(z, zs[-1], dim=1, eps=1e-300) for z in zs])
        curves.append(ConvergenceCurve(s, model.cfg.patch_nums[s] ** 2, rel, cos, st.rel_residual.double()))
        logger.info(
            "scale %d: final rel residual %.3g (gap to the solver's %.1e), cosine at k=5 %.4f",
            s,
            float(rel[-1].mean()),
            solver_gap(curves[-1]),
            float(cos[min(5, len(cos) - 1)].mean()),
        )
    assert all(c.solver_rel_residual.numel() == B for c in curves)
    return curves


def solver_gap(curve: ConvergenceCurve) -> float:
    """Largest relative difference between the hook's last relative residual (worst row of each guided pair)
    and the solver's own statistic (stored in float32 by the sampler, so about 1e-7 at best); a small number
    means the curves describe the iterates the solver used."""
    B = curve.solver_rel_residual.numel()
    ours, theirs = curve.rel_residual[-1].view(-1, B).amax(0), curve.solver_rel_residual
    return float(((ours - theirs).abs() / theirs.abs().clamp_min(1e-300)).max())
