"""Writing ``report.md`` and its plots from the report's measurements (see :mod:`deqgen.evaluation.report`).

:class:`ReportData` holds plain data (dumped as ``report.json``); :func:`write_report` formats the markdown
tables with the paper's claim and a verdict on each row, and draws the PNGs (matplotlib, an optional extra,
is imported only here, lazily).
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any

from deqgen.evaluation.convergence import ConvergenceCurve, solver_gap
from deqgen.evaluation.report import ReportSettings
from deqgen.evaluation.sampling_sweep import SweepResult
from deqgen.evaluation.training_memory import MemoryPoint
from deqgen.files import atomic_write_text
from deqgen.plots import matplotlib_available, new_figure, save_figure, tab_colors

__all__ = ["PAPER", "ReportData", "require_matplotlib", "write_report"]

# ---- the report -------------------------------------------------------------------------------------

#: The headline numbers of the VIAR paper (Visual Implicit Autoregressive Modeling, arXiv 2605.01220),
#: quoted in the report next to what this run measured.
PAPER: Mapping[str, Any] = MappingProxyType(
    {
        "fid": 2.16,
        "viar_params": 770.9e6,
        "var_params": 2010.0e6,
        "memory_gb": (19.24, 8.53),
        "throughput": (15.16, 32.08),
    }
)


@dataclass
class ReportData:
    """Everything :func:`write_report` needs (plain data, also dumped as ``report.json``).

    Attributes:
        run_dir: the digits run.
        settings: the sizes used; ``quick`` whether they were :data:`~deqgen.evaluation.report.QUICK`.
        parameters: ``{"viar": n, "var": n}``.
        sweep: results of :func:`~deqgen.evaluation.sampling_sweep.sample_sweep` (VAR first, then VIAR with
            the run's own schedule and both caches).
        floor: real-vs-real feature-FID at the generated sets' size
            (:func:`~deqgen.evaluation.sampling_sweep.real_floor` with ``per_class``).
        floor_all: the same with all training digits.
        memory: :func:`~deqgen.evaluation.training_memory.training_memory` points.
        convergence: ``{cache: curves}`` from :func:`~deqgen.evaluation.convergence.convergence_curves`.
        machine: cores, threads, torch version, load averages, wall time.
        sampling: the run's ``sampling`` section (from its ``config.yaml``).
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
            "run_dir": str(self.run_dir),
            "quick": self.quick,
            "settings": dataclasses.asdict(self.settings),
            "parameters": self.parameters,
            "floor_feature_fid": self.floor,
            "floor_feature_fid_all_training_digits": self.floor_all,
            "machine": self.machine,
            "sampling": self.sampling,
            "sweep": [
                {
                    **dataclasses.asdict(r.config),
                    **{k: v for k, v in dataclasses.asdict(r).items() if k != "config"},
                    "mean_iterations": r.mean_iterations,
                }
                for r in self.sweep
            ],
            "memory": [dataclasses.asdict(m) for m in self.memory],
            "convergence": {
                cache: [
                    {
                        "scale": c.scale,
                        "tokens": c.tokens,
                        "rel_residual": c.mean_rel_residual(),
                        "cosine": c.mean_cosine(),
                        "min_cosine": [float(v) for v in c.cosine.amin(1)],
                        "solver_gap": solver_gap(c),
                    }
                    for c in curves
                ]
                for cache, curves in self.convergence.items()
            },
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
        (
            f"| parameters | {d.parameters['var']:,} | {d.parameters['viar']:,} | {p_ratio:.1%} | 770.9M vs 2010.0M "
            f"({paper_p:.1%}) | {'fewer parameters, as claimed' if p_ratio < 1 else 'not fewer'}; "
            f"{p_ratio:.1%} vs {paper_p:.1%} |"
        ),
        (
            f"| class accuracy of samples (digits classifier; ± binomial s.e.) | {var.class_accuracy:.3f} ± "
            f"{var.class_accuracy_se:.3f} | {viar.class_accuracy:.3f} ± {viar.class_accuracy_se:.3f} "
            f"| {_ratio(viar.class_accuracy, var.class_accuracy)} | quality on par with VAR at 38.4 % of its "
            f"parameters (FID 2.16) | {_verdict_accuracy(viar, var)} |"
        ),
        (
            f"| feature-FID vs held-out digits (± bootstrap s.d.; real digits at the same count: {d.floor:.2f}) | "
            f"{var.feature_fid:.2f} ± {var.feature_fid_std:.2f} | "
            f"{viar.feature_fid:.2f} ± {viar.feature_fid_std:.2f} | "
            f"{_ratio(viar.feature_fid, var.feature_fid)} | FID {PAPER['fid']} (Inception "
            f"features, 50k samples; a different metric) | {_verdict_fid(viar, var)} |"
        ),
        (
            f"| sampling img/s (side by side) | {var.images_per_second:.1f} | {viar.images_per_second:.1f} | "
            f"{speed:.2f}x | throughput {t0} -> {t1} img/s ({t1 / t0:.2f}x, RTX 4090) | "
            f"{'faster' if speed > 1 else 'slower'} than VAR here ({speed:.2f}x vs {t1 / t0:.2f}x claimed) |"
        ),
        (
            f"| KV-cache bytes per image, iteration-keyed | {_fmt_bytes(var.kv_bytes_per_image)} | "
            f"{_fmt_bytes(viar.kv_bytes_per_image)} | {_ratio(viar.kv_bytes_per_image, var.kv_bytes_per_image)} | "
            f"peak sampling memory {m0} -> {m1} GB ({m1 / m0:.2f}x; all memory, not only KV) | "
            f"{_verdict_memory(viar.kv_bytes_per_image / var.kv_bytes_per_image, m1 / m0)} |"
        ),
        (
            f"| KV-cache bytes per image, lean cache | {_fmt_bytes(var.kv_bytes_per_image)} | "
            f"{_fmt_bytes(lean.kv_bytes_per_image)} | {_ratio(lean.kv_bytes_per_image, var.kv_bytes_per_image)} | "
            f"(same claim) | {_verdict_memory(lean.kv_bytes_per_image / var.kv_bytes_per_image, m1 / m0)} |"
        ),
    ]
    return rows


def _verdict(diff: float, noise: float, lower_is_better: bool) -> str:
    """'on par' when the difference is within two combined standard errors, else better / worse."""
    if not abs(diff) > 2 * noise:  # also when the noise is unknown (NaN): no claim either way
        return f"on par with VAR (difference {diff:+.3f}, within 2 s.e. = {2 * noise:.3f})"
    better = diff < 0 if lower_is_better else diff > 0
    return f"{'better' if better else 'worse'} than VAR (difference {diff:+.3f}, 2 s.e. = {2 * noise:.3f})"


def _verdict_accuracy(viar: SweepResult, var: SweepResult) -> str:
    return _verdict(
        viar.class_accuracy - var.class_accuracy,
        math.hypot(viar.class_accuracy_se, var.class_accuracy_se),
        lower_is_better=False,
    )


def _verdict_fid(viar: SweepResult, var: SweepResult) -> str:
    return _verdict(
        viar.feature_fid - var.feature_fid,
        math.hypot(viar.feature_fid_std, var.feature_fid_std),
        lower_is_better=True,
    )


def _verdict_memory(ours: float, paper: float) -> str:
    if ours < 1:
        return f"smaller than VAR's ({ours:.2f}x; paper {paper:.2f}x)"
    return f"larger than VAR's ({ours:.2f}x; paper {paper:.2f}x)"


def _sweep_table(d: ReportData) -> list[str]:
    var = d.sweep[0]
    head = (
        "| sampler | iterations per sample (per scale) | img/s | vs VAR | class accuracy ± s.e. | "
        "feature-FID ± s.d. | KV bytes / image |"
    )
    rows = [head, "|---|---|---:|---:|---:|---:|---:|"]
    for r in d.sweep:
        per = " / ".join(f"{v:.2f}".rstrip("0").rstrip(".") for v in r.iterations_per_scale)
        rows.append(
            f"| {r.config.label} | {r.mean_iterations:.2f} ({per}) | {r.images_per_second:.1f} | "
            f"{_ratio(r.images_per_second, var.images_per_second)} | {r.class_accuracy:.3f} ± "
            f"{r.class_accuracy_se:.3f} | {r.feature_fid:.2f} ± {r.feature_fid_std:.2f} | "
            f"{_fmt_bytes(r.kv_bytes_per_image)} |"
        )
    return rows


def _memory_table(d: ReportData) -> list[str]:
    by = {(m.impl, m.k1): m for m in d.memory}
    head = (
        "| k1 (no-grad iterations) | deqgen peak RSS MiB | official pattern peak RSS MiB | deqgen autograd MiB | "
        "official pattern autograd MiB | deqgen step s | official pattern step s |"
    )
    rows = [head, "|---:|---:|---:|---:|---:|---:|---:|"]
    for k1 in d.settings.k1s:
        a, b = by[("deqgen", k1)], by[("official", k1)]
        rows.append(
            f"| {k1} | {a.peak_rss_mb:.1f} | {b.peak_rss_mb:.1f} | {a.autograd_mb:.1f} | {b.autograd_mb:.1f} "
            f"| {a.step_seconds:.3f} | {b.step_seconds:.3f} |"
        )
    return rows


def _memory_summary(d: ReportData) -> str:
    k_lo, k_hi = min(d.settings.k1s), max(d.settings.k1s)
    by = {(m.impl, m.k1): m for m in d.memory}
    parts = []
    for impl, name in (("deqgen", "deqgen's S-JFB"), ("official", "the official pattern")):
        lo, hi = by[(impl, k_lo)], by[(impl, k_hi)]
        per_it = (hi.autograd_mb - lo.autograd_mb) / max(1, k_hi - k_lo)
        parts.append(
            f"{name}: autograd memory {lo.autograd_mb:.1f} -> {hi.autograd_mb:.1f} MiB from k1 = {k_lo} to "
            f"{k_hi} ({per_it:+.2f} MiB per no-grad iteration), peak RSS {lo.peak_rss_mb:.1f} -> "
            f"{hi.peak_rss_mb:.1f} MiB, step time {_ratio(hi.step_seconds, lo.step_seconds)}"
        )
    return "; ".join(parts) + "."


def _at(values: list[float], k: int) -> str:
    return f"{values[k]:.4g}" if k < len(values) else "-"


def _convergence_table(curves: list[ConvergenceCurve], K: int) -> list[str]:
    ks = sorted({0, 1, min(4, K - 1), K - 1})
    cs = [k for k in (0, 1, 2, 5, 10) if k < K]
    head = " | ".join([f"rel residual k={k}" for k in ks] + [f"cosine(z_{k}, z_{K})" for k in cs])
    rows = [
        f"| scale (tokens) | {head} | min cosine(z_{min(5, K)}, z_{K}) | relative gap to solver stats |",
        "|---|" + "---:|" * (len(ks) + len(cs) + 2),
    ]
    for c in curves:
        rel, cos = c.mean_rel_residual(), c.mean_cosine()
        cells = [_at(rel, k) for k in ks] + [f"{cos[k]:.6f}" for k in cs]
        rows.append(
            f"| {c.scale} ({c.tokens}) | "
            + " | ".join(cells)
            + f" | {float(c.cosine[min(5, K)].min()):.6f} | {solver_gap(c):.1e} |"
        )
    return rows


def _cosine_verdict(curves: list[ConvergenceCurve], K: int) -> str:
    k = min(5, K)
    last = curves[-1]
    mean5, min5 = float(last.cosine[k].mean()), float(last.cosine[k].min())
    ok = "holds" if mean5 > 0.98 else "does not hold"
    first = next((i for i, v in enumerate(last.mean_cosine()) if v > 0.98), None)
    return (
        f"At the largest scale ({last.tokens} tokens) the mean cosine similarity of z_{k} with z_{K} is "
        f"{mean5:.6f} (lowest row {min5:.6f}): the claim {ok} here; the mean first exceeds 0.98 at "
        f"k = {first}."
    )


def write_report(d: ReportData, out_dir: Path) -> Path:
    """Write ``report.md``, ``report.json`` and the plots into ``out_dir``; returns the markdown path."""
    out_dir.mkdir(parents=True, exist_ok=True)
    plots = _plots(d, out_dir)
    K = d.settings.convergence_iterations
    m = d.machine
    lines = [
        f"# VIAR vs VAR on a digits run: `{d.run_dir}`",
        "",
        (
            f"Measured by `deqgen report`{' --quick (small counts: numbers are noise)' if d.quick else ''} in "
            f"{m['wall_seconds']:.0f} s on {m['cpu_count']} CPU cores ({m['torch_threads']} torch thread(s), torch "
            f"{m['torch']}, {m['platform']}); load average {m['load_before']:.2f} before, {m['load_after']:.2f} after. "
            "Timings are measured side by side in one run (round robin over configurations, batch by batch) and are "
            "best read as ratios; the machine may be shared."
        ),
        "",
        (
            f"Sampler settings from the run's config.yaml: cfg scale {d.sampling['cfg_scale']}, "
            f"top-k {d.sampling['top_k']}, top-p "
            f"{d.sampling['top_p']}, seed {d.sampling['seed']}; {d.settings.per_class} samples per class per "
            f"configuration, batches of {d.settings.batch_size}; every configuration draws the same per-sample seeds. "
            "Quality is judged by the run's own digits classifier (trained on held-out real digits the generators "
            "never saw): class accuracy of the samples, and the Fréchet distance in its 128-d feature space against "
            "those held-out digits (feature-FID). Paper numbers are quoted from the VIAR paper (arXiv 2605.01220); "
            "the paper's models are "
            "~1000x larger and run on a GPU, so only directions and ratios can be compared."
        ),
        "",
        "## 1. VIAR vs the same-width VAR",
        "",
        (
            "Paper claims: VIAR reaches VAR-level quality with 38.4 % of VAR-d30's parameters (FID 2.16), and "
            "with its per-scale iteration knob samples faster (15.16 -> 32.08 img/s) in less memory "
            "(19.24 -> 8.53 GB)."
        ),
        "",
        *_model_table(d),
        "",
        (
            f"VIAR samples with the run's own schedule `{d.sampling['schedule']}`. "
            "The KV bytes are those held at the end "
            "of a batch (the cache's peak), per image, guidance rows included; the iteration-keyed cache keeps one K/V "
            "per iteration in the implicit block (the official semantics, equal to teacher forcing for a constant "
            "count), the lean cache one per scale."
        ),
        "",
        "## 2. Training step: memory and time against no-grad iterations k1",
        "",
        (
            f"Paper claim: constant training memory in the number of no-grad iterations (the paper's S-JFB). "
            f'The official VIAR code runs its "no-grad" phase under a `nullcontext`, which records it, so its memory '
            f"grows with k1. One training step (forward, cross-entropy, backward) of this run's VIAR, batch "
            f"{d.settings.train_batch}, k2 = {d.settings.k2} recorded iterations, float32, one thread, each point in a "
            "fresh process. `deqgen` is deqgen's S-JFB (k1 phase under `torch.no_grad()`); `official pattern` runs "
            "the same modules the official way (k1 phase under `contextlib.nullcontext()` from a detached start, "
            "detached afterwards). Peak RSS is how far the resident memory rose during the step above its level "
            "just before it (after a no-grad warm-up; the kernel's high-water mark is reset first); autograd is the "
            "most bytes held for backward, counted with `saved_tensors_hooks`."
        ),
        "",
        *_memory_table(d),
        "",
        _memory_summary(d),
        "",
        f"![training memory]({plots['memory']})",
        "",
        "## 3. Quality against throughput over iteration schedules",
        "",
        (
            "Paper claim (in words): fewer implicit iterations per scale buy throughput at little cost in quality "
            "(the paper's per-scale iteration knob). `constant:K` runs K map evaluations at every scale, "
            "`linear:A:B` goes from A at the coarsest to B at the finest scale, `adaptive:TOL:MAX` stops each sample "
            "once its relative residual is at most TOL (at most MAX evaluations), `warm start` starts each scale from "
            "the previous scale's upsampled equilibrium instead of the pre blocks' output."
        ),
        "",
        *_sweep_table(d),
        "",
        f"![quality vs throughput]({plots['quality']})",
        "",
        "## 4. Convergence of the implicit block per scale",
        "",
        (
            f"Paper claim: the cosine similarity between an iterate and the equilibrium exceeds 0.98 by 5 "
            f"iterations at the largest scales. The sampler ran `constant:{K}` Picard with the run's guidance on "
            f"{d.settings.convergence_per_class} sample(s) per class; a forward hook recorded every iterate z_k of the "
            f"implicit map (z_0 = the pre blocks' output, z_k = f applied k times). Relative residual "
            f"|f(z_k) - z_k| / |f(z_k)| and cosine(z_k, z_{K}) are per row (all tokens and channels of the scale), "
            "averaged over rows (conditional and unconditional). The last column is the largest difference between "
            "the hook's final residual and the residual the solver itself reported (its statistics): the curves "
            "describe the iterates the sampler used."
        ),
        "",
    ]
    for cache, curves in d.convergence.items():
        lines += [
            f"**{cache} cache**",
            "",
            *_convergence_table(curves, K),
            "",
            _cosine_verdict(curves, K),
            "",
        ]
    lines += [f"![convergence]({plots['convergence']})", ""]
    path = out_dir / "report.md"
    atomic_write_text(path, "\n".join(lines))
    atomic_write_text(out_dir / "report.json", json.dumps(d.to_json(), indent=2))
    return path


def require_matplotlib() -> None:
    """Raise ImportError naming the extra to install when matplotlib is missing (the report's plots need it)."""
    if not matplotlib_available():
        raise ImportError("deqgen report draws its plots with matplotlib: pip install 'deqgen[eval]'")


def _plots(d: ReportData, out_dir: Path) -> dict[str, str]:
    require_matplotlib()
    names = {
        "memory": "training_memory.png",
        "quality": "quality_vs_throughput.png",
        "convergence": "convergence.png",
    }
    figs = [_plot_memory(d), _plot_quality(d), _plot_convergence(d)]
    for fig, name in zip(figs, names.values()):
        save_figure(fig, out_dir / name, dpi=110)
    return names


def _plot_memory(d: ReportData) -> Any:
    fig, axes = new_figure(1, 3, figsize=(13, 3.6))
    for impl, style in (("deqgen", "o-"), ("official", "s--")):
        pts = sorted((m for m in d.memory if m.impl == impl), key=lambda m: m.k1)
        k1 = [m.k1 for m in pts]
        name = "deqgen S-JFB" if impl == "deqgen" else "official pattern (nullcontext)"
        axes[0].plot(k1, [m.peak_rss_mb for m in pts], style, label=name)
        axes[1].plot(k1, [m.autograd_mb for m in pts], style, label=name)
        axes[2].plot(k1, [m.step_seconds for m in pts], style, label=name)
    for ax, title in zip(
        axes, ("peak RSS rise during the step (MiB)", "autograd saved bytes (MiB)", "step time (s)")
    ):
        ax.set_xlabel(f"k1 no-grad iterations (k2 = {d.settings.k2})")
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
        ax.set_ylim(bottom=0)
    axes[0].legend(fontsize=8)
    fig.suptitle("Training step vs no-grad iterations. Claim: constant training memory (S-JFB)", fontsize=10)
    return fig


def _plot_quality(d: ReportData) -> Any:
    fig, axes = new_figure(1, 2, figsize=(13, 4.6))
    colors = tab_colors("tab20")
    for i, r in enumerate(d.sweep):
        marker = "s" if r.config.model == "var" else ("^" if r.config.warm_start else "o")
        color = "black" if r.config.model == "var" else colors[i % len(colors)]
        axes[0].errorbar(
            r.images_per_second,
            r.feature_fid,
            yerr=r.feature_fid_std,
            fmt=marker,
            color=color,
            capsize=2,
            label=r.config.label,
        )
        axes[1].errorbar(
            r.images_per_second,
            r.class_accuracy,
            yerr=r.class_accuracy_se,
            fmt=marker,
            color=color,
            capsize=2,
        )
    axes[0].set_title(
        f"feature-FID vs held-out, ± bootstrap s.d. (real digits, same count: {d.floor:.2f})", fontsize=9
    )
    axes[1].set_title("class accuracy, ± binomial s.e.", fontsize=9)
    for ax in axes:
        ax.set_xlabel(f"images / s (side by side, CPU, {d.machine['torch_threads']} thread(s))")
        ax.grid(alpha=0.3)
    fig.legend(loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=8)
    fig.suptitle(
        "Quality vs throughput over iteration schedules (square: VAR; triangle: warm start). "
        "Claim: the per-scale iteration knob trades little quality for speed",
        fontsize=9,
    )
    fig.tight_layout()
    return fig


def _plot_convergence(d: ReportData) -> Any:
    fig, axes = new_figure(1, 2, figsize=(13, 4.4))
    styles = {"iteration": "-", "lean": "--"}
    colors = tab_colors("tab10")
    K = d.settings.convergence_iterations
    for cache, curves in d.convergence.items():
        for c in curves:
            col = colors[c.scale % len(colors)]
            lab = f"scale {c.scale} ({c.tokens} tokens), {cache} cache"
            rel, cos = c.mean_rel_residual(), c.mean_cosine()[:K]  # cosine(z_K, z_K) = 1 is left out
            axes[0].semilogy(range(len(rel)), rel, styles.get(cache, ":"), color=col, label=lab)
            axes[1].semilogy(
                range(len(cos)), [max(1 - v, 1e-16) for v in cos], styles.get(cache, ":"), color=col
            )
    axes[0].set_title("relative residual |f(z_k) - z_k| / |f(z_k)|", fontsize=10)
    axes[1].axhline(0.02, color="gray", ls=":", lw=1)
    axes[1].axvline(min(5, K), color="gray", ls=":", lw=1)
    axes[1].set_title(f"1 - cosine(z_k, z_{K}); claim: below 0.02 (dotted) by k = 5", fontsize=10)
    for ax in axes:
        ax.set_xlabel("iteration k (map evaluations from z_0 = pre blocks' output)")
        ax.grid(alpha=0.3, which="both")
    fig.legend(loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=8)
    fig.suptitle(
        "Implicit block per scale, means over rows. Claim: cosine similarity > 0.98 by 5 iterations "
        "at the largest scales",
        fontsize=10,
    )
    fig.tight_layout()
    return fig
