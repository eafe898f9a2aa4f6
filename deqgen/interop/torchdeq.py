"""Use deqgen's solvers inside torchdeq with one line.

>>> from deqgen.interop.torchdeq import register_torchdeq_solvers   # doctest: +SKIP
>>> register_torchdeq_solvers()                                     # doctest: +SKIP
('deqgen_picard', 'deqgen_anderson', 'deqgen_broyden')
>>> deq = torchdeq.get_deq(f_solver="deqgen_anderson", b_solver="deqgen_picard", ift=True)  # doctest: +SKIP

Each registered function follows torchdeq's solver protocol,
``solver(func, x0, max_iter, tol, stop_mode, indexing=None, **kwargs) -> (z, trajectory, SolverStat)``, and runs
deqgen's per-sample loop underneath. Differences from torchdeq's own solvers, on purpose:

* ``tol`` is tested per sample (torchdeq tests the batch maximum), and converged samples stop being updated;
* an unknown keyword raises ``TypeError`` naming it (torchdeq silently ignores it). torchdeq's own option
  names are accepted where they mean the same thing: ``tau`` (damping / mixing / step size), ``m``, ``lam``
  (Anderson; deqgen's ``lam`` is relative to the Gram trace, torchdeq's is absolute) and ``LBFGS_thres``
  (Broyden memory);
* ``SolverStat.nstep`` holds each sample's number of evaluations; traces are ``(B, K)`` with each sample's
  row padded by its final residual after it stopped (torchdeq pads with the lowest value);
* with ``indexing`` (torchdeq's DEQIndexing core), the solve runs in segments that end at the requested
  steps and returns each segment's result; Anderson/Broyden restart their history at each segment.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from deqgen import solvers
from deqgen.problem import FixedPointProblem
from deqgen.solvers import SOLVERS
from deqgen.solvers.base import Solver, run
from deqgen.stats import Solution

__all__ = ["register_torchdeq_solvers", "torchdeq_solver"]

_TORCHDEQ_ALIASES: dict[str, dict[str, str]] = {
    "picard": {"tau": "damping"},
    "anderson": {"tau": "beta"},
    "broyden": {"tau": "step_size", "LBFGS_thres": "memory"},
}


def torchdeq_solver(name: str) -> Callable[..., tuple[Tensor, list[Tensor], Any]]:
    """A function with torchdeq's solver signature that runs deqgen's solver ``name``."""
    key = name.lower()
    if key not in SOLVERS:
        raise ValueError(f"unknown deqgen solver {name!r}; choose one of {sorted(SOLVERS)}")
    cls = SOLVERS[key]
    aliases = _TORCHDEQ_ALIASES[key]
    fields = {f.name for f in dataclasses.fields(cls)}

    def solve(
        func: Callable[[Tensor], Tensor],
        x0: Tensor,
        max_iter: int = 50,
        tol: float = 1e-3,
        stop_mode: str = "abs",
        indexing: Sequence[int] | None = None,
        **kwargs: Any,
    ) -> tuple[Tensor, list[Tensor], Any]:
        opts = {aliases.get(k, k): v for k, v in kwargs.items()}
        unknown = sorted(set(opts) - fields)
        if unknown:
            raise TypeError(
                f"deqgen_{key} (via torchdeq) got unknown option(s) {unknown}; valid options: "
                f"{sorted(fields | set(aliases))}"
            )
        base = solvers.get(key, tol=tol, stop_mode=stop_mode, max_iter=int(max_iter), **opts)
        return _solve_segments(base, func, x0, indexing)

    solve.__name__ = f"deqgen_{key}"
    solve.__doc__ = (
        f"deqgen's {cls.__name__} behind torchdeq's solver signature (see deqgen.interop.torchdeq)."
    )
    return solve


def register_torchdeq_solvers(prefix: str = "deqgen_") -> tuple[str, ...]:
    """Register deqgen's solvers in torchdeq's solver registry as ``prefix + name``; returns the names.

    torchdeq's registry is its own module-level dict: calling this changes torchdeq's state for the process,
    which is what torchdeq's ``register_solver`` is for.

    Raises:
        ImportError: torchdeq is not installed (``pip install torchdeq``).
    """
    try:
        from torchdeq.solver import register_solver
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError("register_torchdeq_solvers needs torchdeq: pip install torchdeq") from err
    names = []
    for key in SOLVERS:
        register_solver(prefix + key, torchdeq_solver(key))
        names.append(prefix + key)
    return tuple(names)


def _solve_segments(
    solver: Solver[Any], func: Callable[[Tensor], Tensor], x0: Tensor, indexing: Sequence[int] | None
) -> tuple[Tensor, list[Tensor], Any]:
    steps = sorted({int(i) for i in indexing}) if indexing else []
    if any(i < 1 for i in steps):
        raise ValueError(f"indexing must hold steps >= 1, got {list(indexing or [])}")
    bounds = [i for i in steps if i < solver.max_iter] + [solver.max_iter]
    z, done, trajectory, solutions = x0, 0, [], []
    for end in bounds:
        seg = dataclasses.replace(solver, max_iter=end - done)
        sol = run(FixedPointProblem(func, z), seg, trace=True)
        solutions.append(sol)
        z, done = sol.z, end
        if end in steps:
            trajectory.append(z)
    if indexing and not trajectory:
        trajectory.append(z)
    return z, trajectory, _stat(solutions)


def _stat(solutions: list[Solution]) -> Any:
    from torchdeq.solver.stat import SolverStat

    last = solutions[-1].stats
    abs_trace = torch.cat([_padded(s.stats.abs_trace, s.stats.abs_residual) for s in solutions], dim=1)
    rel_trace = torch.cat([_padded(s.stats.rel_trace, s.stats.rel_residual) for s in solutions], dim=1)
    nstep = sum(s.stats.nfe for s in solutions)
    return SolverStat(
        abs_lowest=last.abs_residual,
        rel_lowest=last.rel_residual,
        abs_trace=abs_trace,
        rel_trace=rel_trace,
        nstep=nstep.to(last.abs_residual.dtype),
    )


def _padded(trace: Tensor | None, final: Tensor) -> Tensor:
    """``(K, B)`` trace with NaN after each stop -> ``(B, K)`` padded with the sample's final residual."""
    assert trace is not None
    return torch.where(torch.isnan(trace), final.unsqueeze(0), trace).T
