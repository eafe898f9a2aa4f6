"""Block-causal masks for VAR's next-scale token pyramid.

VAR lays the tokens of all scales out coarse to fine in one sequence: scale ``s`` is a ``p_s x p_s`` grid,
so it holds ``n_s = p_s**2`` tokens (row-major), and the sequence has ``L = sum(n_s)`` tokens. During
teacher forcing a token of scale ``s`` may attend to every token of scales ``<= s`` (its own scale
included, in both directions) and to nothing finer. The helpers here build that pattern from
``patch_nums``, e.g. ``(1, 2, 3, 4, 5, 6, 8, 10, 13, 16)`` for 256 px (``L = 680``).

Example:
    >>> block_causal_mask((1, 2)).int()
    tensor([[1, 0, 0, 0, 0],
            [1, 1, 1, 1, 1],
            [1, 1, 1, 1, 1],
            [1, 1, 1, 1, 1],
            [1, 1, 1, 1, 1]], dtype=torch.int32)
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = ["tokens_per_scale", "scale_slices", "level_index", "block_causal_mask", "block_causal_bias"]


def tokens_per_scale(patch_nums: Sequence[int]) -> tuple[int, ...]:
    """Token count ``n_s = p_s**2`` of every scale.

    Args:
        patch_nums: side length ``p_s`` of each scale's token grid, coarse to fine; positive ints.

    Returns:
        ``(n_0, ..., n_{S-1})``.

    Raises:
        ValueError: ``patch_nums`` is empty or holds something other than positive ints.

    Example:
        >>> tokens_per_scale((1, 2, 3))
        (1, 4, 9)
    """
    if isinstance(patch_nums, (str, bytes)) or not isinstance(patch_nums, Sequence) or len(patch_nums) == 0:
        raise ValueError(f"patch_nums must be a non-empty sequence of positive ints, got {patch_nums!r}")
    for p in patch_nums:
        if isinstance(p, bool) or not isinstance(p, int) or p < 1:
            raise ValueError(f"patch_nums must hold positive ints, got {p!r} in {tuple(patch_nums)!r}")
    return tuple(p * p for p in patch_nums)


def scale_slices(patch_nums: Sequence[int]) -> tuple[slice, ...]:
    """Where each scale's tokens sit in the flattened sequence (VAR's ``begin_ends``).

    Args:
        patch_nums: side lengths ``p_s``, coarse to fine.

    Returns:
        One ``slice(begin, end)`` per scale; ``x_BLC[:, slices[s]]`` is scale ``s``'s ``(B, n_s, C)`` block.

    Example:
        >>> scale_slices((1, 2, 3))
        (slice(0, 1, None), slice(1, 5, None), slice(5, 14, None))
    """
    slices = []
    begin = 0
    for n in tokens_per_scale(patch_nums):
        slices.append(slice(begin, begin + n))
        begin += n
    return tuple(slices)


def level_index(patch_nums: Sequence[int], *, device: torch.device | str | None = None) -> Tensor:
    """Scale index of every token (VAR's ``lvl_1L`` without the leading 1).

    Args:
        patch_nums: side lengths ``p_s``, coarse to fine.
        device: where to build the tensor.

    Returns:
        ``(L,)`` int64, ``L = sum(p_s**2)``: entry ``i`` is the scale that token ``i`` belongs to.

    Example:
        >>> level_index((1, 2))
        tensor([0, 1, 1, 1, 1])
    """
    counts = torch.tensor(tokens_per_scale(patch_nums), device=device)
    return torch.repeat_interleave(torch.arange(len(counts), device=device), counts)


def block_causal_mask(patch_nums: Sequence[int], *, device: torch.device | str | None = None) -> Tensor:
    """Boolean block-causal mask, ``True`` where attention is allowed (the SDPA convention).

    Args:
        patch_nums: side lengths ``p_s``, coarse to fine.
        device: where to build the tensor.

    Returns:
        ``(L, L)`` bool: ``mask[i, j]`` is ``level[i] >= level[j]``. It broadcasts against attention
        logits ``(B, heads, L, L)``. Every row has at least one ``True`` (its own token).
    """
    level = level_index(patch_nums, device=device)
    return level[:, None] >= level[None, :]


def block_causal_bias(
    patch_nums: Sequence[int],
    *,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> Tensor:
    """Additive block-causal bias: ``0`` where attention is allowed, ``-inf`` elsewhere.

    Same pattern as :func:`block_causal_mask`, in the form VAR stores as ``attn_bias_for_masking``.

    Args:
        patch_nums: side lengths ``p_s``, coarse to fine.
        dtype: floating dtype of the bias; use the attention logits' dtype.
        device: where to build the tensor.

    Returns:
        ``(L, L)`` tensor of ``dtype`` holding ``0`` and ``-inf``.

    Raises:
        TypeError: ``dtype`` is not a floating dtype.
    """
    if not dtype.is_floating_point:
        raise TypeError(
            f"block_causal_bias needs a floating dtype, got dtype={dtype}; use block_causal_mask for bool"
        )
    allowed = block_causal_mask(patch_nums, device=device)
    bias = torch.zeros(allowed.shape, dtype=dtype, device=device)
    return bias.masked_fill_(~allowed, float("-inf"))
