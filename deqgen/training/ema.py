"""An exponential moving average (EMA) of a model's weights, as DiT and timm keep one.

``training.ema_decay: d`` keeps a copy of the model whose parameters follow the trained ones after every
optimizer step, ``ema <- d * ema + (1 - d) * weights`` (``Tensor.lerp_``), on the same device; buffers are
copied as they are. The engine saves the average in every checkpoint (exact resume), samples mid-run from it
and exports it. Under DDP it averages the unwrapped module (identical on every rank); an EMA of
FSDP2-sharded weights is refused by the config.

Example:
    >>> import torch
    >>> from torch import nn
    >>> net = nn.Linear(2, 1)
    >>> ema = EMA(net, decay=0.5)
    >>> with torch.no_grad():
    ...     net.weight.add_(2.0)
    >>> ema.update(net)
    >>> torch.allclose(ema.module.weight, net.weight - 1.0)
    True
"""

from __future__ import annotations

import copy
from collections.abc import Mapping

import torch
from torch import Tensor, nn

__all__ = ["EMA"]


class EMA:
    """The moving average of ``model``'s parameters, held in a frozen copy of ``model`` (:attr:`module`).

    Create it before the model is compiled or wrapped (the copy must be a plain module).

    Args:
        model: the model to follow (its current weights start the average).
        decay: the weight of the old average per update, in ``(0, 1)``.

    Raises:
        ValueError: ``decay`` outside ``(0, 1)`` (names ``training.ema_decay``).
    """

    def __init__(self, model: nn.Module, decay: float) -> None:
        if not 0.0 < decay < 1.0:
            raise ValueError(f"training.ema_decay must lie in (0, 1), got {decay}")
        self.decay = decay
        self.module = copy.deepcopy(model).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """One step toward ``model``'s current weights (the same module type as :attr:`module`)."""
        averages = [p for _, p in self.module.named_parameters(remove_duplicate=False)]
        current = [p for _, p in model.named_parameters(remove_duplicate=False)]
        if len(averages) != len(current):
            raise ValueError(f"EMA: the model has {len(current)} parameters, the average {len(averages)}")
        for avg, p in zip(averages, current):
            avg.lerp_(p.detach(), 1.0 - self.decay)
        for avg_b, b in zip(self.module.buffers(), model.buffers()):
            avg_b.copy_(b)

    def state_dict(self) -> dict[str, Tensor]:
        """The averaged weights as a CPU state dict with the model's keys (checkpoints and export)."""
        return {k: v.detach().to("cpu", copy=True) for k, v in self.module.state_dict().items()}

    def load_state_dict(self, state: Mapping[str, Tensor]) -> None:
        """Restore the average from :meth:`state_dict` (bitwise).

        Raises:
            ValueError: keys missing or unexpected (the first few are named).
        """
        own = self.module.state_dict()
        missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
        if missing or unexpected:
            raise ValueError(
                f"EMA state does not match the model: missing {missing[:5]}, unexpected {unexpected[:5]}"
            )
        self.module.load_state_dict(dict(state))

    def copy_from(self, model: nn.Module) -> None:
        """Restart the average at ``model``'s weights (a resumed checkpoint saved without an EMA)."""
        self.module.load_state_dict(model.state_dict())
