"""The step safeguard shared by Anderson and Broyden: accept or reject a trial, and its step length.

Both solvers keep a *base* iterate (the last accepted one) and propose ``x_trial = x_base + t * d``. When the
trial's residual comes back, :func:`judge` decides:

* the first trial along a fresh direction (``t`` at its full value) is accepted unless its residual is more
  than ``reject_ratio`` times the base's, a non-monotone test that lets the fast transients of Anderson and
  Broyden through (on contractions it never rejects, so the full step costs nothing extra);
* after a rejection the solver backtracks: the step length shrinks by ``shrink`` and each further trial must
  pass the Armijo test on the residual norm, ``||g(x_trial)|| <= (1 - c t) ||g(x_base)||``;
* a NaN/Inf residual is always rejected (shrink and retry) rather than ending the sample at once;
* after ``max_backtracks`` rejections in a row a finite trial is accepted anyway, so a sample cannot stall.

A rejected but finite trial still carries a valid secant pair ``(x_trial - x_base, g_trial - g_base)``; each
solver feeds it to its model before proposing the next trial from the base.
"""

from __future__ import annotations

import dataclasses
import math
from typing import TypeVar

import torch
from torch import Tensor

from deqgen.solvers.base import Solver, check_int

__all__ = ["ARMIJO_C", "Safeguarded", "base_point", "judge", "next_trial"]

ARMIJO_C = 1e-4
"""The sufficient-decrease constant ``c`` of the Armijo test (Nocedal & Wright, 2nd ed., section 3.1)."""

StateT = TypeVar("StateT")


@dataclasses.dataclass(frozen=True, kw_only=True)
class Safeguarded(Solver[StateT]):
    """The safeguard's fields, shared by :class:`~deqgen.Anderson` and :class:`~deqgen.Broyden`.

    Args:
        reject_ratio: reject a full step whose residual is above ``reject_ratio`` times the base's (``inf``
            accepts every finite full step).
        shrink: factor in ``(0, 1)`` applied to the step length after each rejected trial.
        max_backtracks: rejected trials in a row before a finite one is accepted anyway; also how many
            NaN/Inf evaluations in a row a sample survives before it is frozen as non-finite.
    """

    reject_ratio: float = 2.0
    shrink: float = 0.5
    max_backtracks: int = 4

    def __post_init__(self) -> None:
        super().__post_init__()
        cls = type(self).__name__
        if not (isinstance(self.reject_ratio, (int, float)) and self.reject_ratio >= 1):
            raise ValueError(
                f"{cls} got reject_ratio={self.reject_ratio!r}; use a number >= 1 (inf disables it)"
            )
        if not (isinstance(self.shrink, (int, float)) and 0.0 < self.shrink < 1.0):
            raise ValueError(f"{cls} got shrink={self.shrink!r}; use 0 < shrink < 1")
        check_int(cls, "max_backtracks", self.max_backtracks, 0)

    @property
    def non_finite_retries(self) -> int:
        """A NaN/Inf trial is retried with a shorter step up to ``max_backtracks`` times in a row."""
        return self.max_backtracks


def judge(
    res: Tensor,
    res_base: Tensor,
    t: Tensor,
    t_full: float,
    fails: Tensor,
    reject_ratio: float,
    max_backtracks: int,
    clean: bool = False,
) -> Tensor:
    """Decide per row whether the trial replaces the base: ``(B,)`` bool, True where it is rejected (every
    NaN/Inf trial is).

    Args:
        res: ``(B,)`` residual norm of the trial (may be NaN/Inf).
        res_base: ``(B,)`` residual norm of the base (finite).
        t: ``(B,)`` the step length the trial was taken with.
        t_full: the full step length (a fresh direction's first trial).
        fails: ``(B,)`` int, rejections in a row so far.
        reject_ratio: the non-monotone bound for a full step (``inf`` accepts every finite full step).
        max_backtracks: accept a finite trial after this many rejections in a row.
        clean: known that every row's trial is a full step after no rejection (``t == t_full``,
            ``fails == 0``, see :func:`next_trial`), which skips the backtracking terms.
    """
    if clean:  # every row on its first trial along a fresh direction: the same test in fewer passes
        if max_backtracks == 0 or math.isinf(reject_ratio):
            return ~torch.isfinite(res)
        return ~(res <= reject_ratio * res_base)  # NaN and Inf fail the comparison
    backtracking = t < t_full
    bound = torch.where(backtracking, (1 - ARMIJO_C * t) * res_base, reject_ratio * res_base)
    return ~torch.isfinite(res) | ((res > bound) & (fails < max_backtracks))


def base_point(reject: Tensor, trial: tuple[Tensor, ...], base: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
    """The point the next trial starts from, field by field: the trial's where accepted, the old base's where
    rejected.

    ``trial`` and ``base`` hold the same batch-first fields, e.g. ``(x: (B, D), g: (B, D), res: (B,))``.
    (Callers that know no row rejected take the trial without calling this.)
    """
    col = reject[:, None]
    return tuple(torch.where(col if t.dim() > 1 else reject, b, t) for t, b in zip(trial, base, strict=True))


def next_trial(
    t: Tensor, fails: Tensor, reject: Tensor, accepted: bool, clean: bool, t_full: float, shrink: float
) -> tuple[Tensor, Tensor, bool]:
    """The next trial's ``(t, fails, clean)``: step length ``(B,)`` (full after an accepted trial, ``shrink *
    t`` after a rejection), rejections in a row ``(B,)``, and whether every row is known to be on a full step
    after no rejection. ``accepted``: known that no row rejected (see
    :func:`~deqgen.solvers.numerics.known_false`); ``clean``: the current trial's flag."""
    if accepted:
        if clean:  # t and fails already hold t_full and 0
            return t, fails, True
        return torch.full_like(t, t_full), torch.zeros_like(fails), True
    return torch.where(reject, t * shrink, t_full), torch.where(reject, fails + 1, 0), False
