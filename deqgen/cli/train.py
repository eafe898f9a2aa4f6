"""``deqgen train``, ``deqgen demo`` and ``deqgen pretokenize``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import torch


def _train_args(p: argparse.ArgumentParser, resume: bool = True) -> None:
    p.add_argument(
        "config_path", nargs="?", metavar="CONFIG", help="recipe YAML, e.g. recipes/mnist_cpu.yaml"
    )
    p.add_argument("--config", dest="config_flag", metavar="PATH", help="recipe YAML (instead of CONFIG)")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config field, e.g. --set optim.lr_per_256=1e-4 (repeatable)",
    )
    if resume:
        p.add_argument(
            "--resume",
            metavar="auto|none|PATH",
            help="sets checkpoint.resume: the newest complete checkpoint, none, or a checkpoint directory",
        )
        p.add_argument(
            "--overwrite",
            action="store_true",
            help="clear a previous run in logging.out_dir first (otherwise a non-empty run "
            "directory is only resumed)",
        )


def _load_recipe(args: argparse.Namespace) -> Any:
    """The validated recipe of ``train``/``pretokenize``, or None after printing the error (exit 2)."""
    import json

    from deqgen.training.config import load_config
    from deqgen.training.schema import ConfigError

    a, b = args.config_path, args.config_flag
    if a is not None and b is not None and a != b:
        print(f"error: two configs given ({a!r} and --config {b!r}); give one", file=sys.stderr)
        return None
    path = a if a is not None else b
    if path is None:
        print(f"error: '{args.cmd}' needs a recipe: give CONFIG or --config PATH", file=sys.stderr)
        return None
    overrides = list(args.overrides)
    if getattr(args, "resume", None) is not None:  # a quoted YAML string keeps paths verbatim
        overrides.append(f"checkpoint.resume={json.dumps(args.resume)}")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        return load_config(path, overrides, device=device)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return None


def _pretokenize(args: argparse.Namespace) -> int:
    """Encode a recipe's training images once into a token-pyramid folder (``data.pretokenized``)."""
    cfg = _load_recipe(args)
    if cfg is None:
        return 2
    from deqgen.models.viar.convert import CheckpointError
    from deqgen.training.tasks.generation.tokens import pretokenize_recipe

    try:
        out = pretokenize_recipe(cfg, args.out, batch_size=args.batch_size)
    except (CheckpointError, FileExistsError, FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {out}; train on it with --set data.pretokenized={out}")
    return 0


def _train(args: argparse.Namespace) -> int:
    """Validate the recipe (exit 2 on any error, before anything is written), then run the training loop."""
    cfg = _load_recipe(args)
    if cfg is None:
        return 2
    from deqgen.training.checkpoint import CheckpointConfigMismatch, CheckpointError, CheckpointWriteError
    from deqgen.training.rundir import RunDirError
    from deqgen.training.train import main as train_main

    try:
        return int(train_main(cfg, overwrite=args.overwrite) or 0)
    except CheckpointWriteError as err:  # the run failed while running (disk full): not a usage error
        print(f"error: {err}", file=sys.stderr)
        return 1
    except (CheckpointError, CheckpointConfigMismatch, RunDirError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


def _demo_args(p: argparse.ArgumentParser) -> None:
    _train_args(p)  # a rerun resumes the training, as deqgen train does
    p.add_argument("--out", type=Path, default=Path("runs/digits"), help="run folder (default runs/digits)")
    p.add_argument(
        "--classifier-epochs", type=int, default=5, help="epochs of the held-out judge (default 5)"
    )


def _demo(args: argparse.Namespace) -> int:
    """``deqgen train`` a digits recipe into ``--out``, then score its samples with a held-out judge."""
    import json

    from deqgen.evaluation.digits_judge import judge_run
    from deqgen.evaluation.digits_run import check_digits_recipe
    from deqgen.evaluation.report import ReportError

    args.overrides = [*args.overrides, f"logging.out_dir={json.dumps(str(args.out))}"]
    cfg = _load_recipe(args)
    if cfg is None:
        return 2
    if args.classifier_epochs < 1:
        print(f"error: --classifier-epochs must be >= 1, got {args.classifier_epochs}", file=sys.stderr)
        return 2
    try:
        check_digits_recipe(cfg, args.config_path or args.config_flag)
    except ReportError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    code = _train(args)
    if code != 0:
        return code
    metrics = judge_run(args.out, classifier_epochs=args.classifier_epochs)
    keys = ("parameters", "class_accuracy", "feature_fid_vs_heldout", "final_loss")
    print(
        json.dumps({n: {k: v[k] for k in keys} for n, v in metrics.items() if isinstance(v, dict)}, indent=2)
    )
    print(f"wrote {args.out}/grid.png, loss.png, metrics.json")
    return 0
