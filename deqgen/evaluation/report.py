"""``deqgen report``: measure a CPU demo run (``recipes.digits_demo``) against the VIAR paper's claims.

Three measurements, each a function returning plain data, and :func:`write_report` turning them into
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
4. :func:`build_report` -- loads the run, runs 1-3 with :data:`FULL` or :data:`QUICK` settings, writes the
   report.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from deqgen.evaluation.digits_classifier import DigitsClassifier, class_accuracy
from deqgen.evaluation.frechet import fid_from_features
from deqgen.evaluation.memory import SavedTensorBytes
from deqgen.evaluation.npz import to_uint8_nhwc, write_samples_npz
from deqgen.models.viar.model import NextScaleTransformer
from deqgen.models.viar.sampling import SampleResult, generate
from deqgen.models.viar.trunk import ImplicitInput, ImplicitTrunk

__all__ = [
    "FULL",
    "QUICK",
    "ConvergenceCurve",
    "DemoRun",
    "MemoryPoint",
    "ReportData",
    "ReportError",
    "ReportSettings",
    "SamplerConfig",
    "SweepResult",
    "build_report",
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
    "write_report",
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
        sampling: the demo's sampler settings (``schedule``, ``cfg``, ``top_k``, ``top_p``, ``seed``).
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
    sampling = {"schedule": cfg.get("sample_schedule", "linear:4:2"), "cfg": float(cfg.get("cfg", 2.0)),
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
    return generate(model, run.vqvae, labels, schedule=c.schedule if c.model == "viar" else None, cfg=s["cfg"],
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


# ---- 4. the report -------------------------------------------------------------------------------------

#: The paper's headline numbers (viar_facts.md section 10 and 6), quoted in the report.
PAPER: Mapping[str, Any] = MappingProxyType({
    "fid": 2.16,
    "viar_params": 770.9e6,
    "var_params": 2010.0e6,
    "memory_gb": (19.24, 8.53),
    "throughput": (15.16, 32.08),
})


@dataclass
class ReportData:
    """Everything :func:`write_report` needs (plain data, also dumped as ``report.json``).

    Attributes:
        run_dir: the demo run.
        settings: the sizes used; ``quick`` whether they were :data:`QUICK`.
        parameters: ``{"viar": n, "var": n}``.
        sweep: results of :func:`sample_sweep` (VAR first, then VIAR with the demo's schedule and both caches).
        floor: real-vs-real feature-FID at the generated sets' size (:func:`real_floor` with ``per_class``).
        floor_all: the same with all training digits.
        memory: :func:`training_memory` points.
        convergence: ``{cache: curves}`` from :func:`convergence_curves`.
        machine: cores, threads, torch version, load averages, wall time.
        sampling: the demo's sampler settings.
    """

    run_dir: Path
    settings: ReportSettings
    quick: bool
    parameters: dict[str, int]
    sweep: list[SweepResult]
    floor: float
    floor_all: float
    memory: list[MemoryPoint]
    convergence: dict[str, list[ConvergenceCurve]]
    machine: dict[str, Any]
    sampling: dict[str, Any]

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict (tensors become lists of per-iteration means)."""
        return {
            "run_dir": str(self.run_dir), "quick": self.quick, "settings": dataclasses.asdict(self.settings),
            "parameters": self.parameters, "floor_feature_fid": self.floor,
            "floor_feature_fid_all_training_digits": self.floor_all, "machine": self.machine,
            "sampling": self.sampling,
            "sweep": [{**dataclasses.asdict(r.config), **{k: v for k, v in dataclasses.asdict(r).items()
                                                          if k != "config"}, "mean_iterations": r.mean_iterations}
                      for r in self.sweep],
            "memory": [dataclasses.asdict(m) for m in self.memory],
            "convergence": {cache: [{"scale": c.scale, "tokens": c.tokens, "rel_residual": c.mean_rel_residual(),
                                     "cosine": c.mean_cosine(), "min_cosine": [float(v) for v in c.cosine.amin(1)],
                                     "solver_gap": solver_gap(c)} for c in curves]
                            for cache, curves in self.convergence.items()},
        }


def _fmt_bytes(n: float) -> str:
    return f"{n / 1024:.1f} KiB" if n < 2**20 else f"{n / 2**20:.2f} MiB"


def _ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}x" if b else "n/a"


def _model_table(d: ReportData) -> list[str]:
    var, viar, lean = d.sweep[0], d.sweep[1], d.sweep[2]
    p_ratio = d.parameters["viar"] / d.parameters["var"]
    paper_p = PAPER["viar_params"] / PAPER["var_params"]
    t0, t1 = PAPER["throughput"]
    m0, m1 = PAPER["memory_gb"]
    speed = viar.images_per_second / var.images_per_second
    rows = [
        "| quantity | VAR | VIAR | VIAR / VAR | paper claim (VIAR-d30 vs VAR-d30, ImageNet 256) | here |",
        "|---|---:|---:|---:|---|---|",
        (f"| parameters | {d.parameters['var']:,} | {d.parameters['viar']:,} | {p_ratio:.1%} | 770.9M vs 2010.0M "
         f"({paper_p:.1%}) | {'fewer parameters, as claimed' if p_ratio < 1 else 'not fewer'}; "
         f"{p_ratio:.1%} vs {paper_p:.1%} |"),
        (f"| class accuracy of samples (digits classifier; ± binomial s.e.) | {var.class_accuracy:.3f} ± "
         f"{var.class_accuracy_se:.3f} | {viar.class_accuracy:.3f} ± {viar.class_accuracy_se:.3f} "
         f"| {_ratio(viar.class_accuracy, var.class_accuracy)} | quality on par with VAR at 38.4 % of its "
         f"parameters (FID 2.16) | {_verdict_accuracy(viar, var)} |"),
        (f"| feature-FID vs held-out digits (± bootstrap s.d.; real digits at the same count: {d.floor:.2f}) | "
         f"{var.feature_fid:.2f} ± {var.feature_fid_std:.2f} | {viar.feature_fid:.2f} ± {viar.feature_fid_std:.2f} | "
         f"{_ratio(viar.feature_fid, var.feature_fid)} | FID {PAPER['fid']} (Inception "
         f"features, 50k samples; a different metric) | {_verdict_fid(viar, var)} |"),
        (f"| sampling img/s (side by side) | {var.images_per_second:.1f} | {viar.images_per_second:.1f} | "
         f"{speed:.2f}x | throughput {t0} -> {t1} img/s ({t1 / t0:.2f}x, RTX 4090) | "
         f"{'faster' if speed > 1 else 'slower'} than VAR here ({speed:.2f}x vs {t1 / t0:.2f}x claimed) |"),
        (f"| KV-cache bytes per image, iteration-keyed | {_fmt_bytes(var.kv_bytes_per_image)} | "
         f"{_fmt_bytes(viar.kv_bytes_per_image)} | {_ratio(viar.kv_bytes_per_image, var.kv_bytes_per_image)} | "
         f"peak sampling memory {m0} -> {m1} GB ({m1 / m0:.2f}x; all memory, not only KV) | "
         f"{_verdict_memory(viar.kv_bytes_per_image / var.kv_bytes_per_image, m1 / m0)} |"),
        (f"| KV-cache bytes per image, lean cache | {_fmt_bytes(var.kv_bytes_per_image)} | "
         f"{_fmt_bytes(lean.kv_bytes_per_image)} | {_ratio(lean.kv_bytes_per_image, var.kv_bytes_per_image)} | "
         f"(same claim) | {_verdict_memory(lean.kv_bytes_per_image / var.kv_bytes_per_image, m1 / m0)} |"),
    ]
    return rows


def _verdict(diff: float, noise: float, lower_is_better: bool) -> str:
    """'on par' when the difference is within two combined standard errors, else better / worse."""
    if not abs(diff) > 2 * noise:  # also when the noise is unknown (NaN): no claim either way
        return f"on par with VAR (difference {diff:+.3f}, within 2 s.e. = {2 * noise:.3f})"
    better = diff < 0 if lower_is_better else diff > 0
    return f"{'better' if better else 'worse'} than VAR (difference {diff:+.3f}, 2 s.e. = {2 * noise:.3f})"


def _verdict_accuracy(viar: SweepResult, var: SweepResult) -> str:
    return _verdict(viar.class_accuracy - var.class_accuracy, math.hypot(viar.class_accuracy_se, var.class_accuracy_se),
                    lower_is_better=False)


def _verdict_fid(viar: SweepResult, var: SweepResult) -> str:
    return _verdict(viar.feature_fid - var.feature_fid, math.hypot(viar.feature_fid_std, var.feature_fid_std),
                    lower_is_better=True)


def _verdict_memory(ours: float, paper: float) -> str:
    if ours < 1:
        return f"smaller than VAR's ({ours:.2f}x; paper {paper:.2f}x)"
    return f"larger than VAR's ({ours:.2f}x; paper {paper:.2f}x)"


def _sweep_table(d: ReportData) -> list[str]:
    var = d.sweep[0]
    head = ("| sampler | iterations per sample (per scale) | img/s | vs VAR | class accuracy ± s.e. | "
            "feature-FID ± s.d. | KV bytes / image |")
    rows = [head, "|---|---|---:|---:|---:|---:|---:|"]
    for r in d.sweep:
        per = " / ".join(f"{v:.2f}".rstrip("0").rstrip(".") for v in r.iterations_per_scale)
        rows.append(f"| {r.config.label} | {r.mean_iterations:.2f} ({per}) | {r.images_per_second:.1f} | "
                    f"{_ratio(r.images_per_second, var.images_per_second)} | {r.class_accuracy:.3f} ± "
                    f"{r.class_accuracy_se:.3f} | {r.feature_fid:.2f} ± {r.feature_fid_std:.2f} | "
                    f"{_fmt_bytes(r.kv_bytes_per_image)} |")
    return rows


def _memory_table(d: ReportData) -> list[str]:
    by = {(m.impl, m.k1): m for m in d.memory}
    head = ("| k1 (no-grad iterations) | deqgen peak RSS MiB | official pattern peak RSS MiB | deqgen autograd MiB | "
            "official pattern autograd MiB | deqgen step s | official pattern step s |")
    rows = [head, "|---:|---:|---:|---:|---:|---:|---:|"]
    for k1 in d.settings.k1s:
        a, b = by[("deqgen", k1)], by[("official", k1)]
        rows.append(f"| {k1} | {a.peak_rss_mb:.1f} | {b.peak_rss_mb:.1f} | {a.autograd_mb:.1f} | {b.autograd_mb:.1f} "
                    f"| {a.step_seconds:.3f} | {b.step_seconds:.3f} |")
    return rows


def _memory_summary(d: ReportData) -> str:
    k_lo, k_hi = min(d.settings.k1s), max(d.settings.k1s)
    by = {(m.impl, m.k1): m for m in d.memory}
    parts = []
    for impl, name in (("deqgen", "deqgen's S-JFB"), ("official", "the official pattern")):
        lo, hi = by[(impl, k_lo)], by[(impl, k_hi)]
        per_it = (hi.autograd_mb - lo.autograd_mb) / max(1, k_hi - k_lo)
        parts.append(f"{name}: autograd memory {lo.autograd_mb:.1f} -> {hi.autograd_mb:.1f} MiB from k1 = {k_lo} to "
                     f"{k_hi} ({per_it:+.2f} MiB per no-grad iteration), peak RSS {lo.peak_rss_mb:.1f} -> "
                     f"{hi.peak_rss_mb:.1f} MiB, step time {_ratio(hi.step_seconds, lo.step_seconds)}")
    return "; ".join(parts) + "."


def _at(values: list[float], k: int) -> str:
    return f"{values[k]:.4g}" if k < len(values) else "-"


def _convergence_table(curves: list[ConvergenceCurve], K: int) -> list[str]:
    ks = sorted({0, 1, min(4, K - 1), K - 1})
    cs = [k for k in (0, 1, 2, 5, 10) if k < K]
    head = " | ".join([f"rel residual k={k}" for k in ks] + [f"cosine(z_{k}, z_{K})" for k in cs])
    rows = [f"| scale (tokens) | {head} | min cosine(z_{min(5, K)}, z_{K}) | relative gap to solver stats |",
            "|---|" + "---:|" * (len(ks) + len(cs) + 2)]
    for c in curves:
        rel, cos = c.mean_rel_residual(), c.mean_cosine()
        cells = [_at(rel, k) for k in ks] + [f"{cos[k]:.6f}" for k in cs]
        rows.append(f"| {c.scale} ({c.tokens}) | " + " | ".join(cells) +
                    f" | {float(c.cosine[min(5, K)].min()):.6f} | {solver_gap(c):.1e} |")
    return rows


def _cosine_verdict(curves: list[ConvergenceCurve], K: int) -> str:
    k = min(5, K)
    last = curves[-1]
    mean5, min5 = float(last.cosine[k].mean()), float(last.cosine[k].min())
    ok = "holds" if mean5 > 0.98 else "does not hold"
    first = next((i for i, v in enumerate(last.mean_cosine()) if v > 0.98), None)
    return (f"At the largest scale ({last.tokens} tokens) the mean cosine similarity of z_{k} with z_{K} is "
            f"{mean5:.6f} (lowest row {min5:.6f}): the claim {ok} here; the mean first exceeds 0.98 at "
            f"k = {first}.")


def write_report(d: ReportData, out_dir: Path) -> Path:
    """Write ``report.md``, ``report.json`` and the plots into ``out_dir``; returns the markdown path."""
    out_dir.mkdir(parents=True, exist_ok=True)
    plots = _plots(d, out_dir)
    K = d.settings.convergence_iterations
    m = d.machine
    lines = [
        f"# VIAR vs VAR on the CPU digits demo: `{d.run_dir}`",
        "",
        (f"Measured by `deqgen report`{' --quick (small counts: numbers are noise)' if d.quick else ''} in "
         f"{m['wall_seconds']:.0f} s on {m['cpu_count']} CPU cores ({m['torch_threads']} torch thread(s), torch "
         f"{m['torch']}, {m['platform']}); load average {m['load_before']:.2f} before, {m['load_after']:.2f} after. "
         "Timings are measured side by side in one run (round robin over configurations, batch by batch) and are "
         "best read as ratios; the machine may be shared."),
        "",
        (f"Sampler settings from the demo: cfg {d.sampling['cfg']}, top-k {d.sampling['top_k']}, top-p "
         f"{d.sampling['top_p']}, seed {d.sampling['seed']}; {d.settings.per_class} samples per class per "
         f"configuration, batches of {d.settings.batch_size}; every configuration draws the same per-sample seeds. "
         "Quality is judged by the run's own digits classifier (trained on held-out real digits the generators "
         "never saw): class accuracy of the samples, and the Fréchet distance in its 128-d feature space against "
         "those held-out digits (feature-FID). Paper numbers are quoted from viar_facts.md; the paper's models are "
         "~1000x larger and run on a GPU, so only directions and ratios can be compared."),
        "",
        "## 1. VIAR vs the same-width VAR",
        "",
        ("Paper claims: VIAR reaches VAR-level quality with 38.4 % of VAR-d30's parameters (FID 2.16), and "
         "with its per-scale iteration knob samples faster (15.16 -> 32.08 img/s) in less memory "
         "(19.24 -> 8.53 GB)."),
        "",
        *_model_table(d),
        "",
        (f"VIAR samples with the demo's schedule `{d.sampling['schedule']}`. The KV bytes are those held at the end "
         "of a batch (the cache's peak), per image, guidance rows included; the iteration-keyed cache keeps one K/V "
         "per iteration in the implicit block (the official semantics, equal to teacher forcing for a constant "
         "count), the lean cache one per scale."),
        "",
        "## 2. Training step: memory and time against no-grad iterations k1",
        "",
        (f"Paper claim: constant training memory in the number of no-grad iterations (the paper's S-JFB). "
         f"viar_facts.md (section 11.1) found that the official code records its \"no-grad\" phase, so its memory "
         f"grows with k1. One training step (forward, cross-entropy, backward) of this run's VIAR, batch "
         f"{d.settings.train_batch}, k2 = {d.settings.k2} recorded iterations, float32, one thread, each point in a "
         "fresh process. `deqgen` is deqgen's S-JFB (k1 phase under `torch.no_grad()`); `official pattern` runs "
         "the same modules the official way (k1 phase under `contextlib.nullcontext()` from a detached start, "
         "detached afterwards). Peak RSS is how far the resident memory rose during the step above its level "
         "just before it (after a no-grad warm-up; the kernel's high-water mark is reset first); autograd is the "
         "most bytes held for backward, counted with `saved_tensors_hooks`."),
        "",
        *_memory_table(d),
        "",
        _memory_summary(d),
        "",
        f"![training memory]({plots['memory']})",
        "",
        "## 3. Quality against throughput over iteration schedules",
        "",
        ("Paper claim (in words): fewer implicit iterations per scale buy throughput at little cost in quality "
         "(the paper's per-scale iteration knob). `constant:K` runs K map evaluations at every scale, "
         "`linear:A:B` goes from A at the coarsest to B at the finest scale, `adaptive:TOL:MAX` stops each sample "
         "once its relative residual is at most TOL (at most MAX evaluations), `warm start` starts each scale from "
         "the previous scale's upsampled equilibrium instead of the pre blocks' output."),
        "",
        *_sweep_table(d),
        "",
        f"![quality vs throughput]({plots['quality']})",
        "",
        "## 4. Convergence of the implicit block per scale",
        "",
        (f"Paper claim: the cosine similarity between an iterate and the equilibrium exceeds 0.98 by 5 "
         f"iterations at the largest scales. The sampler ran `constant:{K}` Picard with the demo's guidance on "
         f"{d.settings.convergence_per_class} sample(s) per class; a forward hook recorded every iterate z_k of the "
         f"implicit map (z_0 = the pre blocks' output, z_k = f applied k times). Relative residual "
         f"|f(z_k) - z_k| / |f(z_k)| and cosine(z_k, z_{K}) are per row (all tokens and channels of the scale), "
         "averaged over rows (conditional and unconditional). The last column is the largest difference between "
         "the hook's final residual and the residual the solver itself reported (its statistics): the curves "
         "describe the iterates the sampler used."),
        "",
    ]
    for cache, curves in d.convergence.items():
        lines += [f"**{cache} cache**", "", *_convergence_table(curves, K), "", _cosine_verdict(curves, K), ""]
    lines += [f"![convergence]({plots['convergence']})", ""]
    path = out_dir / "report.md"
    path.write_text("\n".join(lines))
    (out_dir / "report.json").write_text(json.dumps(d.to_json(), indent=2))
    return path


def _plt() -> Any:
    try:
        import matplotlib
    except ImportError as err:
        raise ImportError("deqgen report draws its plots with matplotlib: pip install 'deqgen[eval]'") from err
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    fig.savefig(tmp, dpi=110, bbox_inches="tight", format="png")
    os.replace(tmp, path)


def _plots(d: ReportData, out_dir: Path) -> dict[str, str]:
    plt = _plt()
    names = {"memory": "training_memory.png", "quality": "quality_vs_throughput.png",
             "convergence": "convergence.png"}
    figs = [_plot_memory(plt, d), _plot_quality(plt, d), _plot_convergence(plt, d)]
    for fig, name in zip(figs, names.values()):
        _save(fig, out_dir / name)
        plt.close(fig)
    return names


def _plot_memory(plt: Any, d: ReportData) -> Any:
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for impl, style in (("deqgen", "o-"), ("official", "s--")):
        pts = sorted((m for m in d.memory if m.impl == impl), key=lambda m: m.k1)
        k1 = [m.k1 for m in pts]
        name = "deqgen S-JFB" if impl == "deqgen" else "official pattern (nullcontext)"
        axes[0].plot(k1, [m.peak_rss_mb for m in pts], style, label=name)
        axes[1].plot(k1, [m.autograd_mb for m in pts], style, label=name)
        axes[2].plot(k1, [m.step_seconds for m in pts], style, label=name)
    for ax, title in zip(axes, ("peak RSS rise during the step (MiB)", "autograd saved bytes (MiB)", "step time (s)")):
        ax.set_xlabel(f"k1 no-grad iterations (k2 = {d.settings.k2})")
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
        ax.set_ylim(bottom=0)
    axes[0].legend(fontsize=8)
    fig.suptitle("Training step vs no-grad iterations. Claim: constant training memory (S-JFB)", fontsize=10)
    return fig


def _plot_quality(plt: Any, d: ReportData) -> Any:
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.6))
    colors = plt.get_cmap("tab20").colors
    for i, r in enumerate(d.sweep):
        marker = "s" if r.config.model == "var" else ("^" if r.config.warm_start else "o")
        color = "black" if r.config.model == "var" else colors[i % len(colors)]
        axes[0].errorbar(r.images_per_second, r.feature_fid, yerr=r.feature_fid_std, fmt=marker, color=color,
                         capsize=2, label=r.config.label)
        axes[1].errorbar(r.images_per_second, r.class_accuracy, yerr=r.class_accuracy_se, fmt=marker, color=color,
                         capsize=2)
    axes[0].set_title(f"feature-FID vs held-out, ± bootstrap s.d. (real digits, same count: {d.floor:.2f})",
                      fontsize=9)
    axes[1].set_title("class accuracy, ± binomial s.e.", fontsize=9)
    for ax in axes:
        ax.set_xlabel(f"images / s (side by side, CPU, {d.machine['torch_threads']} thread(s))")
        ax.grid(alpha=0.3)
    fig.legend(loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=8)
    fig.suptitle("Quality vs throughput over iteration schedules (square: VAR; triangle: warm start). "
                 "Claim: the per-scale iteration knob trades little quality for speed", fontsize=9)
    fig.tight_layout()
    return fig


def _plot_convergence(plt: Any, d: ReportData) -> Any:
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.4))
    styles = {"iteration": "-", "lean": "--"}
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    K = d.settings.convergence_iterations
    for cache, curves in d.convergence.items():
        for c in curves:
            col = colors[c.scale % len(colors)]
            lab = f"scale {c.scale} ({c.tokens} tokens), {cache} cache"
            rel, cos = c.mean_rel_residual(), c.mean_cosine()[:K]  # cosine(z_K, z_K) = 1 is left out
            axes[0].semilogy(range(len(rel)), rel, styles.get(cache, ":"), color=col, label=lab)
            axes[1].semilogy(range(len(cos)), [max(1 - v, 1e-16) for v in cos], styles.get(cache, ":"), color=col)
    axes[0].set_title("relative residual |f(z_k) - z_k| / |f(z_k)|", fontsize=10)
    axes[1].axhline(0.02, color="gray", ls=":", lw=1)
    axes[1].axvline(min(5, K), color="gray", ls=":", lw=1)
    axes[1].set_title(f"1 - cosine(z_k, z_{K}); claim: below 0.02 (dotted) by k = 5", fontsize=10)
    for ax in axes:
        ax.set_xlabel("iteration k (map evaluations from z_0 = pre blocks' output)")
        ax.grid(alpha=0.3, which="both")
    fig.legend(loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=8)
    fig.suptitle("Implicit block per scale, means over rows. Claim: cosine similarity > 0.98 by 5 iterations "
                 "at the largest scales", fontsize=10)
    fig.tight_layout()
    return fig


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
    _plt()  # fail before measuring if the plots cannot be drawn
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
                                             cache=cache, cfg=s["cfg"], top_k=s["top_k"], top_p=s["top_p"],
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
