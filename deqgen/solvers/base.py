"""The solver interface and :func:`run`, the only iteration loop in deqgen.

A solver is a frozen object with typed fields and two methods, ``init`` and ``step``. It has no loop, no
stopping test, no best-iterate tracking and no autograd: :func:`run` does all of that once, for every solver.

``run`` works on flattened samples ``z: (B, D)``. Each iteration it evaluates ``f`` on the rows that are still
active, measures each row's residual, records the best iterate of each row, and freezes rows that converged or
went non-finite. Frozen rows are removed from the working set (compacted) at the next host check, so they stop
costing solver work, and, for a separable problem, evaluations of ``f`` too. Because every solver's state is
batch-first and per-row, a row's trajectory does not depend on the other rows in its batch.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from abc import ABC, abstractmethod
from typing import Any, ClassVar, Generic, Literal, TypeVar

import torch
from torch import Tensor

from deqgen.problem import FixedPointProblem
from deqgen.stats import Solution, SolverError, SolverStats, Status

__all__ = ["Solver", "run", "take_rows"]

logger = logging.getLogger(__name__)

StateT = TypeVar("StateT")
StopMode = Literal["abs", "rel"]
NormName = Literal["l2", "inf"]


@dataclasses.dataclass(frozen=True, kw_only=True)
class Solver(ABC, Generic[StateT]):
    """Fields shared by every solver.

    Args:
        tol: stop a sample once its stop-mode residual is ``<= tol``. ``None`` selects the fixed-budget mode:
            exactly ``max_iter`` evaluations, no convergence test and no host synchronisation (inference at a
            known budget, e.g. VIAR's per-scale iteration counts).
        stop_mode: ``"rel"`` tests ``||f(z) - z|| / ||f(z)||``, ``"abs"`` tests ``||f(z) - z||``.
        norm: ``"l2"`` or ``"inf"``, taken per sample over all non-batch dims.
        max_iter: the most evaluations of ``f`` per sample.
        check_every: look at the host (one synchronisation) every this many iterations to drop finished rows
            and stop early. Rows still freeze on the device at the exact iteration they finish, so results and
            statistics do not depend on it; only the work spent on finished rows between checks does.
    """

    tol: float | None = 1e-4
    stop_mode: StopMode = "rel"
    norm: NormName = "l2"
    max_iter: int = 50
    check_every: int = 1

    name: ClassVar[str] = "solver"

    def __post_init__(self) -> None:
        cls = type(self).__name__
        if self.tol is not None and (isinstance(self.tol, bool) or not isinstance(self.tol, (int, float))):
            raise TypeError(f"{cls} got tol={self.tol!r}; use a positive float, or None for a fixed budget")
        if self.tol is not None and not (self.tol > 0 and math.isfinite(self.tol)):
            raise ValueError(f"{cls} got tol={self.tol!r}; use a positive finite float, or None for a fixed budget")
        if self.stop_mode not in ("abs", "rel"):
            raise ValueError(f"{cls} got stop_mode={self.stop_mode!r}; use 'abs' or 'rel'")
        if self.norm not in ("l2", "inf"):
            raise ValueError(f"{cls} got norm={self.norm!r}; use 'l2' or 'inf'")
        check_int(cls, "max_iter", self.max_iter, 1)
        check_int(cls, "check_every", self.check_every, 1)

    @abstractmethod
    def init(self, z: Tensor) -> StateT:
        """Allocate the solver state for flattened samples ``z: (B, D)``.

        Every tensor field of the state must be batch-first (``(B, ...)``) so that :func:`take_rows` can drop
        finished rows.
        """

    @abstractmethod
    def step(self, state: StateT, z: Tensor, fz: Tensor, g: Tensor, res: Tensor) -> tuple[Tensor, StateT]:
        """One update.

        Args:
            state: from ``init`` or the previous ``step``, restricted to the active rows.
            z: ``(B, D)`` the current iterates.
            fz: ``(B, D)`` ``f(z)``.
            g: ``(B, D)`` the residual vector ``f(z) - z``.
            res: ``(B,)`` ``||g||`` in the solver's norm (float32 or wider).

        Returns:
            ``(z_next, state)`` with ``z_next: (B, D)`` in ``z``'s dtype.
        """


def check_int(cls: str, field: str, value: Any, low: int) -> None:
    """Raise naming ``cls.field`` unless ``value`` is an int (not a bool) ``>= low``."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{cls} got {field}={value!r}; use an integer >= {low}")
    if value < low:
        raise ValueError(f"{cls} got {field}={value!r}; use an integer >= {low}")


def take_rows(state: StateT, keep: Tensor) -> StateT:
    """Restrict a dataclass state to the rows ``keep`` (every tensor field is batch-first)."""
    if state is None:
        return state
    changes = {
        f.name: getattr(state, f.name)[keep]
        for f in dataclasses.fields(state)  # type: ignore[arg-type]
        if isinstance(getattr(state, f.name), Tensor)
    }
    return dataclasses.replace(state, **changes)  # type: ignore[type-var]


def _residual_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


class _Outputs:
    """Full-batch buffers that finished rows are written into."""

    def __init__(self, z: Tensor, res_dtype: torch.dtype) -> None:
        B = z.shape[0]
        self.z = torch.empty_like(z)
        self.abs = torch.full((B,), math.nan, dtype=res_dtype, device=z.device)
        self.rel = torch.full((B,), math.nan, dtype=res_dtype, device=z.device)
        self.status = torch.full((B,), int(Status.MAX_ITER), dtype=torch.int8, device=z.device)
        self.nfe = torch.zeros(B, dtype=torch.int64, device=z.device)

    def write(self, at: Tensor, z: Tensor, abs_: Tensor, rel: Tensor, status: Tensor, nfe: Tensor | int) -> None:
        self.z.index_copy_(0, at, z)
        self.abs.index_copy_(0, at, abs_)
        self.rel.index_copy_(0, at, rel)
        self.status.index_copy_(0, at, status.to(torch.int8))
        if isinstance(nfe, int):
            self.nfe.index_fill_(0, at, nfe)
        else:
            self.nfe.index_copy_(0, at, nfe)

    def stats(self, iterations: int, rows_evaluated: int, traces: list[tuple[Tensor, Tensor]]) -> SolverStats:
        return SolverStats(
            status=self.status,
            nfe=self.nfe,
            abs_residual=self.abs,
            rel_residual=self.rel,
            iterations=iterations,
            rows_evaluated=rows_evaluated,
            abs_trace=torch.stack([t[0] for t in traces]) if traces else None,
            rel_trace=torch.stack([t[1] for t in traces]) if traces else None,
        )


def run(
    problem: FixedPointProblem, solver: Solver[Any], *, trace: bool = False, throw: bool = False
) -> Solution:
    """Drive ``solver`` on ``problem``: the single iteration loop behind every solve.

    Args:
        problem: the map, start point ``z0: (B, *S)`` and injection.
        solver: a :class:`Solver`; its fields set tolerance, stop mode, norm and budget.
        trace: also return the per-iteration residual traces ``(K, B)``.
        throw: raise :class:`~deqgen.stats.SolverError` when a sample ends with status MAX_ITER or NON_FINITE.

    Returns:
        A :class:`~deqgen.stats.Solution` with ``z: (B, *S)`` in ``z0``'s dtype and per-sample stats. With a
        tolerance, each sample's ``z`` is its lowest-residual iterate (the converged one when it converged).

    The loop runs under ``torch.no_grad()``: gradients are the business of deqgen's gradient methods.
    """
    if not isinstance(problem, FixedPointProblem):
        raise TypeError(f"run() needs a FixedPointProblem, got {type(problem).__name__}")
    if not isinstance(solver, Solver):
        raise TypeError(f"run() needs a deqgen Solver (Picard, Anderson, Broyden), got {type(solver).__name__}")
    with torch.no_grad():
        solution = _run(problem, solver, trace)
    if throw:
        solution.raise_for_status()
    return solution


@dataclasses.dataclass
class _Rows:
    """The working set: the ``n <= B`` rows still in the loop, each field batch-first.

    ``best_*`` hold each row's lowest-residual evaluated iterate; ``best_z`` may alias ``z``. ``nfe`` and
    ``live`` are per row only in masked mode (finished rows wait, frozen, for the next host check); otherwise
    every working row is live and has made ``k + 1`` evaluations.
    """

    orig: Tensor  # (n,) original row index
    z: Tensor  # (n, D)
    best_z: Tensor  # (n, D)
    best_abs: Tensor  # (n,)
    best_rel: Tensor  # (n,)
    nfe: Tensor  # (n,)
    live: Tensor  # (n,) bool

    def take(self, keep: Tensor) -> _Rows:
        z = self.z[keep]
        best_z = z if self.best_z is self.z else self.best_z[keep]
        return _Rows(
            self.orig[keep], z, best_z, self.best_abs[keep], self.best_rel[keep], self.nfe[keep], self.live[keep]
        )


def _run(problem: FixedPointProblem, solver: Solver[Any], want_trace: bool) -> Solution:
    z0 = problem.z0.detach()
    B, S = problem.batch_size, problem.sample_shape
    rdtype = _residual_dtype(z0.dtype)
    fixed, rel = solver.tol is None, solver.stop_mode == "rel"
    # Between host checks, finished rows are frozen on the device by a mask (and nfe is counted per row).
    # With a check every iteration they are dropped before the next step: no mask, and nfe = k + 1.
    masked = fixed or solver.check_every > 1
    ord_ = 2.0 if solver.norm == "l2" else math.inf

    z = z0.reshape(B, -1)
    dev = z.device
    inf = torch.full((B,), math.inf, dtype=rdtype, device=dev)
    rows = _Rows(
        torch.arange(B, device=dev), z, z, inf, inf.clone(),
        torch.zeros(B, dtype=torch.int64, device=dev), torch.ones(B, dtype=torch.bool, device=dev),
    )
    x_rows = problem.x
    z_full = None if problem.separable else z.clone()
    state = solver.init(z)
    out = _Outputs(z, rdtype)
    traces: list[tuple[Tensor, Tensor]] = []
    rows_evaluated = iterations = 0
    all_done = False

    for k in range(solver.max_iter):
        n = rows.z.shape[0]
        fz = _evaluate(problem, rows.z, k, rows.orig, n < B, x_rows, z_full, S)
        rows_evaluated += n if problem.separable else B
        iterations = k + 1
        g = fz - rows.z
        res_abs = torch.linalg.vector_norm(g, ord=ord_, dim=1, dtype=rdtype)
        res_rel = res_abs / torch.linalg.vector_norm(fz, ord=ord_, dim=1, dtype=rdtype).clamp_min(
            torch.finfo(rdtype).tiny
        )
        res = res_rel if rel else res_abs
        if want_trace:
            traces.append(_trace_row(res_abs, res_rel, rows.live if masked else None, rows.orig, B))
        if masked:
            rows.nfe += rows.live
        if fixed:  # no test, no host sync: only non-finite rows are frozen
            rows.best_abs = torch.where(rows.live, res_abs, rows.best_abs)
            rows.best_rel = torch.where(rows.live, res_rel, rows.best_rel)
            rows.live = rows.live & torch.isfinite(res_abs)
        else:
            _track_best(rows, res, res_abs, res_rel, rel, masked)
            # False once converged or f returned NaN/Inf. Finiteness is judged on the abs residual: the rel one
            # is +inf for a finite f(z) = 0 (z != 0), which is no reason to stop.
            running = (res > solver.tol) & torch.isfinite(res_abs)
            rows.live = (rows.live & running) if masked else running
            if (k + 1) % solver.check_every == 0 or k + 1 == solver.max_iter:
                live_host = rows.live.cpu()  # the host check: the only synchronisation of the iteration
                done_host = (~live_host).nonzero().squeeze(1)
                if done_host.numel():
                    done = done_host.to(dev, non_blocking=True)
                    _retire(out, rows, done, solver.tol, rel, None if masked else k + 1)
                    if done_host.numel() == n:
                        all_done = True
                        break
                    if z_full is not None:  # f sees all B rows: the frozen ones keep their last values
                        z_full.index_copy_(0, rows.orig[done], rows.z[done])
                    keep = live_host.nonzero().squeeze(1).to(dev, non_blocking=True)
                    rows = rows.take(keep)
                    fz, g, res_abs = fz[keep], g[keep], res_abs[keep]
                    state = take_rows(state, keep)
                    if problem.separable and isinstance(problem.x, Tensor):
                        x_rows = problem.x[rows.orig]
            if k + 1 == solver.max_iter:
                break  # no step after the last evaluation: the best evaluated iterate is returned
        z_next, state = solver.step(state, rows.z, fz, g, res_abs)
        rows.z = torch.where(rows.live[:, None], z_next, rows.z) if masked else z_next

    if fixed:
        status = torch.where(rows.live, int(Status.BUDGET), int(Status.NON_FINITE))
        out.write(rows.orig, rows.z, rows.best_abs, rows.best_rel, status, rows.nfe)
    elif not all_done:  # the last check dropped every finished row: the rest ran out of iterations
        status = torch.full_like(rows.orig, int(Status.MAX_ITER))
        out.write(rows.orig, rows.best_z, rows.best_abs, rows.best_rel, status, rows.nfe if masked else iterations)
    return Solution(z=out.z.reshape(problem.z0.shape), stats=out.stats(iterations, rows_evaluated, traces))


def _track_best(rows: _Rows, res: Tensor, res_abs: Tensor, res_rel: Tensor, rel: bool, masked: bool) -> None:
    """Keep each row's lowest stop-mode residual and its iterate (NaN never counts as lower)."""
    improved = res < (rows.best_rel if rel else rows.best_abs)
    if masked:
        improved &= rows.live
    if not masked and known_false(~improved):  # every row improved (known for free on CPU): alias
        rows.best_abs, rows.best_rel, rows.best_z = res_abs, res_rel, rows.z
        return
    rows.best_abs = torch.where(improved, res_abs, rows.best_abs)
    rows.best_rel = torch.where(improved, res_rel, rows.best_rel)
    rows.best_z = torch.where(improved[:, None], rows.z, rows.best_z)


def _retire(out: _Outputs, rows: _Rows, done: Tensor, tol: float, rel: bool, nfe: int | None) -> None:
    """Write the finished rows ``done`` to the outputs: converged when their best residual is <= tol, else
    the loop stopped them for a NaN/Inf residual."""
    best = (rows.best_rel if rel else rows.best_abs)[done]
    status = torch.where(best <= tol, int(Status.CONVERGED), int(Status.NON_FINITE))
    out.write(
        rows.orig[done], rows.best_z[done], rows.best_abs[done], rows.best_rel[done], status,
        rows.nfe[done] if nfe is None else nfe,
    )


def _evaluate(
    problem: FixedPointProblem,
    z: Tensor,
    k: int,
    orig: Tensor,
    subset: bool,
    x_rows: Any,
    z_full: Tensor | None,
    S: torch.Size,
) -> Tensor:
    """``f`` on the working rows: only them for a separable problem, else all ``B`` rows (frozen ones kept)."""
    if z_full is None:
        zin = z
        rows = orig if subset else None
    else:
        if subset:
            z_full.index_copy_(0, orig, z)
            zin = z_full
        else:
            zin = z
        rows = None
    shape = (zin.shape[0], *S)
    fz = problem.evaluate(zin.view(shape), k, rows, x_rows)
    if not isinstance(fz, Tensor) or fz.shape != shape or fz.dtype != zin.dtype:
        got = f"shape {tuple(fz.shape)}, dtype {fz.dtype}" if isinstance(fz, Tensor) else type(fz).__name__
        raise SolverError(
            f"f must return a tensor shaped like its input z: expected shape {shape}, dtype {zin.dtype}; "
            f"got {got} (at iteration k={k})"
        )
    fz = fz.reshape(shape[0], -1)
    if z_full is not None and subset:
        fz = fz[orig]
    return fz


def _trace_row(res_abs: Tensor, res_rel: Tensor, live: Tensor | None, orig: Tensor, B: int) -> tuple[Tensor, Tensor]:
    if live is not None:
        res_abs = torch.where(live, res_abs, math.nan)
        res_rel = torch.where(live, res_rel, math.nan)
    full_abs = torch.full((B,), math.nan, dtype=res_abs.dtype, device=res_abs.device)
    full_rel = full_abs.clone()
    return full_abs.index_copy_(0, orig, res_abs), full_rel.index_copy_(0, orig, res_rel)


def cast_to(x: Tensor, dtype: torch.dtype) -> Tensor:
    """``x`` in ``dtype`` (no copy when it already is): solvers work in float32+ and return ``z``'s dtype."""
    return x if x.dtype == dtype else x.to(dtype)


def known_false(mask: Tensor) -> bool:
    """True when ``mask`` is certainly all False, decided without an accelerator sync.

    On CPU the answer is read (a host read costs nothing there), which lets callers skip ``torch.where``
    passes that CPU kernels make expensive. On other devices it returns False ("not known"), and callers take
    the general, sync-free path.
    """
    return mask.device.type == "cpu" and not bool(mask.any())


def rowdot(A: Tensor, v: Tensor) -> Tensor:
    """``(A @ v)`` per row: ``A: (B, m, D)``, ``v: (B, D)`` -> ``(B, m)``.

    Written as a row-vector times transposed matrix product: on CPU this is ~5-10x faster than
    ``bmm(A, v[..., None])``, which runs as an unblocked matrix-vector product.
    """
    return torch.bmm(v.unsqueeze(1), A.transpose(1, 2)).squeeze(1)


def combine(c: Tensor, A: Tensor) -> Tensor:
    """``A^T c`` per row: ``c: (B, m)``, ``A: (B, m, D)`` -> ``(B, D)``."""
    return torch.bmm(c.unsqueeze(1), A).squeeze(1)
