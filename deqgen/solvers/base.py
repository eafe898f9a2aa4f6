"""The solver interface and :func:`run`, the only iteration loop in deqgen.

A solver is a frozen object with typed fields and two methods, ``init`` and ``step``. It has no loop, no
stopping test, no best-iterate tracking and no autograd: :func:`run` does all of that once, for every solver.

``run`` works on flattened samples ``z: (B, D)`` and has two paths:

* the **tolerance path** (``tol`` set): each iteration it evaluates ``f`` on the rows still active, measures
  each row's residual, keeps each row's best iterate, and freezes rows that converged or went non-finite.
  Frozen rows leave the working set at the next host check, so they stop costing solver work and, for a
  separable problem, evaluations of ``f`` too;
* the **fixed-budget path** (``tol=None``): exactly ``max_iter`` evaluations with no host synchronisation;
  only rows whose residual is not finite are frozen.

Every solver's state is batch-first and per row, so a row's trajectory does not depend on the rest of its
batch. The per-row bookkeeping lives in :mod:`deqgen.solvers.rows`, the norms in
:mod:`deqgen.solvers.numerics`.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from abc import ABC, abstractmethod
from typing import Any, ClassVar, Generic, Literal, TypeVar

import numpy as np
import torch
from torch import Tensor

from deqgen.problem import FixedPointProblem
from deqgen.solvers.numerics import residual_norms, work_dtype
from deqgen.solvers.rows import Outputs, Rows, survives, trace_row, track_best
from deqgen.stats import Solution, SolverError, Status

__all__ = ["Solver", "run", "take_rows"]

logger = logging.getLogger(__name__)

StateT = TypeVar("StateT")
StopMode = Literal["abs", "rel"]
NormName = Literal["l2", "inf"]
_HALF = (torch.float16, torch.bfloat16)


@dataclasses.dataclass(frozen=True, kw_only=True)
class Solver(ABC, Generic[StateT]):
    """Fields shared by every solver.

    Args:
        tol: stop a sample once its stop-mode residual is ``<= tol``. ``None`` selects the fixed-budget mode:
            exactly ``max_iter`` evaluations, no convergence test and no host synchronisation (inference at a
            known budget, e.g. VIAR's per-scale iteration counts).
        stop_mode: ``"rel"`` tests ``||f(z) - z|| / ||f(z)||``, ``"abs"`` tests ``||f(z) - z||``.
        atol: with ``stop_mode="rel"``, a sample also stops once its absolute residual is ``<= atol``
            (``abs <= atol or rel <= tol``, as scipy's ``f_tol``/``f_rtol`` and optimistix's
            ``atol``/``rtol``), so a fixed point at or near ``z = 0`` is reachable. ``0`` (the default)
            disables it.
        norm: ``"l2"`` or ``"inf"``, taken per sample over all non-batch dims.
        max_iter: the most evaluations of ``f`` per sample.
        check_every: look at the host (one synchronisation) every this many iterations to drop finished rows
            and stop early. Rows still freeze on the device at the exact iteration they finish, so results and
            statistics do not depend on it; only the work spent on finished rows between checks does.
        upcast_half: under an active ``torch.autocast``, iterate a float16/bfloat16 ``z0`` in float32: ``f``
            receives float32 ``z`` and its half-precision output is cast up, so the iterate does not lose bits
            at every step. The returned ``z`` has ``z0``'s dtype. ``False`` iterates in ``z0``'s dtype.
    """

    tol: float | None = 1e-4
    stop_mode: StopMode = "rel"
    atol: float = 0.0
    norm: NormName = "l2"
    max_iter: int = 50
    check_every: int = 1
    upcast_half: bool = True

    name: ClassVar[str] = "solver"

    def __post_init__(self) -> None:
        cls = type(self).__name__
        if self.tol is not None and (isinstance(self.tol, bool) or not isinstance(self.tol, (int, float))):
            raise TypeError(f"{cls} got tol={self.tol!r}; use a positive float, or None for a fixed budget")
        if self.tol is not None and not (self.tol > 0 and math.isfinite(self.tol)):
            msg = f"{cls} got tol={self.tol!r}; use a positive finite float, or None for a fixed budget"
            raise ValueError(msg)
        if self.stop_mode not in ("abs", "rel"):
            raise ValueError(f"{cls} got stop_mode={self.stop_mode!r}; use 'abs' or 'rel'")
        if isinstance(self.atol, bool) or not isinstance(self.atol, (int, float)):
            raise TypeError(f"{cls} got atol={self.atol!r}; use a float >= 0 (0 disables it)")
        if not (self.atol >= 0 and math.isfinite(self.atol)):
            raise ValueError(f"{cls} got atol={self.atol!r}; use a finite float >= 0 (0 disables it)")
        if self.atol > 0 and self.stop_mode != "rel":
            raise ValueError(f"{cls} got atol={self.atol!r} with stop_mode='abs'; set tol or stop_mode='rel'")
        if self.norm not in ("l2", "inf"):
            raise ValueError(f"{cls} got norm={self.norm!r}; use 'l2' or 'inf'")
        check_int(cls, "max_iter", self.max_iter, 1)
        check_int(cls, "check_every", self.check_every, 1)
        if not isinstance(self.upcast_half, bool):
            raise TypeError(f"{cls} got upcast_half={self.upcast_half!r}; use True or False")

    @property
    def non_finite_retries(self) -> int:
        """How many consecutive non-finite evaluations a sample may survive, because ``step`` backs off from
        them (tolerance mode only). 0: the loop freezes the sample at the first one."""
        return 0

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
            res: ``(B,)`` ``||g||`` in the solver's norm (float32 or wider); NaN/Inf only for a solver with
                ``non_finite_retries > 0``.

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
        f.name: getattr(state, f.name).index_select(0, keep)
        for f in dataclasses.fields(state)  # type: ignore[arg-type]
        if isinstance(getattr(state, f.name), Tensor)
    }
    return dataclasses.replace(state, **changes)  # type: ignore[type-var]


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
        A :class:`~deqgen.stats.Solution` with ``z: (B, *S)`` in ``z0``'s dtype (for a structured problem, the
        structure of the original ``z0``, see :meth:`~deqgen.problem.FixedPointProblem.unpack`) and per-sample
        stats. With a tolerance, a converged sample returns the iterate that met the stop rule; any other
        sample returns its best iterate: with ``stop_mode="abs"`` the one with the lowest absolute residual;
        with ``stop_mode="rel"`` the one with the lowest relative residual among those whose absolute residual
        is no larger than the start's. Either way it is never worse than ``z0`` in the absolute residual.

    The loop runs under ``torch.no_grad()``: gradients are the business of deqgen's gradient methods.
    """
    if not isinstance(problem, FixedPointProblem):
        raise TypeError(f"run() needs a FixedPointProblem, got {type(problem).__name__}")
    if not isinstance(solver, Solver):
        raise TypeError(f"run() needs a Solver (Picard, Anderson, Broyden), not {type(solver).__name__}")
    with torch.no_grad():
        loop = _Loop(problem, solver, trace)
        solution = loop.run_budget() if solver.tol is None else loop.run_tolerance()
    if throw:
        solution.raise_for_status()
    return solution


class _Loop:
    """One solve: the setup both paths share, then :meth:`run_tolerance` or :meth:`run_budget`."""

    def __init__(self, problem: FixedPointProblem, solver: Solver[Any], want_trace: bool) -> None:
        z0 = problem.z0.detach()
        self.problem, self.solver, self.want_trace = problem, solver, want_trace
        self.B, self.S = problem.batch_size, problem.sample_shape
        self.flat = len(self.S) == 1
        self.dtype = _iterate_dtype(z0, solver)
        self.rdtype = work_dtype(self.dtype)
        self.ord = 2.0 if solver.norm == "l2" else math.inf
        self.z = z0.reshape(self.B, -1).to(self.dtype)
        self.traces: list[tuple[Tensor, Tensor]] = []
        self.rows_evaluated = 0

    def residuals(self, fz: Tensor, z: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
        """``g = f(z) - z``, its absolute and relative norms, and the ``(n,)`` mask of finite residuals, None
        when every one is known to be finite (a finite ``f(z) = 0`` has ``rel = +inf``, which is no reason to
        stop)."""
        g = fz - z
        return g, *residual_norms(g, fz, self.ord, self.rdtype)

    def stop_rule(self, res_abs: Tensor, res_rel: Tensor) -> Tensor:
        """``(n,)`` bool: ``abs <= tol`` (abs mode), or ``rel <= tol or abs <= atol`` (rel mode); NaN never
        stops."""
        solver = self.solver
        if solver.stop_mode == "abs":
            return res_abs <= solver.tol
        met = res_rel <= solver.tol
        return (met | (res_abs <= solver.atol)) if solver.atol > 0 else met

    def evaluate(self, z: Tensor, k: int, orig: Tensor | None, x_rows: Any, z_full: Tensor | None) -> Tensor:
        """``f`` on the working rows ``z: (n, D)``: only them for a separable problem, else all ``B`` rows
        (the frozen ones at their final values, kept in ``z_full``). ``orig`` is None when all rows work."""
        if z_full is not None and orig is not None:
            z_full.index_copy_(0, orig, z)
            zin = z_full
        else:
            zin = z
        rows = orig if z_full is None else None
        if self.flat:  # samples are vectors: f takes and returns (n, D) as the loop holds them
            fz = _checked_output(self.problem.evaluate(zin, k, rows, x_rows), zin.shape, zin.dtype, k)
        else:
            shape = (zin.shape[0], *self.S)
            fz = self.problem.evaluate(zin.view(shape), k, rows, x_rows)
            fz = _checked_output(fz, shape, zin.dtype, k).reshape(shape[0], -1)
        self.rows_evaluated += zin.shape[0]
        return fz.index_select(0, orig) if z_full is not None and orig is not None else fz

    def record(self, res_abs: Tensor, res_rel: Tensor, live: Tensor | None, orig: Tensor) -> None:
        if self.want_trace:
            self.traces.append(trace_row(res_abs, res_rel, live, orig, self.B))

    def retire(
        self, out: Outputs, rows: Rows, live_host: np.ndarray, nfe: int | None, z_full: Tensor | None
    ) -> Tensor | None:
        """Write the rows that are not ``live_host`` (the host copy of the mask) to ``out``: converged when
        their best iterate meets the stop rule, else stopped for a NaN/Inf residual; ``nfe`` None takes
        ``rows.nfe``. Returns the indices of the rows that go on, or None when none do."""
        dev = rows.z.device
        done = _indices(~live_host, dev)
        at, best_abs, best_rel = (t.index_select(0, done) for t in (rows.orig, rows.best_abs, rows.best_rel))
        met = self.stop_rule(best_abs, best_rel)
        status = torch.where(met, int(Status.CONVERGED), int(Status.NON_FINITE))
        nfe_done = rows.nfe.index_select(0, done) if nfe is None else nfe
        out.write(at, rows.best_z.index_select(0, done), best_abs, best_rel, status, nfe_done)
        if done.numel() == rows.z.shape[0]:
            return None
        if z_full is not None:  # f sees all B rows: the frozen ones keep their last values
            z_full.index_copy_(0, at, rows.z.index_select(0, done))
        return _indices(live_host, dev)

    def solution(self, out: Outputs, iterations: int) -> Solution:
        z_flat, stats = out.finish(iterations, self.rows_evaluated, self.traces)
        z = self.problem.unpack(z_flat.reshape(self.problem.z0.shape).to(self.problem.z0.dtype))
        return Solution(z=z, stats=stats)  # type: ignore[arg-type]

    def run_budget(self) -> Solution:
        """Exactly ``max_iter`` evaluations and steps, no host sync; non-finite rows are frozen."""
        solver, z = self.solver, self.z
        B, dev = self.B, z.device
        orig = torch.arange(B, device=dev)
        live = torch.ones(B, dtype=torch.bool, device=dev)
        nfe = torch.zeros(B, dtype=torch.int64, device=dev)
        last_abs = last_rel = torch.full((B,), math.nan, dtype=self.rdtype, device=dev)
        state = solver.init(z)
        for k in range(solver.max_iter):
            fz = self.evaluate(z, k, None, self.problem.x, None)
            g, res_abs, res_rel, finite = self.residuals(fz, z)
            self.record(res_abs, res_rel, live, orig)
            nfe += live
            last_abs = torch.where(live, res_abs, last_abs)
            last_rel = torch.where(live, res_rel, last_rel)
            live = live if finite is None else live & finite
            z_next, state = solver.step(state, z, fz, g, res_abs)
            z = torch.where(live[:, None], z_next, z)
        out = Outputs(z, self.rdtype)
        status = torch.where(live, int(Status.BUDGET), int(Status.NON_FINITE))
        out.write(orig, z, last_abs, last_rel, status, nfe)
        return self.solution(out, solver.max_iter)

    def run_tolerance(self) -> Solution:
        """Evaluate, test and step until every row has converged, gone non-finite or spent ``max_iter``."""
        solver, problem, B = self.solver, self.problem, self.B
        # Between host checks, finished rows are frozen on the device by a mask (and nfe is counted per row).
        # With a check every iteration they are dropped before the next step: no mask, and nfe = k + 1.
        masked = solver.check_every > 1
        rows = Rows.start(self.z, self.rdtype, masked)
        x_rows = problem.x
        z_full = None if problem.separable else self.z.clone()
        state = solver.init(self.z)
        out = Outputs(self.z, self.rdtype)
        for k in range(solver.max_iter):
            fz = self.evaluate(rows.z, k, rows.orig if rows.z.shape[0] < B else None, x_rows, z_full)
            g, res_abs, res_rel, finite = self.residuals(fz, rows.z)
            self.record(res_abs, res_rel, rows.live if masked else None, rows.orig)
            if masked:
                rows.nfe += rows.live
            converged = self.stop_rule(res_abs, res_rel)
            track_best(rows, k, res_abs, res_rel, finite, converged, solver.stop_mode == "rel", masked)
            going = survives(rows, finite, k, solver.non_finite_retries)
            running = ~converged if going is None else ~converged & going
            rows.live = (rows.live & running) if masked else running
            if (k + 1) % solver.check_every == 0 or k + 1 == solver.max_iter:
                live_host = rows.live.cpu().numpy()  # the host check: the iteration's only synchronisation
                if not live_host.all():
                    keep = self.retire(out, rows, live_host, None if masked else k + 1, z_full)
                    if keep is None:
                        return self.solution(out, k + 1)
                    rows, state = rows.take(keep), take_rows(state, keep)
                    fz, g, res_abs = (t.index_select(0, keep) for t in (fz, g, res_abs))
                    if problem.separable and isinstance(problem.x, Tensor):
                        x_rows = problem.x.index_select(0, rows.orig)
            if k + 1 == solver.max_iter:
                break  # no step after the last evaluation: the best evaluated iterate is returned
            z_next, state = solver.step(state, rows.z, fz, g, res_abs)
            rows.z = torch.where(rows.live[:, None], z_next, rows.z) if masked else z_next
        # the last check retired every finished row: the rest ran out of iterations
        status = torch.full_like(rows.orig, int(Status.MAX_ITER))
        nfe = rows.nfe if masked else solver.max_iter
        out.write(rows.orig, rows.best_z, rows.best_abs, rows.best_rel, status, nfe)
        return self.solution(out, solver.max_iter)


def _indices(mask: np.ndarray, device: torch.device) -> Tensor:
    """``(n,)`` int64 indices of the True entries of a host mask, on ``device`` (numpy answers a host mask in a
    fraction of the time of torch's ``nonzero``)."""
    return torch.from_numpy(np.flatnonzero(mask)).to(device, non_blocking=True)


def _iterate_dtype(z0: Tensor, solver: Solver[Any]) -> torch.dtype:
    """float32 for a half-precision ``z0`` under autocast (unless ``upcast_half=False``), else ``z0``'s
    dtype."""
    if solver.upcast_half and z0.dtype in _HALF and torch.is_autocast_enabled(z0.device.type):
        return torch.float32
    return z0.dtype


def _checked_output(fz: Any, shape: tuple[int, ...], dtype: torch.dtype, k: int) -> Tensor:
    """``fz`` in ``dtype`` after checking it is a tensor of ``shape``; a half-precision output is accepted
    (and cast up) when the loop iterates a half-precision ``z0`` in float32 under autocast."""
    if isinstance(fz, Tensor) and fz.shape == shape:
        if fz.dtype == dtype:
            return fz
        if dtype == torch.float32 and fz.dtype in _HALF and torch.is_autocast_enabled(fz.device.type):
            return fz.float()
    got = f"shape {tuple(fz.shape)}, dtype {fz.dtype}" if isinstance(fz, Tensor) else type(fz).__name__
    raise SolverError(
        f"f must return a tensor shaped like its input z: expected shape {tuple(shape)}, dtype {dtype}; "
        f"got {got} (at iteration k={k})"
    )
