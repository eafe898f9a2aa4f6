"""deqgen vs torchdeq on P1-P4: a markdown table of time ratios, measured side by side in one run.

    python benchmarks/solver_table.py                 # all problems, tol 1e-4 and 1e-6 (~2-3 min on 2 cores)
    python benchmarks/solver_table.py --problems P1 P3 --rounds 3

Protocol (also in docs/benchmarks.md): (float32, one thread, z0 = 0, relative stopping; torchdeq with its defaults).
For each problem and tolerance, every (library, solver) pair runs once to warm up, then ``--rounds`` interleaved
rounds (each pair once per round); the median is reported. ``nfe`` is rows evaluated / B (deqgen stops
evaluating converged rows), ``calls`` the number of f calls, ``conv`` the fraction of rows whose residual,
re-measured in float64 on the returned z, is at or below tol. ``ovh`` is deqgen's loop overhead: the share of
its time not spent in f, (time - nfe * t_f) / time, with t_f one full-batch call of f.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.benchmarks.harness import LIBRARIES, SOLVER_NAMES, Outcome, measure, time_f  # noqa: E402
from tests.problems import benchmark_problem  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--problems", nargs="+", default=["P1", "P2", "P3", "P4"])
    parser.add_argument("--tols", nargs="+", type=float, default=[1e-4, 1e-6])
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds (P4 uses at most 3)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)

    print(
        "| P | tol | solver | deqgen ms | torchdeq ms | ratio | nfe deqgen / torchdeq | calls deqgen / torchdeq "
        "| conv deqgen / torchdeq | max res deqgen / torchdeq | deqgen ovh |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for name in args.problems:
        bp = benchmark_problem(name, torch.float32)
        rounds = min(args.rounds, 3) if name == "P4" else args.rounds
        for tol in args.tols:
            pairs = [(lib, s) for s in SOLVER_NAMES for lib in LIBRARIES]
            for lib, s in pairs:  # warm-up
                measure(lib, s, bp, tol)
            runs: dict[tuple[str, str], list[Outcome]] = {p: [] for p in pairs}
            t_fs = []  # one full-batch f call, timed inside every round so it sees the same machine state
            for _ in range(rounds):
                for lib, s in pairs:
                    runs[(lib, s)].append(measure(lib, s, bp, tol))
                    t_fs.append(time_f(bp, repeats=1 if name == "P4" else 3))
            t_f = statistics.median(t_fs)
            for s in SOLVER_NAMES:
                d, t = runs[("deqgen", s)], runs[("torchdeq", s)]
                td, tt = statistics.median(o.seconds for o in d), statistics.median(o.seconds for o in t)
                ovh = (td - d[0].rows_per_b * t_f) / td
                print(
                    f"| {name} | {tol:g} | {s} | {td * 1e3:.1f} | {tt * 1e3:.1f} | **{td / tt:.2f}** | "
                    f"{d[0].rows_per_b:.1f} / {t[0].rows_per_b:.1f} | {d[0].calls} / {t[0].calls} | "
                    f"{d[0].conv:.2f} / {t[0].conv:.2f} | {d[0].max_res:.1e} / {t[0].max_res:.1e} | {ovh:.0%} |",
                    flush=True,
                )
            print(f"| {name} | {tol:g} | t_f = {t_f * 1e3:.2f} ms |  |  |  |  |  |  |  |  |", flush=True)


if __name__ == "__main__":
    main()
