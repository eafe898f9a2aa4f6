"""``deqgen report``: measure a judged digits run and write it up.

This module joins the measurements (:mod:`~deqgen.evaluation.sampling_sweep`,
:mod:`~deqgen.evaluation.training_memory`, :mod:`~deqgen.evaluation.convergence`) and the writer
(:mod:`~deqgen.evaluation.report_writer`), so none of them imports another.
"""

from __future__ import annotations

import os
import platform
import time
from pathlib import Path
from typing import Any

import torch

from deqgen.evaluation.convergence import ConvergenceCurve, convergence_curves
from deqgen.evaluation.digits_run import DigitsRun, load_digits_run
from deqgen.evaluation.npz import to_uint8_nhwc, write_samples_npz
from deqgen.evaluation.report import FULL, QUICK, CacheKind, ReportSettings
from deqgen.evaluation.report_writer import ReportData, require_matplotlib, write_report
from deqgen.evaluation.sampling_sweep import real_floor, sample_sweep, sweep_configs
from deqgen.evaluation.training_memory import training_memory

__all__ = ["build_report"]


def build_report(run_dir: str | Path, out_dir: str | Path | None = None, *, quick: bool = False) -> Path:
    """Measure a judged digits run (``deqgen demo``'s output) and write the report.

    Args:
        run_dir: the run directory: ``config.yaml``, the exported models and the judge.
        out_dir: where to write (default ``run_dir/report``).
        quick: use :data:`~deqgen.evaluation.report.QUICK` (tests, a first look) instead of
            :data:`~deqgen.evaluation.report.FULL`.

    Returns:
        The path of ``report.md``.

    Raises:
        deqgen.evaluation.report.ReportError: the run folder is incomplete (nothing is written then).
        ImportError: matplotlib is missing (checked before measuring).
    """
    require_matplotlib()  # fail before measuring if the plots cannot be drawn
    t0, load_before, threads = time.perf_counter(), os.getloadavg()[0], torch.get_num_threads()
    run = load_digits_run(run_dir)
    out = Path(out_dir) if out_dir is not None else run.run_dir / "report"
    settings = QUICK if quick else FULL
    out.mkdir(parents=True, exist_ok=True)
    write_samples_npz(out / "heldout_digits.npz", to_uint8_nhwc(run.heldout, value_range=(-1.0, 1.0)))
    sweep = sample_sweep(run, sweep_configs(run, settings), settings)
    memory = training_memory(run, settings)
    convergence = {cache: _convergence(run, settings, cache) for cache in ("iteration", "lean")}
    machine = {
        "cpu_count": os.cpu_count(),
        "torch_threads": threads,
        "torch": torch.__version__,
        "platform": platform.platform(terse=True),
        "load_before": load_before,
        "load_after": os.getloadavg()[0],
        "wall_seconds": time.perf_counter() - t0,
    }
    params = {
        name: sum(p.numel() for p in model.parameters())
        for name, model in (("viar", run.viar), ("var", run.var))
    }
    data = ReportData(
        run.run_dir,
        settings,
        quick,
        params,
        sweep,
        real_floor(run, settings.per_class),
        real_floor(run),
        memory,
        convergence,
        machine,
        _sampling(run),
    )
    return write_report(data, out)


def _convergence(run: DigitsRun, settings: ReportSettings, cache: CacheKind) -> list[ConvergenceCurve]:
    labels = torch.arange(10).repeat_interleave(settings.convergence_per_class)
    s = run.cfg.sampling
    return convergence_curves(
        run.viar,
        run.vqvae,
        labels,
        iterations=settings.convergence_iterations,
        cache=cache,
        cfg_scale=s.cfg_scale,
        top_k=s.top_k,
        top_p=s.top_p,
        seed=s.seed,
    )


def _sampling(run: DigitsRun) -> dict[str, Any]:
    """The run's sampler settings as plain data (``report.json``)."""
    s = run.cfg.sampling
    return {
        "schedule": s.schedule,
        "cfg_scale": s.cfg_scale,
        "top_k": s.top_k,
        "top_p": s.top_p,
        "seed": s.seed,
    }
