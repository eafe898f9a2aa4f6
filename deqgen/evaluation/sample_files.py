"""ADM sample files from a VAR / VIAR checkpoint: the engine of ``deqgen eval``.

:func:`sample_shards` generates one rank's share of a class-major sample set as resumable shards
(:class:`~deqgen.evaluation.npz.ShardedSampleWriter`); :func:`merge_samples` assembles them into one ``.npz``
with ``arr_0`` (uint8 ``(N, H, W, 3)``, what the ADM evaluator reads) and ``labels`` (int64 ``(N,)``).

**Independent of the world size.** Chunk ``[start, stop)`` of the global index range is always sampled as one
batch, whatever rank owns it, and sample ``i`` draws its random numbers from a generator seeded by
``(seed, i)`` (:func:`~deqgen.models.viar.logits.per_sample_generators`). So 1 rank, 2 ranks, or a run killed
and resumed give the same bytes. The chunk size (``batch_size``) is part of the run's identity: changing it
changes the batches the model sees, and a resume with another one is refused.

**Resume.** The shard folder holds ``sampling.json`` (the :class:`SampleSpec` and the checkpoint's identity);
a rerun with the same options skips the shards that are complete, a rerun with other options is refused
before anything is written.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import zipfile
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from numpy.lib import format as npy_format
from torch import Tensor

from deqgen.evaluation.npz import (
    SampleChunk,
    ShardedSampleWriter,
    merge_shards,
    read_samples_npz,
    to_uint8_nhwc,
)
from deqgen.files import atomic_file, atomic_write_bytes
from deqgen.models.viar.model import NextScaleTransformer
from deqgen.models.viar.sampling import generate
from deqgen.models.viar.schedules import parse_schedule

__all__ = [
    "SPEC_NAME",
    "SampleSpec",
    "check_metric_inputs",
    "check_resume",
    "checkpoint_identity",
    "merge_samples",
    "read_sample_labels",
    "sample_shards",
    "score_samples",
    "shard_dir_for",
    "uint8_to_grey",
]

logger = logging.getLogger(__name__)

SPEC_NAME = "sampling.json"
_SPEC_FORMAT = "deqgen-eval-sampling-v1"
CacheKind = Literal["iteration", "lean"]


@dataclass(frozen=True)
class SampleSpec:
    """What to sample: classes, count and sampler settings (everything that changes the bytes).

    Attributes:
        classes: class ids, in the order they appear in the file (class-major).
        per_class: samples per class; sample ``i`` has class ``classes[i // per_class]``.
        schedule: VIAR's per-scale iteration schedule spec (e.g. ``"linear:4:2"``); ``None`` = the model's
            default. Ignored by VAR.
        cfg_scale: classifier-free guidance scale (0 = no guidance).
        top_k: top-k filter (0 = off).
        top_p: nucleus filter (0 = off).
        seed: run seed; sample ``i`` draws from a generator seeded by ``(seed, i)``.
        batch_size: samples per generated batch and per shard.
        cache: VIAR's implicit-block KV cache, ``"iteration"`` (official) or ``"lean"``.
        warm_start: start each scale's solve from the previous scale's upsampled equilibrium.
    """

    classes: tuple[int, ...]
    per_class: int
    schedule: str | None = None
    cfg_scale: float = 1.5
    top_k: int = 0
    top_p: float = 0.0
    seed: int = 0
    batch_size: int = 50
    cache: CacheKind = "iteration"
    warm_start: bool = False

    def __post_init__(self) -> None:
        if not self.classes or any(
            isinstance(c, bool) or not isinstance(c, int) or c < 0 for c in self.classes
        ):
            raise ValueError(f"classes must be a non-empty list of ints >= 0, got {self.classes!r}")
        if len(set(self.classes)) != len(self.classes):
            raise ValueError(f"classes {list(self.classes)} repeat a class; give each class once")
        for name in ("per_class", "batch_size"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be an int >= 1, got {v!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"seed must be an int >= 0, got {self.seed!r}")
        if not math.isfinite(self.cfg_scale) or self.cfg_scale < 0:
            raise ValueError(
                f"cfg_scale must be a finite number >= 0 (0 = no guidance), got {self.cfg_scale!r}"
            )
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
            raise ValueError(f"top_k must be an int >= 0 (0 = off), got {self.top_k!r}")
        if not 0.0 <= self.top_p <= 1.0:
            raise ValueError(f"top_p must lie in [0, 1] (0 = off), got {self.top_p!r}")
        if self.cache not in ("iteration", "lean"):
            raise ValueError(f"cache must be 'iteration' or 'lean', got {self.cache!r}")
        if self.schedule is not None:
            parse_schedule(self.schedule)  # raises ValueError naming the accepted forms

    @property
    def total(self) -> int:
        """Number of samples, ``len(classes) * per_class``."""
        return len(self.classes) * self.per_class

    def labels(self, chunk: SampleChunk) -> Tensor:
        """``(len(chunk),)`` int64 class ids of a chunk's samples."""
        return torch.tensor(self.classes, dtype=torch.int64)[chunk.labels]

    def all_labels(self) -> np.ndarray:
        """``(total,)`` int64 class ids of the whole file, class-major."""
        return np.repeat(np.asarray(self.classes, dtype=np.int64), self.per_class)

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict of the fields."""
        d = asdict(self)
        d["classes"] = list(self.classes)
        return d


def shard_dir_for(out: str | Path) -> Path:
    """Where the shards of ``out`` (``samples.npz``) live: ``samples_shards/`` next to it."""
    out = Path(out)
    return out.with_name(f"{out.stem}_shards")


def checkpoint_identity(model_dir: str | Path) -> dict[str, Any]:
    """What identifies a converted checkpoint directory for resume checks: a hash of ``config.json`` and the
    size of ``model.safetensors`` (cheap; a retrained model of the same config and size is not detected)."""
    d = Path(model_dir)
    config = (d / "config.json").read_bytes()
    weights = d / "model.safetensors"
    return {
        "config_sha256": hashlib.sha256(config).hexdigest(),
        "weights_bytes": weights.stat().st_size if weights.is_file() else None,
    }


def _spec_record(spec: SampleSpec, identity: Mapping[str, Any]) -> dict[str, Any]:
    return {"format": _SPEC_FORMAT, "spec": spec.to_json(), "checkpoints": dict(identity)}


def check_resume(shard_dir: str | Path, spec: SampleSpec, identity: Mapping[str, Any]) -> None:
    """Raise ``ValueError`` if ``shard_dir`` holds shards of a different run; writes nothing.

    Args:
        shard_dir: the shard folder (may not exist yet).
        spec: this run's options.
        identity: this run's checkpoints (e.g. :func:`checkpoint_identity` of the model and the tokenizer).
    """
    path = Path(shard_dir) / SPEC_NAME
    if not path.is_file():
        if Path(shard_dir).is_dir() and any(Path(shard_dir).glob("shard_*.npz")):
            raise ValueError(
                f"{shard_dir} holds shards but no {SPEC_NAME}; remove the folder or choose another --out"
            )
        return
    old = json.loads(path.read_text())
    new = json.loads(json.dumps(_spec_record(spec, identity)))  # same JSON types as the stored record
    if old != new:
        diff = sorted(
            k
            for k in set(old.get("spec", {})) | set(new["spec"])
            if old.get("spec", {}).get(k) != new["spec"].get(k)
        )
        what = f"options {diff}" if diff else "checkpoints"
        raise ValueError(
            f"{shard_dir} holds shards of another run (different {what}); resume with the same "
            f"options, or remove {shard_dir} (or choose another --out) to start over"
        )


def _progress(chunks: list[SampleChunk], show: bool) -> Iterator[SampleChunk]:
    if show:
        try:
            from tqdm import tqdm
        except ImportError:
            logger.debug("tqdm is not installed; no progress bar")
        else:
            yield from tqdm(chunks, desc="sampling", unit="shard")
            return
    yield from chunks


def sample_shards(
    model: NextScaleTransformer,
    vqvae: Any,
    spec: SampleSpec,
    shard_dir: str | Path,
    *,
    rank: int = 0,
    world_size: int = 1,
    device: torch.device | str = "cpu",
    identity: Mapping[str, Any] | None = None,
    progress: bool = False,
) -> int:
    """Generate this rank's pending shards of ``spec`` into ``shard_dir``.

    Rank ``r`` owns chunks ``r, r + world_size, ...`` of ``batch_size`` samples; a chunk whose shard is
    complete is skipped, a damaged one redone. Each chunk is one :func:`~deqgen.models.viar.sampling.generate`
    call with ``seed=spec.seed`` and ``sample_offset=chunk.start``, so its images do not depend on
    ``world_size`` or on earlier, interrupted runs.

    Args:
        model: VAR / VIAR in eval mode, on ``device``.
        vqvae: its tokenizer, on ``device``.
        spec: what to sample.
        shard_dir: shard folder (created), e.g. :func:`shard_dir_for` of the output file.
        rank: this process's rank.
        world_size: number of sampling processes.
        device: where labels go.
        identity: the checkpoints' identity, stored for resume checks (default: none).
        progress: show a tqdm bar (tqdm optional); give ``True`` on rank 0 only.

    Returns:
        The number of shards this call generated (0 when everything was already done).

    Raises:
        ValueError: ``shard_dir`` belongs to another run (:func:`check_resume`), or a class id is outside the
            model's classes.
    """
    if max(spec.classes) >= model.num_classes:
        raise ValueError(
            f"classes {list(spec.classes)} go beyond the model's {model.num_classes} classes "
            f"(ids 0..{model.num_classes - 1})"
        )
    identity = dict(identity or {})
    check_resume(shard_dir, spec, identity)
    writer = ShardedSampleWriter(
        shard_dir,
        total=spec.total,
        num_classes=len(spec.classes),
        rank=rank,
        world_size=world_size,
        chunk_size=spec.batch_size,
    )
    record = json.dumps(_spec_record(spec, identity), indent=2, sort_keys=True).encode()
    spec_path = Path(shard_dir) / SPEC_NAME
    if not spec_path.is_file():
        atomic_write_bytes(spec_path, record)
    pending = list(writer.pending())
    logger.info(
        "rank %d/%d: %d of %d shards to sample (%d samples each)",
        rank,
        world_size,
        len(pending),
        len(writer.chunks()),
        spec.batch_size,
    )
    for chunk in _progress(pending, progress):
        res = generate(
            model,
            vqvae,
            spec.labels(chunk).to(device),
            schedule=spec.schedule,
            cfg_scale=spec.cfg_scale,
            top_k=spec.top_k,
            top_p=spec.top_p,
            seed=spec.seed,
            sample_offset=chunk.start,
            cache=spec.cache,
            warm_start=spec.warm_start,
        )
        writer.write(chunk, to_uint8_nhwc(res.images, value_range=(0.0, 1.0)))
    return len(pending)


def merge_samples(shard_dir: str | Path, out: str | Path, spec: SampleSpec) -> Path:
    """Merge all shards into ``out``: ``arr_0`` uint8 ``(N, H, W, 3)`` plus ``labels`` int64 ``(N,)``.

    The merge streams one shard at a time (memory: one shard) into a temporary file next to ``out``, adds the
    labels as a second member, then renames it: ``out`` never exists half-written.

    Args:
        shard_dir: the folder :func:`sample_shards` wrote (all ranks finished).
        out: the ``.npz`` to write.
        spec: the run's options (for the labels).

    Returns:
        ``out``.

    Raises:
        ValueError: shards missing or damaged (the message names the index ranges).
    """
    out = Path(out)
    with atomic_file(out) as tmp:
        merge_shards(shard_dir, tmp)
        labels = spec.all_labels()
        with (
            zipfile.ZipFile(tmp, mode="a", compression=zipfile.ZIP_STORED, allowZip64=True) as archive,
            archive.open("labels.npy", mode="w", force_zip64=True) as member,
        ):
            npy_format.write_array(member, labels, allow_pickle=False)
    return out


def read_sample_labels(path: str | Path) -> np.ndarray:
    """``labels`` (int64 ``(N,)``) of a file written by :func:`merge_samples`."""
    with open(path, "rb") as f, np.load(f) as data:
        if "labels" not in data:
            raise KeyError(
                f"{path} has no 'labels' array (keys {sorted(data.keys())}); class accuracy needs the "
                "labels that deqgen eval writes"
            )
        return data["labels"].astype(np.int64)


def uint8_to_grey(images: np.ndarray, side: int | None = None) -> Tensor:
    """ADM-layout uint8 images as grey float images in ``[-1, 1]`` (the digits classifier's input).

    Args:
        images: ``(N, H, W, 3)`` uint8 (grey images stored as three equal channels, as
            :func:`~deqgen.evaluation.npz.to_uint8_nhwc` writes them).
        side: expected ``H == W``; raise if it differs.

    Returns:
        ``(N, 1, H, W)`` float32.
    """
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[3] != 3:
        raise ValueError(f"expected uint8 (N, H, W, 3) images, got {images.dtype} {images.shape}")
    if side is not None and images.shape[1:3] != (side, side):
        raise ValueError(
            f"images are {images.shape[1]}x{images.shape[2]}, the classifier takes {side}x{side}"
        )
    grey = torch.from_numpy(np.ascontiguousarray(images)).float().mean(dim=3)  # (N, H, W)
    return (grey / 255.0 * 2.0 - 1.0).unsqueeze(1)


def check_metric_inputs(
    *,
    reference: str | Path | None,
    inception_weights: str | Path | None,
    classifier: str | Path | None,
) -> None:
    """Fail before sampling when the metric inputs cannot work; reads and writes nothing big.

    Raises:
        FileNotFoundError: the reference, the classifier or the Inception weights file is missing (the last
            message names the file and where to put it; nothing is ever downloaded).
        ImportError: Inception metrics asked for but torch-fidelity is not installed.
        ValueError: ``reference`` without anything to compare it with.
    """
    from deqgen.evaluation.fidelity import resolve_inception_weights

    if reference is not None and not Path(reference).is_file():
        raise FileNotFoundError(f"--reference {reference} does not exist; give an ADM .npz of real images")
    if reference is not None and inception_weights is None and classifier is None:
        raise ValueError(
            "--reference alone computes nothing; add --inception-weights (FID/IS/P-R) or "
            "--classifier (digits: class accuracy and feature-FID)"
        )
    if inception_weights is not None:
        resolve_inception_weights(inception_weights, argument="--inception-weights ")
        import importlib.util

        if importlib.util.find_spec("torch_fidelity") is None:
            raise ImportError("FID/IS/precision-recall need torch-fidelity: pip install 'deqgen[eval]'")
    if classifier is not None:
        path = Path(classifier)
        if not path.is_file() or not path.with_suffix(".json").is_file():
            raise FileNotFoundError(
                f"--classifier {path} needs the weights file and its config "
                f"{path.with_suffix('.json')} (DigitsClassifier.save writes both)"
            )


def score_samples(
    samples: str | Path,
    *,
    reference: str | Path | None = None,
    inception_weights: str | Path | None = None,
    classifier: str | Path | None = None,
    cuda: bool = False,
) -> dict[str, float]:
    """Metrics of a sample file written by :func:`merge_samples`.

    Args:
        samples: the ``.npz`` (``arr_0`` and ``labels``).
        reference: an ADM ``.npz`` of real images (``arr_0``).
        inception_weights: local Inception-v3 weights; with it: Inception Score, and with ``reference`` also
            FID and precision / recall (:func:`~deqgen.evaluation.fidelity.compute_fidelity_metrics`).
        classifier: a :class:`~deqgen.evaluation.digits_classifier.DigitsClassifier` file; with it: class
            accuracy of the samples against their labels, and with ``reference`` the Fréchet distance in the
            classifier's feature space (``feature_fid``).
        cuda: run the Inception feature extractor on the GPU.

    Returns:
        ``{metric name: value}`` (empty without metric inputs).
    """
    metrics: dict[str, float] = {}
    if inception_weights is not None:
        from deqgen.evaluation.fidelity import compute_fidelity_metrics

        both = reference is not None
        metrics.update(
            compute_fidelity_metrics(
                samples,
                reference,
                feature_extractor_weights_path=inception_weights,
                isc=True,
                fid=both,
                prc=both,
                cuda=cuda,
            )
        )
    if classifier is not None:
        from deqgen.evaluation.digits_classifier import DigitsClassifier, class_accuracy
        from deqgen.evaluation.frechet import fid_from_features

        clf = DigitsClassifier.load(classifier)
        fake = uint8_to_grey(read_samples_npz(samples), clf.config.side)
        labels = torch.from_numpy(read_sample_labels(samples))
        metrics["class_accuracy"] = class_accuracy(clf, fake, labels)
        if reference is not None:
            real = uint8_to_grey(read_samples_npz(reference), clf.config.side)
            with torch.no_grad():
                metrics["feature_fid"] = fid_from_features(clf.features(fake), clf.features(real))
    return metrics
