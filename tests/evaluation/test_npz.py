"""ADM-format sample files: uint8 conversion, atomic writes, resumable sharded writing and the class-major merge."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch

from deqgen.evaluation.npz import (
    SampleChunk,
    ShardedSampleWriter,
    merge_shards,
    read_reference_statistics,
    read_samples_npz,
    to_uint8_nhwc,
    write_samples_npz,
)

TOTAL, CLASSES, CHUNK, SIDE = 40, 4, 5, 3  # 10 samples per class, 8 chunks


def _fake_samples(chunk: SampleChunk) -> np.ndarray:
    """Images that encode their global index (channel 0) and class (channel 1)."""
    images = np.zeros((len(chunk), SIDE, SIDE, 3), dtype=np.uint8)
    images[..., 0] = np.arange(chunk.start, chunk.stop, dtype=np.uint8)[:, None, None]
    images[..., 1] = chunk.labels.numpy().astype(np.uint8)[:, None, None]
    return images


def _run_rank(out_dir: Path, rank: int, world_size: int, stop_after: int | None = None) -> list[int]:
    """Simulate one rank's sampling loop; returns the chunk starts it sampled."""
    writer = ShardedSampleWriter(out_dir, TOTAL, CLASSES, rank, world_size, chunk_size=CHUNK)
    sampled = []
    for chunk in writer.pending():
        if stop_after is not None and len(sampled) == stop_after:
            break  # "killed"
        sampled.append(chunk.start)
        writer.write(chunk, _fake_samples(chunk))
    return sampled


def test_to_uint8_truncates_like_the_official_sampler() -> None:
    x = torch.tensor([0.0, 0.5, 0.999, 1.0, 1.5, -0.2]).reshape(1, 1, 1, 6)
    out = to_uint8_nhwc(x, value_range=(0.0, 1.0))
    assert out.shape == (1, 1, 6, 3) and out.dtype == np.uint8
    assert out[0, 0, :, 0].tolist() == [0, 127, 254, 255, 255, 0]  # 127.5 -> 127, 254.7 -> 254
    assert (out[..., 0] == out[..., 2]).all()  # 1 channel repeated to 3
    rounded = to_uint8_nhwc(x, value_range=(0.0, 1.0), rounding="round")
    assert rounded[0, 0, :, 0].tolist() == [0, 128, 255, 255, 255, 0]
    symmetric = to_uint8_nhwc(x * 2 - 1, value_range=(-1.0, 1.0))
    assert np.array_equal(symmetric, out)


def test_to_uint8_keeps_rgb_channels_in_order() -> None:
    x = torch.zeros(2, 3, 4, 5)
    x[:, 1] = 1.0
    out = to_uint8_nhwc(x, value_range=(0.0, 1.0))
    assert out.shape == (2, 4, 5, 3) and (out[..., 1] == 255).all() and (out[..., [0, 2]] == 0).all()
    with pytest.raises(ValueError, match="C in"):
        to_uint8_nhwc(torch.zeros(2, 2, 4, 4), value_range=(0.0, 1.0))


def test_write_read_round_trip(tmp_path: Path) -> None:
    images = np.random.default_rng(0).integers(0, 256, size=(7, 8, 8, 3), dtype=np.uint8)
    path = write_samples_npz(tmp_path / "samples.npz", images)
    with np.load(path) as data:
        assert list(data.keys()) == ["arr_0"]
    assert np.array_equal(read_samples_npz(path), images)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["samples.npz"]  # no temp file left behind
    with pytest.raises(ValueError, match="to_uint8_nhwc"):
        write_samples_npz(tmp_path / "bad.npz", images.astype(np.float32))


def test_ranks_own_strided_chunks_with_class_major_labels(tmp_path: Path) -> None:
    rank1 = ShardedSampleWriter(tmp_path, TOTAL, CLASSES, rank=1, world_size=2, chunk_size=CHUNK)
    assert [c.start for c in rank1.chunks()] == [5, 15, 25, 35]
    chunk = rank1.chunks()[1]
    assert chunk.labels.tolist() == [1, 1, 1, 1, 1]
    assert rank1.chunks()[0].labels.tolist() == [0] * 5


def test_merge_of_two_ranks_is_class_major(tmp_path: Path) -> None:
    assert _run_rank(tmp_path, 1, 2) == [5, 15, 25, 35]
    assert _run_rank(tmp_path, 0, 2) == [0, 10, 20, 30]
    out = merge_shards(tmp_path, tmp_path / "all.npz")
    merged = read_samples_npz(out)
    assert merged.shape == (TOTAL, SIDE, SIDE, 3)
    assert merged[:, 0, 0, 0].tolist() == list(range(TOTAL))
    assert merged[:, 0, 0, 1].tolist() == [i // (TOTAL // CLASSES) for i in range(TOTAL)]
    with np.load(out) as data:
        assert list(data.keys()) == ["arr_0"]


def test_resume_skips_done_shards(tmp_path: Path) -> None:
    assert _run_rank(tmp_path, 0, 1, stop_after=3) == [0, 5, 10]
    assert _run_rank(tmp_path, 0, 1) == [15, 20, 25, 30, 35]  # only the rest is sampled
    assert _run_rank(tmp_path, 0, 1) == []
    # Shard names do not depend on the rank, so a resume with another world size reuses them too.
    assert _run_rank(tmp_path, 1, 3) == []


def test_corrupt_shard_is_detected_and_redone(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    _run_rank(tmp_path, 0, 1)
    shard = tmp_path / "shard_00000010_00000015.npz"
    shard.write_bytes(shard.read_bytes()[:-40])  # truncated, as by a kill during a non-atomic copy
    (tmp_path / "shard_00000020_00000025.npz").write_bytes(b"not a zip file")
    with open(tmp_path / "shard_00000030_00000035.npz", "wb") as f:
        np.save(f, np.zeros(3))  # a bare .npy, not a zip
    with caplog.at_level(logging.WARNING, logger="deqgen.evaluation.npz"):
        assert _run_rank(tmp_path, 0, 1) == [10, 20, 30]
    assert "damaged" in caplog.text
    assert read_samples_npz(merge_shards(tmp_path, tmp_path / "all.npz"))[:, 0, 0, 0].tolist() == list(
        range(TOTAL)
    )


def test_shard_with_wrong_contents_is_redone(tmp_path: Path) -> None:
    _run_rank(tmp_path, 0, 1)
    wrong = SampleChunk(0, 0, CHUNK, TOTAL // CLASSES)
    other = tmp_path / "shard_00000035_00000040.npz"
    (tmp_path / wrong.filename).write_bytes(other.read_bytes())  # valid npz, wrong index range
    assert _run_rank(tmp_path, 0, 1) == [0]


def test_merge_lists_missing_index_ranges(tmp_path: Path) -> None:
    _run_rank(tmp_path, 0, 2)  # rank 1 never ran: [5, 10), [15, 20), ...
    (tmp_path / "shard_00000020_00000025.npz").unlink()
    with pytest.raises(ValueError, match=r"25 of 40 samples are missing") as info:
        merge_shards(tmp_path, tmp_path / "all.npz")
    assert "[5, 10), [15, 30), [35, 40)" in str(info.value)
    assert not (tmp_path / "all.npz").exists()


def test_merge_reports_a_damaged_shard(tmp_path: Path) -> None:
    _run_rank(tmp_path, 0, 1)
    (tmp_path / "shard_00000030_00000035.npz").write_bytes(b"garbage")
    with pytest.raises(ValueError, match=r"shard_00000030_00000035\.npz is damaged"):
        merge_shards(tmp_path, tmp_path / "all.npz")
    assert not (tmp_path / "all.npz").exists()
    assert not list(tmp_path.glob(".*.tmp"))


def test_writer_rejects_mismatched_runs_and_foreign_chunks(tmp_path: Path) -> None:
    writer = ShardedSampleWriter(tmp_path, TOTAL, CLASSES, 0, 2, chunk_size=CHUNK)
    with pytest.raises(ValueError, match="different run"):
        ShardedSampleWriter(tmp_path, TOTAL, CLASSES, 0, 2, chunk_size=CHUNK + 1)
    foreign = ShardedSampleWriter(tmp_path, TOTAL, CLASSES, 1, 2, chunk_size=CHUNK).chunks()[0]
    with pytest.raises(ValueError, match="not owned by rank 0"):
        writer.write(foreign, _fake_samples(foreign))
    mine = writer.chunks()[0]
    with pytest.raises(ValueError, match="needs 5 images"):
        writer.write(mine, _fake_samples(mine)[:3])
    with pytest.raises(ValueError, match="multiple of num_classes"):
        ShardedSampleWriter(tmp_path / "x", 41, CLASSES, 0, 1)
    with pytest.raises(FileNotFoundError, match="manifest"):
        merge_shards(tmp_path / "empty", tmp_path / "all.npz")


def test_read_reference_statistics(tmp_path: Path) -> None:
    np.savez(tmp_path / "ref.npz", mu=np.zeros(3, np.float32), sigma=np.eye(3, dtype=np.float32))
    mu, sigma = read_reference_statistics(tmp_path / "ref.npz")
    assert mu.dtype == sigma.dtype == np.float64 and sigma.shape == (3, 3)
    np.savez(tmp_path / "samples.npz", arr_0=np.zeros((1, 2, 2, 3), np.uint8))
    with pytest.raises(KeyError, match="'mu' and 'sigma'"):
        read_reference_statistics(tmp_path / "samples.npz")
