"""Checkpoints: round trip (tensors, optimizer, RNG streams), pruning, torn/corrupt saves, config checks, and a
2-process gloo run (per-rank RNG files, FSDP2 full-state gather/scatter)."""

from __future__ import annotations

import json
import logging
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from deqgen.training.checkpoint import (
    MANIFEST_FILE,
    MODEL_FILE,
    CheckpointConfigMismatch,
    CheckpointError,
    CheckpointManager,
    capture_rng_state,
    restore_rng_state,
)
from deqgen.training.config import check_config_compatible, load_config
from deqgen.training.distributed import DistInfo

MNIST = Path(__file__).resolve().parents[2] / "recipes" / "mnist_cpu.yaml"


class _Tied(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(5, 4)
        self.body = nn.Linear(4, 4)
        self.head = nn.Linear(4, 5, bias=False)
        self.head.weight = self.embed.weight  # tied: safetensors' save_file refuses shared storage


def _trained() -> tuple[_Tied, torch.optim.AdamW]:
    model = _Tied()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model.head(model.body(model.embed(torch.tensor([1, 2])))).sum().backward()
    opt.step()
    return model, opt


def _draws(gen: torch.Generator) -> tuple[list[float], list[float], float, float, list[int]]:
    return (
        torch.rand(3).tolist(),
        np.random.rand(2).tolist(),
        random.random(),
        float(np.random.randn()),
        torch.randint(0, 100, (3,), generator=gen).tolist(),
    )


def _save_steps(mgr: CheckpointManager, steps: list[int]) -> None:
    for s in steps:
        mgr.save(s, {"w": torch.full((4,), float(s))}, {"epoch": s})


def test_round_trip_restores_tensors_optimizer_and_rng(tmp_path: Path) -> None:
    cfg = load_config(MNIST)
    model, opt = _trained()
    gen = torch.Generator().manual_seed(7)
    mgr = CheckpointManager(tmp_path, keep_last=2, config=cfg, check=check_config_compatible)
    path = mgr.save(
        12,
        model.state_dict(),
        {"optimizer": opt.state_dict(), "epoch": 3, "position": 40},
        generators={"sjfb": gen},
    )
    expected = _draws(gen)

    torch.manual_seed(123)
    np.random.seed(5)
    random.seed(9)
    gen.manual_seed(999)
    ckpt = mgr.load("auto")
    assert ckpt is not None and ckpt.path == path and ckpt.step == 12
    restore_rng_state(ckpt.rng_state, {"sjfb": gen})  # type: ignore[arg-type]
    assert _draws(gen) == expected

    fresh = _Tied()
    fresh.load_state_dict(ckpt.model_state)
    fresh_opt = torch.optim.AdamW(fresh.parameters(), lr=1e-2)
    fresh_opt.load_state_dict(ckpt.train_state["optimizer"])
    for k, v in model.state_dict().items():
        assert torch.equal(fresh.state_dict()[k], v)
    assert fresh.head.weight is fresh.embed.weight
    state = fresh_opt.state_dict()["state"]
    for i, s in opt.state_dict()["state"].items():
        assert torch.equal(state[i]["exp_avg"], s["exp_avg"])
    assert (ckpt.train_state["epoch"], ckpt.train_state["position"]) == (3, 40)
    assert load_config(MNIST) == cfg and "model:" in (ckpt.config_yaml or "")
    assert (path / "config.yaml").read_text() == ckpt.config_yaml
    manifest = json.loads((path / MANIFEST_FILE).read_text())
    assert set(manifest["files"]) == {"model.safetensors", "state.pt", "config.yaml", "rng_rank0.pt"}
    torch.load(path / "state.pt", weights_only=True)  # weights_only loadable


def test_rng_capture_is_weights_only_friendly(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(3)
    torch.save(capture_rng_state({"g": g}), tmp_path / "rng.pt")
    state = torch.load(tmp_path / "rng.pt", weights_only=True)
    a = (torch.rand(2).tolist(), np.random.rand(), random.random(), torch.rand(1, generator=g).item())
    restore_rng_state(state, {"g": g})
    assert (torch.rand(2).tolist(), np.random.rand(), random.random(), torch.rand(1, generator=g).item()) == a


def test_keep_last_prunes_older_checkpoints(tmp_path: Path) -> None:
    mgr = CheckpointManager(tmp_path, keep_last=2)
    _save_steps(mgr, [1, 2, 3, 4])
    assert [p.name for p in mgr.complete_checkpoints()] == ["ckpt_00000003", "ckpt_00000004"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt_00000003", "ckpt_00000004"]
    mgr.save(4, {"w": torch.zeros(4)}, {})  # re-saving a step replaces it
    ckpt = mgr.load("auto")
    assert ckpt is not None and ckpt.step == 4 and torch.equal(ckpt.model_state["w"], torch.zeros(4))


def test_none_and_empty_directory(tmp_path: Path) -> None:
    mgr = CheckpointManager(tmp_path / "absent")
    assert mgr.load("none") is None and mgr.load("auto") is None and mgr.latest_complete() is None


def test_interrupted_save_is_ignored(tmp_path: Path) -> None:
    mgr = CheckpointManager(tmp_path, keep_last=3)
    _save_steps(mgr, [1, 2])
    torn = tmp_path / ".ckpt_00000003.tmp"  # a crash mid-write leaves only the temp directory
    torn.mkdir()
    (torn / MODEL_FILE).write_bytes(b"\x00" * 10)
    ckpt = mgr.load("auto")
    assert ckpt is not None and ckpt.step == 2
    _save_steps(mgr, [3])  # the next save of that step clears the leftovers
    assert not torn.exists() and mgr.load("auto").step == 3  # type: ignore[union-attr]


def test_truncated_newest_falls_back_and_explicit_path_raises(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    mgr = CheckpointManager(tmp_path, keep_last=3)
    _save_steps(mgr, [1, 2])
    newest = tmp_path / "ckpt_00000002" / MODEL_FILE
    newest.write_bytes(newest.read_bytes()[:-7])
    with caplog.at_level(logging.WARNING, logger="deqgen.training.checkpoint"):
        ckpt = mgr.load("auto")
    assert ckpt is not None and ckpt.step == 1
    assert "skipping damaged checkpoint" in caplog.text and str(newest) in caplog.text
    aside = tmp_path / "ckpt_00000002.corrupt"  # moved aside: never loaded by auto again, never deleted
    assert aside.is_dir() and not (tmp_path / "ckpt_00000002").exists()
    with pytest.raises(CheckpointError, match=str(aside / MODEL_FILE).replace(".", r"\.") + ".*truncated"):
        mgr.load(aside)


def test_corrupt_bytes_missing_manifest_and_bad_header(tmp_path: Path) -> None:
    mgr = CheckpointManager(tmp_path, keep_last=3)
    _save_steps(mgr, [1, 2, 3])
    f = tmp_path / "ckpt_00000003" / "state.pt"
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, different bytes
    f.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="sha256"):
        mgr.verify(tmp_path / "ckpt_00000003")
    (tmp_path / "ckpt_00000002" / MANIFEST_FILE).unlink()
    with pytest.raises(CheckpointError, match="incomplete"):
        mgr.load(tmp_path / "ckpt_00000002")
    assert mgr.load("auto").step == 1  # type: ignore[union-attr]
    header = tmp_path / "ckpt_00000001" / MODEL_FILE
    raw = bytearray(header.read_bytes())
    raw[8:16] = b"garbage!"
    header.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match="bad safetensors header"):
        CheckpointManager(tmp_path, verify_hash=False).verify(tmp_path / "ckpt_00000001")
    with pytest.raises(CheckpointError, match="does not exist"):
        mgr.load(tmp_path / "nope")


def test_config_mismatch_lists_the_fields(tmp_path: Path) -> None:
    cfg = load_config(MNIST)
    CheckpointManager(tmp_path, config=cfg, check=check_config_compatible).save(5, {"w": torch.zeros(1)}, {})
    changed = load_config(MNIST, ["model.embed_dim=64", "model.implicit.pre_depth=2", "tokenizer.ch=64"])
    with pytest.raises(CheckpointConfigMismatch) as e:
        CheckpointManager(tmp_path, config=changed, check=check_config_compatible).load("auto")
    msg = str(e.value)
    assert "model.embed_dim: checkpoint 128, run 64" in msg and "model.implicit.pre_depth" in msg
    assert "tokenizer.ch: checkpoint 32, run 64" in msg and "baseline" not in msg
    var = load_config(MNIST, ["model.implicit=null"])
    with pytest.raises(CheckpointConfigMismatch, match="model.implicit: checkpoint VIAR, run VAR"):
        CheckpointManager(tmp_path, config=var, check=check_config_compatible).load("auto")
    relaxed = load_config(
        MNIST,
        [
            "optim.lr_per_256=1e-3",
            "training.max_steps=10",
            "optim.warmup_steps=2",
            "model.cond_drop_prob=0.2",
        ],
    )
    assert CheckpointManager(tmp_path, config=relaxed, check=check_config_compatible).load("auto") is not None


# ---- two processes over gloo ---------------------------------------------------------------------------------------


def _worker(rank: int, store: str, directory: str) -> None:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from deqgen.training.checkpoint import gather_full_state, scatter_full_state

    # A FileStore, not tcp://: with a TCPStore the rank hosting it sometimes aborts at interpreter exit
    # ("terminate called without an active exception", about 1 run in 15 under pytest), after the test passed.
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    try:
        info = DistInfo(rank=rank, local_rank=rank, world_size=2)
        mesh = init_device_mesh("cpu", (2,))

        def build(seed: int) -> tuple[nn.Module, torch.optim.Optimizer]:
            torch.manual_seed(seed)
            model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
            for layer in (model[0], model[2]):
                fully_shard(layer, mesh=mesh)
            fully_shard(model, mesh=mesh)
            return model, torch.optim.AdamW(model.parameters(), lr=1e-2)

        model, opt = build(0)
        model(torch.randn(3, 8)).sum().backward()
        opt.step()
        full_model, full_optim = gather_full_state(model, opt)
        gen = torch.Generator().manual_seed(
            100 + rank
        )  # a per-rank stream, to check each rank gets its own back
        mgr = CheckpointManager(directory, keep_last=1, dist=info)
        mgr.save(1, full_model, {"optimizer": full_optim}, generators={"g": gen})
        expected = torch.rand(2, generator=gen)

        model2, opt2 = build(1)
        ckpt = mgr.load("auto", model_on_main_only=True)
        assert ckpt is not None and (len(ckpt.model_state) > 0) == (rank == 0)
        scatter_full_state(model2, ckpt.model_state, opt2, ckpt.train_state["optimizer"])
        restore_rng_state(ckpt.rng_state, {"g": gen})  # type: ignore[arg-type]
        assert torch.equal(torch.rand(2, generator=gen), expected)
        again, again_optim = gather_full_state(model2, opt2)
        if rank == 0:
            for k, v in full_model.items():
                assert torch.equal(again[k], v), k
            for k, s in full_optim["state"].items():
                assert torch.equal(again_optim["state"][k]["exp_avg"], s["exp_avg"]), k
        dist.barrier()
    finally:
        dist.destroy_process_group()


def test_two_ranks_fsdp2_save_and_load(tmp_path: Path) -> None:
    import torch.multiprocessing as mp

    mp.spawn(_worker, args=(str(tmp_path / "store"), str(tmp_path / "ckpts")), nprocs=2, join=True)
    names = sorted(p.name for p in (tmp_path / "ckpts" / "ckpt_00000001").iterdir())
    assert names == ["MANIFEST.json", "model.safetensors", "rng_rank0.pt", "rng_rank1.pt", "state.pt"]
