"""Limited-memory ("good") Broyden on ``g(z) = f(z) - z``, per sample, safeguarded."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import torch
from torch import Tensor

from deqgen.solvers.base import check_int
from deqgen.solvers.numerics import cast_to as _out
from deqgen.solvers.numerics import combine, known_false, rowdot
from deqgen.solvers.safeguards import Safeguarded, base_point, judge, next_trial

__all__ = ["Broyden", "BroydenState"]


@dataclasses.dataclass(frozen=True)
class BroydenState:
    """Per-row low-rank inverse Jacobian ``J^-1 ~ -I + sum_j u_j v_j^T``; tensors are batch-first.

    Attributes:
        U, V: ``(B, M, D)`` stacks of rank-one factors, ``M = min(memory, max_iter)``; slots ``[0, ptr)`` are
            in use (a skipped update leaves a zero pair).
        valid: ``(B, M)`` bool, which slots hold a pair that was actually fitted for the row.
        x_prev, g_prev: ``(B, D)`` the iterate the last step started from and its residual ``f(x) - x``.
        res_prev: ``(B,)`` ``||g_prev||``.
        Jg_prev: ``(B, D)`` the current model applied to ``g_prev`` (the last step was ``-step_size`` times it),
            kept so that ``J^-1 dg`` costs no extra pass over the history.
        t: ``(B,)`` the step length of the pending trial ``x_prev - t * Jg_prev``.
        fails: ``(B,)`` int32, trials rejected in a row (see :mod:`deqgen.solvers.safeguards`).
        ptr: slot written next (the same for every row); k: steps taken.
        clean: known that every row's pending trial is a full step after no rejection (see
            :func:`~deqgen.solvers.safeguards.next_trial`); lets the step skip the safeguard's passes.
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
    clean: bool = True


@dataclasses.dataclass(frozen=True, kw_only=True)
class Broyden(Safeguarded[BroydenState]):
    """Limited-memory Broyden's ("good") method for ``g(z) = f(z) - z = 0`` (Broyden, Math. Comp. 1965).

    Each sample keeps ``J^-1 ~ -I + U^T V`` with at most ``memory`` rank-one pairs and steps
    ``z+ = z - step_size * J^-1 g``. The first step is a Picard step. Memory is bounded by
    ``2 * B * memory * D`` elements of the working dtype (float32 for fp16/bf16 inputs), whatever ``max_iter``.

    Unlike torchdeq's Broyden:
      * when its ``memory`` pairs are all used the model restarts from ``-I`` (torchdeq's ring overwrites the
        oldest pair after using it, which breaks the newest secant condition; dropping the oldest pair first
        leaves the rest fitted to a model that no longer exists: on the Moré-Garbow-Hillstrom problems it
        solved 3 of 12 at ``memory=16`` against 10 with the restart, see ``docs/benchmarks.md``);
      * the rank-one division is guarded (``|v^T dg| > 1e-12 ||v|| ||dg||`` and finite, else the update is
        skipped), per sample;
      * it is globalised (:mod:`deqgen.solvers.safeguards`): a full step whose residual grew by more than
        ``reject_ratio`` is rejected, and so is a NaN/Inf one; the sample stays at its base, still updates its
        model with the rejected trial's secant pair (so a first step in the wrong direction teaches it the
        Jacobian's sign), and retries with a step ``shrink`` times shorter that must pass the Armijo test on
        the residual norm. An accepted full step costs nothing extra;
      * the stopping test is the loop's, per sample: it never exits above ``tol`` with status "converged".

    Also takes the shared fields of :class:`~deqgen.solvers.base.Solver` (``tol``, ``stop_mode``, ``norm``,
    ``max_iter``, ``check_every``) and the safeguard's (``reject_ratio``, ``shrink``, ``max_backtracks``, see
    :class:`~deqgen.solvers.safeguards.Safeguarded`).

    Args:
        memory: number of rank-one pairs kept (>= 1).
        step_size: ``alpha`` in ``(0, 1]``.

    Example:
        >>> import torch
        >>> from deqgen import Broyden, fixed_point
        >>> sol = fixed_point(torch.cos, torch.zeros(2, 3, dtype=torch.float64), Broyden(tol=1e-10))
        >>> bool(sol.stats.all_converged), round(float(sol.z[1, 2]), 6)
        (True, 0.739085)
    """

    memory: int = 32
    step_size: float = 1.0

    name: ClassVar[str] = "broyden"

    def __post_init__(self) -> None:
        super().__post_init__()
        check_int("Broyden", "memory", self.memory, 1)
        if not (isinstance(self.step_size, (int, float)) and 0.0 < self.step_size <= 1.0):
            raise ValueError(f"Broyden got step_size={self.step_size!r}; use 0 < step_size <= 1")

    def init(self, z: Tensor) -> BroydenState:
        B, D = z.shape
        wd = z.dtype if z.dtype == torch.float64 else torch.float32
        dev = z.device
        M = min(self.memory, self.max_iter)  # a solve makes fewer than max_iter pairs
        return BroydenState(
            U=torch.zeros(B, M, D, dtype=wd, device=dev),
            V=torch.zeros(B, M, D, dtype=wd, device=dev),
            valid=torch.zeros(B, M, dtype=torch.bool, device=dev),
            x_prev=torch.zeros(B, D, dtype=wd, device=dev),
            g_prev=torch.zeros(B, D, dtype=wd, device=dev),
            res_prev=torch.zeros(B, dtype=wd, device=dev),
            Jg_prev=torch.zeros(B, D, dtype=wd, device=dev),
            t=torch.full((B,), self.step_size, dtype=wd, device=dev),
            fails=torch.zeros(B, dtype=torch.int32, device=dev),
        )

    def step(
        self, state: BroydenState, z: Tensor, fz: Tensor, g: Tensor, res: Tensor
    ) -> tuple[Tensor, BroydenState]:
        s = state
        wd = s.U.dtype
        x, gw = _out(z, wd), _out(g, wd)
        a = self.step_size
        if s.k == 0:
            nxt = dataclasses.replace(s, x_prev=x, g_prev=gw, res_prev=res, Jg_prev=-gw, k=1)
            return _out(x + a * gw, z.dtype), nxt

        reject = judge(
            res, s.res_prev, s.t, a, s.fails, self.reject_ratio, self.max_backtracks, clean=s.clean
        )
        accepted = known_false(reject)  # CPU: no row rejected, so every trial is finite and is the new base
        finite = None if accepted else torch.isfinite(res)
        trial = (x, gw, res)
        base_x, base_g, base_res = (
            trial if accepted else base_point(reject, trial, (s.x_prev, s.g_prev, s.res_prev))
        )

        # The pairs in use are the stack U[:, :p], V[:, :p]; when it is full the model restarts from -I (as
        # scipy's broyden1 with reduction_method="restart"), which keeps every pair consistent with the model it
        # was fitted to (dropping the oldest pair leaves the others fitted to a model that no longer exists).
        # Jg_prev = M g_prev for the model M of the last trial, so M dg = M g - M g_prev costs no extra pass.
        # A rejected finite trial is a valid secant pair too: it updates the model, and the next trial starts
        # from the base (where M g_prev is the model's direction). Failed updates leave zero pairs.
        p, Mg_prev = (s.ptr, s.Jg_prev) if s.ptr < s.U.shape[1] else (0, -s.g_prev)
        U, V = s.U[:, :p], s.V[:, :p]
        dx = x - s.x_prev
        dg = gw - s.g_prev
        Jg = combine(rowdot(V, gw), U) - gw  # M g with M = -I + U^T V
        v = combine(rowdot(U, dx), V) - dx  # M^T dx
        u, ok = _rank_one(dx, dg, Jg - Mg_prev, v, finite)
        if not known_false(~ok):
            u, v = torch.where(ok[:, None], u, 0.0), torch.where(ok[:, None], v, 0.0)
        s.U[:, p] = u
        s.V[:, p] = v
        s.valid[:, p] = ok
        s.valid[:, p + 1 :] = False
        # Newton-like step from the base with the updated model: -J^-1 g = -(M g + u (v . g)).
        Jg_base = Jg if accepted else torch.where(reject[:, None], Mg_prev, Jg)
        Jg_new = torch.addcmul(Jg_base, u, (v * base_g).sum(-1, keepdim=True))
        t, fails, clean = next_trial(s.t, s.fails, reject, accepted, s.clean, a, self.shrink)
        x_next = base_x - a * Jg_new if accepted else base_x - t[:, None] * Jg_new
        nxt = dataclasses.replace(
            s,
            x_prev=base_x,
            g_prev=base_g,
            res_prev=base_res,
            Jg_prev=Jg_new,
            t=t,
            fails=fails,
            ptr=p + 1,
            k=s.k + 1,
            clean=clean,
        )
        return _out(x_next, z.dtype), nxt


def _rank_one(dx: Tensor, dg: Tensor, Jdg: Tensor, v: Tensor, finite: Tensor | None) -> tuple[Tensor, Tensor]:
    """The good-Broyden factor ``u = (dx - M dg) / (v . dg)``, ``(B, D)``, and ``ok: (B,)``: the trial was
    finite (``finite`` None: known for every row) and ``|v . dg| > 1e-12 ||v|| ||dg||`` (a guarded
    division)."""
    denom = (v * dg).sum(-1)
    scale = torch.linalg.vector_norm(v, dim=-1) * torch.linalg.vector_norm(dg, dim=-1)
    ok = (denom.abs() > 1e-12 * scale) & torch.isfinite(denom)
    if finite is not None:
        ok = ok & finite
    u = (dx - Jdg) / torch.where(ok, denom, 1.0)[:, None]
    return u, ok & torch.isfinite(u).all(-1)
