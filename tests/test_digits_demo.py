"""The CPU job (``deqgen demo recipes/mnist_cpu.yaml``: ``deqgen train`` then the held-out digits judge) runs
end to end at a tiny budget and leaves its picture, plot, weights and metrics."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

pytest.importorskip("matplotlib")
pytest.importorskip("mlxtend")

from safetensors.torch import load_file  # noqa: E402

from deqgen.cli import main  # noqa: E402
from deqgen.evaluation.digits_classifier import DigitsClassifier, class_accuracy  # noqa: E402
from deqgen.evaluation.frechet import fid_from_features  # noqa: E402
from deqgen.models.viar.convert import load_converted  # noqa: E402
from deqgen.training.config import load_config  # noqa: E402
from deqgen.training.tasks.generation.data import digit_splits  # noqa: E402

RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "mnist_cpu.yaml"
TINY = (
    "tokenizer.train.steps=3",
    "training.max_steps=4",
    "optim.warmup_steps=2",
    "sampling.samples_per_class=2",
    "training.global_batch_size=16",
    "training.micro_batch_size=8",
    "logging.progress_bar=false",
)


def demo_argv(out: Path, *extra: str) -> list[str]:
    """``deqgen demo`` on the CPU recipe at the tiny budget."""
    sets = [a for kv in TINY for a in ("--set", kv)]
    return ["demo", str(RECIPE), "--out", str(out), "--classifier-epochs", "1", *sets, *extra]


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("digits")
    assert main(demo_argv(out)) == 0
    return out


def test_demo_writes_grid_plot_weights_and_metrics(demo_run: Path) -> None:
    tmp_path = demo_run
    for name in (
        "grid.png",
        "loss.png",
        "metrics.json",
        "classifier.safetensors",
        "config.yaml",
        "tokenizer/model.safetensors",
        "viar/config.json",
        "var/model.safetensors",
        "model_metrics.jsonl",
        "baseline_metrics.jsonl",
        "samples/viar.safetensors",
        "samples/var.safetensors",
    ):
        assert (tmp_path / name).stat().st_size > 0, name
    assert (tmp_path / "grid.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved["viar"]["parameters"] < saved["var"]["parameters"]
    # the recipe's schedule linear:4:2 over 4 scales, exactly
    assert saved["viar"]["implicit_iterations_per_scale"] == [4.0, 3.0, 3.0, 2.0]
    assert saved["viar"]["kv_cache_bytes"] > 0
    assert not list(tmp_path.glob("*.tmp*"))
    # the saved directories load back without the demo's code and reproduce the demo's model
    viar, vae = load_converted(tmp_path / "viar"), load_converted(tmp_path / "tokenizer")
    assert (
        viar.cfg.implicit is not None
        and sum(p.numel() for p in viar.parameters()) == saved["viar"]["parameters"]
    )
    assert vae.config.patch_nums == (1, 2, 3, 4)


def test_judge_scores_are_recomputed_from_the_saved_files(demo_run: Path) -> None:
    """The judge's numbers in metrics.json equal a recomputation from the run's own files: the held-out split
    rebuilt from config.yaml, the saved classifier, and the saved sample grids."""
    tmp_path = demo_run
    saved = json.loads((tmp_path / "metrics.json").read_text())
    cfg = load_config(tmp_path / "config.yaml", check_paths=False, world_size=1)
    train, held = digit_splits(cfg)
    assert len(held) == pytest.approx(cfg.data.val_fraction * (len(train) + len(held)), abs=10)
    clf = DigitsClassifier.load(tmp_path / "classifier.safetensors")
    assert clf.config.side == cfg.data.image_size == 16
    for name in ("viar", "var"):
        grid = load_file(str(tmp_path / "samples" / f"{name}.safetensors"))
        assert saved[name]["class_accuracy"] == class_accuracy(clf, grid["images"] * 2 - 1, grid["labels"])
    assert saved["classifier_accuracy_on_real_train"] == class_accuracy(clf, train.images, train.labels)
    assert saved["data"] == held.source
    with torch.no_grad():
        floor = fid_from_features(clf.features(train.images), clf.features(held.images))
    assert saved["real_train_feature_fid_vs_heldout"] == pytest.approx(floor, rel=1e-9)


def test_bad_override_exits_2_and_writes_nothing(tmp_path: Path) -> None:
    assert main(["demo", str(RECIPE), "--out", str(tmp_path / "x"), "--set", "training.max_steps=0"]) == 2
    assert not (tmp_path / "x").exists()


def test_a_recipe_without_held_out_digits_exits_2_before_training(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["demo", str(RECIPE), "--out", str(tmp_path / "x"), "--set", "data.val_fraction=0"]) == 2
    assert "data.val_fraction=0" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
