"""Logits processing for sampling: guidance ramp, top-k / top-p filtering, per-sample random draws.

Every random draw comes from a per-sample ``torch.Generator``: sample ``i``'s tokens depend only on its own
generator, so the same seed gives the same tokens for sample ``i`` whatever the batch size.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor

__all__ = ["cfg_ramp", "apply_cfg", "top_k_top_p_filter", "sample_tokens", "per_sample_generators"]


def cfg_ramp(si: int, num_scales: int, cfg: float, kind: Literal["linear", "constant"] = "linear") -> float:
    """Guidance weight ``t`` at scale ``si``.

    ``"linear"`` (official): ``t = cfg * si / (K - 1)``, no guidance at the first scale and full guidance at
    the last (``cfg`` when ``K == 1``); ``"constant"``: ``t = cfg`` everywhere.
    """
    if not 0 <= si < num_scales:
        raise ValueError(f"scale index {si} outside [0, {num_scales})")
    if kind == "constant" or num_scales == 1:
        return float(cfg)
    if kind != "linear":
        raise ValueError(f"cfg kind must be 'linear' or 'constant', got {kind!r}")
    return float(cfg) * si / (num_scales - 1)


def apply_cfg(logits_cond: Tensor, logits_uncond: Tensor, t: float) -> Tensor:
    """Classifier-free guidance ``(1 + t) * cond - t * uncond`` on ``(B, n, V)`` logits."""
    return (1 + t) * logits_cond - t * logits_uncond


def top_k_top_p_filter(logits: Tensor, top_k: int = 0, top_p: float = 0.0) -> Tensor:
    """Set removed tokens to ``-inf`` (a new tensor; the input is not modified).

    Args:
        logits: ``(B, n, V)``.
        top_k: keep logits ``>=`` the ``top_k``-th largest (0 = off; ``>= V`` keeps all).
        top_p: nucleus: sort ascending and drop tokens whose ascending cumulative probability is
            ``<= 1 - top_p``, always keeping the most likely one (0 = off), as the official code.

    Returns:
        ``(B, n, V)`` filtered logits.
    """
    out = logits.clone()
    V = out.shape[-1]
    if top_k < 0 or not 0.0 <= top_p <= 1.0:
        raise ValueError(f"need top_k >= 0 and 0 <= top_p <= 1, got top_k={top_k}, top_p={top_p}")
    if 0 < top_k < V:
        kth = out.topk(top_k, dim=-1).values[..., -1:]
        out = out.masked_fill(out < kth, float("-inf"))
    if top_p > 0.0:
        sorted_logits, order = out.sort(dim=-1, descending=False)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop_sorted = cum <= 1 - top_p
        drop_sorted[..., -1] = False
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        out = out.masked_fill(drop, float("-inf"))
    return out


def per_sample_generators(
    generator: torch.Generator, count: int, *, offset: int = 0, device: torch.device | str = "cpu"
) -> list[torch.Generator]:
    """One generator per sample, seeded from ``generator``'s draws one at a time.

    Sample ``j`` (global index ``offset + j``) gets the ``(offset + j)``-th draw, so a batch, its prefix,
    and a shard starting at ``offset`` of the same seed agree.
    """
    seeds = [int(torch.randint(0, 2**62, (1,), generator=generator)) for _ in range(offset + count)]
    return [torch.Generator(device=device).manual_seed(s) for s in seeds[offset:]]


def sample_tokens(
    logits: Tensor, *, top_k: int = 0, top_p: float = 0.0, generators: Sequence[torch.Generator]
) -> Tensor:
    """One categorical draw per position from filtered ``(B, n, V)`` logits -> ``(B, n)`` int64.

    Row ``b`` draws ``n`` uniforms from ``generators[b]`` and inverts its cumulative distribution, so its
    tokens depend only on its logits and its generator.
    """
    B, n, _ = logits.shape
    if len(generators) != B:
        raise ValueError(f"need one generator per sample: {B} rows, {len(generators)} generators")
    probs = top_k_top_p_filter(logits.float(), top_k, top_p).softmax(-1).double()
    cdf = probs.cumsum(-1)
    out = torch.empty(B, n, dtype=torch.long, device=logits.device)
    for b in range(B):
        u = torch.rand(n, 1, generator=generators[b], device=logits.device, dtype=torch.float64) * cdf[b, :, -1:]
        idx = torch.searchsorted(cdf[b], u).squeeze(1)
        out[b] = idx.clamp_max(probs.shape[-1] - 1)
    # never pick a removed token (searchsorted can land on a zero-probability slot only at exact ties)
    bad = probs.gather(-1, out[..., None]).squeeze(-1) == 0
    if bool(bad.any()):
        out = torch.where(bad, probs.argmax(-1), out)
    return out
