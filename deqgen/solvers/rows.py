"""The per-row bookkeeping of :func:`~deqgen.solvers.base.run`: the working set, each row's best iterate,
and the full-batch outputs that finished rows are written into.

Every tensor here is batch-first. Nothing synchronises with an accelerator except through
:func:`~deqgen.solvers.numerics.known_true`, which answers only on CPU.
"""

from __future__ import annotations

import dataclasses
import math

import torch
from torch import Tensor

from deqgen.solvers.numerics import known_true
from deqgen.stats import SolverStats, Status

__all__ = ["Outputs", "Rows", "survives", "trace_row", "track_best"]


@dataclasses.dataclass
class Rows:
    """The working set: the ``n <= B`` rows still in the loop, each field batch-first.

    ``best_*`` hold each row's best evaluated iterate (see :func:`~deqgen.solvers.base.run`); ``best_z`` may
    alias ``z``. ``nfe`` and ``live`` are per row only in masked mode (finished rows wait, frozen, for the
    next host check); otherwise every working row is live and has made ``k + 1`` evaluations, ``nfe`` is
    None and ``live`` is set anew each iteration. ``streak`` None: no row has a non-finite streak.
    """

    orig: Tensor  # (n,) original row index
    z: Tensor  # (n, D)
    best_z: Tensor  # (n, D)
    best_abs: Tensor  # (n,)
    best_rel: Tensor  # (n,)
    start_abs: Tensor  # (n,) absolute residual of z0
    streak: Tensor | None  # (n,) consecutive non-finite evaluations
    nfe: Tensor | None  # (n,)
    live: Tensor  # (n,) bool

    @classmethod
    def start(cls, z: Tensor, rdtype: torch.dtype, masked: bool) -> Rows:
        """Every row of ``z: (B, D)`` working, no best iterate yet, residuals kept in ``rdtype``; ``masked``:
        finished rows wait for the host check (``check_every > 1``)."""
        B, dev = z.shape[0], z.device
        inf = torch.full((B,), math.inf, dtype=rdtype, device=dev)
        return cls(
            orig=torch.arange(B, device=dev),
            z=z,
            best_z=z,
            best_abs=inf,
            best_rel=inf.clone(),
            start_abs=inf.clone(),
            streak=None,
            nfe=torch.zeros(B, dtype=torch.int64, device=dev) if masked else None,
            live=torch.ones(B, dtype=torch.bool, device=dev),
        )

    def take(self, keep: Tensor) -> Rows:
        """The rows ``keep: (n',)`` (indices into the working set)."""

        def pick(t: Tensor) -> Tensor:
            return t.index_select(0, keep)  # on CPU several times faster than t[keep], the same rows

        masked = (
            self.nfe is not None
        )  # only masked mode keeps per-row counts and live masks across iterations
        z = pick(self.z)
        return Rows(
            orig=pick(self.orig),
            z=z,
            best_z=z if self.best_z is self.z else pick(self.best_z),
            best_abs=pick(self.best_abs),
            best_rel=pick(self.best_rel),
            start_abs=pick(self.start_abs),
            streak=None if self.streak is None else pick(self.streak),
            nfe=pick(self.nfe) if masked else None,
            live=pick(self.live) if masked else self.live,  # unmasked: replaced before it is read
        )


class Outputs:
    """The full-batch results, ``(B, ...)`` each, assembled from the rows as they finish.

    Finished rows are collected as they are written and scattered into the buffers once, by :meth:`finish`:
    one scatter per buffer per solve instead of one per host check that retires rows.
    """

    def __init__(self, z: Tensor, res_dtype: torch.dtype) -> None:
        self.template, self.res_dtype = z, res_dtype
        self.parts: list[tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor | int]] = []

    def write(
        self, at: Tensor, z: Tensor, abs_: Tensor, rel: Tensor, status: Tensor, nfe: Tensor | int
    ) -> None:
        """Rows ``at: (n,)`` of every buffer; ``nfe`` one count for all of them or ``(n,)``."""
        self.parts.append((at, z, abs_, rel, status, nfe))

    def finish(
        self, iterations: int, rows_evaluated: int, traces: list[tuple[Tensor, Tensor]]
    ) -> tuple[Tensor, SolverStats]:
        """The returned iterates ``(B, D)`` and the per-sample statistics of the finished solve; ``traces`` (one
        ``(abs, rel)`` pair of ``(B,)`` rows per iteration) are stacked into ``(K, B)`` traces when recorded.
        A row never written (the loop writes every row) would keep NaN residuals, status MAX_ITER and nfe 0."""
        B, dev = self.template.shape[0], self.template.device
        z = torch.empty_like(self.template)
        abs_ = torch.full((B,), math.nan, dtype=self.res_dtype, device=dev)
        rel = torch.full((B,), math.nan, dtype=self.res_dtype, device=dev)
        status = torch.full((B,), int(Status.MAX_ITER), dtype=torch.int8, device=dev)
        nfe = torch.zeros(B, dtype=torch.int64, device=dev)
        if self.parts:
            at = torch.cat([p[0] for p in self.parts])
            z.index_copy_(0, at, torch.cat([p[1] for p in self.parts]))
            abs_.index_copy_(0, at, torch.cat([p[2] for p in self.parts]))
            rel.index_copy_(0, at, torch.cat([p[3] for p in self.parts]))
            status.index_copy_(0, at, torch.cat([p[4] for p in self.parts]).to(torch.int8))
            if all(isinstance(p[5], int) for p in self.parts):  # one count per write: build them on the host
                counts = torch.tensor([p[5] for p in self.parts for _ in range(p[0].numel())], device=dev)
            else:
                counts = torch.cat(
                    [torch.as_tensor(p[5], device=dev).expand(p[0].numel()) for p in self.parts]
                )
            nfe.index_copy_(0, at, counts.to(torch.int64))
        stats = SolverStats(
            status=status,
            nfe=nfe,
            abs_residual=abs_,
            rel_residual=rel,
            iterations=iterations,
            rows_evaluated=rows_evaluated,
            abs_trace=torch.stack([t[0] for t in traces]) if traces else None,
            rel_trace=torch.stack([t[1] for t in traces]) if traces else None,
        )
        return z, stats


def track_best(
    rows: Rows,
    k: int,
    res_abs: Tensor,
    res_rel: Tensor,
    finite: Tensor | None,
    converged: Tensor,
    rel: bool,
    masked: bool,
) -> None:
    """Keep each row's best iterate (see :func:`~deqgen.solvers.base.run`); the start and a converged iterate
    always count. When every row improved (known for free on CPU) the best iterate aliases the current one.
    ``finite`` None: every residual is known to be finite."""
    if k == 0:
        if finite is None:
            rows.start_abs, improved = res_abs, torch.ones_like(converged)
        else:
            rows.start_abs, improved = torch.where(finite, res_abs, math.inf), finite
    elif rel:  # lowest rel among iterates no worse than the start in abs: rel alone is scale-dependent
        improved = converged | ((res_rel < rows.best_rel) & (res_abs <= rows.start_abs))
    else:
        improved = res_abs < rows.best_abs  # NaN never counts as lower
    if masked:
        improved = improved & rows.live
    elif known_true(improved):
        rows.best_abs, rows.best_rel, rows.best_z = res_abs, res_rel, rows.z
        return
    rows.best_abs = torch.where(improved, res_abs, rows.best_abs)
    rows.best_rel = torch.where(improved, res_rel, rows.best_rel)
    rows.best_z = torch.where(improved[:, None], rows.z, rows.best_z)


def survives(rows: Rows, finite: Tensor | None, k: int, retries: int) -> Tensor | None:
    """``(n,)`` bool: the row may go on, or None: every row may. A non-finite residual ends a row unless the
    solver backs off from it (at most ``retries`` times in a row, never at the start, where there is nothing to
    go back to). ``finite`` None: every residual is known to be finite."""
    if finite is None:
        rows.streak = None  # every streak is broken
        return None
    if retries == 0 or k == 0:
        return finite
    if rows.streak is None:
        rows.streak = torch.zeros_like(finite, dtype=torch.int32)
    rows.streak = torch.where(finite, 0, rows.streak + 1)
    return finite | (rows.streak <= retries)


def trace_row(
    res_abs: Tensor, res_rel: Tensor, live: Tensor | None, orig: Tensor, B: int
) -> tuple[Tensor, Tensor]:
    """One iteration's ``(B,)`` traces: the working rows' residuals at ``orig``, NaN where not evaluated."""
    if live is not None:
        res_abs = torch.where(live, res_abs, math.nan)
        res_rel = torch.where(live, res_rel, math.nan)
    full_abs = torch.full((B,), math.nan, dtype=res_abs.dtype, device=res_abs.device)
    full_rel = full_abs.clone()
    return full_abs.index_copy_(0, orig, res_abs), full_rel.index_copy_(0, orig, res_rel)
