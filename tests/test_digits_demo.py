"""The CPU recipe runs end to end at a tiny budget and leaves its picture, plot, weights and metrics."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

pytest.importorskip("matplotlib")

from recipes.digits_demo import PRESETS, main, run  # noqa: E402


def test_demo_writes_grid_plot_weights_and_metrics(tmp_path: Path) -> None:
    c = dataclasses.replace(PRESETS["quick"], tokenizer_steps=3, steps=4, warmup_steps=2, samples_per_class=2,
                            classifier_epochs=1, batch_size=16)
    m = run(c, tmp_path)
    for name in ("grid.png", "loss.png", "metrics.json", "run.json", "classifier.safetensors",
                 "tokenizer/model.safetensors", "viar/config.json", "var/model.safetensors", "viar_train_log.jsonl"):
        assert (tmp_path / name).stat().st_size > 0, name
    assert (tmp_path / "grid.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved["viar"]["parameters"] < saved["var"]["parameters"]
    assert 0.0 <= saved["viar"]["class_accuracy"] <= 1.0 and len(saved["viar"]["implicit_iterations_per_scale"]) == 4
    assert m["viar"]["kv_cache_bytes"] > 0
    assert not list(tmp_path.glob("*.tmp*"))
    # the saved directories load back without the demo's code and reproduce the demo's model
    from deqgen.evaluation.digits_classifier import DigitsClassifier
    from deqgen.models.viar.convert import load_converted

    viar, vae = load_converted(tmp_path / "viar"), load_converted(tmp_path / "tokenizer")
    assert viar.cfg.implicit is not None and sum(p.numel() for p in viar.parameters()) == saved["viar"]["parameters"]
    assert vae.config.patch_nums == c.patch_nums
    assert DigitsClassifier.load(tmp_path / "classifier.safetensors").config.side == c.side


def test_bad_argument_exits_2_and_writes_nothing(tmp_path: Path) -> None:
    assert main(["--out", str(tmp_path / "x"), "--steps", "0"]) == 2
    assert not (tmp_path / "x").exists()
