"""The ``deqgen`` command: ``train``, ``convert``, ``sample``, ``edit``, ``eval`` and ``report``.

    deqgen train recipes/mnist_cpu.yaml --set training.max_steps=100 --resume auto
    torchrun --standalone --nproc_per_node=8 -m deqgen train recipes/viar_imagenet.yaml --set data.root=/data/in1k
    deqgen pretokenize recipes/viar_imagenet.yaml --set data.root=/data/in1k --out /data/in1k_tokens
    deqgen convert viar.pth ckpt/viar_d30
    deqgen sample ckpt/viar_d30 --vqvae ckpt/vae --classes 207 360 --schedule linear:10:5:floor --out grid.png
    deqgen edit ckpt/viar_d30 --vqvae ckpt/vae --image in.png --box 64 64 192 192 --class 980 --out edit.png
    torchrun --standalone --nproc_per_node=8 -m deqgen eval ckpt/viar_d30 --vqvae ckpt/vae --per-class 50 \
        --out samples.npz --reference VIRTUAL_imagenet256_labeled.npz --inception-weights weights-inception.pth
    deqgen demo recipes/mnist_cpu.yaml --out runs/digits
    deqgen report runs/digits

Errors (bad arguments, an invalid recipe, unreadable checkpoints) print to stderr and exit with code 2;
nothing is written then. ``train`` validates the whole recipe before it creates the run directory.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from deqgen.cli.common import _positive_int
from deqgen.cli.evaluate import _eval, _eval_args, _report
from deqgen.cli.generate import _convert_cmd, _sample_args, _sample_or_edit
from deqgen.cli.train import _demo, _demo_args, _pretokenize, _train, _train_args

__all__ = ["build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    """The ``deqgen`` argument parser (``sample``, ``edit`` and ``convert`` show every default in ``--help``)."""
    from deqgen import __version__

    ap = argparse.ArgumentParser(prog="deqgen", description="deqgen command line")
    ap.add_argument("--version", action="version", version=f"deqgen {__version__}")
    sub = ap.add_subparsers(dest="cmd", required=True)
    shown = argparse.ArgumentDefaultsHelpFormatter
    _train_args(
        sub.add_parser("train", help="train a recipe YAML: tokenizer (if asked), model, baseline; resumable")
    )
    _demo_args(
        sub.add_parser(
            "demo",
            help="the CPU digits job: deqgen train a digits recipe, then score its "
            "samples with a classifier trained on held-out digits",
        )
    )
    pt = sub.add_parser("pretokenize", help="encode a recipe's training images once into token pyramids")
    _train_args(pt, resume=False)
    pt.add_argument(
        "--out", type=Path, required=True, help="the folder to write (then set data.pretokenized)"
    )
    pt.add_argument("--batch-size", type=_positive_int, default=256, help="images per encoder batch")
    c = sub.add_parser(
        "convert",
        help="official VAR / VIAR / VQVAE .pth -> deqgen safetensors + config.json",
        formatter_class=shown,
    )
    c.add_argument("src", help="the official .pth (vae_ch160v4096z32.pth, var_d30.pth, viar.pth, ...)")
    c.add_argument("dst", help="the output directory: model.safetensors, config.json, README.md")
    c.add_argument(
        "--kind",
        default="auto",
        choices=["auto", "var", "viar", "vqvae"],
        help="auto reads the kind from the keys; any other value only checks it",
    )
    c.add_argument(
        "--patch-nums",
        type=int,
        nargs="+",
        default=None,
        help="token pyramid side per scale; None means the 256-px 1 2 3 4 5 6 8 10 13 16",
    )
    c.add_argument(
        "--slim",
        action="store_true",
        help="SRC is an official training checkpoint (ar-ckpt-*.pth): read it with an allow-list of the "
        "official argument classes and convert only the model's weights",
    )
    s = sub.add_parser("sample", help="sample a labelled PNG grid", formatter_class=shown)
    _sample_args(s)
    s.add_argument("--classes", type=int, nargs="+", required=True, help="class ids, one grid row each")
    s.add_argument("--per-class", type=_positive_int, default=4, help="samples per class (grid columns)")
    s.add_argument("--compile", action="store_true", help="torch.compile the per-scale forward (for GPUs)")
    e = sub.add_parser(
        "edit",
        help="in-paint (or out-paint) a box of an image, optionally with a new class",
        formatter_class=shown,
    )
    _sample_args(e)
    e.add_argument(
        "--image", type=Path, required=True, help="the image to edit (PNG/JPEG; resized to the model)"
    )
    e.add_argument(
        "--box",
        type=int,
        nargs=4,
        metavar=("X0", "Y0", "X1", "Y1"),
        required=True,
        help="pixel box in the model's image size",
    )
    e.add_argument("--outpaint", action="store_true", help="regenerate outside the box instead of inside")
    e.add_argument("--class", dest="label", type=int, required=True, help="class of the regenerated region")
    e.add_argument(
        "--samples", type=_positive_int, default=4, help="edits drawn (the grid shows the input first)"
    )
    _eval_args(
        sub.add_parser(
            "eval",
            help="class-major ADM sample file (.npz), sharded over torchrun ranks, "
            "resumable; optional FID/IS or digits metrics",
        )
    )
    r = sub.add_parser("report", help="report.md + plots for a `deqgen demo` run: VIAR vs VAR")
    r.add_argument("run_dir", type=Path, help="the demo's output folder (e.g. runs/digits)")
    r.add_argument("--out", type=Path, default=None, help="report folder (default RUN_DIR/report)")
    r.add_argument(
        "--quick", action="store_true", help="small sample counts and sweeps (tests, a first look)"
    )
    r.add_argument(
        "--threads",
        type=_positive_int,
        default=1,
        help="torch threads while sampling (default 1: steadier timings on a shared machine)",
    )
    return ap


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit code (0 success, 2 usage/config/checkpoint errors)."""
    ap = build_parser()
    try:
        args = ap.parse_args(argv)
    except SystemExit as exit_:  # --help (0) or a usage error (2), already printed by argparse
        return int(exit_.code or 0)
    if args.cmd in ("train", "demo"):
        return _train(args) if args.cmd == "train" else _demo(args)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    commands = {
        "pretokenize": _pretokenize,
        "eval": _eval,
        "report": _report,
        "convert": _convert_cmd,
        "sample": _sample_or_edit,
        "edit": _sample_or_edit,
    }
    return commands[args.cmd](args)


if __name__ == "__main__":
    raise SystemExit(main())
