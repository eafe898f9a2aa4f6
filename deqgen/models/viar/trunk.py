"""The two trunks of the next-scale transformer and their KV caches.

Both trunks take ``(x_BLC, cond, ...)`` and return ``(x_BLC, stats)``:

- :class:`ExplicitTrunk`: VAR, a stack of AdaLN blocks.
- :class:`ImplicitTrunk`: VIAR, ``pre`` blocks, then one AdaLN block iterated to a fixed point on
  ``z <- Block(P([z ; u]))`` with ``u`` the pre blocks' output (``z0 = u``) and ``P`` the fusion MLP
  Linear(2C, 2C) - GELU(tanh) - Linear(2C, C), then ``post`` blocks. The fixed point is an
  :class:`~deqgen.layer.ImplicitLayer`, so any deqgen solver and gradient method apply.

Sampling goes scale by scale through :meth:`forward_cached` with a :class:`TrunkCache` made by
:meth:`new_cache`; teacher-forced training goes through ``forward`` with the block-causal mask.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from deqgen.gradients import GradientMethod, forward_solve
from deqgen.kv_cache import AppendCache, EquilibriumCache, IterationKeyedCache, KVCache, MissingPolicy
from deqgen.layer import ImplicitLayer
from deqgen.models.viar.blocks import AdaLNBlock, DropMasks, cache_slot
from deqgen.nn.normalization import weight_norm
from deqgen.solvers.base import Solver
from deqgen.stats import Solution

__all__ = [
    "TrunkCache",
    "TrunkStats",
    "ExplicitTrunk",
    "FusionMLP",
    "ImplicitMap",
    "ImplicitTrunk",
    "CachePolicy",
]

#: ``"iteration"``: iteration-keyed K/V in the implicit block (equals teacher forcing with a constant
#: count); ``"lean"``: one K/V per earlier scale, its last iteration (the size of a VAR layer's cache).
CachePolicy = Literal["iteration", "lean"]


@dataclass
class TrunkCache:
    """Per-layer KV caches of one trunk for one batch; ``reset()`` between batches.

    Attributes:
        layers: one cache per explicit block, in trunk order (pre blocks then post blocks for VIAR).
        implicit: the implicit block's cache (``None`` for VAR).
    """

    layers: list[KVCache]
    implicit: KVCache | None = None

    def all(self) -> list[KVCache]:
        """Every cache: the explicit blocks' in order, then the implicit block's (if any)."""
        return [*self.layers, *([self.implicit] if self.implicit is not None else [])]

    def reset(self) -> None:
        """Empty every cache (a new batch of samples)."""
        for c in self.all():
            c.reset()

    def nbytes(self) -> int:
        """Bytes of all stored keys and values."""
        return sum(c.nbytes() for c in self.all())


@dataclass
class TrunkStats:
    """What a trunk call reports: the implicit solve's :class:`~deqgen.stats.Solution` (``None`` for VAR)
    and, in training, the number of no-grad and recorded iterations."""

    solution: Solution | None = None
    no_grad_steps: int = 0
    grad_steps: int = 0


def _run_blocks(
    blocks: Sequence[AdaLNBlock],
    x: Tensor,
    cond: Tensor,
    mask: Tensor | None,
    caches: Sequence[KVCache] | None,
    scale: int,
    generator: torch.Generator | None,
) -> Tensor:
    for i, blk in enumerate(blocks):
        slot = cache_slot(caches[i] if caches is not None else None, scale)
        x = blk(x, cond, mask=mask, cache=slot, generator=generator)
    return x


class ExplicitTrunk(nn.Module):
    """VAR's trunk: ``blocks`` applied in order.

    Args:
        blocks: the AdaLN blocks.
    """

    def __init__(self, blocks: Sequence[AdaLNBlock]) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(blocks)

    def forward(
        self,
        x_BLC: Tensor,
        cond: Tensor,
        *,
        mask: Tensor | None,
        generator: torch.Generator | None = None,
        shared_generator: torch.Generator | None = None,
    ) -> tuple[Tensor, TrunkStats]:
        """Teacher-forced pass: ``(B, L, C) -> (B, L, C)`` with the block-causal ``mask``
        (``shared_generator`` is unused: VAR has no gradient-method draws)."""
        return _run_blocks(self.blocks, x_BLC, cond, mask, None, 0, generator), TrunkStats()

    def new_cache(self, policy: CachePolicy = "iteration", missing: MissingPolicy = "last") -> TrunkCache:
        """One :class:`~deqgen.kv_cache.AppendCache` per block (``policy``/``missing`` only matter for VIAR)."""
        return TrunkCache([AppendCache() for _ in self.blocks])

    def forward_cached(
        self,
        x_BnC: Tensor,
        cond: Tensor,
        *,
        scale: int,
        cache: TrunkCache,
        solver: Solver[Any] | None = None,
        z0: Tensor | None = None,
    ) -> tuple[Tensor, TrunkStats]:
        """One scale of sampling: ``(B, n_s, C) -> (B, n_s, C)`` attending to the cached coarser scales."""
        return _run_blocks(self.blocks, x_BnC, cond, None, cache.layers, scale, None), TrunkStats()


class FusionMLP(nn.Module):
    """VIAR's injection/fusion map ``P([z ; u]) = Linear(2C, C)(GELU_tanh(Linear(2C, 2C)([z ; u])))``.

    Registered as ``implicit_block_projection`` in the official checkpoints: keys ``0.*`` and ``2.*``.
    """

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(2 * dim, 2 * dim), nn.GELU(approximate="tanh"), nn.Linear(2 * dim, dim)
        )

    def forward(self, z_BLC: Tensor, u_BLC: Tensor) -> Tensor:
        """``(B, L, C), (B, L, C) -> (B, L, C)``."""
        return self.net(torch.cat((z_BLC, u_BLC), dim=-1))


@dataclass(frozen=True)
class ImplicitInput:
    """Everything the fixed-point map sees besides ``z`` (the ``x`` of ``f(z, x, k)``).

    Attributes:
        u: ``(B, L, C)`` the pre blocks' output (the injection).
        cond: ``(B, C)`` class embedding (or the shared-AdaLN output).
        mask: the block-causal mask in teacher forcing, ``None`` when sampling.
        masks: drop masks drawn once for this forward call (training), or ``None``.
        cache: the implicit block's KV cache (sampling), or ``None``.
        scale: the current scale (sampling).
    """

    u: Tensor
    cond: Tensor
    mask: Tensor | None = None
    masks: DropMasks | None = None
    cache: KVCache | None = None
    scale: int = 0


class ImplicitMap(nn.Module):
    """``f(z, x, k) = block(P([z ; x.u]), x.cond)``: the map VIAR iterates.

    ``k`` (the iteration number) keys the implicit block's KV cache when sampling.
    """

    def __init__(self, block: AdaLNBlock, projection: FusionMLP) -> None:
        super().__init__()
        self.block = block
        self.projection = projection

    def forward(self, z_BLC: Tensor, x: ImplicitInput, k: int) -> Tensor:
        """One map evaluation ``f(z, x, k) = Block(P([z; u]))``: ``(B, L, C) -> (B, L, C)``; ``k`` keys the
        implicit block's KV cache slot when sampling."""
        h = self.projection(z_BLC, x.u)
        slot = cache_slot(x.cache, x.scale, k)
        return self.block(h, x.cond, mask=x.mask, cache=slot, masks=x.masks or DropMasks())


class ImplicitTrunk(nn.Module):
    """VIAR's trunk: ``pre`` blocks -> fixed point of :class:`ImplicitMap` -> ``post`` blocks.

    Args:
        pre: explicit blocks before the implicit block.
        block: the weight-tied implicit block.
        projection: the fusion MLP ``P``.
        post: explicit blocks after it.
        gradient: the training gradient method (e.g. :class:`~deqgen.gradients.SJFB` with VIAR's ranges).
        train_solver: forward solver in training (S-JFB uses only its type: ``k1`` fixed evaluations).
        eval_solver: solver in eval mode, or an int for a fixed count of block applications.
        weight_norm: reparametrise the Linear weights of the implicit block and of ``P`` as ``g v / |v|``.
    """

    def __init__(
        self,
        pre: Sequence[AdaLNBlock],
        block: AdaLNBlock,
        projection: FusionMLP,
        post: Sequence[AdaLNBlock],
        *,
        gradient: GradientMethod,
        train_solver: Solver[Any] | int | None = None,
        eval_solver: Solver[Any] | int | None = None,
        weight_norm: bool = False,
    ) -> None:
        super().__init__()
        self.pre_blocks = nn.ModuleList(pre)
        self.post_blocks = nn.ModuleList(post)
        self.implicit = ImplicitLayer(ImplicitMap(block, projection), gradient, train_solver, eval_solver)
        self.weight_norm = weight_norm
        if weight_norm:
            self.apply_weight_norm()

    @property
    def map(self) -> ImplicitMap:
        """The implicit map ``f`` (fusion projection + the weight-tied block) inside the layer."""
        f = self.implicit.f
        assert isinstance(f, ImplicitMap)
        return f

    def apply_weight_norm(self) -> None:
        """Weight-normalise every Linear of the implicit block and ``P`` (call after loading plain weights)."""
        for mod in self.map.modules():
            if isinstance(mod, nn.Linear) and not hasattr(mod, "parametrizations"):
                weight_norm(mod, name="weight", dim=0)

    def forward(
        self,
        x_BLC: Tensor,
        cond: Tensor,
        *,
        mask: Tensor | None,
        generator: torch.Generator | None = None,
        shared_generator: torch.Generator | None = None,
    ) -> tuple[Tensor, TrunkStats]:
        """Teacher-forced pass ``(B, L, C) -> (B, L, C)``.

        In training the implicit block's drop masks are drawn once here (from ``generator``) and reused at
        every iteration. The gradient method's draws (S-JFB's ``k1``, ``k2``) come from ``shared_generator``
        when given (data-parallel training passes one stream that is identical on every rank), else from
        ``generator``.
        """
        u = _run_blocks(self.pre_blocks, x_BLC, cond, mask, None, 0, generator)
        blk = self.map.block
        masks = blk.draw_masks(u, generator) if self.training and torch.is_grad_enabled() else None
        z, info = self.implicit(
            ImplicitInput(u, cond, mask, masks),
            u,
            generator=generator if shared_generator is None else shared_generator,
        )
        out = _run_blocks(self.post_blocks, z, cond, mask, None, 0, generator)
        return out, TrunkStats(info.forward, info.no_grad_steps, info.grad_steps)

    def new_cache(self, policy: CachePolicy = "iteration", missing: MissingPolicy = "last") -> TrunkCache:
        """Append caches for the explicit blocks and an iteration-keyed (or lean) cache for the implicit one.

        Args:
            policy: ``"iteration"`` (:class:`~deqgen.kv_cache.IterationKeyedCache`, equals teacher forcing for
                a constant count) or ``"lean"`` (:class:`~deqgen.kv_cache.EquilibriumCache`).
            missing: the iteration-keyed cache's rule for iterations an earlier scale never stored.
        """
        n = len(self.pre_blocks) + len(self.post_blocks)
        if policy == "iteration":
            implicit: KVCache = IterationKeyedCache(missing=missing)
        elif policy == "lean":
            implicit = EquilibriumCache()
        else:
            raise ValueError(f"cache policy must be 'iteration' or 'lean', got {policy!r}")
        return TrunkCache([AppendCache() for _ in range(n)], implicit)

    def forward_cached(
        self,
        x_BnC: Tensor,
        cond: Tensor,
        *,
        scale: int,
        cache: TrunkCache,
        solver: Solver[Any] | None = None,
        z0: Tensor | None = None,
    ) -> tuple[Tensor, TrunkStats]:
        """One scale of sampling: ``(B, n_s, C) -> (B, n_s, C)``.

        Args:
            x_BnC: the scale's embedded tokens.
            cond: ``(B, C)`` class embedding (or shared-AdaLN output).
            scale: the scale index ``s``.
            cache: from :meth:`new_cache`, shared by all scales of the batch.
            solver: the implicit block's solver at this scale (default: the layer's ``eval_solver``).
            z0: start of the iteration ``(B, n_s, C)`` (default: the pre blocks' output, as the official).

        Returns:
            ``(out, stats)`` with ``stats.solution`` the implicit solve's per-sample statistics.
        """
        npre = len(self.pre_blocks)
        u = _run_blocks(self.pre_blocks, x_BnC, cond, None, cache.layers[:npre], scale, None)
        x = ImplicitInput(u, cond, None, None, cache.implicit, scale)
        sol = forward_solve(
            lambda z, k: self.map(z, x, k), u if z0 is None else z0, solver or self.implicit.eval_solver
        )
        out = _run_blocks(self.post_blocks, sol.z, cond, None, cache.layers[npre:], scale, None)
        return out, TrunkStats(sol, sol.stats.iterations, 0)


def upsample_tokens(z_BnC: Tensor, side_from: int, side_to: int) -> Tensor:
    """Bilinearly resize a scale's token grid ``(B, side_from^2, C) -> (B, side_to^2, C)`` (warm starts)."""
    B, n, C = z_BnC.shape
    if n != side_from * side_from:
        raise ValueError(f"expected {side_from}^2 = {side_from * side_from} tokens, got {n}")
    grid = z_BnC.transpose(1, 2).reshape(B, C, side_from, side_from)
    up = F.interpolate(grid, size=(side_to, side_to), mode="bilinear", align_corners=False)
    return up.reshape(B, C, side_to * side_to).transpose(1, 2)
