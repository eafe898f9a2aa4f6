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
import contextlib
import logging
import sys
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from deqgen import solvers
from deqgen.images import save_grid

__all__ = ["main"]


def _load_pair(model_dir: str, vqvae_dir: str):  # type: ignore[no-untyped-def]
    """The model and the tokenizer, each checked to be what its argument says (swapped folders are named).

    Raises:
        TypeError: ``model_dir`` is not a VAR/VIAR model or ``vqvae_dir`` not a tokenizer.
    """
    from deqgen.models.viar.convert import load_converted
    from deqgen.models.viar.model import NextScaleTransformer
    from deqgen.models.viar.vqvae import MultiScaleVQVAE

    model, vae = load_converted(model_dir), load_converted(vqvae_dir)
    if isinstance(model, MultiScaleVQVAE) and isinstance(vae, NextScaleTransformer):
        raise TypeError(f"MODEL {model_dir} holds a tokenizer and --vqvae {vqvae_dir} a model: swap them")
    if not isinstance(model, NextScaleTransformer):
        raise TypeError(
            f"MODEL {model_dir} holds a {type(model).__name__}, not a VAR/VIAR model (deqgen convert)"
        )
    if not isinstance(vae, MultiScaleVQVAE):
        raise TypeError(f"--vqvae {vqvae_dir} holds a {type(vae).__name__}, not a tokenizer (deqgen convert)")
    return model.eval(), vae.eval()


def _check_classes(flag: str, classes: list[int], num_classes: int) -> None:
    """Class ids must be real classes: ``num_classes`` itself is the null class used for guidance."""
    bad = [c for c in classes if not 0 <= c < num_classes]
    if bad:
        raise ValueError(
            f"{flag} {bad[0]}: the model has classes 0..{num_classes - 1} ({num_classes} is the "
            "null class used for guidance, not a class to sample)"
        )


def _positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _non_negative_int(text: str) -> int:
    """argparse type: an integer >= 0."""
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def _non_negative_float(text: str) -> float:
    """argparse type: a finite float >= 0."""
    value = float(text)
    if not 0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text}")
    return value


def _probability(text: str) -> float:
    """argparse type: a float in [0, 1]."""
    value = float(text)
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"must lie in [0, 1], got {text}")
    return value


def _check_image(path: Path) -> None:
    """Raise unless ``path`` is an image file Pillow can read (before any model is loaded)."""
    from PIL import Image, UnidentifiedImageError

    if not path.is_file():
        raise FileNotFoundError(f"--image {path}: no such file")
    try:
        with Image.open(path) as img:
            img.verify()
    except (UnidentifiedImageError, OSError, SyntaxError) as e:
        raise ValueError(
            f"--image {path} is not an image Pillow can read ({e}); give a PNG or JPEG"
        ) from None


def _check_out_png(out: Path) -> None:
    """``--out`` must name a file in an existing folder, not a folder."""
    if out.is_dir():
        raise ValueError(f"--out {out} is a directory; give a file name such as {out / 'grid.png'}")
    if not out.parent.is_dir():
        raise ValueError(f"--out {out}: the folder {out.parent} does not exist; create it first")


def _read_image(path: Path, side: int, channels: int) -> Tensor:
    try:
        from PIL import Image
    except ImportError:
        raise SystemExit("error: reading images needs Pillow: pip install 'deqgen[recipes]'") from None
    img = (
        Image.open(path)
        .convert("L" if channels == 1 else "RGB")
        .resize((side, side), Image.Resampling.LANCZOS)
    )
    t = torch.tensor(bytearray(img.tobytes()), dtype=torch.uint8).view(side, side, channels).permute(2, 0, 1)
    return t.float()[None] / 127.5 - 1


_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _device_args(p: argparse.ArgumentParser, *, batch_size: int | None) -> None:
    """``--device`` and ``--dtype`` (and ``--batch-size`` when ``batch_size`` gives its default)."""
    p.add_argument("--device", default=None, help="cpu, cuda or cuda:N; None: cuda when available")
    p.add_argument(
        "--dtype",
        default="fp32",
        choices=list(_DTYPES),
        help="autocast dtype of the forward passes (fp32: no autocast)",
    )
    if batch_size is not None:
        p.add_argument(
            "--batch-size",
            type=_positive_int,
            default=batch_size,
            help="samples per batch; images do not depend on it",
        )


def _resolve_device(name: str | None) -> torch.device:
    """``--device``, checked: a CUDA device needs CUDA here.

    Raises:
        ValueError: an unparsable device name, or CUDA asked for without CUDA.
    """
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device {name!r} is not a device; use cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: CUDA is not available on this machine; use --device cpu")
    return device


def _autocast(device: torch.device, dtype: str) -> contextlib.AbstractContextManager[Any]:
    """Autocast to ``--dtype`` on ``device`` (a no-op for fp32)."""
    return torch.autocast(device.type, dtype=_DTYPES[dtype], enabled=dtype != "fp32")


def _compile_for_sampling(model: Any, device: torch.device, dtype: str) -> None:
    """``--compile``: resolve the attention kernels for the dtype the blocks see, then compile the per-scale
    forward that :func:`~deqgen.models.viar.sampling.generate` calls."""
    model.prepare_attention(device, _DTYPES[dtype])
    model.forward_scale = torch.compile(model.forward_scale)


def _generate_in_batches(
    model: Any,
    vae: Any,
    labels: Tensor,
    batch_size: int,
    seed: int,
    edit_image: Tensor | None,
    edit_mask: Tensor | None,
    **kw: Any,
) -> Tensor:
    """Images ``(N, C, H, W)`` on the CPU, sampled ``batch_size`` at a time on the model's device.

    Sample ``i`` draws from its own generator seeded by ``(seed, i)`` (``sample_offset``), so an image does
    not depend on the batch size.
    """
    from deqgen.models.viar.sampling import EditSpec, generate

    device = next(model.parameters()).device
    images = []
    for start in range(0, labels.shape[0], batch_size):
        rows = slice(start, start + batch_size)
        edit = None if edit_image is None or edit_mask is None else EditSpec(edit_image[rows], edit_mask)
        res = generate(model, vae, labels[rows].to(device), seed=seed, sample_offset=start, edit=edit, **kw)
        images.append(res.images.float().cpu())
    return torch.cat(images)


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


def _eval_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="converted model directory (deqgen convert)")
    p.add_argument("--vqvae", required=True, help="converted tokenizer directory")
    p.add_argument(
        "--per-class", type=_positive_int, required=True, help="samples per class (ImageNet protocol: 50)"
    )
    p.add_argument(
        "--classes", type=int, nargs="+", default=None, help="class ids (default: all of the model's)"
    )
    p.add_argument(
        "--out",
        type=Path,
        required=True,
        help="ADM sample file (.npz); shards go next to it (samples.npz: samples_shards/)",
    )
    p.add_argument(
        "--schedule", default=None, help="VIAR per-scale iterations, e.g. constant:10, linear:10:5"
    )
    p.add_argument(
        "--cache", default="iteration", choices=["iteration", "lean"], help="VIAR's implicit KV cache"
    )
    p.add_argument("--warm-start", action="store_true", help="start each scale from the previous equilibrium")
    p.add_argument(
        "--cfg-scale",
        "--cfg",
        type=_non_negative_float,
        default=1.5,
        help="classifier-free guidance scale (>= 0)",
    )
    p.add_argument("--top-k", type=_non_negative_int, default=900, help="0 = off")
    p.add_argument("--top-p", type=_probability, default=0.96, help="in [0, 1]; 0 = off")
    p.add_argument("--seed", type=_non_negative_int, default=0)
    p.add_argument(
        "--batch-size",
        type=_positive_int,
        default=50,
        help="samples per batch and per shard (fixed for a resume)",
    )
    p.add_argument("--reference", type=Path, default=None, help="ADM .npz of real images (FID, feature-FID)")
    p.add_argument(
        "--inception-weights",
        type=Path,
        default=None,
        help="local weights-inception-2015-12-05-6726825d.pth (FID/IS/P-R; never downloaded)",
    )
    p.add_argument(
        "--classifier",
        type=Path,
        default=None,
        help="digits classifier .safetensors (class accuracy, feature-FID vs --reference)",
    )
    _device_args(p, batch_size=None)


def _eval(args: argparse.Namespace) -> int:
    """Sample class-major shards on every rank, merge on rank 0, then score; exit 2 before writing on bad input."""
    import json

    from deqgen.evaluation import sample_files as sf
    from deqgen.models.viar.convert import CheckpointError
    from deqgen.training.distributed import barrier, init_distributed, teardown

    out: Path = args.out
    try:
        if out.suffix != ".npz":
            raise ValueError(f"--out {out} must end in .npz (the ADM evaluator's format)")
        sf.check_metric_inputs(
            reference=args.reference, inception_weights=args.inception_weights, classifier=args.classifier
        )
        device = _resolve_device(args.device)
        model, vae = _load_pair(args.model, args.vqvae)
        classes = tuple(args.classes) if args.classes else tuple(range(model.num_classes))
        _check_classes("--classes", list(classes), model.num_classes)
        spec = sf.SampleSpec(
            classes,
            args.per_class,
            args.schedule,
            args.cfg_scale,
            args.top_k,
            args.top_p,
            args.seed,
            args.batch_size,
            args.cache,
            args.warm_start,
        )
        shards = sf.shard_dir_for(out)
        identity = {"model": sf.checkpoint_identity(args.model), "vqvae": sf.checkpoint_identity(args.vqvae)}
        if args.dtype != "fp32":  # autocast gives other bytes: no resume across dtypes (fp32 runs as before)
            identity["dtype"] = args.dtype
        sf.check_resume(shards, spec, identity)
    except (CheckpointError, ValueError, TypeError, KeyError, FileNotFoundError, ImportError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    info = init_distributed()
    device = info.device if args.device is None else device  # torchrun: each rank its own GPU
    code = 0
    try:
        model.to(device)
        vae.to(device)
        try:
            with _autocast(device, args.dtype):
                sf.sample_shards(
                    model,
                    vae,
                    spec,
                    shards,
                    rank=info.rank,
                    world_size=info.world_size,
                    device=device,
                    identity=identity,
                    progress=info.is_main,
                )
        except (ValueError, KeyError, OSError) as err:
            print(f"error: rank {info.rank}: {err}", file=sys.stderr)
            code = 2
        barrier()  # every rank passes both barriers, failed or not, so none waits forever
        if info.is_main and code == 0:
            try:
                sf.merge_samples(shards, out, spec)
                metrics = sf.score_samples(
                    out,
                    reference=args.reference,
                    inception_weights=args.inception_weights,
                    classifier=args.classifier,
                    cuda=device.type == "cuda",
                )
                record = {
                    "samples": str(out),
                    "num_samples": spec.total,
                    "spec": spec.to_json(),
                    "model": str(args.model),
                    "vqvae": str(args.vqvae),
                    "world_size": info.world_size,
                    "reference": None if args.reference is None else str(args.reference),
                    "metrics": metrics,
                }
                metrics_path = out.with_name(f"{out.stem}.metrics.json")
                metrics_path.write_text(json.dumps(record, indent=2))
                print(f"wrote {out} and {metrics_path}")
            except (ValueError, KeyError, OSError, ImportError) as err:
                print(f"error: {err}", file=sys.stderr)
                code = 2
        barrier()
        return code
    finally:
        teardown()


def _report(args: argparse.Namespace) -> int:
    """Measure the CPU demo run and write report.md with its plots."""
    from deqgen.evaluation.make_report import build_report
    from deqgen.evaluation.report import ReportError

    if args.threads < 1:
        print(f"error: --threads must be >= 1, got {args.threads}", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    try:
        path = build_report(args.run_dir, args.out, quick=args.quick)
    except (ReportError, ImportError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {path}")
    return 0


def _convert(src: str, dst: str, *, kind: Any, patch_nums: tuple[int, ...] | None, slim: bool) -> Path:
    """``deqgen convert``; with ``slim`` the training checkpoint is first slimmed into a temporary file."""
    import tempfile

    from deqgen.models.viar.convert import convert_checkpoint, slim_checkpoint

    if not slim:
        return convert_checkpoint(src, dst, kind=kind, patch_nums=patch_nums)
    with tempfile.TemporaryDirectory(prefix="deqgen-slim-") as tmp:
        slim_pth = slim_checkpoint(src, Path(tmp) / "slim.pth")
        return convert_checkpoint(slim_pth, dst, kind=kind, patch_nums=patch_nums)


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


if __name__ == "__main__":
    raise SystemExit(main())
