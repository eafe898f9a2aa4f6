"""``logging.wandb``: an offline wandb run per model next to the JSONL log, with the logged metrics in it
(skipped when wandb is not installed)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest

from deqgen.training.distributed import DistInfo
from deqgen.training.metrics import WandbSink, make_metric_logger

wandb = pytest.importorskip("wandb")


def test_offline_run_records_the_metrics(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb_env"))
    cfg = SimpleNamespace(
        jsonl=True,
        tensorboard=False,
        out_dir=tmp_path / "run",
        wandb=SimpleNamespace(project="deqgen-test", mode="offline"),
    )
    with make_metric_logger(cfg, DistInfo(), prefix="model_", run_config={"seed": 7}) as log:
        assert any(isinstance(s, WandbSink) for s in log.sinks)
        log.log(1, {"loss": 2.5, "note": "skipped"})
        log.log(2, {"loss": 1.25, "val_loss_marker_xyz": 3.0})
    wandb.teardown()  # the wandb service writes the run file asynchronously; shutting it down flushes it
    (events,) = (tmp_path / "run" / "wandb").rglob("offline-run-*/run-*.wandb")
    data = events.read_bytes()
    assert b"val_loss_marker_xyz" in data and b"deqgen-test" in data and b"1.25" in data
    assert (tmp_path / "run" / "model_metrics.jsonl").read_text().count("\n") == 2


def test_other_ranks_start_no_run(tmp_path: Path) -> None:
    cfg = SimpleNamespace(
        jsonl=True,
        tensorboard=False,
        out_dir=tmp_path / "run",
        wandb=SimpleNamespace(project="p", mode="offline"),
    )
    assert make_metric_logger(cfg, DistInfo(rank=1, world_size=2)).sinks == ()
    assert not (tmp_path / "run").exists()
