"""Limited-memory ("good") Broyden on ``g(z) = f(z) - z``, per sample, safeguarded."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import torch
from torch import Tensor

from deqgen.solvers.base import Solver, check_int
from deqgen.solvers.numerics import cast_to as _out
from deqgen.solvers.numerics import combine, known_false, rowdot
from deqgen.solvers.safeguards import judge, next_length

__all__ = ["Broyden", "BroydenState"]


@dataclasses.dataclass(frozen=True)
class BroydenState:
    """Per-row low-rank inverse Jacobian ``J^-1 ~ -I + sum_j u_j v_j^T``; tensors are batch-first.

    Attributes:
        U, V: ``(B, M, D)`` rings of rank-one factors, ``M`` = ``memory``.
        valid: ``(B, M)`` bool, which slots are part of the row's approximation.
        x_prev, g_prev: ``(B, D)`` the iterate the last step started from and its residual ``f(x) - x``.
        res_prev: ``(B,)`` ``||g_prev||``.
        Jg_prev: ``(B, D)`` the current model applied to ``g_prev`` (the last step was ``-step_size`` times it),
            kept so that ``J^-1 dg`` costs no extra pass over the history.
        t: ``(B,)`` the step length of the pending trial ``x_prev - t * Jg_prev``.
        fails: ``(B,)`` int32, trials rejected in a row (see :mod:`deqgen.solvers.safeguards`).
        ptr: ring slot written next (the same for every row); k: steps taken.
    """

    U: Tensor
    V: Tensor
    valid: Tensor
    x_prev: Tensor
    g_prev: Tensor
    res_prev: Tensor
    Jg_prev: Tensor
    t: Tensor
    fails: Tensor
    ptr: int = 0
    k: int = 0


@dataclasses.dataclass(frozen=True, kw_only=True)
class Broyden(Solver[BroydenState]):
    """Limited-memory Broyden's ("good") method for ``g(z) = f(z) - z = 0`` (Broyden, Math. Comp. 1965).

    Each sample keeps ``J^-1 ~ -I + U^T V`` with at most ``memory`` rank-one pairs and steps
    ``z+ = z - step_size * J^-1 g``. The first step is a Picard step. Memory is bounded by
    ``2 * B * memory * D`` elements of the working dtype (float32 for fp16/bf16 inputs), whatever ``max_iter``.

    Unlike torchdeq's Broyden:
      * when the ring is full the oldest pair is dropped *before* the new pair is computed, so the newest
        secant condition ``J^-1 dg = dz`` holds exactly;
      * the rank-one division is guarded (``|v^T dg| > 1e-12 ||v|| ||dg||`` and finite, else the update is
        skipped), per sample;
      * it is globalised (:mod:`deqgen.solvers.safeguards`): a full step whose residual grew by more than
        ``reject_ratio`` is rejected, and so is a NaN/Inf one; the sample stays at its base, still updates its
        model with the rejected trial's secant pair (so a first step in the wrong direction teaches it the
        Jacobian's sign), and retries with a step ``shrink`` times shorter that must pass the Armijo test on
        the residual norm. An accepted full step costs nothing extra;
      * the stopping test is the loop's, per sample: it never exits above ``tol`` with status "converged".

    Also takes the shared fields of :class:`~deqgen.solvers.base.Solver` (``tol``, ``stop_mode``, ``norm``,
    ``max_iter``, ``check_every``).

    Args:
        memory: number of rank-one pairs kept (>= 1).
        step_size: ``alpha`` in ``(0, 1]``.
        reject_ratio: reject a full step whose residual is above ``reject_ratio`` times the base's.
        shrink: factor in ``(0, 1)`` applied to the step length after each rejected trial.
        max_backtracks: rejected trials in a row before a finite one is accepted anyway; also how many
            NaN/Inf evaluations in a row a sample survives before it is frozen as non-finite.

    Example:
        >>> import torch
        >>> from deqgen import Broyden, fixed_point
        >>> sol = fixed_point(torch.cos, torch.zeros(2, 3, dtype=torch.float64), Broyden(tol=1e-10))
        >>> bool(sol.stats.all_converged), round(float(sol.z[1, 2]), 6)
        (True, 0.739085)
    """

    memory: int = 16
    step_size: float = 1.0
    reject_ratio: float = 2.0
    shrink: float = 0.5
    max_backtracks: int = 8

    name: ClassVar[str] = "broyden"

    def __post_init__(self) -> None:
        super().__post_init__()
        check_int("Broyden", "memory", self.memory, 1)
        if not (isinstance(self.step_size, (int, float)) and 0.0 < self.step_size <= 1.0):
            raise ValueError(f"Broyden got step_size={self.step_size!r}; use 0 < step_size <= 1")
        if not (isinstance(self.reject_ratio, (int, float)) and self.reject_ratio >= 1):
            raise ValueError(f"Broyden got reject_ratio={self.reject_ratio!r}; use a number >= 1 (inf disables it)")
        if not (isinstance(self.shrink, (int, float)) and 0.0 < self.shrink < 1.0):
            raise ValueError(f"Broyden got shrink={self.shrink!r}; use 0 < shrink < 1")
        check_int("Broyden", "max_backtracks", self.max_backtracks, 0)

    def init(self, z: Tensor) -> BroydenState:
        B, D = z.shape
        wd = z.dtype if z.dtype == torch.float64 else torch.float32
        dev = z.device
        return BroydenState(
            U=torch.zeros(B, self.memory, D, dtype=wd, device=dev),
            V=torch.zeros(B, self.memory, D, dtype=wd, device=dev),
            valid=torch.zeros(B, self.memory, dtype=torch.bool, device=dev),
            x_prev=torch.zeros(B, D, dtype=wd, device=dev),
            g_prev=torch.zeros(B, D, dtype=wd, device=dev),
            res_prev=torch.zeros(B, dtype=wd, device=dev),
            Jg_prev=torch.zeros(B, D, dtype=wd, device=dev),
            t=torch.full((B,), self.step_size, dtype=wd, device=dev),
            fails=torch.zeros(B, dtype=torch.int32, device=dev),
        )

    @property
    def non_finite_retries(self) -> int:
        """A NaN/Inf trial is retried with a shorter step up to ``max_backtracks`` times in a row."""
        return self.max_backtracks

    def step(self, state: BroydenState, z: Tensor, fz: Tensor, g: Tensor, res: Tensor) -> tuple[Tensor, BroydenState]:
        s = state
        wd = s.U.dtype
        x, gw = _out(z, wd), _out(g, wd)
        a = self.step_size
        if s.k == 0:
            nxt = dataclasses.replace(s, x_prev=x, g_prev=gw, res_prev=res, Jg_prev=-gw, k=1)
            return _out(x + a * gw, z.dtype), nxt

        finite, reject = judge(res, s.res_prev, s.t, a, s.fails, self.reject_ratio, self.max_backtracks)
        rej_col = reject[:, None]
        if known_false(reject):
            base_x, base_g, base_res = x, gw, res
        else:
            base_x = torch.where(rej_col, s.x_prev, x)
            base_g = torch.where(rej_col, s.g_prev, gw)
            base_res = torch.where(reject, s.res_prev, res)

        # Drop the oldest pair first, then fit the new one to the remaining model M'. With M the model of the
        # last step, M' g_prev = M g_prev - u_p (v_p . g_prev) for the dropped pair p, and M g_prev was kept,
        # so M' dg = M' g - M' g_prev costs no pass over the history: 4 batched passes per step, not 6.
        # A rejected finite trial is a valid secant pair too: it updates the model, and the next trial starts
        # from the base (where M' g_prev is the model's direction).
        p = s.ptr
        valid = s.valid.clone()
        dropped = valid[:, p : p + 1].to(wd) * (s.V[:, p] * s.g_prev).sum(-1, keepdim=True)
        Mg_prev = s.Jg_prev - s.U[:, p] * dropped
        valid[:, p] = False
        dx = x - s.x_prev
        dg = gw - s.g_prev
        # M' = -I + U^T diag(valid) V applied to g, and its transpose to dx (valid pairs only).
        Jg = combine(rowdot(s.V, gw) * valid, s.U) - gw
        Jdg = Jg - Mg_prev
        v = combine(rowdot(s.U, dx) * valid, s.V) - dx  # M'^T dx
        denom = (v * dg).sum(-1)
        scale = torch.linalg.vector_norm(v, dim=-1) * torch.linalg.vector_norm(dg, dim=-1)
        ok = (denom.abs() > 1e-12 * scale) & torch.isfinite(denom) & finite
        u = (dx - Jdg) / torch.where(ok, denom, 1.0)[:, None]
        ok = ok & torch.isfinite(u).all(-1)
        s.U[:, p] = torch.where(ok[:, None], u, 0.0)
        s.V[:, p] = torch.where(ok[:, None], v, 0.0)
        valid[:, p] = ok
        # Newton-like step from the base with the updated model: -J^-1 g = -(M' g + u (v . g)).
        Jg_base = Jg if known_false(reject) else torch.where(rej_col, Mg_prev, Jg)
        vg = (s.V[:, p] * base_g).sum(-1, keepdim=True)
        Jg_new = Jg_base + s.U[:, p] * vg
        t = next_length(s.t, reject, a, self.shrink)
        x_next = base_x - t[:, None] * Jg_new if not known_false(reject) else base_x - a * Jg_new
        nxt = dataclasses.replace(
            s,
            valid=valid,
            x_prev=base_x,
            g_prev=base_g,
            res_prev=base_res,
            Jg_prev=Jg_new,
            t=t,
            fails=torch.where(reject, s.fails + 1, 0),
            ptr=(p + 1) % self.memory,
            k=s.k + 1,
        )
        return _out(x_next, z.dtype), nxt

