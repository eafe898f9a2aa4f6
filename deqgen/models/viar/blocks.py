"""Transformer parts shared by VAR and VIAR: AdaLN self-attention block, attention, FFN, AdaLN head.

Parameter names follow the official checkpoints (``attn.mat_qkv``, ``attn.q_bias``, ``ffn.fc1``,
``ada_lin.1``, ``head_nm.ada_lin.1`` ...), so a converted state dict maps key for key.

Stochastic depth and dropout take their masks from a :class:`DropMasks` value when one is given. VIAR's
implicit block draws one per forward call and reuses it for every fixed-point iteration, so the map being
iterated stays the same map (the official code redraws the mask at each iteration). Explicit blocks draw a
fresh one per call.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from deqgen.kv_cache import CacheSlot, KVCache
from deqgen.nn.attention import AttentionBackend, ResolvedAttention
from deqgen.nn.dropout import dropout_mask

__all__ = ["DropMasks", "SelfAttention", "FFN", "AdaLNBlock", "AdaLNHead", "SharedAdaLN"]

#: Upper bound of the learned per-head logit scale, ``exp(min(scale_mul, ln 100))`` (official constant).
MAX_SCALE_MUL = math.log(100.0)
#: Initial per-head logit scale with L2-normalised attention: 4.
INIT_SCALE_MUL = math.log(4.0)


@dataclass(frozen=True)
class DropMasks:
    """Pre-drawn stochastic-depth and dropout masks for one block, already divided by the keep rate.

    Attributes:
        path_attn: ``(B, 1, 1)`` per-sample factor on the attention branch (0 or ``1/(1-p)``), or ``None``.
        path_ffn: ``(B, 1, 1)`` per-sample factor on the FFN branch, or ``None``.
        attn_out: ``(B, L, C)`` dropout factor on the attention output, or ``None``.
        ffn_out: ``(B, L, C)`` dropout factor on the FFN output, or ``None``.
    """

    path_attn: Tensor | None = None
    path_ffn: Tensor | None = None
    attn_out: Tensor | None = None
    ffn_out: Tensor | None = None


def _mul(x: Tensor, m: Tensor | None) -> Tensor:
    return x if m is None else x * m


class SelfAttention(nn.Module):
    """Multi-head self-attention with VAR's L2-normalised queries/keys and learned per-head scale.

    ``mat_qkv`` has no bias of its own; it is fed ``[q_bias, 0, v_bias]`` (the zero key bias is a constant,
    not a parameter or buffer). With ``l2_norm`` q and k are unit vectors per head, q is multiplied by
    ``exp(min(scale_mul, ln 100))`` and the softmax scale is 1; otherwise the scale is ``0.25 / sqrt(head_dim)``
    (the official choice).

    Args:
        dim: width ``C``.
        num_heads: heads ``H``; ``head_dim = C / H``.
        l2_norm: L2-normalised attention (official default ``True``).
        backend: attention kernel (see :func:`deqgen.nn.attention.attention`).
    """

    def __init__(
        self, dim: int, num_heads: int, l2_norm: bool = True, backend: AttentionBackend | str = "auto"
    ) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim={dim} is not divisible by num_heads={num_heads}")
        self.dim, self.num_heads, self.head_dim = dim, num_heads, dim // num_heads
        self.l2_norm = l2_norm
        self.backend = AttentionBackend(backend)
        self.attend = ResolvedAttention(self.backend)  # kernel resolved once per device/dtype/mask kind
        self.mat_qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.q_bias = nn.Parameter(torch.zeros(dim))
        self.v_bias = nn.Parameter(torch.zeros(dim))
        if l2_norm:
            self.scale_mul_1H11 = nn.Parameter(torch.full((1, num_heads, 1, 1), INIT_SCALE_MUL))
        self.proj = nn.Linear(dim, dim)

    def forward(
        self,
        x_BLC: Tensor,
        *,
        mask: Tensor | None = None,
        cache: CacheSlot | None = None,
    ) -> Tensor:
        """Attend ``x``'s tokens to themselves, or (with ``cache``) to the cached scales plus themselves.

        Args:
            x_BLC: ``(B, L, C)`` normalised input.
            mask: optional ``(L, L)`` / ``(1, 1, L, L)`` additive or bool mask (training: block-causal).
            cache: where this call's keys/values go and the earlier scales' come from (sampling; no mask).

        Returns:
            ``(B, L, C)``.
        """
        B, L, C = x_BLC.shape
        bias = torch.cat((self.q_bias, torch.zeros_like(self.q_bias), self.v_bias))
        qkv = F.linear(x_BLC, self.mat_qkv.weight, bias).view(B, L, 3, self.num_heads, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # (B, H, L, hd) each
        if self.l2_norm:
            q = F.normalize(q, dim=-1) * self.scale_mul_1H11.clamp_max(MAX_SCALE_MUL).exp().to(q.dtype)
            k = F.normalize(k, dim=-1)
            scale = 1.0
        else:
            scale = 0.25 / math.sqrt(self.head_dim)
        if cache is not None:
            k, v = cache.update(k, v)
        out = self.attend(q, k, v, mask=mask, scale=scale)  # (B, H, L, hd)
        return self.proj(out.transpose(1, 2).reshape(B, L, C))


class FFN(nn.Module):
    """``fc2(GELU_tanh(fc1(x)))``: ``(B, L, C) -> (B, L, C)`` with hidden width ``hidden``."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        """Apply the two-layer MLP token-wise.

        Args:
            x: ``(B, L, C)`` floating-point tokens (any leading shape works; the last dimension is ``C``).

        Returns:
            ``(B, L, C)``, the same dtype as ``x``.
        """
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class SharedAdaLN(nn.Module):
    """The model-level AdaLN projection of the ``shared_aln`` variant: ``cond (B, C) -> (B, 1, 6, C)``."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dim = dim
        self.ada_lin = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))

    def forward(self, cond_BC: Tensor) -> Tensor:
        """Project the class condition to the six modulation vectors every block shares.

        Args:
            cond_BC: ``(B, C)`` floating-point class embedding.

        Returns:
            ``(B, 1, 6, C)``, the same dtype as ``cond_BC``: ``gamma1, gamma2, scale1, scale2, shift1,
            shift2`` along dimension 2, before each block adds its own ``ada_gss`` offset.
        """
        return self.ada_lin(cond_BC).view(-1, 1, 6, self.dim)


class AdaLNBlock(nn.Module):
    """VAR's AdaLN self-attention block (pre-norm, LayerNorm without affine, class-conditioned modulation).

    ``ada_lin(cond)`` gives ``gamma1, gamma2, scale1, scale2, shift1, shift2`` (in that order), and::

        x = x + DropPath(Attn(LN(x) * (1 + scale1) + shift1) * gamma1)
        x = x + DropPath(FFN(LN(x) * (1 + scale2) + shift2) * gamma2)

    With ``shared_aln`` the block holds only a learned offset ``ada_gss (1, 1, 6, C)`` added to the
    model-level :class:`SharedAdaLN` output, which is then what ``cond`` must be.

    Args:
        dim: width ``C``.
        num_heads: attention heads.
        mlp_ratio: FFN hidden width over ``C``.
        drop_path: stochastic-depth rate of both branches.
        dropout: dropout rate on the attention and FFN outputs.
        norm_eps: LayerNorm epsilon.
        l2_norm: L2-normalised attention.
        shared_aln: use the shared-AdaLN variant.
        backend: attention kernel.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        drop_path: float = 0.0,
        dropout: float = 0.0,
        norm_eps: float = 1e-6,
        l2_norm: bool = True,
        shared_aln: bool = False,
        backend: AttentionBackend | str = "auto",
    ) -> None:
        super().__init__()
        self.dim, self.drop_path, self.dropout = dim, float(drop_path), float(dropout)
        self.shared_aln = shared_aln
        self.attn = SelfAttention(dim, num_heads, l2_norm, backend)
        self.ffn = FFN(dim, round(dim * mlp_ratio))
        self.norm = nn.LayerNorm(dim, eps=norm_eps, elementwise_affine=False)
        if shared_aln:
            self.ada_gss = nn.Parameter(torch.randn(1, 1, 6, dim) / dim**0.5)
        else:
            self.ada_lin = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))

    def draw_masks(self, x_BLC: Tensor, generator: torch.Generator | None = None) -> DropMasks:
        """Draw this block's drop-path and dropout masks for an input shaped like ``x_BLC`` (training only)."""
        B = x_BLC.shape[0]
        p, d = self.drop_path, self.dropout
        return DropMasks(
            path_attn=dropout_mask((B, 1, 1), p, x_BLC, generator) if p > 0 else None,
            path_ffn=dropout_mask((B, 1, 1), p, x_BLC, generator) if p > 0 else None,
            attn_out=dropout_mask(tuple(x_BLC.shape), d, x_BLC, generator) if d > 0 else None,
            ffn_out=dropout_mask(tuple(x_BLC.shape), d, x_BLC, generator) if d > 0 else None,
        )

    def modulation(self, cond: Tensor) -> tuple[Tensor, ...]:
        """``(gamma1, gamma2, scale1, scale2, shift1, shift2)``, each ``(B, 1, C)``.

        ``cond`` is the class embedding ``(B, C)``, or with ``shared_aln`` the :class:`SharedAdaLN` output
        ``(B, 1, 6, C)``.
        """
        if self.shared_aln:
            return tuple((self.ada_gss + cond).unbind(2))
        return tuple(self.ada_lin(cond).view(-1, 1, 6, self.dim).unbind(2))

    def forward(
        self,
        x_BLC: Tensor,
        cond: Tensor,
        *,
        mask: Tensor | None = None,
        cache: CacheSlot | None = None,
        masks: DropMasks | None = None,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """One block.

        Args:
            x_BLC: ``(B, L, C)`` residual stream.
            cond: ``(B, C)`` class embedding (or ``(B, 1, 6, C)`` with ``shared_aln``).
            mask: attention mask for the full teacher-forced sequence, ``None`` when sampling with a cache.
            cache: the attention's cache slot (sampling).
            masks: pre-drawn :class:`DropMasks`; if ``None`` and training, fresh masks are drawn.
            generator: random source for fresh masks.

        Returns:
            ``(B, L, C)``.
        """
        if masks is None and self.training and (self.drop_path > 0 or self.dropout > 0):
            masks = self.draw_masks(x_BLC, generator)
        m = masks or DropMasks()
        gamma1, gamma2, scale1, scale2, shift1, shift2 = self.modulation(cond)
        h = self.attn(self.norm(x_BLC) * (scale1 + 1) + shift1, mask=mask, cache=cache)
        x_BLC = x_BLC + _mul(_mul(h, m.attn_out) * gamma1, m.path_attn)
        h = self.ffn(self.norm(x_BLC) * (scale2 + 1) + shift2)
        return x_BLC + _mul(_mul(h, m.ffn_out) * gamma2, m.path_ffn)


class AdaLNHead(nn.Module):
    """Output head: ``head(LN(x) * (1 + scale) + shift)`` with ``(scale, shift) = head_nm(cond)``.

    Holds ``head_nm.ada_lin`` (SiLU -> Linear(C, 2C)) and ``head`` (Linear(C, V)) under the official
    names, so a model keeps them as two attributes; this module is registered as ``head_nm`` and the
    vocabulary projection is passed in.
    """

    def __init__(self, dim: int, norm_eps: float = 1e-6) -> None:
        super().__init__()
        self.dim = dim
        self.norm = nn.LayerNorm(dim, eps=norm_eps, elementwise_affine=False)
        self.ada_lin = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))

    def forward(self, x_BLC: Tensor, cond_BC: Tensor) -> Tensor:
        """``(B, L, C), (B, C) -> (B, L, C)`` modulated features (the caller applies ``head``)."""
        scale, shift = self.ada_lin(cond_BC).view(-1, 1, 2, self.dim).unbind(2)
        return self.norm(x_BLC) * (scale + 1) + shift


def cache_slot(cache: KVCache | None, scale: int, iteration: int = 0) -> CacheSlot | None:
    """``cache.at(scale=, iteration=)`` or ``None`` without a cache."""
    return None if cache is None else cache.at(scale=scale, iteration=iteration)
