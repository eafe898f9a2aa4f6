"""``deqgen report``: measure a CPU demo run (:mod:`deqgen.evaluation.report`) and write it up
(:mod:`deqgen.evaluation.report_writer`). This module joins the two, so neither imports the other."""

from __future__ import annotations

import os
import platform
import time
from pathlib import Path

import torch

from deqgen.evaluation.npz import to_uint8_nhwc, write_samples_npz
from deqgen.evaluation.report import (
    FULL,
    QUICK,
    convergence_curves,
    load_demo_run,
    real_floor,
    sample_sweep,
    sweep_configs,
    training_memory,
)
from deqgen.evaluation.report_writer import ReportData, require_matplotlib, write_report

__all__ = ["build_report"]


def build_report(run_dir: str | Path, out_dir: str | Path | None = None, *, quick: bool = False) -> Path:
    """Measure a CPU demo run and write the report (see the module docstring).

    Args:
        run_dir: the ``recipes.digits_demo`` output folder.
        out_dir: where to write (default ``run_dir/report``).
        quick: use :data:`QUICK` (tests, a first look) instead of :data:`FULL`.

    Returns:
        The path of ``report.md``.

    Raises:
        ReportError: the run folder is incomplete (nothing is written then).
        ImportError: matplotlib is missing (checked before measuring).
    """
    require_matplotlib()  # fail before measuring if the plots cannot be drawn
    t0, load_before, threads = time.perf_counter(), os.getloadavg()[0], torch.get_num_threads()
    run = load_demo_run(run_dir)
    out = Path(out_dir) if out_dir is not None else run.run_dir / "report"
    settings = QUICK if quick else FULL
    out.mkdir(parents=True, exist_ok=True)
    write_samples_npz(out / "heldout_digits.npz", to_uint8_nhwc(run.heldout, value_range=(-1.0, 1.0)))
    sweep = sample_sweep(run, sweep_configs(run, settings), settings)
    memory = training_memory(run, settings)
    labels = torch.arange(10).repeat_interleave(settings.convergence_per_class)
    s = run.sampling
    convergence = {cache: convergence_curves(run.viar, run.vqvae, labels, iterations=settings.convergence_iterations,
                                             cache=cache, cfg=s["cfg_scale"], top_k=s["top_k"], top_p=s["top_p"],
                                             seed=s["seed"])
                   for cache in ("iteration", "lean")}
    machine = {"cpu_count": os.cpu_count(), "torch_threads": threads, "torch": torch.__version__,
               "platform": platform.platform(terse=True), "load_before": load_before,
               "load_after": os.getloadavg()[0], "wall_seconds": time.perf_counter() - t0}
    params = {name: sum(p.numel() for p in model.parameters()) for name, model in (("viar", run.viar),
                                                                                    ("var", run.var))}
    data = ReportData(run.run_dir, settings, quick, params, sweep, real_floor(run, settings.per_class),
                      real_floor(run), memory, convergence, machine, dict(s))
    return write_report(data, out)
