"""A short solver demo: ``python recipes/solver_demo.py`` prints a table (the README's main job is
``deqgen demo recipes/mnist_cpu.yaml``; this script is a first look at the solvers alone).

It solves three batched fixed-point problems with Picard, Anderson and Broyden and reports, per solver, the
status counts, the per-sample NFE range, the effective NFE of the batch (rows evaluated / B; below the
iteration count because converged samples stop being evaluated), the worst residual and the wall time of a
second (warm) solve.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch
from torch import Tensor

from deqgen import Anderson, Broyden, FixedPointProblem, Picard, run
from deqgen.solvers.base import Solver
from deqgen.stats import Status


def _problems(gen: torch.Generator, dtype: torch.dtype) -> dict[str, tuple[Callable[..., Tensor], Tensor]]:
    B, D = 32, 256
    W = torch.randn(D, D, generator=gen, dtype=torch.float64)
    W = (W + W.T) / 2
    W = (W / torch.linalg.matrix_norm(W, 2)).to(dtype)
    inj = (0.5 * torch.randn(B, D, generator=gen, dtype=torch.float64)).to(dtype)
    c = torch.linspace(0.3, 0.97, B, dtype=torch.float64)[torch.randperm(B, generator=gen)].to(dtype)[:, None]

    def pick(t: Tensor, rows: Tensor | None) -> Tensor:
        return t if rows is None else t.index_select(0, rows)  # faster than t[rows] on CPU

    def linear(z: Tensor, rows: Tensor | None = None) -> Tensor:
        return 0.8 * z @ W.T + pick(inj, rows)

    def tanh_mlp(z: Tensor, rows: Tensor | None = None) -> Tensor:
        return torch.tanh(0.95 * z @ W.T + pick(inj, rows))

    def mixed(z: Tensor, rows: Tensor | None = None) -> Tensor:
        return torch.tanh(pick(c, rows) * (z @ W.T) + pick(inj, rows))

    z0 = torch.zeros(B, D, dtype=dtype)
    return {
        "linear (0.8)": (linear, z0),
        "tanh-MLP (0.95)": (tanh_mlp, z0),
        "mixed rows (0.3-0.97)": (mixed, z0),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m recipes.solver_demo", description=__doc__)
    parser.add_argument("--tol", type=float, default=1e-6, help="relative residual tolerance (default 1e-6)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    gen = torch.Generator().manual_seed(args.seed)
    solvers: list[Solver] = [
        Picard(tol=args.tol, max_iter=300),
        Anderson(tol=args.tol, max_iter=300),
        Broyden(tol=args.tol, max_iter=300),
    ]
    print(f"deqgen solver demo: B=32 samples of D=256, float32, relative tol {args.tol:g}\n")
    print("| problem | solver | status | nfe per sample | rows evaluated / B | max rel residual | ms |")
    print("|---|---|---|---|---|---|---|")
    for name, (f, z0) in _problems(gen, torch.float32).items():
        for solver in solvers:
            problem = FixedPointProblem(f, z0, separable=True)
            run(problem, solver)  # warm-up: first calls load kernels and allocate
            t0 = time.perf_counter()
            sol = run(problem, solver)
            ms = (time.perf_counter() - t0) * 1e3
            st = sol.stats
            counts = _status_text(st.status)
            print(
                f"| {name} | {type(solver).__name__} | {counts} | {int(st.nfe.min())}-{int(st.nfe.max())} | "
                f"{st.rows_evaluated / z0.shape[0]:.1f} | {float(st.rel_residual.max()):.2e} | {ms:.1f} |"
            )


def _status_text(status: Tensor) -> str:
    return ", ".join(
        f"{int((status == s).sum())} {s.name.lower()}" for s in Status if bool((status == s).any())
    )


if __name__ == "__main__":
    main()
