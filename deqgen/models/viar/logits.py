"""Logits processing for sampling: guidance ramp, top-k / top-p filtering, per-sample random draws.

Pure functions on ``(B, n, V)`` logits (``B`` samples, ``n`` token positions of one scale, vocabulary
``V``). Every random draw comes from a ``torch.Generator`` passed in; nothing touches the global RNG.

**Batch-size invariance.** Sample ``i`` gets its own generator, seeded from ``(seed, i)`` with the global
sample index ``i`` (:func:`per_sample_generators`), and :func:`sample_tokens` draws row ``b``'s uniforms from
``generators[b]`` only; filtering, probabilities and the search then run batched, but each along one row's
vocabulary. So for the same seed and the same row logits, sample ``i``'s tokens are bitwise the same whatever
the batch size, its position in the batch, or the shard it is in. (The model's logits themselves may still
differ in the last bits between batch sizes on some backends; that is outside this module.)
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence
from typing import Literal

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "apply_cfg",
    "cfg_ramp",
    "derive_seed",
    "per_sample_generators",
    "row_uniforms",
    "sample_tokens",
    "sampling_dtype",
    "top_k_top_p_filter",
]


def cfg_ramp(
    si: int, num_scales: int, cfg_scale: float, kind: Literal["linear", "constant"] = "linear"
) -> float:
    """Guidance weight ``t`` at scale ``si``.

    Args:
        si: scale index in ``[0, num_scales)``.
        num_scales: number of scales, ``>= 1``.
        cfg_scale: classifier-free guidance scale.
        kind: ``"linear"`` (official): ``t = cfg_scale * (si / (num_scales - 1))``, no guidance at scale 0 and
            full guidance at the last scale; with ``num_scales == 1`` (where the official formula divides by
            zero) the only scale is the last one and gets ``t = cfg_scale``. ``"constant"``: ``t = cfg_scale``
            at every scale.

    Returns:
        ``t`` as a Python float.
    """
    if kind not in ("linear", "constant"):
        raise ValueError(f"cfg kind must be 'linear' or 'constant', got {kind!r}")
    if isinstance(num_scales, bool) or not isinstance(num_scales, numbers.Integral) or num_scales < 1:
        raise ValueError(f"num_scales must be an int >= 1, got {num_scales!r}")
    if isinstance(si, bool) or not isinstance(si, numbers.Integral) or not 0 <= si < num_scales:
        raise ValueError(f"scale index {si!r} is outside [0, {num_scales})")
    if kind == "constant" or num_scales == 1:
        return float(cfg_scale)
    return float(cfg_scale) * (int(si) / (int(num_scales) - 1))  # the official ``cfg * ratio``, bit for bit


def apply_cfg(logits_cond: Tensor, logits_uncond: Tensor, t: float) -> Tensor:
    """Classifier-free guidance, the official expression ``(1 + t) * cond - t * uncond``.

    Args:
        logits_cond: ``(B, n, V)`` class-conditional logits.
        logits_uncond: ``(B, n, V)`` unconditional (null-class) logits.
        t: guidance weight (see :func:`cfg_ramp`).

    Returns:
        ``(B, n, V)`` guided logits (a new tensor).
    """
    if logits_cond.shape != logits_uncond.shape:
        raise ValueError(
            f"cond and uncond logits differ in shape: {tuple(logits_cond.shape)} vs {tuple(logits_uncond.shape)}"
        )
    return (1 + t) * logits_cond - t * logits_uncond


def _check_filter_args(top_k: object, top_p: object) -> None:
    if isinstance(top_k, bool) or not isinstance(top_k, numbers.Integral) or top_k < 0:
        raise ValueError(f"top_k must be an int >= 0 (0 = off), got {top_k!r}")
    if isinstance(top_p, bool) or not isinstance(top_p, numbers.Real) or not 0.0 <= float(top_p) <= 1.0:
        raise ValueError(f"top_p must be a number in [0, 1] (0 = off), got {top_p!r}")


def top_k_top_p_filter(logits: Tensor, top_k: int = 0, top_p: float = 0.0) -> Tensor:
    """Set the logits of removed tokens to ``-inf``, as the official ``sample_with_top_k_top_p_``.

    Top-k first, then top-p on what is left. Ties: top-k keeps every token tied with the ``k``-th largest;
    top-p sorts with a *stable* ascending sort, so among tied tokens the lower vocabulary index comes first
    in the ascending order and is dropped first (the official unstable sort leaves this unspecified).
    Probabilities for top-p are computed in float32 or wider, whatever the logits' dtype.

    Args:
        logits: ``(..., V)``, usually ``(B, n, V)``. Not modified.
        top_k: keep logits ``>=`` the ``top_k``-th largest of their row; ``0`` = off, ``>= V`` keeps all
            (the official code raises there).
        top_p: nucleus: sort a row ascending and drop the tokens whose ascending cumulative probability is
            ``<= 1 - top_p``, always keeping the most likely token; ``0.0`` = off. ``1.0`` drops only tokens of
            zero probability.

    Returns:
        A new tensor shaped and typed like ``logits``, ``-inf`` where a token was removed.
    """
    _check_filter_args(top_k, top_p)
    out = logits.clone()
    V = out.shape[-1]
    if 0 < top_k < V:
        kth = out.topk(int(top_k), dim=-1).values[..., -1:]
        out.masked_fill_(out < kth, float("-inf"))
    if top_p > 0.0:
        wide = out if out.dtype in (torch.float32, torch.float64) else out.float()
        sorted_logits, order = wide.sort(dim=-1, descending=False, stable=True)
        drop_sorted = sorted_logits.softmax(dim=-1).cumsum(dim=-1) <= 1.0 - float(top_p)
        drop_sorted[..., -1] = False
        drop = torch.empty_like(drop_sorted).scatter_(-1, order, drop_sorted)
        out.masked_fill_(drop, float("-inf"))
    return out


_SEED_MOD = 2**64


def derive_seed(seed: int, index: int) -> int:
    """The 64-bit seed of sample ``index`` under run seed ``seed``.

    ``numpy.random.SeedSequence(seed, spawn_key=(index,))``: numpy's hash-based child-seed derivation (a
    fixed, documented algorithm), so different samples get well-separated seeds and the seed of sample
    ``index`` depends only on ``(seed, index)``.

    Args:
        seed: run seed, an int ``>= 0``.
        index: global sample index, an int ``>= 0``.

    Returns:
        An int in ``[0, 2**64)``.
    """
    for name, v in (("seed", seed), ("index", index)):
        if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < 0:
            raise ValueError(f"{name} must be an int >= 0, got {v!r}")
    state = np.random.SeedSequence(int(seed), spawn_key=(int(index),)).generate_state(1, dtype=np.uint64)
    return int(state[0]) % _SEED_MOD


def per_sample_generators(
    seed: int | torch.Generator,
    indices: int | Sequence[int],
    *,
    offset: int = 0,
    device: torch.device | str = "cpu",
) -> list[torch.Generator]:
    """One generator per sample, seeded by :func:`derive_seed` from the run seed and the global sample index.

    Args:
        seed: the run seed (an int ``>= 0``), or a ``torch.Generator`` from which one 63-bit run seed is
            drawn (so the same generator state gives the same samples, and a used generator new ones).
        indices: the number of samples ``count`` (global indices ``offset .. offset + count - 1``), or the
            global sample indices themselves (then ``offset`` must be 0).
        offset: global index of the first sample, for sharded runs.
        device: device of the generators (the logits' device in :func:`sample_tokens`).

    Returns:
        A list of generators, one per sample, in order. A batch, any prefix of it and any shard at the right
        ``offset`` of the same seed give sample ``i`` the same generator seed.
    """
    if isinstance(seed, torch.Generator):
        run_seed = int(torch.randint(0, 2**63 - 1, (1,), generator=seed, device=seed.device).item())
    elif isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or seed < 0:
        raise ValueError(f"seed must be an int >= 0 or a torch.Generator, got {seed!r}")
    else:
        run_seed = int(seed)
    if isinstance(offset, bool) or not isinstance(offset, numbers.Integral) or offset < 0:
        raise ValueError(f"offset must be an int >= 0, got {offset!r}")
    if isinstance(indices, numbers.Integral) and not isinstance(indices, bool):
        if indices < 0:
            raise ValueError(f"sample count must be >= 0, got {indices}")
        idx: Sequence[int] = range(int(offset), int(offset) + int(indices))
    elif offset:
        raise ValueError("give either a count with an offset, or explicit global indices (offset 0)")
    else:
        idx = [int(i) for i in indices]  # type: ignore[union-attr]
    return [torch.Generator(device=device).manual_seed(derive_seed(run_seed, i)) for i in idx]


def sample_tokens(
    logits: Tensor,
    *,
    top_k: int = 0,
    top_p: float = 0.0,
    generators: torch.Generator | Sequence[torch.Generator],
) -> Tensor:
    """One categorical draw per position from top-k / top-p filtered logits.

    The whole batch is filtered (:func:`top_k_top_p_filter`), turned into probabilities (softmax) and
    sampled by inverting its cumulative distribution in a fixed number of batched operations; the only
    per-row work is one draw of ``n`` uniforms from ``generators[b]`` (:func:`row_uniforms`). (On the CPU,
    large scales are processed a few rows per pass so the working set stays in cache; the result is the
    same.) Token ``v`` is
    drawn for ``u = U * cdf[-1]`` with ``cdf[v - 1] <= u < cdf[v]``, which has probability ``p_v`` (up to
    the rounding of the sampling dtype) and never picks a token of zero probability, so filtered tokens are
    never drawn. Every batched operation works along the vocabulary of one row, so a row's tokens depend
    only on its logits and its generator: bitwise batch-size invariant.

    Sampling dtype: float64 on the CPU, where it costs little; float32 on accelerators, where float64 is
    slow or missing (the official sampler draws with ``torch.multinomial`` from float32 probabilities too).

    Args:
        logits: ``(B, n, V)``.
        top_k: see :func:`top_k_top_p_filter` (0 = off).
        top_p: see :func:`top_k_top_p_filter` (0.0 = off).
        generators: ``B`` generators on the logits' device, one per row (see :func:`per_sample_generators`);
            or a single generator, used by every row in turn (row ``b`` draws after row ``b - 1``; then the
            tokens depend on the batch size unless ``B == 1``).

    Returns:
        ``(B, n)`` int64 token indices.

    Raises:
        ValueError: wrong shapes or generator count, or a row with no token of positive finite probability
            (e.g. NaN or all ``-inf`` logits).
    """
    if logits.dim() != 3:
        raise ValueError(f"logits must be (B, n, V), got shape {tuple(logits.shape)}")
    _check_filter_args(top_k, top_p)
    B, n, V = logits.shape
    gens = [generators] * B if isinstance(generators, torch.Generator) else list(generators)
    if len(gens) != B:
        raise ValueError(f"need one generator per sample: {B} rows, {len(gens)} generators")
    wide = sampling_dtype(logits.device)
    u_Bn1 = row_uniforms(gens, n, device=logits.device, dtype=wide)
    rows = _rows_per_pass(B, n * V, logits.device)
    parts = [_draw(logits[i : i + rows], u_Bn1[i : i + rows], top_k, top_p, wide) for i in range(0, B, rows)]
    return parts[0] if len(parts) == 1 else torch.cat(parts)


#: On the CPU, rows are processed in passes of at most this many logits (2 MiB in float64) so each pass stays
#: in cache: one pass over B=16, n=256, V=4096 took 1.35x the CPU time of row-by-row passes (sort, softmax and
#: cumsum stream the whole tensor). Accelerators take the whole batch in one pass.
_CPU_PASS_ELEMENTS = 2**18


def _rows_per_pass(B: int, row_elements: int, device: torch.device) -> int:
    if device.type != "cpu":
        return max(B, 1)
    return max(1, min(B, _CPU_PASS_ELEMENTS // max(row_elements, 1)))


def _draw(logits: Tensor, u_Bn1: Tensor, top_k: int, top_p: float, wide: torch.dtype) -> Tensor:
    """Inverse-CDF draws for ``(B, n, V)`` logits with uniforms ``(B, n, 1)``; each row independently."""
    V = logits.shape[-1]
    probs_BnV = top_k_top_p_filter(logits, top_k, top_p).to(wide).softmax(dim=-1)
    cdf_BnV = probs_BnV.cumsum(dim=-1)
    total_Bn1 = cdf_BnV[..., -1:]
    if not bool(((total_Bn1 > 0) & torch.isfinite(total_Bn1)).all()):  # one host sync per pass
        raise ValueError(
            "a row of logits has no token of positive finite probability (NaN or all -inf logits?)"
        )
    idx_Bn1 = torch.searchsorted(cdf_BnV, u_Bn1 * total_Bn1, right=True)  # first v with cdf[v] > u
    # u < total always holds in float64 (U <= 1 - 2**-53); in float32 U * total can round up to total, so
    # clamp to each row's last token of positive probability.
    last_pos_Bn1 = (V - 1) - (probs_BnV > 0).flip(-1).to(torch.uint8).argmax(dim=-1, keepdim=True)
    return torch.minimum(idx_Bn1, last_pos_Bn1).squeeze(-1)


def sampling_dtype(device: torch.device) -> torch.dtype:
    """The dtype :func:`sample_tokens` computes probabilities and uniforms in on ``device``.

    Args:
        device: the logits' device.

    Returns:
        ``torch.float64`` on the CPU, ``torch.float32`` elsewhere.
    """
    return torch.float64 if torch.device(device).type == "cpu" else torch.float32


def row_uniforms(
    generators: Sequence[torch.Generator], n: int, *, device: torch.device, dtype: torch.dtype
) -> Tensor:
    """``n`` uniforms in ``[0, 1)`` per row, row ``b`` drawn from ``generators[b]`` only.

    One draw per row, written straight into its slice of the output, so the number of operations is the
    number of rows and nothing else.

    Args:
        generators: one generator per row (the same object may repeat; rows then draw in order).
        n: uniforms per row.
        device: the generators' device.
        dtype: floating dtype of the draws.

    Returns:
        ``(B, n, 1)`` with ``B = len(generators)``.
    """
    u_Bn1 = torch.empty(len(generators), n, 1, device=device, dtype=dtype)
    for b, gen in enumerate(generators):
        u_Bn1[b].uniform_(generator=gen)  # the same stream as torch.rand(n, 1, generator=gen)
    return u_Bn1
