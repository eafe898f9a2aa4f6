"""Anderson acceleration (type II), per sample, scale-invariant and safeguarded."""

from __future__ import annotations

import dataclasses
import math
from typing import ClassVar

import torch
from torch import Tensor

from deqgen.solvers.numerics import cast_to as _out
from deqgen.solvers.numerics import combine, known_false, known_true, rowdot
from deqgen.solvers.safeguards import Safeguarded, base_point, judge, next_trial

__all__ = ["Anderson", "AndersonState"]

_TINY = torch.finfo(torch.float64).tiny


@dataclasses.dataclass(frozen=True)
class AndersonState:
    """Per-row history. ``m`` = memory, ``D`` = flattened sample size; tensors are batch-first.

    Attributes:
        dG: ``(B, m, D)`` ring of residual differences ``g_trial - g_base``.
        C: ``(B, m, D)`` ring of ``dX + beta * dG`` (the step basis, one matmul per step); with ``beta = 1``
            that is ``dF``, the differences of ``f``, written in one pass.
        H: ``(B, m, m)`` float64 Gram matrix ``dG dG^T`` of the valid slots (zero rows/columns elsewhere),
            updated one row/column per step.
        valid: ``(B, m)`` bool, which ring slots hold a live difference for the row.
        x_prev, g_prev, f_prev: ``(B, D)`` the base (the last accepted iterate), its residual and ``f`` there.
        res_prev: ``(B,)`` ``||g_prev||``.
        t: ``(B,)`` the step length of the pending trial.
        fails: ``(B,)`` int32, trials rejected in a row (see :mod:`deqgen.solvers.safeguards`).
        ptr: the ring slot written next (the same for every row).
        k: steps taken.
        clean: known that every row's pending trial is a full step after no rejection (see
            :func:`~deqgen.solvers.safeguards.next_trial`); lets the step skip the safeguard's passes.
        full: known that every ring slot of every row is valid; lets the step skip the masking passes.
    """

    dG: Tensor
    C: Tensor
    H: Tensor
    valid: Tensor
    x_prev: Tensor
    g_prev: Tensor
    f_prev: Tensor
    res_prev: Tensor
    t: Tensor
    fails: Tensor
    ptr: int = 0
    k: int = 0
    clean: bool = True
    full: bool = False


@dataclasses.dataclass(frozen=True, kw_only=True)
class Anderson(Safeguarded[AndersonState]):
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
      * it is globalised like :class:`~deqgen.Broyden` (:mod:`deqgen.solvers.safeguards`): a step whose
        residual grew by more than ``reject_ratio``, or came back NaN/Inf, is rejected; the sample stays at its
        base, adds the rejected trial's finite difference pair to its history, and retries from the base with
        a step ``shrink`` times shorter that must pass the Armijo test on the residual norm. An accepted full
        step costs nothing extra.

    Also takes the shared fields of :class:`~deqgen.solvers.base.Solver` (``tol``, ``stop_mode``, ``norm``,
    ``max_iter``, ``check_every``) and the safeguard's (``reject_ratio``, ``shrink``, ``max_backtracks``, see
    :class:`~deqgen.solvers.safeguards.Safeguarded`).

    Args:
        m: history size (>= 1).
        lam: relative ridge regularisation (>= 0).
        beta: mixing parameter in ``(0, 1]``; ``beta=1`` is undamped.
        restart_cond: restart when the history's estimated condition number exceeds this.

    Example:
        >>> import torch
        >>> from deqgen import Anderson, fixed_point
        >>> sol = fixed_point(torch.cos, torch.zeros(2, 3, dtype=torch.float64), Anderson(tol=1e-10))
        >>> bool(sol.stats.all_converged), round(float(sol.z[0, 0]), 6)
        (True, 0.739085)
    """

    m: int = 6
    lam: float = 1e-10
    beta: float = 1.0
    restart_cond: float = 1e8

    name: ClassVar[str] = "anderson"

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.m, bool) or not isinstance(self.m, int) or self.m < 1:
            raise ValueError(f"Anderson got m={self.m!r}; use an integer m >= 1, or Picard for no history")
        if not (isinstance(self.lam, (int, float)) and self.lam >= 0 and math.isfinite(self.lam)):
            raise ValueError(
                f"Anderson got lam={self.lam!r}; use a finite lam >= 0 (it is relative to tr(dG dG^T))"
            )
        if not (isinstance(self.beta, (int, float)) and 0.0 < self.beta <= 1.0):
            raise ValueError(f"Anderson got beta={self.beta!r}; use 0 < beta <= 1")
        if not (isinstance(self.restart_cond, (int, float)) and self.restart_cond > 1):
            raise ValueError(f"Anderson got restart_cond={self.restart_cond!r}; use a number > 1")

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
            f_prev=torch.zeros(B, D, dtype=wd, device=dev),
            res_prev=torch.zeros(B, dtype=wd, device=dev),
            t=torch.ones(B, dtype=wd, device=dev),
            fails=torch.zeros(B, dtype=torch.int32, device=dev),
        )

    def step(
        self, state: AndersonState, z: Tensor, fz: Tensor, g: Tensor, res: Tensor
    ) -> tuple[Tensor, AndersonState]:
        s = state
        wd = s.dG.dtype
        x, gw, fw = _out(z, wd), _out(g, wd), _out(fz, wd)
        beta = self.beta
        if s.k == 0:
            nxt = dataclasses.replace(s, x_prev=x, g_prev=gw, f_prev=fw, res_prev=res, k=1)
            return (z + beta * g if beta != 1.0 else fz), nxt

        reject = judge(
            res, s.res_prev, s.t, 1.0, s.fails, self.reject_ratio, self.max_backtracks, clean=s.clean
        )
        accepted = known_false(reject)  # CPU: no row rejected, so every trial is finite and is the new base
        finite = None if accepted else torch.isfinite(res)
        trial = (x, gw, fw, res)
        base_x, base_g, base_f, base_res = (
            trial if accepted else base_point(reject, trial, (s.x_prev, s.g_prev, s.f_prev, s.res_prev))
        )
        valid, full = self._record(s, x, gw, fw, finite)
        gamma, valid, full = self._coefficients(s, valid, full, base_g)

        # x_next = x_base + t (beta g_base - C^T gamma); with beta = 1 it is written f_base - (1 - t) g_base -
        # t C^T gamma, one pass when every row is at t = 1 (known on CPU): the same bits either way, so a row's
        # trajectory does not depend on its batch
        t, fails, clean = next_trial(s.t, s.fails, reject, accepted, s.clean, 1.0, self.shrink)
        Cg = combine(gamma, s.C)
        if accepted and beta == 1.0:
            x_next = torch.sub(base_f, Cg)
        elif beta == 1.0:
            x_next = torch.addcmul(base_f, (1.0 - t)[:, None], base_g, value=-1.0).sub_(Cg.mul_(t[:, None]))
        else:
            if not accepted:
                Cg.mul_(t[:, None])
            x_next = torch.addcmul(base_x, t[:, None] * beta, base_g).sub_(Cg)
        nxt = AndersonState(
            dG=s.dG, C=s.C, H=s.H, valid=valid, x_prev=base_x, g_prev=base_g, f_prev=base_f, res_prev=base_res,
            t=t, fails=fails, ptr=(s.ptr + 1) % self.m, k=s.k + 1, clean=clean, full=full,
        )  # fmt: skip
        return _out(x_next, z.dtype), nxt

    def _record(
        self, s: AndersonState, x: Tensor, g: Tensor, f: Tensor, finite: Tensor | None
    ) -> tuple[Tensor, bool]:
        """Write the trial's difference pair to ring slot ``ptr`` (in place) and its row/column of the Gram
        matrix ``s.H``; a NaN/Inf trial's slot is left empty (``finite`` None: every trial is known to be finite
        and accepted). Returns ``(valid, full)``. ``H`` stays "clean": rows and columns of unused slots are
        zero, so the solve needs no masking."""
        p = s.ptr
        dg = torch.sub(g, s.g_prev, out=s.dG[:, p])
        if self.beta == 1.0:  # dX + dG = dF
            torch.sub(f, s.f_prev, out=s.C[:, p])
        else:
            torch.sub(x, s.x_prev, out=s.C[:, p]).add_(dg, alpha=self.beta)
        if finite is not None and not known_false(~finite):  # a NaN/Inf trial carries no secant information
            s.dG[:, p] = torch.where(finite[:, None], dg, 0.0)
            s.C[:, p] = torch.where(finite[:, None], s.C[:, p], 0.0)
        if s.full and finite is None:  # slot p was valid everywhere and stays so
            valid, full = s.valid, True
        else:
            valid = s.valid.clone()
            valid[:, p] = True if finite is None else finite
            full = s.k >= self.m and known_true(valid)  # every slot written at least once, all finite
        h = rowdot(s.dG, s.dG[:, p]).double()  # (B, m)
        if not full:
            h.mul_(valid.double())  # zero against unused slots
        s.H[:, p, :] = h
        s.H[:, :, p] = h
        return valid, full

    def _coefficients(
        self, s: AndersonState, valid: Tensor, full: bool, g: Tensor
    ) -> tuple[Tensor, Tensor, bool]:
        """``gamma: (B, m)`` from the ridge-regularised least squares on the trace-normalised Gram matrix
        (scale-free), per sample, by float64 Cholesky without host sync; unused slots get a unit diagonal
        and a zero right-hand side. A sample whose system is ill-conditioned (or fails) drops all but its newest
        difference, whose one-term fit is exact. Returns ``(gamma, valid, full)``."""
        H = s.H
        tr = torch.diagonal(H, dim1=-2, dim2=-1).sum(-1, keepdim=True).clamp_min(_TINY)  # (B, 1)
        rhs = rowdot(s.dG, g).double()
        A = H / tr.unsqueeze(-1)
        if full:  # every slot valid: the diagonal is lam (computed as below, for the same bits)
            A.diagonal(dim1=-2, dim2=-1).add_((self.lam - 1.0) + 1.0)
        else:
            vf = valid.double()
            A.diagonal(dim1=-2, dim2=-1).add_(vf.mul(self.lam - 1.0).add_(1.0))  # lam on used slots, 1 unused
            rhs.mul_(vf)
        rhs.div_(tr)
        L, info = torch.linalg.cholesky_ex(A)
        gamma = torch.cholesky_solve(rhs.unsqueeze(-1), L).squeeze(-1)
        pivots = torch.diagonal(L, dim1=-2, dim2=-1)
        if _known_well_conditioned(pivots, info, self.restart_cond):
            return gamma.to(s.dG.dtype), valid, full
        pivot = pivots.amin(-1).square()  # 1 / condition estimate
        good = (pivot * self.restart_cond > 1.0) & (info == 0)  # NaN pivots fail the test too
        if known_false(~good):
            return gamma.to(s.dG.dtype), valid, full
        gamma, valid = self._keep_newest(s, H, valid, rhs * tr, good[:, None], gamma)
        return gamma, valid, False

    def _keep_newest(
        self, s: AndersonState, H: Tensor, valid: Tensor, dGg: Tensor, good: Tensor, gamma: Tensor
    ) -> tuple[Tensor, Tensor]:
        """For the rows not ``good``, forget every difference but the newest (slot ``ptr``) and fit ``g`` with
        it alone: ``gamma_p = (dg_p . g) / ((1 + lam) ||dg_p||^2)``."""
        p = s.ptr
        newest = torch.zeros_like(valid)
        newest[:, p] = valid[:, p]
        hpp = H[:, p, p].clone()
        H.mul_(good.unsqueeze(-1))
        H[:, p, p] = torch.where(good[:, 0], H[:, p, p], hpp)
        single = torch.zeros_like(gamma)
        single[:, p] = dGg[:, p] / (hpp * (1 + self.lam)).clamp_min(_TINY)
        single = torch.where(newest, single, 0.0)
        return torch.where(good, gamma, single).to(s.dG.dtype), torch.where(good, valid, newest)


def _known_well_conditioned(pivots: Tensor, info: Tensor, restart_cond: float) -> bool:
    """True when, known on CPU, every row's Cholesky succeeded and its smallest pivot passes the restart test
    (the row-wise test below, decided by one reduction over all rows); False ("not known") elsewhere."""
    if pivots.device.type != "cpu" or torch.compiler.is_compiling():
        return False
    lo = float(pivots.amin())  # NaN fails the comparison
    return lo * lo * restart_cond > 1.0 and not bool(info.any())
