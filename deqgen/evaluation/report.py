"""``deqgen report``: measure a trained digits run against the VIAR paper's claims; the report's settings.

The report is split by what it measures, each module a function returning plain data:

1. :mod:`~deqgen.evaluation.sampling_sweep` -- VIAR and the same-width VAR, and VIAR under several iteration
   schedules, sampled side by side and scored by the run's digits classifier.
2. :mod:`~deqgen.evaluation.training_memory` -- one training step per number of no-grad iterations ``k1``:
   deqgen's S-JFB against the official code's pattern (peak memory, autograd bytes, step time).
3. :mod:`~deqgen.evaluation.convergence` -- per-scale residual and cosine curves of the implicit block.

:mod:`~deqgen.evaluation.digits_run` loads the run from its own saved ``config.yaml``;
:func:`deqgen.evaluation.make_report.build_report` runs 1-3 with :data:`FULL` or :data:`QUICK` settings and
:mod:`~deqgen.evaluation.report_writer` writes ``report.md`` and its plots.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

__all__ = ["FULL", "QUICK", "CacheKind", "ReportError", "ReportSettings"]

#: VIAR's implicit-block KV cache kinds (``generate``'s ``cache`` argument).
CacheKind = Literal["iteration", "lean"]


class ReportError(ValueError):
    """The run directory cannot be reported on; the message says what is missing and how to make it."""


@dataclass(frozen=True)
class ReportSettings:
    """Sizes of the report's measurements.

    Attributes:
        per_class: generated samples per class for every sampler configuration.
        batch_size: images per ``generate`` call (the unit of the timing round robin).
        constant_iterations: the ``K`` of the ``constant:K`` schedules in the sweep.
        adaptive_tolerances: relative-residual tolerances of the ``adaptive`` schedules.
        adaptive_max_iter: their evaluation budget per scale.
        warm_start: schedules also run with warm starts.
        bootstrap: resamples of the generated set behind the feature-FID's standard deviation.
        k1s: no-grad iteration counts of the training-memory measurement.
        k2: recorded iterations there.
        train_batch: training batch size there.
        timing_steps: timed training steps per point, in round robin over the points (median reported).
        convergence_iterations: ``K`` of the long solve behind the convergence curves.
        convergence_per_class: samples per class there.
    """

    per_class: int = 50
    batch_size: int = 100
    constant_iterations: tuple[int, ...] = (1, 2, 4, 8)
    adaptive_tolerances: tuple[float, ...] = (1e-2, 1e-3)
    adaptive_max_iter: int = 16
    warm_start: tuple[str, ...] = ("constant:2", "adaptive:0.01:16")
    bootstrap: int = 50
    k1s: tuple[int, ...] = (0, 2, 4, 8, 16)
    k2: int = 2
    train_batch: int = 64
    timing_steps: int = 3
    convergence_iterations: int = 20
    convergence_per_class: int = 4


FULL = ReportSettings()
QUICK = ReportSettings(
    per_class=2,
    batch_size=20,
    constant_iterations=(1, 4),
    adaptive_tolerances=(1e-2,),
    adaptive_max_iter=8,
    warm_start=("constant:2",),
    k1s=(0, 4),
    train_batch=16,
    timing_steps=1,
    convergence_iterations=6,
    convergence_per_class=1,
    bootstrap=5,
)
