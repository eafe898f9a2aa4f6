"""Learning-rate and weight-decay schedules as pure functions of the step, and AdamW parameter groups.

The formulas are those of the official VAR/VIAR trainer (``utils/lr_control.py``), including its
denominators (``max_it - 1``), so the ImageNet recipe reproduces the official figures: with 2,503 it/epoch,
550 epochs and 11 warmup epochs, lr(1000) = 6.58e-6, lr(700k) = 8.52e-5 and wd(700k) = 0.0654.

- warmup (``step < warmup``): linear from ``warmup_start_ratio * peak`` towards ``peak``;
- ``lin0``: hold ``peak`` for ``hold_fraction`` of the post-warmup span, then linear to ``end_ratio * peak``;
- ``cosine``: half-cosine from ``peak`` to ``end_ratio * peak``;
- ``constant``: ``peak``;
- weight decay: half-cosine from ``start`` at step 0 to ``end`` at the last step (it may go up, as in VIAR).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

__all__ = [
    "LRSchedule",
    "WDSchedule",
    "apply_schedules",
    "build_schedules",
    "is_no_weight_decay",
    "lr_at",
    "param_groups",
    "peak_lr",
    "wd_at",
]

ScheduleKind = Literal["lin0", "cosine", "constant"]


def peak_lr(lr_per_256: float, global_batch_size: int) -> float:
    """The linear scaling rule: ``lr_per_256 * global_batch_size / 256`` (official ``tblr``)."""
    return lr_per_256 * global_batch_size / 256


def lr_at(
    step: int,
    *,
    peak: float,
    total_steps: int,
    warmup_steps: int,
    kind: ScheduleKind = "lin0",
    warmup_start_ratio: float = 0.005,
    end_ratio: float = 0.01,
    hold_fraction: float = 0.05,
) -> float:
    """Learning rate at optimizer step ``step`` (0-based).

    Args:
        step: the current step, ``0 <= step < total_steps``.
        peak: the lr after warmup.
        total_steps: steps of the whole run.
        warmup_steps: linear warmup length (0 = none).
        kind: ``"lin0"``, ``"cosine"`` or ``"constant"`` after warmup.
        warmup_start_ratio: the warmup starts at this fraction of ``peak`` (official ``wp0`` 0.005).
        end_ratio: the last step's lr over ``peak`` (official ``wpe``).
        hold_fraction: ``lin0`` only: fraction of the post-warmup span held at ``peak`` (official 0.05).

    Raises:
        ValueError: an unknown ``kind`` or a warmup not shorter than the run.
    """
    if step < warmup_steps:
        return peak * (warmup_start_ratio + (1 - warmup_start_ratio) * step / warmup_steps)
    span = total_steps - 1 - warmup_steps
    if span <= 0:
        if warmup_steps >= total_steps:
            raise ValueError(f"warmup_steps={warmup_steps} must be shorter than total_steps={total_steps}")
        return peak
    passed = (step - warmup_steps) / span  # 0 at the end of warmup, 1 at the last step
    if kind == "constant":
        factor = 1.0
    elif kind == "cosine":
        factor = end_ratio + (1 - end_ratio) * (0.5 + 0.5 * math.cos(math.pi * passed))
    elif kind == "lin0":
        rest = 1 - passed
        factor = 1.0 if passed < hold_fraction else end_ratio + (1 - end_ratio) * rest / (1 - hold_fraction)
    else:
        raise ValueError(f"unknown lr schedule kind {kind!r}; use 'lin0', 'cosine' or 'constant'")
    return peak * factor


def wd_at(step: int, *, start: float, end: float, total_steps: int) -> float:
    """Weight decay at ``step``: half-cosine from ``start`` (step 0) to ``end`` (step ``total_steps - 1``)."""
    passed = step / max(total_steps - 1, 1)
    return end + (start - end) * (0.5 + 0.5 * math.cos(math.pi * passed))


@dataclass(frozen=True)
class LRSchedule:
    """:func:`lr_at` with its settings bound: ``schedule(step) -> lr``."""

    peak: float
    total_steps: int
    warmup_steps: int
    kind: ScheduleKind = "lin0"
    warmup_start_ratio: float = 0.005
    end_ratio: float = 0.01
    hold_fraction: float = 0.05

    def __post_init__(self) -> None:
        if self.peak <= 0:
            raise ValueError(f"LRSchedule got peak={self.peak}; use a positive learning rate")
        if self.total_steps < 1 or not 0 <= self.warmup_steps < max(self.total_steps, 1):
            raise ValueError(
                f"LRSchedule got total_steps={self.total_steps}, warmup_steps={self.warmup_steps}; "
                "use total_steps >= 1 and 0 <= warmup_steps < total_steps"
            )

    def __call__(self, step: int) -> float:
        return lr_at(
            step,
            peak=self.peak,
            total_steps=self.total_steps,
            warmup_steps=self.warmup_steps,
            kind=self.kind,
            warmup_start_ratio=self.warmup_start_ratio,
            end_ratio=self.end_ratio,
            hold_fraction=self.hold_fraction,
        )


@dataclass(frozen=True)
class WDSchedule:
    """:func:`wd_at` with its settings bound: ``schedule(step) -> weight decay``."""

    start: float
    end: float
    total_steps: int

    def __call__(self, step: int) -> float:
        return wd_at(step, start=self.start, end=self.end, total_steps=self.total_steps)


def build_schedules(
    optim: Any, global_batch_size: int, total_steps: int, warmup_steps: int
) -> tuple[LRSchedule, WDSchedule]:
    """Both schedules from a recipe's ``optim`` section (:class:`deqgen.training.schema.OptimSection`).

    Use ``cfg.total_steps(steps_per_epoch)`` and ``cfg.warmup_steps(steps_per_epoch)`` for the lengths.
    """
    lr = LRSchedule(
        peak=peak_lr(optim.lr_per_256, global_batch_size),
        total_steps=total_steps,
        warmup_steps=warmup_steps,
        kind=optim.schedule,
        warmup_start_ratio=optim.warmup_start_ratio,
        end_ratio=optim.end_ratio,
        hold_fraction=optim.hold_fraction,
    )
    return lr, WDSchedule(optim.weight_decay, optim.weight_decay_end, total_steps)


def apply_schedules(optimizer: torch.optim.Optimizer, lr: float, wd: float) -> None:
    """Set ``lr`` on every group and ``wd`` on the groups that decay (``wd_scale`` 1; no-decay groups keep 0)."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)
        group["weight_decay"] = wd * group.get("wd_scale", 1.0)


def is_no_weight_decay(name: str, ndim: int, patterns: Iterable[str], exempt_1d: bool = True) -> bool:
    """Whether parameter ``name`` is exempt from weight decay, by the official rule: 1-D tensors, biases,
    and names containing any of ``patterns``."""
    if exempt_1d and (ndim <= 1 or name.endswith("bias")):
        return True
    return any(p in name for p in patterns)


def param_groups(model: nn.Module, patterns: Iterable[str], exempt_1d: bool = True) -> list[dict[str, Any]]:
    """AdamW groups: ``{"params", "names", "wd_scale": 1.0}`` and the exempt ``{"wd_scale": 0.0}`` group.

    Frozen parameters (``requires_grad=False``) are left out. Names are kept (``names``) for logging; pass
    the groups straight to ``torch.optim.AdamW`` and drive them with :func:`apply_schedules`.
    """
    patterns = tuple(patterns)
    decay: dict[str, Any] = {"params": [], "names": [], "wd_scale": 1.0}
    no_decay: dict[str, Any] = {"params": [], "names": [], "wd_scale": 0.0, "weight_decay": 0.0}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        group = no_decay if is_no_weight_decay(name, p.ndim, patterns, exempt_1d) else decay
        group["params"].append(p)
        group["names"].append(name)
    return [g for g in (decay, no_decay) if g["params"]]
