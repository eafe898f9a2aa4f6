"""Anderson acceleration (type II), per sample, scale-invariant and safeguarded."""

from __future__ import annotations

import dataclasses
import math
from typing import ClassVar

import torch
from torch import Tensor

from deqgen.solvers.base import Solver
from deqgen.solvers.numerics import cast_to as _out
from deqgen.solvers.numerics import combine, known_false, rowdot

__all__ = ["Anderson", "AndersonState"]

_TINY = torch.finfo(torch.float64).tiny


@dataclasses.dataclass(frozen=True)
class AndersonState:
    """Per-row history. ``m`` = memory, ``D`` = flattened sample size; tensors are batch-first.

    Attributes:
        dG: ``(B, m, D)`` ring of residual differences ``g_{i+1} - g_i``.
        C: ``(B, m, D)`` ring of ``dX + beta * dG`` (the step basis, one matmul per step).
        H: ``(B, m, m)`` float64 Gram matrix ``dG dG^T`` of the valid slots (zero rows/columns elsewhere),
            updated one row/column per step.
        valid: ``(B, m)`` bool, which ring slots hold a live difference for the row.
        x_prev, g_prev: ``(B, D)`` the iterate the last step started from and its residual.
        res_prev: ``(B,)`` ``||g_prev||``.
        accelerated: ``(B,)`` bool, the last step used the history (so it may be rejected).
        ptr: the ring slot written next (the same for every row).
        k: steps taken.
    """

    dG: Tensor
    C: Tensor
    H: Tensor
    valid: Tensor
    x_prev: Tensor
    g_prev: Tensor
    res_prev: Tensor
    accelerated: Tensor
    ptr: int = 0
    k: int = 0


@dataclasses.dataclass(frozen=True, kw_only=True)
class Anderson(Solver[AndersonState]):
    """Anderson acceleration with per-sample least squares.

    With residual ``g = f(x) - x`` and the last ``m`` differences ``dX, dG``, each sample solves
    ``gamma = argmin ||g - dG^T gamma||^2 + lam * tr(dG dG^T) ||gamma||^2`` in float64 and steps
    ``x+ = x + beta * g - (dX + beta * dG)^T gamma`` (Walker & Ni, SIAM J. Numer. Anal. 2011).

    Unlike torchdeq's Anderson:
      * the ridge is relative to ``tr(dG dG^T)``, so convergence does not depend on the units of ``z``;
      * the small ``(m, m)`` system is solved per sample by Cholesky in float64 (no host sync, works when
        ``z`` is fp16/bf16; the history is kept in float32 then);
      * it restarts (clears a sample's history) when that sample's system is ill-conditioned
        (pivot ratio > ``restart_cond``) or the solve fails;
      * it rejects an accelerated step whose residual grew by more than ``reject_ratio``: the sample
        returns to the previous iterate, takes a plain (Picard) step from there and restarts its history.
        So in the worst case it spends one wasted evaluation per rejection and otherwise behaves like Picard.

    Also takes the shared fields of :class:`~deqgen.solvers.base.Solver` (``tol``, ``stop_mode``, ``norm``,
    ``max_iter``, ``check_every``).

    Args:
        m: history size (>= 1).
        lam: relative ridge regularisation (>= 0).
        beta: mixing parameter in ``(0, 1]``; ``beta=1`` is undamped.
        restart_cond: restart when the history's estimated condition number exceeds this.
        reject_ratio: reject an accelerated step whose residual is above ``reject_ratio`` times the previous one.

    Example:
        >>> import torch
        >>> from deqgen import Anderson, fixed_point
        >>> sol = fixed_point(torch.cos, torch.zeros(2, 3, dtype=torch.float64), Anderson(tol=1e-10))
        >>> bool(sol.stats.all_converged), round(float(sol.z[0, 0]), 6)
        (True, 0.739085)
    """

    m: int = 5
    lam: float = 1e-10
    beta: float = 1.0
    restart_cond: float = 1e8
    reject_ratio: float = 2.0

    name: ClassVar[str] = "anderson"

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.m, bool) or not isinstance(self.m, int) or self.m < 1:
            raise ValueError(f"Anderson got m={self.m!r}; use an integer m >= 1, or Picard for no history")
        if not (isinstance(self.lam, (int, float)) and self.lam >= 0 and math.isfinite(self.lam)):
            raise ValueError(f"Anderson got lam={self.lam!r}; use a finite lam >= 0 (it is relative to tr(dG dG^T))")
        if not (isinstance(self.beta, (int, float)) and 0.0 < self.beta <= 1.0):
            raise ValueError(f"Anderson got beta={self.beta!r}; use 0 < beta <= 1")
        if not (isinstance(self.restart_cond, (int, float)) and self.restart_cond > 1):
            raise ValueError(f"Anderson got restart_cond={self.restart_cond!r}; use a number > 1")
        if not (isinstance(self.reject_ratio, (int, float)) and self.reject_ratio >= 1):
            raise ValueError(f"Anderson got reject_ratio={self.reject_ratio!r}; use a number >= 1 (inf disables it)")

    def init(self, z: Tensor) -> AndersonState:
        B, D = z.shape
        wd = z.dtype if z.dtype == torch.float64 else torch.float32
        dev = z.device
        return AndersonState(
            dG=torch.zeros(B, self.m, D, dtype=wd, device=dev),
            C=torch.zeros(B, self.m, D, dtype=wd, device=dev),
            H=torch.zeros(B, self.m, self.m, dtype=torch.float64, device=dev),
            valid=torch.zeros(B, self.m, dtype=torch.bool, device=dev),
            x_prev=torch.zeros(B, D, dtype=wd, device=dev),
            g_prev=torch.zeros(B, D, dtype=wd, device=dev),
            res_prev=torch.zeros(B, dtype=wd, device=dev),
            accelerated=torch.zeros(B, dtype=torch.bool, device=dev),
        )

    def step(self, state: AndersonState, z: Tensor, fz: Tensor, g: Tensor, res: Tensor) -> tuple[Tensor, AndersonState]:
        s = state
        wd = s.dG.dtype
        x, gw = _out(z, wd), _out(g, wd)
        beta = self.beta
        if s.k == 0:
            nxt = dataclasses.replace(s, x_prev=x, g_prev=gw, res_prev=res, k=1)
            return (z + beta * g if beta != 1.0 else fz), nxt

        # A step that raised the residual too much is rejected: go back to where it started and restart.
        # H is kept "clean": rows/columns of unused slots are zero, so they need no masking below.
        H = s.H
        reject = s.accelerated & (res > self.reject_ratio * s.res_prev)
        if known_false(reject):
            base_x, base_g, base_res = x, gw, res
            valid = s.valid.clone()
        else:
            rej = reject[:, None]
            base_x = torch.where(rej, s.x_prev, x)
            base_g = torch.where(rej, s.g_prev, gw)
            base_res = torch.where(reject, s.res_prev, res)
            valid = s.valid & ~rej
            H.mul_(~rej.unsqueeze(-1))

        # Record the new difference in ring slot ptr (in place) and its row/column of the Gram matrix.
        p = s.ptr
        dg = torch.sub(gw, s.g_prev, out=s.dG[:, p])
        torch.sub(x, s.x_prev, out=s.C[:, p]).add_(dg, alpha=beta)
        valid[:, p] = ~reject
        vf = valid.double()
        h = rowdot(s.dG, dg).double().mul_(vf)  # (B, m), zero against unused slots
        H[:, p, :] = h
        H[:, :, p] = h

        # Ridge-regularised least squares on the trace-normalised Gram matrix (scale-free), per sample,
        # float64 Cholesky without host sync. Unused slots get a unit diagonal and a zero right-hand side.
        tr = torch.diagonal(H, dim1=-2, dim2=-1).sum(-1, keepdim=True).clamp_min(_TINY)  # (B, 1)
        A = torch.diag_embed(vf.mul(self.lam - 1.0).add_(1.0)).addcdiv_(H, tr.unsqueeze(-1))  # diag: lam or 1
        rhs = rowdot(s.dG, base_g).double().mul_(vf).div_(tr)
        L, info = torch.linalg.cholesky_ex(A)
        gamma = torch.cholesky_solve(rhs.unsqueeze(-1), L).squeeze(-1)
        pivot = torch.diagonal(L, dim1=-2, dim2=-1).amin(-1).square()  # 1 / condition estimate
        good = (pivot * self.restart_cond > 1.0) & (info == 0)  # NaN pivots fail the test too
        good_col = good[:, None]
        valid = valid & good_col
        H.mul_(good_col.unsqueeze(-1))  # a failed sample restarts with an empty history
        gamma = torch.where(good_col, gamma, 0.0).to(wd)

        x_next = torch.add(base_x, base_g, alpha=beta).sub_(combine(gamma, s.C))
        nxt = AndersonState(
            s.dG, s.C, H, valid, base_x, base_g, base_res, valid.any(-1), ptr=(p + 1) % self.m, k=s.k + 1
        )
        return _out(x_next, z.dtype), nxt
