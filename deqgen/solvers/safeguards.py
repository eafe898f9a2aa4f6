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

import torch
from torch import Tensor

__all__ = ["ARMIJO_C", "judge", "next_length"]

ARMIJO_C = 1e-4
"""The sufficient-decrease constant ``c`` of the Armijo test (Nocedal & Wright, 2nd ed., section 3.1)."""


def judge(
    res: Tensor, res_base: Tensor, t: Tensor, t_full: float, fails: Tensor, reject_ratio: float, max_backtracks: int
) -> tuple[Tensor, Tensor]:
    """Decide per row whether the trial replaces the base.

    Args:
        res: ``(B,)`` residual norm of the trial (may be NaN/Inf).
        res_base: ``(B,)`` residual norm of the base.
        t: ``(B,)`` the step length the trial was taken with.
        t_full: the full step length (a fresh direction's first trial).
        fails: ``(B,)`` int, rejections in a row so far.
        reject_ratio: the non-monotone bound for a full step (``inf`` accepts every finite full step).
        max_backtracks: accept a finite trial after this many rejections in a row.

    Returns:
        ``(finite, reject)``, ``(B,)`` bool each.
    """
    finite = torch.isfinite(res)
    backtracking = t < t_full
    bound = torch.where(backtracking, (1 - ARMIJO_C * t) * res_base, reject_ratio * res_base)
    reject = ~finite | ((res > bound) & (fails < max_backtracks))
    return finite, reject


def next_length(t: Tensor, reject: Tensor, t_full: float, shrink: float) -> Tensor:
    """``(B,)`` step length of the next trial: full after an accepted trial, ``shrink * t`` after a rejection."""
    return torch.where(reject, t * shrink, t_full)
