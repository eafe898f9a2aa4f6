"""Everything deqgen writes gets the permissions the user's umask gives ordinary files and directories.

Under umask 022 every file is ``0644`` and every directory ``0755`` (colleagues on a shared machine can read a
run, a converted model or a sample file); under umask 077 everything is private. The run directory's lock
file is no exception: it is created with ``0o644`` before the umask, so it is ``0644`` under 022 and ``0600``
under 077 (it never gets group write, which would let another user's run truncate the holder's name).
"""

from __future__ import annotations

import contextlib
import os
import stat
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from deqgen.cli import main

pytestmark = pytest.mark.skipif(os.name != "posix", reason="POSIX permission bits")

MNIST = Path(__file__).resolve().parent.parent / "recipes" / "mnist_cpu.yaml"
VQVAE_FIXTURE = Path(__file__).resolve().parent / "data" / "var_vqvae_tiny.pt"
MODES = {0o022: (0o644, 0o755), 0o077: (0o600, 0o700)}


@contextlib.contextmanager
def _umask(mask: int) -> Iterator[None]:
    previous = os.umask(mask)
    try:
        yield
    finally:
        os.umask(previous)


def _wrong_modes(root: Path, mask: int) -> dict[str, str]:
    """Paths under ``root`` (itself included) whose mode is not what ``mask`` gives: ``{path: mode}``."""
    file_mode, dir_mode = MODES[mask]
    wrong = {}
    for p in [root, *sorted(root.rglob("*"))]:
        mode = stat.S_IMODE(p.lstat().st_mode)
        if mode != (dir_mode if p.is_dir() else file_mode):
            wrong[str(p.relative_to(root.parent))] = oct(mode)
    return wrong


def _written(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


def _tiny_train_args(out: Path) -> list[str]:
    """``deqgen train`` of the CPU recipe shrunk to seconds: the tokenizer and VIAR trained 2 steps each."""
    overrides = [
        f"logging.out_dir={out}",
        "data.source=sklearn",
        "data.val_fraction=0.5",
        "baseline=null",
        "tokenizer.train.steps=2",
        "tokenizer.train.batch_size=16",
        "model.embed_dim=16",
        "model.num_heads=2",
        "training.global_batch_size=8",
        "training.micro_batch_size=8",
        "training.max_steps=2",
        "optim.warmup_steps=0",
        "logging.log_every_n_steps=1",
        "logging.progress_bar=false",
        "sampling.samples_per_class=1",
    ]
    return ["train", str(MNIST), *[a for o in overrides for a in ("--set", o)]]


def test_a_training_run_is_readable_by_others_under_umask_022(tmp_path: Path) -> None:
    out = tmp_path / "run"
    with _umask(0o022):
        assert main(_tiny_train_args(out)) == 0
    written = _written(out)
    # the run wrote what a user shares: its config, tokenizer, checkpoint, export, grids, plots and metrics
    for name in (
        "config.yaml",
        "tokenizer/model.safetensors",
        "viar/model.safetensors",
        "grid.png",
        "metrics.json",
        "model_metrics.jsonl",
        ".deqgen.lock",
    ):
        assert name in written, written
    assert any(n.startswith("checkpoints/") and n.endswith("MANIFEST.json") for n in written), written
    assert _wrong_modes(out, 0o022) == {}


@pytest.mark.parametrize("mask", [0o022, 0o077])
def test_a_converted_model_follows_the_umask(tmp_path: Path, mask: int) -> None:
    src = tmp_path / "vae.pth"
    torch.save(torch.load(VQVAE_FIXTURE, weights_only=True)["state_dict"], src)
    with _umask(mask):
        assert main(["convert", str(src), str(tmp_path / "vae"), "--patch-nums", "1", "2", "3", "4"]) == 0
    assert _written(tmp_path / "vae") == ["README.md", "config.json", "model.safetensors"]
    assert _wrong_modes(tmp_path / "vae", mask) == {}


@pytest.mark.parametrize("mask", [0o022, 0o077])
def test_sample_files_follow_the_umask(tmp_path: Path, mask: int) -> None:
    from deqgen.evaluation.npz import ShardedSampleWriter, merge_shards, write_samples_npz

    images = np.zeros((4, 8, 8, 3), dtype=np.uint8)
    out = tmp_path / "samples"
    with _umask(mask):
        write_samples_npz(out / "one.npz", images)
        writer = ShardedSampleWriter(
            out / "shards", total=4, num_classes=2, rank=0, world_size=1, chunk_size=2
        )
        for chunk in writer.chunks():
            writer.write(chunk, images[chunk.start : chunk.stop])
        merge_shards(out / "shards", out / "merged.npz")
    assert len(_written(out)) == 5  # one.npz, merged.npz, the manifest and two shards
    assert _wrong_modes(out, mask) == {}


@pytest.mark.parametrize("mask", [0o022, 0o077])
def test_the_digits_classifier_follows_the_umask(tmp_path: Path, mask: int) -> None:
    from deqgen.evaluation.digits_classifier import DigitsClassifier, DigitsClassifierConfig

    out = tmp_path / "judge"
    with _umask(mask):
        out.mkdir()
        DigitsClassifier(DigitsClassifierConfig(side=8, width=4)).save(out / "classifier.safetensors")
    assert _written(out) == ["classifier.json", "classifier.safetensors"]
    assert _wrong_modes(out, mask) == {}
