"""``deqgen eval`` and ``deqgen report``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from deqgen.cli.common import (
    _autocast,
    _check_classes,
    _device_args,
    _load_pair,
    _non_negative_float,
    _non_negative_int,
    _positive_int,
    _probability,
    _resolve_device,
)


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

    torch.set_num_threads(args.threads)
    try:
        path = build_report(args.run_dir, args.out, quick=args.quick)
    except (ReportError, ImportError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {path}")
    return 0
