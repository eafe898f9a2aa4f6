"""``training.activation_checkpointing`` for VIAR/VAR: the explicit blocks recompute their activations in
backward instead of keeping them (``torch.utils.checkpoint``, ``use_reentrant=False``).

VAR's blocks and VIAR's pre/post blocks are switched, in place, to :class:`CheckpointedBlock`, an
:class:`~deqgen.models.viar.blocks.AdaLNBlock` whose training forward runs under a checkpoint; weights,
state-dict keys and the model code stay as they are. VIAR's implicit block is left alone: its S-JFB gradient
already keeps only the ``k2`` differentiated iterations.

Drop-path and dropout masks are drawn from the explicit ``generator`` the model passes down, which
``torch.utils.checkpoint`` does not rewind (it restores only the global RNGs). :class:`_GeneratorReplay`
rewinds it for the recomputation and puts it back afterwards, so the recomputed masks equal the forward's and the
stream continues as without checkpointing: gradients and every later draw are unchanged.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from deqgen.models.viar.blocks import AdaLNBlock, DropMasks

__all__ = ["CheckpointedBlock", "checkpoint_explicit_blocks"]


class _GeneratorReplay:
    """Calls ``fn``; on every later call (the recomputation) with ``generator`` rewound to its state at the
    first call, restoring its current state afterwards."""

    def __init__(self, fn: Callable[..., Tensor], generator: torch.Generator | None) -> None:
        self.fn, self.generator = fn, generator
        self.start = generator.get_state() if generator is not None else None
        self.calls = 0

    def __call__(self, *args: Any) -> Tensor:
        self.calls += 1
        if self.generator is None or self.start is None or self.calls == 1:
            return self.fn(*args)
        now = self.generator.get_state()
        self.generator.set_state(self.start)
        try:
            return self.fn(*args)
        finally:
            self.generator.set_state(now)


class CheckpointedBlock(AdaLNBlock):
    """An AdaLN block that recomputes its activations in backward (training with gradients only; sampling
    with a KV cache and eval run it as usual)."""

    def forward(
        self,
        x_BLC: Tensor,
        cond: Tensor,
        *,
        mask: Tensor | None = None,
        cache: Any = None,
        masks: DropMasks | None = None,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """:meth:`AdaLNBlock.forward`, under ``torch.utils.checkpoint`` when training with gradients."""
        if cache is not None or not (self.training and torch.is_grad_enabled()):
            return super().forward(x_BLC, cond, mask=mask, cache=cache, masks=masks, generator=generator)

        def block(x: Tensor, c: Tensor, m: Tensor | None) -> Tensor:
            return AdaLNBlock.forward(self, x, c, mask=m, masks=masks, generator=generator)

        out = checkpoint(_GeneratorReplay(block, generator), x_BLC, cond, mask, use_reentrant=False)
        assert isinstance(out, Tensor)
        return out


def checkpoint_explicit_blocks(model: nn.Module) -> int:
    """Switch the explicit blocks of a :class:`~deqgen.models.viar.model.NextScaleTransformer` (VAR's
    ``trunk.blocks``, VIAR's ``trunk.pre_blocks`` and ``trunk.post_blocks``) to :class:`CheckpointedBlock`
    in place; returns how many.

    Raises:
        TypeError: the model has no such trunk.
    """
    trunk = getattr(model, "trunk", None)
    lists = [getattr(trunk, name, None) for name in ("blocks", "pre_blocks", "post_blocks")]
    blocks = [blk for group in lists if isinstance(group, nn.ModuleList) for blk in group]
    if trunk is None or not all(type(blk) in (AdaLNBlock, CheckpointedBlock) for blk in blocks):
        raise TypeError(
            f"training.activation_checkpointing: {type(model).__name__} has no trunk of AdaLN blocks"
        )
    for blk in blocks:
        blk.__class__ = CheckpointedBlock
    return len(blocks)
