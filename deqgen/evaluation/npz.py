"""Sample files in the ADM evaluator's format, written shard by shard from many ranks and resumable after a kill.

The ADM evaluator (OpenAI guided-diffusion ``evaluator.py``) reads one ``.npz`` whose single key ``arr_0`` is a
uint8 ``(N, H, W, 3)`` NHWC array. VAR/VIAR's ``sampling.py`` orders it **class-major**: sample ``i`` has class
``i // per_class`` (50 per class for ImageNet's 50000).

Writing a 50k-sample file takes hours on many GPUs, so :class:`ShardedSampleWriter` cuts the global index range
``[0, total)`` into fixed chunks, gives rank ``r`` the chunks ``r, r + world_size, ...``, and writes each chunk as its
own shard file, atomically (:func:`deqgen.files.atomic_open`: temp file beside it, then a rename). A rank
restarted after a kill skips the chunks whose shards are complete and redoes a truncated or corrupt one.
:func:`merge_shards` then streams the shards, in index order, into the final file without holding all samples in memory.

Layout of ``out_dir``::

    manifest.json                        {"format": ..., "total": N, "num_classes": K, "chunk_size": C}
    shard_00000000_00000025.npz          arr_0 uint8 (25, H, W, 3), labels int64 (25,), index_range [0, 25]
    shard_00000025_00000050.npz          ...

Shard names carry the global index range, not the rank, so a resume with a different ``world_size`` reuses them.
"""

from __future__ import annotations

import json
import logging
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Literal

import numpy as np
import torch
from numpy.lib import format as npy_format
from torch import Tensor

from deqgen.files import atomic_open, atomic_write_bytes

__all__ = [
    "SampleChunk",
    "ShardedSampleWriter",
    "merge_shards",
    "read_reference_statistics",
    "read_samples_npz",
    "to_uint8_nhwc",
    "write_samples_npz",
]

logger = logging.getLogger(__name__)

Rounding = Literal["truncate", "round"]

MANIFEST_NAME = "manifest.json"
_MANIFEST_FORMAT = "deqgen-sample-shards-v1"
# What a damaged npz can raise on open/read: truncated zip, bad CRC, short read, bad npy header, missing key,
# or a bare .npy where a zip was expected (no context manager: TypeError).
_CORRUPT_ERRORS = (OSError, EOFError, ValueError, KeyError, TypeError, zipfile.BadZipFile)


def to_uint8_nhwc(
    images: Tensor, *, value_range: tuple[float, float], rounding: Rounding = "truncate"
) -> np.ndarray:
    """Convert float images to the uint8 NHWC layout of ADM sample files.

    The official VAR/VIAR sampler writes ``(x * 255).astype(uint8)`` for ``x`` in ``[0, 1]``, which **truncates**
    (floors): 254.9 becomes 254, and only exactly 1.0 reaches 255. That is the default here, so numbers stay
    comparable with the paper; ``rounding="round"`` rounds to nearest instead (unbiased, but not the protocol).

    Args:
        images: ``(N, C, H, W)`` float, ``C`` in {1, 3}; 1-channel images are repeated to 3 channels.
        value_range: ``(low, high)`` the images live in, e.g. ``(0.0, 1.0)`` for VAR's sampler output or
            ``(-1.0, 1.0)`` for :mod:`deqgen.data.digits`. Values outside it are clamped.
        rounding: ``"truncate"`` (official) or ``"round"``.

    Returns:
        ``(N, H, W, 3)`` uint8 numpy array.
    """
    if images.dim() != 4 or images.shape[1] not in (1, 3):
        raise ValueError(
            f"to_uint8_nhwc expects (N, C, H, W) images with C in (1, 3), got {tuple(images.shape)}"
        )
    if not images.is_floating_point():
        raise TypeError(f"to_uint8_nhwc expects float images, got {images.dtype}")
    low, high = value_range
    if not high > low:
        raise ValueError(f"to_uint8_nhwc got value_range={value_range}; use (low, high) with high > low")
    if rounding not in ("truncate", "round"):
        raise ValueError(f"to_uint8_nhwc got rounding={rounding!r}; use 'truncate' or 'round'")
    unit = ((images.detach().float() - low) / (high - low)).clamp_(0.0, 1.0)
    scaled = unit * 255.0
    if rounding == "round":
        scaled = scaled.round()
    pixels = scaled.to(torch.uint8)  # float -> uint8 casts truncate toward zero (values are >= 0 here)
    if pixels.shape[1] == 1:
        pixels = pixels.expand(-1, 3, -1, -1)
    return pixels.permute(0, 2, 3, 1).contiguous().cpu().numpy()


def _check_samples(images: np.ndarray, what: str) -> None:
    if (
        not isinstance(images, np.ndarray)
        or images.dtype != np.uint8
        or images.ndim != 4
        or images.shape[3] != 3
    ):
        shape = getattr(images, "shape", None)
        raise ValueError(
            f"{what} must be a uint8 numpy array (N, H, W, 3), got {getattr(images, 'dtype', type(images))} "
            f"{shape}; convert float images with to_uint8_nhwc()"
        )


def write_samples_npz(path: str | Path, images: np.ndarray) -> Path:
    """Write an ADM-format sample file atomically.

    Args:
        path: destination (``.npz``; written exactly there, no suffix is added).
        images: ``(N, H, W, 3)`` uint8.

    Returns:
        The path written.
    """
    _check_samples(images, "write_samples_npz images")
    path = Path(path)
    with atomic_open(path) as f:
        np.savez(f, arr_0=images)
    return path


def read_samples_npz(path: str | Path) -> np.ndarray:
    """Read ``arr_0`` from an ADM-format sample file: ``(N, H, W, 3)`` uint8."""
    with open(path, "rb") as f, np.load(f) as data:
        images = data["arr_0"]
    _check_samples(images, f"{path} arr_0")
    return images


def read_reference_statistics(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """Read the precomputed Inception statistics of an ADM reference batch (e.g. ``VIRTUAL_imagenet256_labeled.npz``).

    Returns:
        ``(mu, sigma)``: ``(2048,)`` and ``(2048, 2048)`` float64, ready for
        :func:`deqgen.evaluation.frechet.frechet_distance`.
    """
    with open(path, "rb") as f, np.load(f) as data:
        if "mu" not in data or "sigma" not in data:
            raise KeyError(
                f"{path} has keys {sorted(data.keys())}; an ADM reference batch carries 'mu' and 'sigma'"
            )
        return data["mu"].astype(np.float64), data["sigma"].astype(np.float64)


@dataclass(frozen=True)
class SampleChunk:
    """One shard's worth of global sample indices ``[start, stop)``.

    Attributes:
        index: chunk number (``start // chunk_size``).
        start: first global sample index.
        stop: one past the last global sample index.
        per_class: samples per class; sample ``i`` has class ``i // per_class``.
    """

    index: int
    start: int
    stop: int
    per_class: int

    def __len__(self) -> int:
        return self.stop - self.start

    @property
    def labels(self) -> Tensor:
        """``(stop - start,)`` int64 class of each sample in the chunk (class-major order)."""
        return torch.arange(self.start, self.stop, dtype=torch.int64) // self.per_class

    @property
    def filename(self) -> str:
        """The shard's file name, ``shard_{start:08d}_{stop:08d}.npz``."""
        return f"shard_{self.start:08d}_{self.stop:08d}.npz"


def _read_shard(path: Path, chunk: SampleChunk) -> np.ndarray:
    """Load and fully validate one shard; raises one of ``_CORRUPT_ERRORS`` if it is damaged or inconsistent."""
    # Open the file ourselves: np.load leaks its handle when the zip directory is unreadable.
    with open(path, "rb") as f, np.load(f) as data:
        images, labels, index_range = data["arr_0"], data["labels"], data["index_range"]
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[0] != len(chunk) or images.shape[3] != 3:
        raise ValueError(
            f"{path.name}: arr_0 is {images.dtype} {images.shape}, expected uint8 ({len(chunk)}, H, W, 3)"
        )
    if index_range.tolist() != [chunk.start, chunk.stop] or not np.array_equal(labels, chunk.labels.numpy()):
        raise ValueError(
            f"{path.name}: index range or labels do not match chunk [{chunk.start}, {chunk.stop})"
        )
    return images


def _write_manifest(out_dir: Path, manifest: dict[str, object]) -> None:
    path = out_dir / MANIFEST_NAME
    if path.exists():
        existing = json.loads(path.read_text())
        if existing != manifest:
            raise ValueError(
                f"{path} describes a different run ({existing}) than this writer ({manifest}); "
                "use a fresh out_dir or the same total / num_classes / chunk_size"
            )
        return
    text = json.dumps(manifest, indent=2, sort_keys=True).encode()
    atomic_write_bytes(path, text)


def _read_manifest(out_dir: Path) -> dict[str, int]:
    path = out_dir / MANIFEST_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found; {out_dir} was not written by ShardedSampleWriter")
    manifest = json.loads(path.read_text())
    if manifest.get("format") != _MANIFEST_FORMAT:
        raise ValueError(f"{path}: unknown format {manifest.get('format')!r}, expected {_MANIFEST_FORMAT!r}")
    return manifest


def _chunks(total: int, per_class: int, chunk_size: int) -> list[SampleChunk]:
    return [
        SampleChunk(i, start, min(start + chunk_size, total), per_class)
        for i, start in enumerate(range(0, total, chunk_size))
    ]


class ShardedSampleWriter:
    """Write one rank's share of a class-major sample set as atomic, resumable shard files.

    Global sample ``i`` (``0 <= i < total``) has class ``i // (total // num_classes)``. The range is cut into
    chunks of ``chunk_size`` indices; rank ``r`` owns chunks ``r, r + world_size, r + 2 world_size, ...`` (strided,
    so every rank gets a similar mix). A chunk is done when its shard exists and loads and validates fully; a
    truncated or corrupt shard is logged, deleted and reported as pending again.

    For results that do not depend on ``world_size`` or on restarts, seed each chunk's sampling from
    ``chunk.start`` (e.g. ``torch.Generator().manual_seed(seed * 1_000_003 + chunk.start)``).

    Args:
        out_dir: directory for the shards and ``manifest.json`` (created).
        total: number of samples in the full set (e.g. 50000).
        num_classes: classes; ``total`` must be a multiple of it.
        rank: this process's rank, ``0 <= rank < world_size``.
        world_size: number of writing processes.
        chunk_size: samples per shard (a sampling batch, e.g. 25 or 50). Must match earlier runs in ``out_dir``.

    Example:
        >>> import tempfile, torch
        >>> with tempfile.TemporaryDirectory() as out:
        ...     writer = ShardedSampleWriter(out, total=20, num_classes=2, rank=0, world_size=1, chunk_size=5)
        ...     for chunk in writer.pending():  # skips chunks already written by an earlier, killed run
        ...         images = torch.zeros(len(chunk), 3, 4, 4)  # your sampler: sample(model, chunk.labels, ...)
        ...         _ = writer.write(chunk, to_uint8_nhwc(images, value_range=(0.0, 1.0)))
        ...     read_samples_npz(merge_shards(out, out + "/samples.npz")).shape
        (20, 4, 4, 3)
    """

    def __init__(
        self,
        out_dir: str | Path,
        total: int,
        num_classes: int,
        rank: int,
        world_size: int,
        *,
        chunk_size: int = 50,
    ) -> None:
        if total < 1 or num_classes < 1 or total % num_classes != 0:
            raise ValueError(
                f"ShardedSampleWriter needs total a positive multiple of num_classes, got "
                f"{total=} {num_classes=}"
            )
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"ShardedSampleWriter needs 0 <= rank < world_size, got {rank=} {world_size=}")
        if chunk_size < 1:
            raise ValueError(f"ShardedSampleWriter got chunk_size={chunk_size}; use >= 1")
        self.out_dir = Path(out_dir)
        self.total, self.num_classes, self.rank, self.world_size = total, num_classes, rank, world_size
        self.chunk_size = chunk_size
        self.per_class = total // num_classes
        self.out_dir.mkdir(parents=True, exist_ok=True)
        _write_manifest(
            self.out_dir,
            {
                "format": _MANIFEST_FORMAT,
                "total": total,
                "num_classes": num_classes,
                "chunk_size": chunk_size,
            },
        )

    def chunks(self) -> list[SampleChunk]:
        """All chunks this rank owns, in index order."""
        return _chunks(self.total, self.per_class, self.chunk_size)[self.rank :: self.world_size]

    def _chunk(self, index: int) -> SampleChunk | None:
        start = index * self.chunk_size
        if not 0 <= start < self.total:
            return None
        return SampleChunk(index, start, min(start + self.chunk_size, self.total), self.per_class)

    def path(self, chunk: SampleChunk) -> Path:
        """Where ``chunk``'s shard lives."""
        return self.out_dir / chunk.filename

    def is_done(self, chunk: SampleChunk) -> bool:
        """Whether ``chunk``'s shard exists and is complete. A damaged shard is deleted and counts as not done."""
        path = self.path(chunk)
        if not path.exists():
            return False
        try:
            _read_shard(path, chunk)
        except _CORRUPT_ERRORS as err:
            logger.warning("shard %s is damaged (%s: %s); it will be redone", path, type(err).__name__, err)
            path.unlink(missing_ok=True)
            return False
        return True

    def pending(self) -> Iterator[SampleChunk]:
        """This rank's chunks that still need sampling, in index order (checked lazily, one shard at a time)."""
        for chunk in self.chunks():
            if self.is_done(chunk):
                logger.debug("skipping done shard %s", chunk.filename)
            else:
                yield chunk

    def write(self, chunk: SampleChunk, images: np.ndarray) -> Path:
        """Write ``chunk``'s samples atomically.

        Args:
            chunk: one of :meth:`chunks`.
            images: ``(len(chunk), H, W, 3)`` uint8, in the chunk's index order (classes ``chunk.labels``).

        Returns:
            The shard's path.
        """
        if chunk.index % self.world_size != self.rank or chunk != self._chunk(chunk.index):
            raise ValueError(
                f"chunk [{chunk.start}, {chunk.stop}) is not owned by rank {self.rank} of {self.world_size}"
            )
        _check_samples(images, "ShardedSampleWriter.write images")
        if images.shape[0] != len(chunk):
            raise ValueError(
                f"chunk [{chunk.start}, {chunk.stop}) needs {len(chunk)} images, got {images.shape[0]}"
            )
        arrays = {
            "arr_0": images,
            "labels": chunk.labels.numpy(),
            "index_range": np.array([chunk.start, chunk.stop]),
        }
        path = self.path(chunk)
        with atomic_open(path) as f:
            np.savez(f, **arrays)
        return path


def _format_ranges(chunks: list[SampleChunk]) -> str:
    """Coalesce consecutive chunks into ``[a, b)`` ranges for an error message."""
    ranges: list[list[int]] = []
    for chunk in chunks:
        if ranges and ranges[-1][1] == chunk.start:
            ranges[-1][1] = chunk.stop
        else:
            ranges.append([chunk.start, chunk.stop])
    return ", ".join(f"[{a}, {b})" for a, b in ranges)


def merge_shards(out_dir: str | Path, out_path: str | Path) -> Path:
    """Assemble all shards of ``out_dir`` into one ADM-format ``.npz`` (``arr_0`` uint8 ``(N, H, W, 3)``, class-major).

    Shards are validated and streamed into the zip one at a time, so memory stays at one shard. The output is
    written atomically and loads with ``np.load(out_path)["arr_0"]``.

    Args:
        out_dir: the :class:`ShardedSampleWriter` directory.
        out_path: destination ``.npz``.

    Returns:
        ``out_path``.

    Raises:
        FileNotFoundError: no manifest in ``out_dir``.
        ValueError: shards missing (the message lists the missing index ranges), damaged, or of mixed image sizes.
    """
    out_dir, out_path = Path(out_dir), Path(out_path)
    manifest = _read_manifest(out_dir)
    total, chunk_size = manifest["total"], manifest["chunk_size"]
    chunks = _chunks(total, total // manifest["num_classes"], chunk_size)
    missing = [c for c in chunks if not (out_dir / c.filename).is_file()]
    if missing:
        raise ValueError(
            f"{out_dir}: {sum(len(c) for c in missing)} of {total} samples are missing, index ranges "
            f"{_format_ranges(missing)}; rerun sampling (done shards are skipped) and merge again"
        )
    first = _load_for_merge(out_dir, chunks[0])
    height, width = first.shape[1:3]

    def write(f: IO[bytes]) -> None:
        # The layout np.savez produces (a stored, zip64 "arr_0.npy" member), written one shard at a time.
        header = {
            "descr": npy_format.dtype_to_descr(np.dtype(np.uint8)),
            "fortran_order": False,
            "shape": (total, height, width, 3),
        }
        with (
            zipfile.ZipFile(f, mode="w", compression=zipfile.ZIP_STORED, allowZip64=True) as archive,
            archive.open("arr_0.npy", mode="w", force_zip64=True) as member,
        ):
            npy_format.write_array_header_1_0(member, header)
            for chunk in chunks:
                images = first if chunk.index == 0 else _load_for_merge(out_dir, chunk)
                if images.shape[1:3] != (height, width):
                    raise ValueError(
                        f"{chunk.filename}: images are {images.shape[1:3]}, the first shard's are "
                        f"{(height, width)}; all shards must have one image size"
                    )
                member.write(np.ascontiguousarray(images).tobytes())

    with atomic_open(out_path) as f:
        write(f)
    logger.info("merged %d shards (%d samples, %dx%d) into %s", len(chunks), total, height, width, out_path)
    return out_path


def _load_for_merge(out_dir: Path, chunk: SampleChunk) -> np.ndarray:
    try:
        return _read_shard(out_dir / chunk.filename, chunk)
    except _CORRUPT_ERRORS as err:
        raise ValueError(
            f"{out_dir / chunk.filename} is damaged ({type(err).__name__}: {err}); rerun sampling for its rank "
            "(the writer detects and redoes damaged shards) and merge again"
        ) from err
