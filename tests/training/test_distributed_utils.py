"""DistInfo, seeds and the resumable batch sampler (single process), plus the rank-0 metric sinks."""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from deqgen.training.distributed import (
    DistInfo,
    DistributedBatchSampler,
    all_reduce_mean,
    init_distributed,
    seed_for_rank,
    shared_seed,
)
from deqgen.training.metrics import (
    JsonlSink,
    MetricLogger,
    NullProgress,
    StdoutSink,
    TensorBoardSink,
    make_metric_logger,
    progress_bar,
)


def test_distinfo_single_process_defaults() -> None:
    info = DistInfo()
    assert (info.rank, info.local_rank, info.world_size, info.device) == (0, 0, 1, torch.device("cpu"))
    assert info.is_main and not info.is_distributed
    with pytest.raises(dataclasses.FrozenInstanceError):
        info.rank = 1  # type: ignore[misc]
    with pytest.raises(ValueError, match="rank"):
        DistInfo(rank=2, world_size=2)
    assert not DistInfo(rank=1, world_size=2).is_main


def test_init_distributed_without_torchrun(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    info = init_distributed()
    assert info.world_size == 1 and info.rank == 0
    assert not torch.distributed.is_initialized()
    with pytest.raises(ValueError, match="backend"):
        init_distributed("mpi")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="nccl"):
            init_distributed("nccl")


def test_seeds_are_deterministic_and_distinct() -> None:
    seeds = {seed_for_rank(s, r) for s in range(4) for r in range(8)}
    assert len(seeds) == 32 and all(0 <= s < 2**63 for s in seeds)
    assert seed_for_rank(3, 1) == seed_for_rank(3, 1)
    assert shared_seed(0) != shared_seed(1) and shared_seed(0) not in seeds


def test_sampler_ranks_partition_each_round() -> None:
    samplers = [DistributedBatchSampler(20, 3, rank=r, world_size=2, seed=1) for r in range(2)]
    batches = [list(s) for s in samplers]
    assert len(samplers[0]) == 3 and all(len(b) == 3 for b in batches)
    for step in range(3):
        both = batches[0][step] + batches[1][step]
        assert len(set(both)) == 6
    flat = [i for b in batches for batch in b for i in batch]
    assert len(set(flat)) == 18 and max(flat) < 20


def test_sampler_epochs_and_resume() -> None:
    s = DistributedBatchSampler(50, 4, seed=0)
    s.set_epoch(3)
    full = list(s)
    assert list(s) == full  # the order depends on (seed, epoch) only
    s.set_epoch(4)
    assert list(s) != full
    s.set_epoch(3)
    s.set_start_batch(5)
    assert list(s) == full[5:]
    assert list(s) == full  # the skip applies once
    with pytest.raises(ValueError, match="micro-batches"):
        s.set_start_batch(len(s) + 1)


def test_sampler_wraps_around_without_drop_last() -> None:
    s = DistributedBatchSampler(10, 4, shuffle=False, drop_last=False)
    assert list(s) == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 0, 1]]
    with pytest.raises(ValueError, match="drop_last"):
        DistributedBatchSampler(3, 4)


def test_all_reduce_mean_single_process() -> None:
    assert all_reduce_mean({"loss": torch.tensor(2.5).item(), "acc": 1}, DistInfo()) == {
        "loss": 2.5,
        "acc": 1.0,
    }


# ---- metric sinks -------------------------------------------------------------------------------------------------


def test_jsonl_and_stdout_sinks(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    cfg = SimpleNamespace(jsonl=True, tensorboard=False, out_dir=tmp_path / "run")
    with (
        caplog.at_level(logging.INFO, logger="deqgen.training.metrics"),
        make_metric_logger(cfg, DistInfo()) as log,
    ):
        log.log(10, {"loss": torch.tensor(1.5), "lr": 1e-4, "nan": float("nan")})
        lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()  # flushed before close
        log.log(20, {"loss": 1.25})
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(lines) == 1 and [r["step"] for r in records] == [10, 20]
    assert records[0]["loss"] == 1.5 and records[0]["nan"] is None
    assert "step 10 | loss 1.5 | lr 0.0001" in caplog.text


def test_other_ranks_get_no_sinks(tmp_path: Path) -> None:
    cfg = SimpleNamespace(jsonl=True, tensorboard=True, out_dir=tmp_path / "run")
    log = make_metric_logger(cfg, DistInfo(rank=1, world_size=2))
    assert isinstance(log, MetricLogger) and log.sinks == ()
    log.log(1, {"loss": 1.0})
    assert not (tmp_path / "run").exists()
    assert isinstance(progress_bar(10, DistInfo(rank=1, world_size=2)), NullProgress)
    assert isinstance(progress_bar(10, DistInfo(), enabled=False), NullProgress)


def test_progress_bar_is_quiet_without_a_tty(capsys: pytest.CaptureFixture[str]) -> None:
    bar = progress_bar(3, DistInfo(), desc="train")
    bar.update()
    bar.close()
    assert capsys.readouterr().err == ""


def test_tensorboard_missing_is_a_clear_error(tmp_path: Path) -> None:
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match="pip install tensorboard"):
            TensorBoardSink(tmp_path / "tb")
    else:
        sink = TensorBoardSink(tmp_path / "tb")
        sink.log(1, {"loss": 1.0})
        sink.close()
        assert any((tmp_path / "tb").iterdir())


def test_stdout_sink_formats_ints_and_strings(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="deqgen.training.metrics"):
        StdoutSink().log(3, {"steps": 7, "phase": "warmup"})
    assert "step 3 | steps 7 | phase warmup" in caplog.text


def test_jsonl_appends_across_resumes(tmp_path: Path) -> None:
    for step in (1, 2):
        sink = JsonlSink(tmp_path / "m.jsonl")
        sink.log(step, {"loss": float(step)})
        sink.close()
    assert [json.loads(x)["step"] for x in (tmp_path / "m.jsonl").read_text().splitlines()] == [1, 2]
