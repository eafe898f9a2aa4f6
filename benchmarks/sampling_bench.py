"""Sampling throughput, peak memory and KV-cache bytes: VAR vs VIAR of the same width, side by side.

Random weights (speed does not depend on them), the 256-px 10-scale pyramid (L = 680), a VAR-d30-shaped
trunk (30 blocks) against VIAR's (5 pre, 1 implicit, 5 post) at a CPU-sized width, classifier-free guidance
on (2B rows), each configuration in a fresh process (peak RSS is per process). Prints a markdown table and
writes a PNG plot.

    python benchmarks/sampling_bench.py --width 256 --batch 4 --out docs/_static/sampling_bench.png
    python benchmarks/sampling_bench.py --count-ops   # ops per sampled batch, dynamo graph breaks
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

CONFIGS = [
    ("VAR (30 blocks)", "var", None, "iteration"),
    ("VIAR constant 10", "viar", "constant:10", "iteration"),
    ("VIAR linear 10->5 (official floor)", "viar", "linear:10:5:floor", "iteration"),
    ("VIAR linear 10->1", "viar", "linear:10:1:floor", "iteration"),
    ("VIAR linear 6->1", "viar", "linear:6:1:floor", "iteration"),
    ("VIAR adaptive 1e-3 (<=10)", "viar", "adaptive:1e-3:10", "iteration"),
    ("VIAR linear 10->5, lean cache", "viar", "linear:10:5:floor", "lean"),
    ("VIAR linear 6->1, lean cache", "viar", "linear:6:1:floor", "lean"),
    ("VIAR adaptive 1e-3 (<=10), warm start", "viar", "adaptive:1e-3:10", "iteration+warm"),
]


def _one(kind: str, schedule: str | None, cache: str, width: int, batch: int, repeats: int) -> dict:
    import torch

    from deqgen.evaluation.memory import peak_memory_bytes, reset_peak_memory
    from deqgen.models.viar.config import ImplicitSpec, TransformerConfig
    from deqgen.models.viar.model import build_model
    from deqgen.models.viar.sampling import generate
    from deqgen.models.viar.vqvae import MultiScaleVQVAE, VQVAEConfig

    torch.set_num_threads(max(1, torch.get_num_threads()))
    base = reset_peak_memory("cpu")
    implicit = ImplicitSpec(pre_depth=5, post_depth=5) if kind == "viar" else None
    cfg = TransformerConfig(depth=30, embed_dim=width, num_heads=width // 64, implicit=implicit)
    model = build_model(cfg, generator=torch.Generator().manual_seed(0)).eval()
    vae = MultiScaleVQVAE(VQVAEConfig(ch=32)).eval()
    vae.init_weights(torch.Generator().manual_seed(0))
    labels = torch.arange(batch)
    warm = cache.endswith("+warm")
    cache = cache.removesuffix("+warm")
    kw = {"warm_start": True} if warm else {}
    generate(
        model, vae, labels, schedule=schedule, cfg_scale=1.5, top_k=900, top_p=0.96, seed=0, cache=cache, **kw
    )  # warm
    times, cpu_times, res = [], [], None
    for r in range(repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        res = generate(
            model,
            vae,
            labels,
            schedule=schedule,
            cfg_scale=1.5,
            top_k=900,
            top_p=0.96,
            seed=r,
            cache=cache,
            **kw,
        )
        times.append(time.perf_counter() - t0)
        cpu_times.append(time.process_time() - c0)  # CPU seconds: less sensitive to other jobs on the box
    assert res is not None
    its = [float(s.iterations.float().mean()) for s in res.stats]
    return {
        "img_per_s": batch / sorted(times)[len(times) // 2],
        "img_per_cpu_s": batch / sorted(cpu_times)[len(cpu_times) // 2],
        "peak_rss_mb": (peak_memory_bytes("cpu") - base) / 2**20,
        "kv_bytes": res.kv_bytes,
        "params": sum(p.numel() for p in model.parameters()),
        "iterations": its,
    }


def count_ops() -> None:
    """Print the aten ops dispatched per sampled batch (batch 1 and 16) and the dynamo graph/break counts of
    the teacher-forced forward, for ``var_tiny`` and ``viar_tiny`` (tiny tokenizer, CFG on, top-k/top-p)."""
    import warnings

    import torch
    import torch._dynamo as dynamo
    from torch.utils._python_dispatch import TorchDispatchMode

    from deqgen.models.viar.model import build_model
    from deqgen.models.viar.sampling import generate
    from deqgen.models.viar.vqvae import VQVAE_PRESETS, MultiScaleVQVAE

    class Count(TorchDispatchMode):
        total = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
            self.total += 1
            return func(*args, **(kwargs or {}))

    vae = MultiScaleVQVAE(VQVAE_PRESETS["vae_tiny"]).eval()
    vae.init_weights(torch.Generator().manual_seed(0))
    print("| model | ops per batch, B=1 | B=16 | ratio | eval forward graphs / breaks | train forward |")
    print("|---|---:|---:|---:|---|---|")
    for name in ("var_tiny", "viar_tiny"):
        m = build_model(name, generator=torch.Generator().manual_seed(0)).eval()
        ops = {}
        for B in (1, 16):
            labels = torch.arange(B) % m.num_classes
            generate(m, vae, labels, cfg_scale=1.5, top_k=20, top_p=0.9, seed=0)
            with Count() as c:
                generate(m, vae, labels, cfg_scale=1.5, top_k=20, top_p=0.9, seed=0)
            ops[B] = c.total
        feats = torch.randn(4, m.cfg.seq_len - m.cfg.patch_nums[0] ** 2, m.cfg.z_channels)
        graphs = []
        for train in (False, True):
            m.train(train)
            dynamo.reset()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                ex = dynamo.explain(
                    lambda lab, f, m=m: m(lab, f, generator=torch.Generator().manual_seed(0))[0]
                )(torch.arange(4) % m.num_classes, feats)
            graphs.append(f"{ex.graph_count} / {ex.graph_break_count}")
        print(f"| {name} | {ops[1]} | {ops[16]} | {ops[16] / ops[1]:.2f} | {graphs[0]} | {graphs[1]} |")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--width", type=int, default=256)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=None, help="PNG plot path")
    ap.add_argument(
        "--only",
        nargs="+",
        type=int,
        default=None,
        metavar="ROW",
        help="run only these rows of the table (0 = VAR, always included), e.g. --only 2 4",
    )
    ap.add_argument(
        "--count-ops",
        action="store_true",
        help="print dispatched-op counts per sampled batch and dynamo graph breaks, then exit",
    )
    ap.add_argument("--child", nargs=3, metavar=("KIND", "SCHEDULE", "CACHE"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.count_ops:
        count_ops()
        return 0
    if args.child:
        kind, schedule, cache = args.child
        print(
            json.dumps(
                _one(kind, None if schedule == "-" else schedule, cache, args.width, args.batch, args.repeats)
            )
        )
        return 0
    rows = []
    chosen = [CONFIGS[i] for i in sorted({0, *args.only})] if args.only else CONFIGS
    for label, kind, schedule, cache in chosen:
        cmd = [
            sys.executable,
            __file__,
            "--width",
            str(args.width),
            "--batch",
            str(args.batch),
            "--repeats",
            str(args.repeats),
            "--child",
            kind,
            schedule or "-",
            cache,
        ]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1]
        rows.append((label, json.loads(out)))
    var = rows[0][1]
    print(
        f"width {args.width}, batch {args.batch} (+{args.batch} unconditional rows), 10 scales, CPU, "
        f"median of {args.repeats}\n"
    )
    print(
        "| configuration | img/s | x VAR | img per CPU-s | peak RSS (MB) | KV-cache MB | x VAR | "
        "mean implicit iters per scale |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---|")
    for label, r in rows:
        its = ", ".join(f"{v:.1f}" for v in r["iterations"]) if "VIAR" in label else "-"
        print(
            f"| {label} | {r['img_per_s']:.2f} | {r['img_per_s'] / var['img_per_s']:.2f} | "
            f"{r['img_per_cpu_s']:.2f} | {r['peak_rss_mb']:.0f} | "
            f"{r['kv_bytes'] / 2**20:.1f} | {r['kv_bytes'] / var['kv_bytes']:.2f} | {its} |"
        )
    if args.out:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(8, 4))
        ax.barh([lbl for lbl, _ in rows][::-1], [r["img_per_s"] for _, r in rows][::-1], color="tab:blue")
        ax.set_xlabel("images / s (CPU)")
        ax.set_title(f"Sampling throughput, width {args.width}, batch {args.batch}, 10 scales")
        fig.savefig(args.out, dpi=100, bbox_inches="tight")
        print(f"\nplot: {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
