"""How fast can an eager PyTorch solver loop be on P2/P3? deqgen next to stripped-down loops, side by side.

The solver-speed goals of ``docs/benchmarks.md`` (deqgen's fastest solver at most 0.35x torchdeq's fastest on
P3 and 0.5x on P2 at tol 1e-6; each solver at most 0.5x its torchdeq counterpart on P3) leave little time
outside ``f``. To show where the floor lies, this script times two loops that keep only what a separable
solve cannot do without: evaluate ``f`` on the working rows, test the relative residual, drop finished rows.
They have no safeguard, restart, best-iterate tracking, NaN isolation, statistics or input checks, and their
small least-squares solve runs in numpy; they are measuring instruments, not solvers. The Anderson one uses
deqgen's defaults (memory m, relative ridge lam, beta = 1) and makes the same f calls on these problems.

    python benchmarks/loop_floor.py              # P2 and P3, tol 1e-6, 9 interleaved rounds (~1 min)

Protocol as ``benchmarks/solver_table.py``: float32, one thread, z0 = 0, relative stopping, torchdeq's Picard
with its defaults; the median of interleaved rounds; ratios against torchdeq's Picard in the same run.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import deqgen  # noqa: E402
from tests.benchmarks.harness import Counted  # noqa: E402
from tests.problems import BankProblem, benchmark_problem  # noqa: E402


def _finish(done: np.ndarray, z: Tensor, orig: Tensor, out: Tensor) -> tuple[Tensor | None, np.ndarray]:
    """Write the finished rows of ``z`` to ``out``; return the indices of the rows that go on (None: none)."""
    out.index_copy_(0, orig.index_select(0, torch.from_numpy(np.flatnonzero(done))), z[done])
    keep = np.flatnonzero(~done)
    return (torch.from_numpy(keep) if keep.size else None), keep


def stripped_picard(f: Callable[..., Tensor], z0: Tensor, tol: float, max_iter: int) -> Tensor:
    """Picard with finished rows dropped: ``z <- f(z)`` until ``||f(z) - z|| / ||f(z)|| <= tol`` per row."""
    z, orig, out, rows = z0, torch.arange(z0.shape[0]), z0.clone(), None
    for _ in range(max_iter):
        fz = f(z, rows=rows)
        done = (torch.linalg.vector_norm(fz - z, dim=1) / torch.linalg.vector_norm(fz, dim=1)).numpy() <= tol
        if done.any():
            keep, _ = _finish(done, z, orig, out)
            if keep is None:
                return out
            orig, fz = orig.index_select(0, keep), fz.index_select(0, keep)
            rows = orig
        z = fz
    return out


def stripped_anderson(
    f: Callable[..., Tensor],
    z0: Tensor,
    tol: float,
    max_iter: int,
    m: int = deqgen.Anderson.m,
    lam: float = deqgen.Anderson.lam,
) -> Tensor:
    """Type-II Anderson with finished rows dropped; the ``(m, m)`` ridge system is solved in float64 numpy."""
    B, D = z0.shape
    z, orig, out, rows = z0, torch.arange(B), z0.clone(), None
    dG, dF = torch.zeros(B, m, D), torch.zeros(B, m, D)  # residual and f differences, a ring of m slots
    H = np.zeros((B, m, m))
    g_prev = f_prev = None
    for k in range(max_iter):
        fz = f(z, rows=rows)
        g = fz - z
        done = (torch.linalg.vector_norm(g, dim=1) / torch.linalg.vector_norm(fz, dim=1)).numpy() <= tol
        if done.any():
            keep, keep_h = _finish(done, z, orig, out)
            if keep is None:
                return out
            orig, z, fz, g = (t.index_select(0, keep) for t in (orig, z, fz, g))
            dG, dF, H, rows = dG.index_select(0, keep), dF.index_select(0, keep), H[keep_h], orig
            if k > 0:
                g_prev, f_prev = g_prev.index_select(0, keep), f_prev.index_select(0, keep)
        if k > 0:
            p, used = (k - 1) % m, min(k, m)
            dg = torch.sub(g, g_prev, out=dG[:, p])
            torch.sub(fz, f_prev, out=dF[:, p])
            h = torch.bmm(dg.unsqueeze(1), dG.transpose(1, 2)).squeeze(1).numpy().astype(np.float64)
            r = torch.bmm(g.unsqueeze(1), dG.transpose(1, 2)).squeeze(1).numpy().astype(np.float64)
            H[:, p, :], H[:, :, p] = h, h
            slots = np.arange(used) if used < m else slice(None)
            Hs = H[:, slots][:, :, slots]
            tr = np.maximum(np.trace(Hs, axis1=1, axis2=2), np.finfo(np.float64).tiny)[:, None]
            A = Hs / tr[:, :, None] + lam * np.eye(Hs.shape[1])
            gamma = np.zeros((H.shape[0], m))
            gamma[:, slots] = np.linalg.solve(A, (r[:, slots] / tr)[..., None])[..., 0]
            step = torch.bmm(torch.from_numpy(gamma.astype(np.float32)).unsqueeze(1), dF).squeeze(1)
        g_prev, f_prev = g, fz
        z = fz - step if k > 0 else fz
    return out


def _loops(bp: BankProblem, tol: float, f: Callable[..., Tensor]) -> dict[str, Callable[[], Tensor]]:
    """The loops timed on ``bp`` (with ``f`` in place of ``bp.f``), each returning its ``z``."""
    from torchdeq.solver import fixed_point_iter

    it = bp.max_iter

    def deq(solver: deqgen.solvers.Solver) -> Callable[[], Tensor]:
        problem = deqgen.FixedPointProblem(f, bp.z0, separable=True)
        return lambda: deqgen.run(problem, solver).z

    return {
        "torchdeq Picard": lambda: fixed_point_iter(f, bp.z0, max_iter=it, tol=tol, stop_mode="rel")[0],
        "deqgen Picard": deq(deqgen.Picard(tol=tol, max_iter=it)),
        "stripped Picard": lambda: stripped_picard(f, bp.z0, tol, it),
        "deqgen Anderson": deq(deqgen.Anderson(tol=tol, max_iter=it)),
        "stripped Anderson": lambda: stripped_anderson(f, bp.z0, tol, it),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--problems", nargs="+", default=["P2", "P3"])
    parser.add_argument("--tol", type=float, default=1e-6)
    parser.add_argument("--rounds", type=int, default=9)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)

    print("| P | loop | ms | x torchdeq Picard | f calls | rows / B | max rel residual |")
    print("|---|---|---|---|---|---|---|")
    for name in args.problems:
        bp = benchmark_problem(name, torch.float32)
        loops = _loops(bp, args.tol, bp.f)
        times: dict[str, list[float]] = {k: [] for k in loops}
        seen = {}
        with torch.no_grad():
            for key, loop in _loops(bp, args.tol, counted := Counted(bp.f)).items():  # warm-up, with counts
                counted.calls = counted.rows = 0
                z = loop()
                fz = bp.full(z).double()
                worst = float(((fz - z.double()).norm(dim=1) / fz.norm(dim=1)).max())
                seen[key] = (counted.calls, counted.rows / bp.z0.shape[0], worst)
            for _ in range(args.rounds):
                for key, loop in loops.items():
                    t0 = time.perf_counter()
                    loop()
                    times[key].append(time.perf_counter() - t0)
        ref = statistics.median(times["torchdeq Picard"])
        for key in loops:
            t = statistics.median(times[key])
            calls, rows, worst = seen[key]
            print(
                f"| {name} | {key} | {t * 1e3:.1f} | **{t / ref:.3f}** | {calls} | {rows:.1f} | {worst:.1e} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
