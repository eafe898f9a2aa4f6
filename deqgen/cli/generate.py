"""``deqgen convert``, ``deqgen sample`` and ``deqgen edit``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import torch

from deqgen import solvers
from deqgen.cli.common import (
    _autocast,
    _check_classes,
    _check_image,
    _check_out_png,
    _compile_for_sampling,
    _device_args,
    _generate_in_batches,
    _load_pair,
    _non_negative_float,
    _non_negative_int,
    _probability,
    _read_image,
    _resolve_device,
)
from deqgen.images import save_grid


def _sample_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="converted model directory (deqgen convert)")
    p.add_argument("--vqvae", required=True, help="converted tokenizer directory")
    p.add_argument(
        "--schedule",
        default=None,
        help="VIAR per-scale iterations, e.g. constant:10, linear:10:5:floor, adaptive:1e-3:10; "
        "None: the model's eval_iterations at every scale",
    )
    p.add_argument(
        "--solver",
        default=None,
        choices=sorted(solvers.SOLVERS),
        help="VIAR's fixed-point solver; None: the model's eval solver",
    )
    p.add_argument(
        "--cfg-scale",
        "--cfg",
        type=_non_negative_float,
        default=1.5,
        help="classifier-free guidance scale (>= 0)",
    )
    p.add_argument("--top-k", type=_non_negative_int, default=900, help="0 = off")
    p.add_argument("--top-p", type=_probability, default=0.96, help="in [0, 1]; 0 = off")
    p.add_argument(
        "--seed", type=_non_negative_int, default=0, help="sample i draws from its own stream of (seed, i)"
    )
    p.add_argument("--out", type=Path, required=True, help="PNG path")
    _device_args(p, batch_size=16)


def _convert(src: str, dst: str, *, kind: Any, patch_nums: tuple[int, ...] | None, slim: bool) -> Path:
    """``deqgen convert``; with ``slim`` the training checkpoint is first slimmed into a temporary file."""
    import tempfile

    from deqgen.models.viar.convert import convert_checkpoint, slim_checkpoint

    if not slim:
        return convert_checkpoint(src, dst, kind=kind, patch_nums=patch_nums)
    with tempfile.TemporaryDirectory(prefix="deqgen-slim-") as tmp:
        slim_pth = slim_checkpoint(src, Path(tmp) / "slim.pth")
        return convert_checkpoint(slim_pth, dst, kind=kind, patch_nums=patch_nums)


_USER_ERRORS = (
    ValueError,
    TypeError,
    KeyError,
    FileNotFoundError,
    FileExistsError,
    NotADirectoryError,
    IsADirectoryError,
    PermissionError,
)
"""What a command reports as ``error: ...`` with exit code 2 (``CheckpointError`` is a ``ValueError``)."""


def _convert_cmd(args: argparse.Namespace) -> int:
    """``deqgen convert``: an official checkpoint into a converted directory."""
    try:
        pn = tuple(args.patch_nums) if args.patch_nums else None
        out = _convert(args.src, args.dst, kind=args.kind, patch_nums=pn, slim=args.slim)
    except _USER_ERRORS as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0


def _sample_or_edit(args: argparse.Namespace) -> int:
    """``deqgen sample`` / ``deqgen edit``: load the pair, check the request, generate, write the PNG grid."""
    try:
        device = _resolve_device(args.device)
        _check_out_png(args.out)
        if args.cmd == "edit":
            _check_image(args.image)
        model, vae = _load_pair(args.model, args.vqvae)
        labels = args.classes if args.cmd == "sample" else [args.label]
        _check_classes("--classes" if args.cmd == "sample" else "--class", labels, model.num_classes)
        model.to(device)
        vae.to(device)
        if getattr(args, "compile", False):
            _compile_for_sampling(model, device, args.dtype)
        solver = solvers.get(args.solver) if args.solver else None
        kw = {
            "schedule": args.schedule,
            "cfg_scale": args.cfg_scale,
            "top_k": args.top_k,
            "top_p": args.top_p,
            "solver": solver,
            "batch_size": args.batch_size,
            "seed": args.seed,
        }
        if args.cmd == "sample":
            _sample_grid(args, model, vae, device, kw)
        else:
            _edit_grid(args, model, vae, device, kw)
    except _USER_ERRORS as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {args.out}")
    return 0


def _sample_grid(
    args: argparse.Namespace, model: Any, vae: Any, device: torch.device, kw: dict[str, Any]
) -> None:
    """``deqgen sample``: ``--per-class`` images of every ``--classes`` entry, one row per class."""
    labels = torch.tensor(args.classes).repeat_interleave(args.per_class)
    with _autocast(device, args.dtype):
        images = _generate_in_batches(model, vae, labels, edit_image=None, edit_mask=None, **kw)
    save_grid(args.out, images, nrow=args.per_class)


def _edit_grid(
    args: argparse.Namespace, model: Any, vae: Any, device: torch.device, kw: dict[str, Any]
) -> None:
    """``deqgen edit``: the input image, then ``--samples`` edits of its ``--box`` (or of the rest)."""
    side, ch = vae.config.image_size, vae.config.in_channels
    x0, y0, x1, y1 = args.box
    if not (0 <= x0 < x1 <= side and 0 <= y0 < y1 <= side):
        raise ValueError(f"--box {args.box} must satisfy 0 <= x0 < x1 <= {side} and 0 <= y0 < y1 <= {side}")
    img = _read_image(args.image, side, ch).expand(args.samples, -1, -1, -1)
    mask = torch.zeros(side, side, dtype=torch.bool)
    mask[y0:y1, x0:x1] = True
    with _autocast(device, args.dtype):
        region = ~mask if args.outpaint else mask
        images = _generate_in_batches(
            model, vae, torch.full((args.samples,), args.label), edit_image=img, edit_mask=region, **kw
        )
    save_grid(args.out, torch.cat([(img[:1] + 1) / 2, images]), nrow=args.samples + 1)
