"""deqgen eval: ADM sample files, class-major, resumable shards, world-size invariant; bad arguments exit 2."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from deqgen.cli import main
from deqgen.evaluation import sample_files as sf
from deqgen.evaluation.digits_classifier import DigitsClassifier, DigitsClassifierConfig
from deqgen.evaluation.fidelity import INCEPTION_WEIGHTS_FILENAME
from deqgen.evaluation.npz import read_samples_npz, to_uint8_nhwc, write_samples_npz
from deqgen.models.viar.convert import load_converted
from deqgen.models.viar.sampling import generate

SPEC = sf.SampleSpec(
    classes=(3, 1), per_class=3, schedule="constant:2", cfg_scale=1.5, top_k=5, seed=7, batch_size=2
)


@pytest.fixture(scope="module")
def dirs(tiny_viar_dirs: tuple[Path, Path]) -> tuple[Path, Path]:
    return tiny_viar_dirs


@pytest.fixture(scope="module")
def models(dirs: tuple[Path, Path]) -> tuple[torch.nn.Module, torch.nn.Module]:
    return load_converted(dirs[0]).eval(), load_converted(dirs[1]).eval()


def _sample(
    models: tuple, shard_dir: Path, out: Path, world: int = 1, spec: sf.SampleSpec = SPEC
) -> list[int]:
    done = [sf.sample_shards(*models, spec, shard_dir, rank=r, world_size=world) for r in range(world)]
    sf.merge_samples(shard_dir, out, spec)
    return done


def test_npz_is_adm_format_class_major_with_labels(models: tuple, tmp_path: Path) -> None:
    out = tmp_path / "s.npz"
    assert _sample(models, tmp_path / "shards", out) == [3]  # 6 samples in shards of 2
    with np.load(out) as data:
        assert sorted(data.keys()) == ["arr_0", "labels"]
        arr, labels = data["arr_0"], data["labels"]
    assert arr.dtype == np.uint8 and arr.shape == (6, 64, 64, 3)
    assert labels.dtype == np.int64 and labels.tolist() == [3, 3, 3, 1, 1, 1]
    assert np.array_equal(read_samples_npz(out), arr)
    # shard [2, 4) is sample 2 (class 3) and sample 3 (class 1), drawn with the global indices 2 and 3
    res = generate(
        *models, torch.tensor([3, 1]), schedule="constant:2", cfg_scale=1.5, top_k=5, seed=7, sample_offset=2
    )
    assert np.array_equal(arr[2:4], to_uint8_nhwc(res.images, value_range=(0.0, 1.0)))
    # other global indices draw other tokens: the offset matters
    other = generate(
        *models, torch.tensor([3, 1]), schedule="constant:2", cfg_scale=1.5, top_k=5, seed=7, sample_offset=0
    )
    assert not np.array_equal(arr[2:4], to_uint8_nhwc(other.images, value_range=(0.0, 1.0)))


def test_two_ranks_give_the_bytes_of_one_rank(models: tuple, tmp_path: Path) -> None:
    _sample(models, tmp_path / "one", tmp_path / "one.npz", world=1)
    done = _sample(models, tmp_path / "two", tmp_path / "two.npz", world=2)
    assert done == [2, 1]  # rank 0 owns chunks 0 and 2, rank 1 chunk 1
    with np.load(tmp_path / "one.npz") as a, np.load(tmp_path / "two.npz") as b:
        assert np.array_equal(a["arr_0"], b["arr_0"]) and np.array_equal(a["labels"], b["labels"])


def test_rerun_skips_finished_shards_and_redoes_missing_ones(models: tuple, tmp_path: Path) -> None:
    shards, out = tmp_path / "shards", tmp_path / "s.npz"
    _sample(models, shards, out)
    first = out.read_bytes()
    files = sorted(shards.glob("shard_*.npz"))
    assert len(files) == 3
    files[1].unlink()
    stamps = {p: p.stat().st_mtime_ns for p in (files[0], files[2])}
    assert sf.sample_shards(*models, SPEC, shards) == 1  # only the missing shard
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps
    assert sf.sample_shards(*models, SPEC, shards) == 0
    sf.merge_samples(shards, out, SPEC)
    assert out.read_bytes() == first


def test_resume_with_other_options_is_refused_before_writing(models: tuple, tmp_path: Path) -> None:
    shards = tmp_path / "shards"
    sf.sample_shards(*models, SPEC, shards)
    before = {p: p.stat().st_mtime_ns for p in shards.iterdir()}
    other = sf.SampleSpec(**{**SPEC.to_json(), "classes": SPEC.classes, "seed": 8})
    with pytest.raises(ValueError, match=r"another run \(different options \['seed'\]\)"):
        sf.sample_shards(*models, other, shards)
    assert {p: p.stat().st_mtime_ns for p in shards.iterdir()} == before


def test_missing_shards_are_named_at_merge(models: tuple, tmp_path: Path) -> None:
    shards = tmp_path / "shards"
    sf.sample_shards(*models, SPEC, shards, rank=0, world_size=2)  # rank 1 never ran
    with pytest.raises(ValueError, match=r"\[2, 4\)"):
        sf.merge_samples(shards, tmp_path / "s.npz", SPEC)
    assert not (tmp_path / "s.npz").exists() and not list(tmp_path.glob(".*tmp"))


def test_cli_eval_writes_npz_and_classifier_metrics(dirs: tuple[Path, Path], tmp_path: Path) -> None:
    clf = DigitsClassifier(DigitsClassifierConfig(side=64), generator=torch.Generator().manual_seed(0))
    clf.save(tmp_path / "clf.safetensors")
    ref = write_samples_npz(
        tmp_path / "ref.npz", np.random.default_rng(0).integers(0, 256, (8, 64, 64, 3), dtype=np.uint8)
    )
    out = tmp_path / "run" / "samples.npz"
    rc = main(
        [
            "eval",
            str(dirs[0]),
            "--vqvae",
            str(dirs[1]),
            "--per-class",
            "2",
            "--classes",
            "0",
            "4",
            "--out",
            str(out),
            "--batch-size",
            "2",
            "--schedule",
            "constant:2",
            "--top-k",
            "5",
            "--classifier",
            str(tmp_path / "clf.safetensors"),
            "--reference",
            str(ref),
        ]
    )
    assert rc == 0
    with np.load(out) as data:
        assert data["arr_0"].shape == (4, 64, 64, 3) and data["labels"].tolist() == [0, 0, 4, 4]
    record = json.loads((tmp_path / "run" / "samples.metrics.json").read_text())
    assert set(record["metrics"]) == {"class_accuracy", "feature_fid"}
    assert 0.0 <= record["metrics"]["class_accuracy"] <= 1.0 and record["metrics"]["feature_fid"] > 0
    assert record["spec"]["classes"] == [0, 4] and record["num_samples"] == 4
    # a rerun finds every shard done and writes the same file
    first = out.read_bytes()
    assert (
        main(
            [
                "eval",
                str(dirs[0]),
                "--vqvae",
                str(dirs[1]),
                "--per-class",
                "2",
                "--classes",
                "0",
                "4",
                "--out",
                str(out),
                "--batch-size",
                "2",
                "--schedule",
                "constant:2",
                "--top-k",
                "5",
            ]
        )
        == 0
    )
    assert out.read_bytes() == first


def _snapshot(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): p.stat().st_mtime_ns for p in root.rglob("*")}


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--per-class", "0"], "argument --per-class: must be >= 1, got 0"),
        (["--per-class", "2", "--classes", "10"], "the model has classes 0..9"),
        (["--per-class", "2", "--classes", "1", "1"], "repeat a class"),
        (["--per-class", "2", "--schedule", "linear:4"], "accepted forms"),
        (["--per-class", "2", "--batch-size", "0"], "argument --batch-size: must be >= 1, got 0"),
        (["--per-class", "2", "--top-p", "1.5"], "argument --top-p: must lie in [0, 1], got 1.5"),
        (["--per-class", "2", "--inception-weights", "nowhere/w.pth"], INCEPTION_WEIGHTS_FILENAME),
        (["--per-class", "2", "--reference", "REF"], "--reference alone computes nothing"),
        (["--per-class", "2", "--classifier", "nowhere/clf.safetensors"], "needs the weights file"),
    ],
)
def test_bad_arguments_exit_2_and_write_nothing(
    dirs: tuple[Path, Path],
    tmp_path: Path,
    extra: list[str],
    message: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    ref = write_samples_npz(tmp_path / "ref.npz", np.zeros((2, 64, 64, 3), dtype=np.uint8))
    extra = [str(ref) if a == "REF" else a for a in extra]
    before = _snapshot(tmp_path)
    out = tmp_path / "out" / "s.npz"
    assert main(["eval", str(dirs[0]), "--vqvae", str(dirs[1]), "--out", str(out), *extra]) == 2
    err = capsys.readouterr().err
    # argparse's range checks print the usage first; the other checks print one line. Either way the last
    # line is the error, and it says what is wrong.
    last = err.splitlines()[-1]
    assert "error: " in last and message in last
    assert _snapshot(tmp_path) == before


def test_other_bad_inputs_exit_2(
    dirs: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    base = [
        "eval",
        str(dirs[0]),
        "--vqvae",
        str(dirs[1]),
        "--per-class",
        "1",
        "--classes",
        "0",
        "--batch-size",
        "1",
        "--schedule",
        "constant:1",
    ]
    assert main([*base, "--out", str(tmp_path / "s.png")]) == 2
    assert "must end in .npz" in capsys.readouterr().err
    assert (
        main(
            [
                "eval",
                str(dirs[1]),
                "--vqvae",
                str(dirs[0]),
                "--per-class",
                "1",
                "--out",
                str(tmp_path / "s.npz"),
            ]
        )
        == 2
    )
    err = capsys.readouterr().err
    assert "holds a tokenizer" in err and "swap them" in err
    # the weights file exists but torch-fidelity is missing: refused before sampling
    if importlib.util.find_spec("torch_fidelity") is None:
        weights = tmp_path / INCEPTION_WEIGHTS_FILENAME
        weights.write_bytes(b"x")
        assert main([*base, "--out", str(tmp_path / "s.npz"), "--inception-weights", str(weights)]) == 2
        assert "torch-fidelity" in capsys.readouterr().err
    # a finished run resumed with another seed is refused, and its files stay as they were
    out = tmp_path / "r" / "s.npz"
    assert main([*base, "--out", str(out)]) == 0
    before = _snapshot(tmp_path / "r")
    assert main([*base, "--out", str(out), "--seed", "3"]) == 2
    assert "different options ['seed']" in capsys.readouterr().err
    assert _snapshot(tmp_path / "r") == before
    assert not (tmp_path / "s.npz").exists() and not (tmp_path / "s_shards").exists()


def test_help_exits_0(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["eval", "--help"]) == 0
    assert "--per-class" in capsys.readouterr().out
    assert main(["report", "--help"]) == 0
    assert "--quick" in capsys.readouterr().out


def test_uint8_to_grey_inverts_to_uint8_nhwc() -> None:
    x = torch.rand(3, 1, 8, 8, dtype=torch.float64) * 2 - 1
    back = sf.uint8_to_grey(to_uint8_nhwc(x, value_range=(-1.0, 1.0)))
    assert back.shape == (3, 1, 8, 8) and float((back.double() - x).abs().max()) <= 2 / 255 + 1e-6
