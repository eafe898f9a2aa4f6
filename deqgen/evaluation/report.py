"""``deqgen report``: measure a CPU demo run (``recipes.digits_demo``) against the VIAR paper's claims.

Three measurements, each a function returning plain data, and :func:`~deqgen.evaluation.report_writer.write_report` turning them into
``report.md`` plus PNG plots (matplotlib, an optional extra, is imported only there):

1. :func:`sample_sweep` -- VIAR and the same-width VAR, and VIAR under several iteration schedules, sampled
   batch by batch in a round robin (every configuration sees the same load on a shared machine), each scored
   by the run's digits classifier: class accuracy and Fréchet distance in its feature space against the
   held-out real digits, images per second, implicit-block iterations, KV-cache bytes.
2. :func:`training_memory` -- one training step of the run's VIAR per number of no-grad iterations ``k1``
   (fixed ``k2``), for deqgen's S-JFB and for the official code's pattern (the ``k1`` phase recorded under a
   ``nullcontext``), as ``benchmarks/gradient_memory.py`` measures a toy block: peak RSS and the bytes
   autograd holds for backward, each point in a fresh process; step time side by side in this process.
3. :func:`convergence_curves` -- per scale, relative residual ``|f(z_k) - z_k| / |f(z_k)|`` and cosine
   similarity between iterate ``z_k`` and the last iterate ``z_K``, from the iterates the sampler's own
   solver produces (a forward hook on the implicit map records them); the last residual is checked against
   the solver's statistics.
4. :func:`deqgen.evaluation.make_report.build_report` -- loads the run, runs 1-3 with :data:`FULL` or :data:`QUICK` settings, writes the
   report.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from deqgen.evaluation.digits_classifier import DigitsClassifier, class_accuracy
from deqgen.evaluation.frechet import fid_from_features
from deqgen.evaluation.memory import SavedTensorBytes
from deqgen.models.viar.model import NextScaleTransformer
from deqgen.models.viar.sampling import SampleResult, generate
from deqgen.models.viar.trunk import ImplicitInput, ImplicitTrunk

__all__ = [
    "FULL",
    "QUICK",
    "ConvergenceCurve",
    "DemoRun",
    "MemoryPoint",
    "ReportError",
    "ReportSettings",
    "SamplerConfig",
    "SweepResult",
    "convergence_curves",
    "load_demo_run",
    "official_pattern_logits",
    "real_floor",
    "sample_sweep",
    "solver_gap",
    "sweep_configs",
    "training_batch",
    "training_memory",
    "training_step_seconds",
]

logger = logging.getLogger(__name__)

#: glibc serves allocations above this from mmap and returns them on free, so peak RSS follows live memory
#: (the value ``benchmarks/gradient_memory.py`` uses).
MMAP_THRESHOLD = 128 * 1024

CacheKind = Literal["iteration", "lean"]


class ReportError(ValueError):
    """The run directory cannot be reported on; the message says what is missing and how to make it."""


# ---- settings ------------------------------------------------------------------------------------------


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
QUICK = ReportSettings(per_class=2, batch_size=20, constant_iterations=(1, 4), adaptive_tolerances=(1e-2,),
                       adaptive_max_iter=8, warm_start=("constant:2",), k1s=(0, 4), train_batch=16,
                       timing_steps=1, convergence_iterations=6, convergence_per_class=1, bootstrap=5)


# ---- the run -------------------------------------------------------------------------------------------


@dataclass
class DemoRun:
    """A trained CPU demo run, loaded.

    Attributes:
        run_dir: the demo's output folder.
        viar, var: the two transformers (eval mode).
        vqvae: the tokenizer (eval mode).
        classifier: the digits judge.
        heldout: ``(N, 1, H, W)`` held-out real digits in ``[-1, 1]`` (never seen by the generators).
        heldout_labels: ``(N,)`` int64.
        train: ``(M, 1, H, W)`` the generators' training digits; ``train_labels`` ``(M,)``.
        sampling: the demo's sampler settings (``schedule``, ``cfg_scale``, ``top_k``, ``top_p``, ``seed``).
        demo_metrics: the demo's own ``metrics.json`` (empty if absent).
    """

    run_dir: Path
    viar: NextScaleTransformer
    var: NextScaleTransformer
    vqvae: Any
    classifier: DigitsClassifier
    heldout: Tensor
    heldout_labels: Tensor
    train: Tensor
    train_labels: Tensor
    sampling: dict[str, Any]
    demo_metrics: dict[str, Any] = field(default_factory=dict)


_NEEDED = ("run.json", "classifier.safetensors", "classifier.json", "tokenizer/config.json",
           "tokenizer/model.safetensors", "viar/config.json", "viar/model.safetensors", "var/config.json",
           "var/model.safetensors")


def load_demo_run(run_dir: str | Path) -> DemoRun:
    """Load the models, the classifier and the held-out digits of a ``recipes.digits_demo`` output folder.

    The held-out digits are rebuilt from ``run.json``: ``split(load_digits(data_source, side=side), split,
    Generator().manual_seed(seed))``, part 1.

    Raises:
        ReportError: files missing or unreadable (the message names them).
    """
    from deqgen.data.digits import load_digits, split
    from deqgen.models.viar.convert import CheckpointError, load_converted

    run_dir = Path(run_dir)
    missing = [n for n in _NEEDED if not (run_dir / n).is_file()]
    if missing:
        raise ReportError(f"{run_dir} is not a finished CPU demo run: missing {', '.join(missing)}; make one with "
                          f"`python -m recipes.digits_demo --out {run_dir}`")
    try:
        info = json.loads((run_dir / "run.json").read_text())
        seed, source, side, fractions = int(info["seed"]), info["data_source"], int(info["side"]), info["split"]
        viar, var, vqvae = (load_converted(run_dir / n).eval() for n in ("viar", "var", "tokenizer"))
        classifier = DigitsClassifier.load(run_dir / "classifier.safetensors")
    except (CheckpointError, KeyError, ValueError, OSError) as err:
        raise ReportError(f"{run_dir}: cannot load the run ({err})") from err
    if not isinstance(viar, NextScaleTransformer) or not isinstance(viar.trunk, ImplicitTrunk):
        raise ReportError(f"{run_dir / 'viar'} does not hold a VIAR model")
    if not isinstance(var, NextScaleTransformer) or isinstance(var.trunk, ImplicitTrunk):
        raise ReportError(f"{run_dir / 'var'} does not hold a VAR model")
    parts = split(load_digits(source, side=side), fractions, torch.Generator().manual_seed(seed))
    metrics_path = run_dir / "metrics.json"
    demo_metrics = json.loads(metrics_path.read_text()) if metrics_path.is_file() else {}
    cfg = demo_metrics.get("config", {})
    sampling = {"schedule": cfg.get("sample_schedule", "linear:4:2"), "cfg_scale": float(cfg.get("cfg_scale", 2.0)),
                "top_k": int(cfg.get("top_k", 0)), "top_p": float(cfg.get("top_p", 0.0)), "seed": seed}
    return DemoRun(run_dir, viar, var, vqvae, classifier, parts[1].images, parts[1].labels, parts[0].images,
                   parts[0].labels, sampling, demo_metrics)


# ---- 1. sampling sweep ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class SamplerConfig:
    """One sampler configuration of the sweep.

    Attributes:
        label: the name in tables and plots.
        model: ``"viar"`` or ``"var"``.
        schedule: VIAR's iteration schedule spec (ignored for VAR).
        cache: VIAR's implicit-block KV cache.
        warm_start: VIAR warm start from the previous scale's equilibrium.
    """

    label: str
    model: Literal["viar", "var"]
    schedule: str | None = None
    cache: CacheKind = "iteration"
    warm_start: bool = False


@dataclass(frozen=True)
class SweepResult:
    """What one sampler configuration measured.

    Attributes:
        config: the configuration.
        images: samples generated (``per_class`` per class).
        seconds: wall time summed over its ``generate`` calls.
        images_per_second: ``images / seconds``.
        iterations_per_scale: mean implicit-block evaluations per sample at each scale (0 for VAR).
        class_accuracy: fraction of samples the classifier assigns to their class.
        class_accuracy_se: its binomial standard error ``sqrt(p (1 - p) / images)``.
        feature_fid: Fréchet distance to the held-out digits in the classifier's feature space.
        feature_fid_std: standard deviation of ``feature_fid`` over bootstrap resamples of the generated set
            (the part of the noise that comes from drawing ``images`` samples).
        kv_bytes_per_image: KV-cache bytes at the end of a batch, divided by the batch's images.
    """

    config: SamplerConfig
    images: int
    seconds: float
    images_per_second: float
    iterations_per_scale: tuple[float, ...]
    class_accuracy: float
    class_accuracy_se: float
    feature_fid: float
    feature_fid_std: float
    kv_bytes_per_image: float

    @property
    def mean_iterations(self) -> float:
        """Mean implicit-block evaluations per sample, summed over scales."""
        return float(sum(self.iterations_per_scale))


def sweep_configs(run: DemoRun, settings: ReportSettings) -> list[SamplerConfig]:
    """VAR, VIAR with the demo's schedule (both caches), then VIAR's schedule sweep."""
    demo = run.sampling["schedule"]
    configs = [SamplerConfig("VAR", "var"), SamplerConfig(f"VIAR {demo}", "viar", demo),
               SamplerConfig(f"VIAR {demo} lean cache", "viar", demo, cache="lean")]
    specs = [f"constant:{k}" for k in settings.constant_iterations]
    specs += [f"adaptive:{tol:g}:{settings.adaptive_max_iter}" for tol in settings.adaptive_tolerances]
    configs += [SamplerConfig(f"VIAR {s}", "viar", s) for s in specs if s != demo]
    configs += [SamplerConfig(f"VIAR {s} warm start", "viar", s, warm_start=True) for s in settings.warm_start]
    return configs


def _generate(run: DemoRun, c: SamplerConfig, labels: Tensor, offset: int) -> SampleResult:
    model = run.viar if c.model == "viar" else run.var
    s = run.sampling
    return generate(model, run.vqvae, labels, schedule=c.schedule if c.model == "viar" else None, cfg=s["cfg_scale"],
                    top_k=s["top_k"], top_p=s["top_p"], seed=s["seed"], sample_offset=offset, cache=c.cache,
                    warm_start=c.warm_start)


def sample_sweep(run: DemoRun, configs: Sequence[SamplerConfig], settings: ReportSettings) -> list[SweepResult]:
    """Sample ``per_class`` images per class with every configuration and score them.

    Timing is side by side: the class-major label list is cut into batches, and batch ``b`` is generated by
    every configuration before batch ``b + 1`` starts, so a load change on a shared machine hits all of them.
    All configurations use the same per-sample seeds (common random numbers). One small untimed batch per
    model warms up first.

    Returns:
        One :class:`SweepResult` per configuration, in order.
    """
    labels = torch.arange(10).repeat_interleave(settings.per_class)
    for c in {c.model: c for c in configs}.values():  # warm-up: thread pool, kernels, allocator
        _generate(run, c, labels[:2], 0)
    seconds = {c: 0.0 for c in configs}
    images: dict[SamplerConfig, list[Tensor]] = {c: [] for c in configs}
    iters: dict[SamplerConfig, list[Tensor]] = {c: [] for c in configs}
    kv: dict[SamplerConfig, list[float]] = {c: [] for c in configs}
    for start in range(0, labels.numel(), settings.batch_size):
        batch = labels[start : start + settings.batch_size]
        for c in configs:
            t0 = time.perf_counter()
            res = _generate(run, c, batch, start)
            seconds[c] += time.perf_counter() - t0
            images[c].append(res.images)
            iters[c].append(torch.stack([st.iterations.double() for st in res.stats], 1))  # (B, scales)
            kv[c].append(res.kv_bytes / batch.numel())
    with torch.no_grad():
        real = run.classifier.features(run.heldout)
    out = []
    for c in configs:
        fake = torch.cat(images[c]) * 2 - 1  # (N, 1, H, W) in [-1, 1]
        with torch.no_grad():
            feats = run.classifier.features(fake)
        fid, fid_std = fid_from_features(feats, real), _bootstrap_fid_std(feats, real, settings.bootstrap)
        acc = class_accuracy(run.classifier, fake, labels)
        per_scale = tuple(float(v) for v in torch.cat(iters[c]).mean(0))
        out.append(SweepResult(c, labels.numel(), seconds[c], labels.numel() / seconds[c], per_scale, acc,
                               math.sqrt(acc * (1 - acc) / labels.numel()), fid, fid_std, statistics.mean(kv[c])))
        logger.info("%s: %.1f img/s, %.2f iterations, accuracy %.3f, feature-FID %.2f", c.label,
                    out[-1].images_per_second, out[-1].mean_iterations, out[-1].class_accuracy, fid)
    return out


def _bootstrap_fid_std(fake: Tensor, real: Tensor, resamples: int) -> float:
    """Standard deviation of the feature-FID over ``resamples`` resamples (with replacement, seeded) of the
    generated features ``fake (N, D)`` against fixed ``real (M, D)``."""
    if resamples < 2:
        return math.nan
    g = torch.Generator().manual_seed(0)
    n = fake.shape[0]
    fids = [fid_from_features(fake[torch.randint(0, n, (n,), generator=g)], real) for _ in range(resamples)]
    return statistics.stdev(fids)


def real_floor(run: DemoRun, per_class: int | None = None) -> float:
    """Feature-FID of real training digits against the held-out ones: the metric's floor.

    Args:
        run: the demo run.
        per_class: use the first ``per_class`` training digits of each class (the generated sets' size, so the
            small-sample bias matches); ``None`` uses all of them.
    """
    images = run.train
    if per_class is not None:
        images = torch.cat([run.train[run.train_labels == k][:per_class] for k in range(10)])
    with torch.no_grad():
        return fid_from_features(run.classifier.features(images), run.classifier.features(run.heldout))


# ---- 2. training memory against k1 ---------------------------------------------------------------------


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

    impl: Literal["deqgen", "official"]
    k1: int
    k2: int
    peak_rss_mb: float
    autograd_mb: float
    step_seconds: float


def official_pattern_logits(model: NextScaleTransformer, labels: Tensor, feats: Tensor, k1: int, k2: int,
                            generator: torch.Generator) -> Tensor:
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


def _proc_status_kib(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise OSError(f"{key} not in /proc/self/status")


def _rss_mark() -> tuple[str, int]:
    """Start a peak-RSS measurement. On Linux the high-water mark is reset (``clear_refs`` 5) and the current
    RSS is the baseline, so loading the model earlier does not hide the step's peak; elsewhere the baseline
    is ``ru_maxrss`` (then only a peak above everything before counts)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return "proc", _proc_status_kib("VmRSS") * 1024
    except OSError:
        import resource  # Unix only

        return "rusage", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _rss_peak_since(mark: tuple[str, int]) -> int:
    """Bytes the resident set rose above the baseline of :func:`_rss_mark` at its highest."""
    how, base = mark
    if how == "proc":
        return _proc_status_kib("VmHWM") * 1024 - base
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base


def _train_model(viar: NextScaleTransformer, k1: int, k2: int) -> NextScaleTransformer:
    """A copy of ``viar`` in train mode whose S-JFB always draws ``k1`` no-grad and ``k2`` recorded iterations."""
    from deqgen.gradients import SJFB
    from deqgen.models.viar.model import build_model

    model = build_model(viar.cfg, gradient=SJFB(no_grad=(k1, k1), with_grad=(k2, k2)), init=False)
    model.load_state_dict(viar.state_dict())
    return model.train()


def _train_step(model: NextScaleTransformer, batch: dict[str, Tensor], impl: str, k1: int, k2: int) -> None:
    """Forward (deqgen's S-JFB or the official pattern), cross-entropy, backward; gradients dropped."""
    g = torch.Generator().manual_seed(0)
    if impl == "deqgen":
        logits, _ = model(batch["labels"], batch["feats"], generator=g)
    else:
        logits = official_pattern_logits(model, batch["labels"], batch["feats"], k1, k2, g)
    F.cross_entropy(logits.flatten(0, 1), batch["target"].flatten()).backward()
    model.zero_grad(set_to_none=True)


def _memory_point(model_dir: str, batch_path: str, impl: str, k1: int, k2: int) -> dict[str, float]:
    """One point, run in a fresh process (:func:`training_memory` starts it)."""
    from deqgen.models.viar.convert import load_converted

    torch.set_num_threads(1)
    model = _train_model(load_converted(model_dir), k1, k2)  # type: ignore[arg-type]
    batch = torch.load(batch_path, weights_only=True)
    with torch.no_grad():  # warm-up outside the measured step: kernels, thread pool, first allocations
        model(batch["labels"], batch["feats"], generator=torch.Generator().manual_seed(0))
    counter = SavedTensorBytes({p.untyped_storage().data_ptr() for p in model.parameters()})
    before = _rss_mark()
    with torch.autograd.graph.saved_tensors_hooks(counter.pack, counter.unpack):
        _train_step(model, batch, impl, k1, k2)
    return {"peak_rss_mb": _rss_peak_since(before) / 2**20, "autograd_mb": counter.peak / 2**20}


def _memory_point_main(arg: str) -> None:
    """Entry of the child process: JSON arguments in, one JSON line out."""
    a = json.loads(arg)
    sys.stdout.write(json.dumps(_memory_point(a["model_dir"], a["batch"], a["impl"], a["k1"], a["k2"])) + "\n")


def training_batch(run: DemoRun, batch_size: int) -> dict[str, Tensor]:
    """The first ``batch_size`` training digits as the transformer's input: ``labels (B,)``, teacher-forcing
    ``feats (B, L - first_l, Cvae)`` and target tokens ``target (B, L)``."""
    images, labels = run.train[:batch_size], run.train_labels[:batch_size]
    with torch.no_grad():
        pyramid = run.vqvae.img_to_indices(images)
        feats = run.vqvae.teacher_forcing_input(pyramid)
    return {"labels": labels.clone(), "feats": feats.contiguous(), "target": torch.cat(pyramid, 1)}


_IMPLS = ("deqgen", "official")


def training_step_seconds(run: DemoRun, settings: ReportSettings) -> dict[tuple[str, int], float]:
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


def _run_memory_point(arg: str, env: dict[str, str]) -> dict[str, float]:
    code = "import sys; from deqgen.evaluation.report import _memory_point_main as m; m(sys.argv[1])"
    proc = subprocess.run([sys.executable, "-c", code, arg], capture_output=True, text=True, env=env, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"memory point {arg} failed:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def training_memory(run: DemoRun, settings: ReportSettings) -> list[MemoryPoint]:
    """Peak memory and step time of one training step per ``k1`` in ``settings.k1s``, both implementations.

    Memory: each point runs in a fresh Python process with one thread and glibc's mmap threshold fixed
    (:data:`MMAP_THRESHOLD`), so that peak RSS follows live memory; up to two such processes run at a time
    (each measures only its own memory). Time: :func:`training_step_seconds`, in this process (with this
    process's thread count), before the memory processes start.
    """
    from concurrent.futures import ThreadPoolExecutor

    seconds = training_step_seconds(run, settings)
    points = [(k1, impl) for k1 in settings.k1s for impl in _IMPLS]
    with tempfile.TemporaryDirectory() as tmp:
        batch_path = os.path.join(tmp, "batch.pt")
        torch.save(training_batch(run, settings.train_batch), batch_path)
        env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(MMAP_THRESHOLD)}
        args = [json.dumps({"model_dir": str(run.run_dir / "viar"), "batch": batch_path, "impl": impl, "k1": k1,
                            "k2": settings.k2}) for k1, impl in points]
        with ThreadPoolExecutor(max_workers=max(1, min(2, os.cpu_count() or 1))) as pool:
            results = list(pool.map(lambda a: _run_memory_point(a, env), args))
    out = []
    for (k1, impl), r in zip(points, results):
        out.append(MemoryPoint(impl, k1, settings.k2, r["peak_rss_mb"], r["autograd_mb"],  # type: ignore[arg-type]
                               seconds[(impl, k1)]))
        logger.info("memory %s k1=%d: peak RSS %.1f MiB, autograd %.1f MiB, step %.3f s", impl, k1,
                    r["peak_rss_mb"], r["autograd_mb"], seconds[(impl, k1)])
    return out


# ---- 3. convergence curves -----------------------------------------------------------------------------


@dataclass(frozen=True)
class ConvergenceCurve:
    """Per-iteration convergence of the implicit block at one scale.

    ``R`` rows: every row the implicit block solved (with guidance, the conditional and the unconditional row
    of each sample). ``K`` evaluations of the map; iterates ``z_0`` (the start) to ``z_K`` (the last).

    Attributes:
        scale: scale index; ``tokens`` its token count.
        rel_residual: ``(K, R)`` float64, ``|f(z_k) - z_k| / |f(z_k)|`` (L2 over the scale's tokens and
            channels), ``k = 0 .. K-1``.
        cosine: ``(K + 1, R)`` float64, cosine similarity of ``z_k`` and ``z_K`` (flattened per row).
        solver_rel_residual: ``(R,)`` the relative residual the solver itself reported for the last
            evaluation (its :class:`~deqgen.stats.SolverStats`), for cross-checking ``rel_residual[-1]``.
    """

    scale: int
    tokens: int
    rel_residual: Tensor
    cosine: Tensor
    solver_rel_residual: Tensor

    def mean_rel_residual(self) -> list[float]:
        """``K`` values: the relative residual at each ``k``, averaged over rows."""
        return [float(v) for v in self.rel_residual.mean(1)]

    def mean_cosine(self) -> list[float]:
        """``K + 1`` values: ``cosine(z_k, z_K)`` at each ``k``, averaged over rows."""
        return [float(v) for v in self.cosine.mean(1)]


def convergence_curves(
    model: NextScaleTransformer,
    vqvae: Any,
    labels: Tensor,
    *,
    iterations: int,
    cache: CacheKind = "iteration",
    cfg: float = 0.0,
    top_k: int = 0,
    top_p: float = 0.0,
    seed: int = 0,
) -> list[ConvergenceCurve]:
    """Sample with ``constant:iterations`` Picard and record every iterate of the implicit block.

    A forward hook on the implicit map (``model.trunk.map``) sees each call ``f(z_k, x, k)``: its input
    ``z_k`` and output ``f(z_k) = z_{k+1}`` (plain Picard). The hook is removed before returning.

    Args:
        model: a VIAR in eval mode.
        vqvae: its tokenizer.
        labels: ``(B,)`` int64.
        iterations: ``K``, map evaluations per scale.
        cache, cfg, top_k, top_p, seed: as :func:`~deqgen.models.viar.sampling.generate`.

    Returns:
        One :class:`ConvergenceCurve` per scale.
    """
    trunk = model.trunk
    if not isinstance(trunk, ImplicitTrunk):
        raise TypeError("convergence curves need a VIAR model (an ImplicitTrunk)")
    calls: dict[int, list[tuple[Tensor, Tensor]]] = {}

    def hook(_module: torch.nn.Module, args: tuple[Any, ...], output: Tensor) -> None:
        z, x, _k = args
        calls.setdefault(x.scale, []).append((z.detach().double().flatten(1), output.detach().double().flatten(1)))

    handle = trunk.map.register_forward_hook(hook)
    try:
        res = generate(model, vqvae, labels, schedule=f"constant:{iterations}", cfg=cfg, top_k=top_k, top_p=top_p,
                       seed=seed, cache=cache)
    finally:
        handle.remove()
    B = labels.numel()
    curves = []
    for s, st in enumerate(res.stats):
        seq = calls[s]
        zs = [z for z, _ in seq] + [seq[-1][1]]  # z_0 .. z_K
        rel = torch.stack([(fz - z).norm(dim=1) / fz.norm(dim=1).clamp_min(1e-300) for z, fz in seq])
        cos = torch.stack([F.cosine_similarity(z, zs[-1], dim=1, eps=1e-300) for z in zs])
        curves.append(ConvergenceCurve(s, model.cfg.patch_nums[s] ** 2, rel, cos, st.rel_residual.double()))
        logger.info("scale %d: final rel residual %.3g (gap to the solver's %.1e), cosine at k=5 %.4f", s,
                    float(rel[-1].mean()), solver_gap(curves[-1]), float(cos[min(5, len(cos) - 1)].mean()))
    assert all(c.solver_rel_residual.numel() == B for c in curves)
    return curves


def solver_gap(curve: ConvergenceCurve) -> float:
    """Largest relative difference between the hook's last relative residual (worst row of each guided pair)
    and the solver's own statistic (stored in float32 by the sampler, so about 1e-7 at best); a small number
    means the curves describe the iterates the solver used."""
    B = curve.solver_rel_residual.numel()
    ours, theirs = curve.rel_residual[-1].view(-1, B).amax(0), curve.solver_rel_residual
    return float(((ours - theirs).abs() / theirs.abs().clamp_min(1e-300)).max())
