"""The ``deqgen`` command: ``train``, ``convert``, ``sample`` and ``edit``.

    deqgen train recipes/mnist_cpu.yaml --set training.max_steps=100 --resume auto
    torchrun --standalone --nproc_per_node=8 -m deqgen train recipes/viar_imagenet.yaml --set data.root=/data/in1k
    deqgen convert viar.pth ckpt/viar_d30
    deqgen sample ckpt/viar_d30 --vqvae ckpt/vae --classes 207 360 --schedule linear:10:5:floor --out grid.png
    deqgen edit ckpt/viar_d30 --vqvae ckpt/vae --image in.png --box 64 64 192 192 --class 980 --out edit.png

Errors (bad arguments, an invalid recipe, unreadable checkpoints) print to stderr and exit with code 2;
nothing is written then. ``train`` validates the whole recipe before it creates the run directory.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import torch
from torch import Tensor

from deqgen.images import save_grid

__all__ = ["main"]


def _load_pair(model_dir: str, vqvae_dir: str):  # type: ignore[no-untyped-def]
    from deqgen.models.viar.convert import load_converted

    model, vae = load_converted(model_dir), load_converted(vqvae_dir)
    return model.eval(), vae.eval()


def _read_image(path: Path, side: int, channels: int) -> Tensor:
    try:
        from PIL import Image
    except ImportError:
        raise SystemExit("error: reading images needs Pillow: pip install 'deqgen[recipes]'") from None
    img = Image.open(path).convert("L" if channels == 1 else "RGB").resize((side, side), Image.Resampling.LANCZOS)
    t = torch.tensor(bytearray(img.tobytes()), dtype=torch.uint8).view(side, side, channels).permute(2, 0, 1)
    return t.float()[None] / 127.5 - 1


def _sample_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="converted model directory (deqgen convert)")
    p.add_argument("--vqvae", required=True, help="converted tokenizer directory")
    p.add_argument("--schedule", default=None, help="e.g. constant:10, linear:10:5:floor, adaptive:1e-3:10")
    p.add_argument("--solver", default=None, choices=["picard", "anderson", "broyden"])
    p.add_argument("--cfg", type=float, default=1.5)
    p.add_argument("--top-k", type=int, default=900)
    p.add_argument("--top-p", type=float, default=0.96)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, required=True, help="PNG path")


def _train_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("config_path", nargs="?", metavar="CONFIG", help="recipe YAML, e.g. recipes/mnist_cpu.yaml")
    p.add_argument("--config", dest="config_flag", metavar="PATH", help="recipe YAML (instead of CONFIG)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field, e.g. --set optim.lr_per_256=1e-4 (repeatable)")
    p.add_argument("--resume", metavar="auto|none|PATH",
                   help="sets checkpoint.resume: the newest complete checkpoint, none, or a checkpoint directory")


def _train(args: argparse.Namespace) -> int:
    """Validate the recipe (exit 2 on any error, before anything is written), then run the training loop."""
    import json

    from deqgen.recipes.config import ConfigError, load_config

    a, b = args.config_path, args.config_flag
    if a is not None and b is not None and a != b:
        print(f"error: two configs given ({a!r} and --config {b!r}); give one", file=sys.stderr)
        return 2
    path = a if a is not None else b
    if path is None:
        print("error: 'train' needs a recipe: give CONFIG or --config PATH", file=sys.stderr)
        return 2
    overrides = list(args.overrides)
    if args.resume is not None:  # a quoted YAML string keeps paths verbatim
        overrides.append(f"checkpoint.resume={json.dumps(args.resume)}")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        cfg = load_config(path, overrides, device=device)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    from deqgen.recipes.checkpoint import CheckpointConfigMismatch, CheckpointError
    from deqgen.recipes.train import main as train_main

    try:
        return int(train_main(cfg) or 0)
    except (CheckpointError, CheckpointConfigMismatch) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit code (0 success, 2 usage/config/checkpoint errors)."""
    ap = argparse.ArgumentParser(prog="deqgen", description="deqgen command line")
    sub = ap.add_subparsers(dest="cmd", required=True)
    _train_args(sub.add_parser("train", help="train a recipe YAML: tokenizer (if asked), model, baseline; resumable"))
    c = sub.add_parser("convert", help="official VAR / VIAR / VQVAE .pth -> deqgen safetensors + config.json")
    c.add_argument("src")
    c.add_argument("dst")
    c.add_argument("--kind", default="auto", choices=["auto", "var", "viar", "vqvae"])
    c.add_argument("--patch-nums", type=int, nargs="+", default=None)
    s = sub.add_parser("sample", help="sample a labelled PNG grid")
    _sample_args(s)
    s.add_argument("--classes", type=int, nargs="+", required=True)
    s.add_argument("--per-class", type=int, default=4)
    e = sub.add_parser("edit", help="in-paint (or out-paint) a box of an image, optionally with a new class")
    _sample_args(e)
    e.add_argument("--image", type=Path, required=True)
    e.add_argument("--box", type=int, nargs=4, metavar=("X0", "Y0", "X1", "Y1"), required=True,
                   help="pixel box in the model's image size")
    e.add_argument("--outpaint", action="store_true", help="regenerate outside the box instead of inside")
    e.add_argument("--class", dest="label", type=int, required=True)
    e.add_argument("--samples", type=int, default=4)
    try:
        args = ap.parse_args(argv)
    except SystemExit as exit_:  # --help (0) or a usage error (2), already printed by argparse
        return int(exit_.code or 0)
    if args.cmd == "train":
        return _train(args)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    from deqgen.models.viar.convert import CheckpointError, convert_checkpoint

    try:
        if args.cmd == "convert":
            pn = tuple(args.patch_nums) if args.patch_nums else None
            out = convert_checkpoint(args.src, args.dst, kind=args.kind, patch_nums=pn)
            print(f"wrote {out}")
            return 0
        from deqgen import solvers
        from deqgen.models.viar.sampling import EditSpec, generate

        model, vae = _load_pair(args.model, args.vqvae)
        solver = solvers.get(args.solver) if args.solver else None
        kw = dict(schedule=args.schedule, cfg=args.cfg, top_k=args.top_k, top_p=args.top_p, solver=solver,
                  generator=torch.Generator().manual_seed(args.seed))
        if args.cmd == "sample":
            labels = torch.tensor(args.classes).repeat_interleave(args.per_class)
            res = generate(model, vae, labels, **kw)  # type: ignore[arg-type]
            save_grid(args.out, res.images, nrow=args.per_class)
        else:
            side, ch = vae.config.image_size, vae.config.in_channels
            x0, y0, x1, y1 = args.box
            if not (0 <= x0 < x1 <= side and 0 <= y0 < y1 <= side):
                raise ValueError(f"--box {args.box} must satisfy 0 <= x0 < x1 <= {side} and 0 <= y0 < y1 <= {side}")
            img = _read_image(args.image, side, ch).expand(args.samples, -1, -1, -1)
            mask = torch.zeros(side, side, dtype=torch.bool)
            mask[y0:y1, x0:x1] = True
            res = generate(model, vae, torch.full((args.samples,), args.label),
                           edit=EditSpec(img, ~mask if args.outpaint else mask), **kw)  # type: ignore[arg-type]
            save_grid(args.out, torch.cat([(img[:1] + 1) / 2, res.images]), nrow=args.samples + 1)
        print(f"wrote {args.out}")
        return 0
    except (CheckpointError, ValueError, TypeError, KeyError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
