"""The recipe command line: ``train``, ``sample``, ``edit``, ``convert`` and ``eval`` on a YAML recipe.

::

    python -m recipes.cli train --config recipes/mnist_cpu.yaml --set training.max_steps=100
    torchrun --standalone --nproc_per_node=8 -m recipes.cli train recipes/viar_imagenet.yaml --resume auto
    python -m recipes.cli sample --config recipes/mnist_cpu.yaml --set sampling.cfg=3.0

Each sub-command loads and validates the config (``--set dotted.key=value`` overrides, repeatable), then calls
``main(cfg, args) -> int | None`` of its module: ``recipes.train``, ``recipes.sample``, ``recipes.edit``,
``recipes.convert``, ``recipes.evaluate``. ``args`` is the parsed namespace; ``args.extra`` holds the
arguments this parser did not recognise, which the sub-command parses itself (``train`` accepts none, and
is the only one that also takes the config as a positional ``CONFIG``).

Exit codes: 0 success; 1 a sub-command that is not in this build, or one that reports failure; 2 a usage or
config error, printed to stderr before anything is written (no run directory is created).
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from typing import Any

__all__ = ["COMMANDS", "main"]


@dataclass(frozen=True)
class Command:
    """One sub-command.

    Attributes:
        module: the module whose ``main(cfg, args)`` runs it.
        help: one-line help.
        check_paths: which path fields must exist (see :func:`recipes.config.load_config`).
        needs_config: whether ``--config`` is required (``convert`` may run without one).
    """

    module: str
    help: str
    check_paths: bool | Collection[str] = True
    needs_config: bool = True


COMMANDS: dict[str, Command] = {
    "train": Command("recipes.train", "train the tokenizer (if asked) and the model(s); resumable"),
    "sample": Command("recipes.sample", "sample a class grid from a trained run", ("tokenizer", "checkpoint")),
    "edit": Command("recipes.edit", "in-/out-paint a box of an image with a class", ("tokenizer", "checkpoint")),
    "convert": Command("recipes.convert", "convert official VAR/VIAR/VQVAE weights", False, needs_config=False),
    "eval": Command("recipes.evaluate", "generate samples and compute metrics", ("tokenizer", "checkpoint")),
}


def _parser(prog: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description="deqgen recipes: train, sample, edit, convert, eval")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, cmd in COMMANDS.items():
        p = sub.add_parser(name, help=cmd.help, description=cmd.help)
        if name == "train":  # the other commands forward unknown arguments, which a positional would swallow
            p.add_argument("config_path", nargs="?", metavar="CONFIG", help="recipe YAML (or use --config)")
        p.add_argument("--config", dest="config_flag", metavar="PATH", help="recipe YAML")
        p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                       help="override a config field, e.g. --set optim.lr_per_256=1e-4 (repeatable)")
        if name == "train":
            p.add_argument("--resume", metavar="auto|none|PATH",
                           help="sets checkpoint.resume: newest complete checkpoint, none, or a directory")
    return parser


def _error(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)


def _config_path(args: argparse.Namespace) -> str | None:
    a, b = getattr(args, "config_path", None), args.config_flag
    if a is not None and b is not None and a != b:
        raise ValueError(f"two configs given ({a!r} and --config {b!r}); give one")
    return a if a is not None else b


def _device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _load(cmd: Command, args: argparse.Namespace) -> Any:
    """The validated config, or None for a command that runs without one. Raises ConfigError/ValueError."""
    from recipes.config import load_config

    path = _config_path(args)
    if path is None:
        if cmd.needs_config:
            raise ValueError(f"'{args.command}' needs a recipe: give --config PATH")
        if args.overrides:
            raise ValueError("--set needs a recipe to override: give --config PATH")
        return None
    overrides = list(args.overrides)
    if getattr(args, "resume", None) is not None:
        overrides.append(f"checkpoint.resume={json.dumps(args.resume)}")  # a quoted string: paths stay verbatim
    return load_config(path, overrides, check_paths=cmd.check_paths, device=_device())


def _dispatch(cmd: Command, name: str, cfg: Any, args: argparse.Namespace) -> int:
    try:
        module = importlib.import_module(cmd.module)
    except ModuleNotFoundError as e:
        if e.name == cmd.module:
            _error(f"'{name}' is not available in this build ({cmd.module} is missing)")
        else:
            _error(f"'{name}' needs the package {e.name!r}, which is not installed")
        return 1
    entry = getattr(module, "main", None)
    if not callable(entry):
        _error(f"'{name}' is not available in this build ({cmd.module} has no main(cfg, args))")
        return 1
    return int(entry(cfg, args) or 0)


def main(argv: Sequence[str] | None = None, *, prog: str = "deqgen") -> int:
    """Run the command line; returns the exit code (see the module docstring)."""
    from recipes.config import ConfigError

    parser = _parser(prog)
    try:
        args, extra = parser.parse_known_args(list(sys.argv[1:] if argv is None else argv))
    except SystemExit as e:  # --help (0) or a usage error (2), already printed by argparse
        return int(e.code or 0)
    args.extra = extra
    if args.command == "train" and extra:
        _error(f"unrecognized arguments for train: {' '.join(extra)} (use --set key=value for config fields)")
        return 2
    cmd = COMMANDS[args.command]
    try:
        cfg = _load(cmd, args)
    except (ConfigError, ValueError) as e:
        _error(str(e))
        return 2
    try:
        return _dispatch(cmd, args.command, cfg, args)
    except ConfigError as e:
        _error(str(e))
        return 2


if __name__ == "__main__":
    sys.exit(main())
