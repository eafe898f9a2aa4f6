"""Results of a solve: the frozen :class:`Solution` and its per-sample :class:`SolverStats`."""

from __future__ import annotations

import enum
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["Status", "SolverStats", "Solution", "SolverError"]


class Status(enum.IntEnum):
    """Per-sample outcome of a solve, stored as ``int8`` in :attr:`SolverStats.status`."""

    CONVERGED = 0
    """The returned iterate meets the stop rule: its stop-mode residual is ``<= tol`` (or, in rel mode with
    ``atol > 0``, its absolute residual is ``<= atol``)."""
    MAX_ITER = 1
    """``max_iter`` evaluations were spent above ``tol``; the returned iterate is the best one seen (see
    :func:`~deqgen.solvers.run` for what "best" means per stop mode; never worse than ``z0`` in the absolute
    residual)."""
    NON_FINITE = 2
    """``f`` returned NaN/Inf for this sample (or its residual's norm exceeded the dtype's range); it was frozen
    and the best finite iterate is returned."""
    BUDGET = 3
    """Fixed-budget mode (``tol=None``): exactly ``max_iter`` evaluations, no convergence test."""

    @property
    def message(self) -> str:
        """A readable explanation of this status, with a hint about what to change when it is a failure."""
        return _MESSAGES[self]


_MESSAGES = {
    Status.CONVERGED: "converged: residual <= tol",
    Status.MAX_ITER: (
        "did not converge within max_iter evaluations; the lowest-residual iterate seen is returned. "
        "Raise max_iter, loosen tol, or try Anderson/Broyden"
    ),
    Status.NON_FINITE: (
        "f returned NaN or Inf (or the residual's norm overflowed); the sample was frozen and its best finite "
        "iterate is returned. "
        "Check f for divergence (is it a contraction?) or lower the step size (damping)"
    ),
    Status.BUDGET: "ran the fixed budget of max_iter evaluations; no convergence test was made",
}


class SolverError(RuntimeError):
    """Raised by ``throw=True`` (or :meth:`Solution.raise_for_status`) when a sample did not converge."""


@dataclass(frozen=True)
class SolverStats:
    """Honest per-sample statistics of one solve.

    Residuals are measured on the returned iterate ``z``: ``abs = ||f(z) - z||`` and
    ``rel = ||f(z) - z|| / ||f(z)||`` with the solver's norm over all non-batch dims. In fixed-budget mode the
    returned iterate is the step after the last evaluated one and the residuals are those of the last evaluated
    iterate.

    Attributes:
        status: ``(B,)`` int8, a :class:`Status` per sample.
        nfe: ``(B,)`` int64, evaluations of ``f`` this sample went through before it stopped (its own cost).
        abs_residual: ``(B,)`` float32/64, absolute residual of the returned iterate.
        rel_residual: ``(B,)`` float32/64, relative residual of the returned iterate.
        abs_trace: ``(K, B)`` absolute residual at each evaluation ``k``, NaN after the sample stopped;
            None unless the solve asked for traces. ``K`` = iterations run.
        rel_trace: ``(K, B)`` the same for the relative residual.
        iterations: loop iterations run (calls of ``f``), a host int.
        rows_evaluated: total rows passed through ``f``; ``rows_evaluated / B`` is the effective NFE of the
            batch. Lower than ``iterations * B`` when frozen rows were skipped (separable problems).
    """

    status: Tensor
    nfe: Tensor
    abs_residual: Tensor
    rel_residual: Tensor
    iterations: int
    rows_evaluated: int
    abs_trace: Tensor | None = None
    rel_trace: Tensor | None = None

    @property
    def converged(self) -> Tensor:
        """``(B,)`` bool, True where the sample converged."""
        return self.status == Status.CONVERGED

    @property
    def all_converged(self) -> bool:
        """True when every sample converged (a host sync)."""
        return bool(self.converged.all())

    def summary(self) -> str:
        """One line: counts per status, NFE range and worst residual."""
        counts = {s.name.lower(): int((self.status == s).sum()) for s in Status}
        counts_txt = ", ".join(f"{name} {n}" for name, n in counts.items() if n)
        return (
            f"{counts_txt}; nfe {int(self.nfe.min())}..{int(self.nfe.max())}; "
            f"max abs residual {float(self.abs_residual.max()):.3g}, max rel residual "
            f"{float(self.rel_residual.max()):.3g}; rows evaluated / B = "
            f"{self.rows_evaluated / max(1, self.status.numel()):.2f}"
        )


@dataclass(frozen=True)
class Solution:
    """The result of a solve: the fixed point ``z`` ``(B, *S)`` and its :class:`SolverStats`."""

    z: Tensor
    stats: SolverStats

    def raise_for_status(self, allow: tuple[Status, ...] = (Status.CONVERGED, Status.BUDGET)) -> Solution:
        """Raise :class:`SolverError` naming each failed sample, or return ``self``."""
        status = self.stats.status
        bad = ~torch.isin(
            status, torch.tensor([int(s) for s in allow], dtype=status.dtype, device=status.device)
        )
        if bool(bad.any()):
            rows = bad.nonzero().flatten().tolist()
            lines = [
                f"  sample {r}: {Status(int(self.stats.status[r])).message} "
                f"(nfe {int(self.stats.nfe[r])}, abs {float(self.stats.abs_residual[r]):.3g}, "
                f"rel {float(self.stats.rel_residual[r]):.3g})"
                for r in rows[:10]
            ]
            more = f"\n  ... and {len(rows) - 10} more" if len(rows) > 10 else ""
            raise SolverError(f"{len(rows)} of {bad.numel()} samples failed:\n" + "\n".join(lines) + more)
        return self
