"""Report part 2: training memory against ``k1``. One training step of the run's VIAR per number of no-grad
iterations ``k1`` (fixed ``k2``), for deqgen's S-JFB and for the official code's pattern (the ``k1`` phase
recorded under a ``nullcontext``), as ``benchmarks/gradient_memory.py`` measures a toy block: peak RSS and the
bytes autograd holds for backward, each point in a fresh process; step time side by side in this process.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from deqgen.evaluation.digits_run import DigitsRun
from deqgen.evaluation.memory import SavedTensorBytes, peak_memory_bytes, reset_peak_memory
from deqgen.evaluation.report import ReportSettings
from deqgen.gradients import SJFB
from deqgen.models.viar.convert import load_converted
from deqgen.models.viar.model import NextScaleTransformer, build_model
from deqgen.models.viar.trunk import ImplicitInput, ImplicitTrunk

__all__ = [
    "MMAP_THRESHOLD",
    "MemoryPoint",
    "PointSpec",
    "main",
    "measure_memory_point",
    "official_pattern_logits",
    "training_batch",
    "training_memory",
    "training_step_seconds",
]

logger = logging.getLogger(__name__)

#: glibc serves allocations above this from mmap and returns them on free, so peak RSS follows live memory
#: (the value ``benchmarks/gradient_memory.py`` uses).
MMAP_THRESHOLD = 128 * 1024

#: deqgen's S-JFB step, or the official code's recorded ``k1`` phase.
Impl = Literal["deqgen", "official"]


@dataclass(frozen=True)
class MemoryPoint:
    """One training step of the run's VIAR at ``k1`` no-grad and ``k2`` recorded iterations.

    Attributes:
        impl: ``"deqgen"`` (S-JFB, ``k1`` phase under ``torch.no_grad()``) or ``"official"`` (the ``k1``
            phase recorded under ``contextlib.nullcontext()`` and detached afterwards).
        k1, k2: iteration counts.
        peak_rss_mb: how far the resident memory rose during the step above its level just before (MiB).
        autograd_mb: most bytes autograd held for backward at any moment (saved tensors, parameters excluded).
        step_seconds: median wall time of the timed steps (measured side by side with the other points).
    """

    impl: Impl
    k1: int
    k2: int
    peak_rss_mb: float
    autograd_mb: float
    step_seconds: float


def official_pattern_logits(
    model: NextScaleTransformer, labels: Tensor, feats: Tensor, k1: int, k2: int, generator: torch.Generator
) -> Tensor:
    """The official VIAR training forward on deqgen's modules: ``k1`` iterations recorded (``nullcontext``)
    from detached ``z0``/injection, then detached, then ``k2`` recorded iterations.

    Args:
        model: a VIAR in train mode.
        labels: ``(B,)`` int64.
        feats: ``(B, L - first_l, Cvae)`` teacher-forcing input.
        k1, k2: iteration counts.
        generator: drop masks.

    Returns:
        ``(B, L, V)`` logits.
    """
    trunk = model.trunk
    assert isinstance(trunk, ImplicitTrunk)
    cond = model.condition(labels)
    x = model.embed(cond, feats)
    L = x.shape[1]
    mask = model.attn_bias[:L, :L].to(x.dtype)
    bc = model.block_condition(cond)
    u = x
    for blk in trunk.pre_blocks:
        u = blk(u, bc, mask=mask, generator=generator)
    masks = trunk.map.block.draw_masks(u, generator)
    z, inj = u.detach(), ImplicitInput(u.detach(), bc, mask, masks)
    with contextlib.nullcontext():  # what the official code runs its "no-grad" phase under: it is recorded
        for k in range(k1):
            z = trunk.map(z, inj, k)
    z, inj = z.detach(), ImplicitInput(u, bc, mask, masks)
    for k in range(k1, k1 + k2):
        z = trunk.map(z, inj, k)
    for blk in trunk.post_blocks:
        z = blk(z, bc, mask=mask, generator=generator)
    return model.logits(z, cond)


def _train_model(viar: NextScaleTransformer, k1: int, k2: int) -> NextScaleTransformer:
    """A copy of ``viar`` in train mode whose S-JFB always draws ``k1`` no-grad and ``k2`` recorded iterations."""
    model = build_model(viar.cfg, gradient=SJFB(no_grad=(k1, k1), with_grad=(k2, k2)), init=False)
    model.load_state_dict(viar.state_dict())
    return model.train()


def _train_step(model: NextScaleTransformer, batch: dict[str, Tensor], impl: Impl, k1: int, k2: int) -> None:
    """Forward (deqgen's S-JFB or the official pattern), cross-entropy, backward; gradients dropped."""
    g = torch.Generator().manual_seed(0)
    if impl == "deqgen":
        logits, _ = model(batch["labels"], batch["feats"], generator=g)
    else:
        logits = official_pattern_logits(model, batch["labels"], batch["feats"], k1, k2, g)
    F.cross_entropy(logits.flatten(0, 1), batch["target"].flatten()).backward()
    model.zero_grad(set_to_none=True)


def training_batch(run: DigitsRun, batch_size: int) -> dict[str, Tensor]:
    """The first ``batch_size`` training digits as the transformer's input: ``labels (B,)``, teacher-forcing
    ``feats (B, L - first_l, Cvae)`` and target tokens ``target (B, L)``."""
    images, labels = run.train[:batch_size], run.train_labels[:batch_size]
    with torch.no_grad():
        pyramid = run.vqvae.img_to_indices(images)
        feats = run.vqvae.teacher_forcing_input(pyramid)
    return {"labels": labels.clone(), "feats": feats.contiguous(), "target": torch.cat(pyramid, 1)}


_IMPLS: tuple[Impl, ...] = ("deqgen", "official")


def training_step_seconds(run: DigitsRun, settings: ReportSettings) -> dict[tuple[str, int], float]:
    """Median step time per ``(impl, k1)``, timed side by side in this process: ``timing_steps`` rounds, each
    running every ``(k1, impl)`` once, after one untimed step of each."""
    batch = training_batch(run, settings.train_batch)
    models = {k1: _train_model(run.viar, k1, settings.k2) for k1 in settings.k1s}
    for k1 in settings.k1s:
        for impl in _IMPLS:
            _train_step(models[k1], batch, impl, k1, settings.k2)
    times: dict[tuple[str, int], list[float]] = {(impl, k1): [] for k1 in settings.k1s for impl in _IMPLS}
    for _ in range(settings.timing_steps):
        for k1 in settings.k1s:
            for impl in _IMPLS:
                t0 = time.perf_counter()
                _train_step(models[k1], batch, impl, k1, settings.k2)
                times[(impl, k1)].append(time.perf_counter() - t0)
    return {key: statistics.median(v) for key, v in times.items()}


def training_memory(run: DigitsRun, settings: ReportSettings) -> list[MemoryPoint]:
    """Peak memory and step time of one training step per ``k1`` in ``settings.k1s``, both implementations.

    Memory: each point runs in a fresh process, ``python -m deqgen.evaluation.training_memory`` (:func:`main`),
    with one thread and glibc's mmap threshold fixed (:data:`MMAP_THRESHOLD`). A fresh process is needed, not
    a convenience: peak RSS is a per-process quantity, the heap an earlier point left behind would hide or
    inflate the next one's peak, and glibc reads ``MALLOC_MMAP_THRESHOLD_`` only at start-up. Up to two such
    processes run at a time (each measures only its own memory). Time: :func:`training_step_seconds`, in this
    process (with this process's thread count), before the memory processes start.
    """
    seconds = training_step_seconds(run, settings)
    points = [(k1, impl) for k1 in settings.k1s for impl in _IMPLS]
    with tempfile.TemporaryDirectory() as tmp:
        batch_path = Path(tmp) / "batch.pt"
        torch.save(training_batch(run, settings.train_batch), batch_path)
        env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(MMAP_THRESHOLD)}
        args = [
            PointSpec(str(run.run_dir / "viar"), str(batch_path), impl, k1, settings.k2)
            for k1, impl in points
        ]
        with ThreadPoolExecutor(max_workers=max(1, min(2, os.cpu_count() or 1))) as pool:
            results = list(pool.map(lambda a: _run_memory_point(a, env), args))
    out = []
    for (k1, impl), r in zip(points, results):
        out.append(
            MemoryPoint(impl, k1, settings.k2, r["peak_rss_mb"], r["autograd_mb"], seconds[(impl, k1)])
        )
        logger.info(
            "memory %s k1=%d: peak RSS %.1f MiB, autograd %.1f MiB, step %.3f s",
            impl,
            k1,
            r["peak_rss_mb"],
            r["autograd_mb"],
            seconds[(impl, k1)],
        )
    return out


@dataclass(frozen=True)
class PointSpec:
    """What one memory process measures (its JSON command line): the VIAR export, the saved batch, the
    implementation and the iteration counts."""

    model_dir: str
    batch: str
    impl: Impl
    k1: int
    k2: int


def _run_memory_point(args: PointSpec, env: dict[str, str]) -> dict[str, float]:
    cmd = [sys.executable, "-m", "deqgen.evaluation.training_memory", json.dumps(dataclasses.asdict(args))]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"memory point {args} failed:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


def measure_memory_point(args: PointSpec) -> dict[str, float]:
    """One point in this process: the rise of peak RSS during one training step and autograd's peak bytes.

    Meant for a fresh process (:func:`main`); in a process that already ran other work the RSS number
    carries that work's heap.
    """
    torch.set_num_threads(1)
    viar = load_converted(args.model_dir)
    if not isinstance(viar, NextScaleTransformer):
        raise TypeError(f"{args.model_dir} does not hold a VIAR model")
    model = _train_model(viar, args.k1, args.k2)
    batch = torch.load(args.batch, weights_only=True)
    with torch.no_grad():  # warm-up outside the measured step: kernels, thread pool, first allocations
        model(batch["labels"], batch["feats"], generator=torch.Generator().manual_seed(0))
    counter = SavedTensorBytes({p.untyped_storage().data_ptr() for p in model.parameters()})
    base = reset_peak_memory("cpu")
    with torch.autograd.graph.saved_tensors_hooks(counter.pack, counter.unpack):
        _train_step(model, batch, args.impl, args.k1, args.k2)
    return {"peak_rss_mb": (peak_memory_bytes("cpu") - base) / 2**20, "autograd_mb": counter.peak / 2**20}


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m deqgen.evaluation.training_memory '<json>'``: one point, one JSON line on stdout."""
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        raise SystemExit(
            "usage: python -m deqgen.evaluation.training_memory "
            '\'{"model_dir": ..., "batch": ..., "impl": ..., "k1": ..., "k2": ...}\''
        )
    result = measure_memory_point(PointSpec(**json.loads(argv[0])))
    sys.stdout.write(json.dumps(result) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
