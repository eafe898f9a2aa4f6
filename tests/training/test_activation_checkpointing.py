"""``training.activation_checkpointing``: the explicit blocks of VIAR and VAR recompute in backward with the
same gradients (drop-path on: the replayed generator draws the same masks) and leave the random stream where
an uncheckpointed step leaves it; tasks without it refuse the option before writing anything."""

from __future__ import annotations

from pathlib import Path
from typing import Any, cast

import pytest
import torch
import torch.nn.functional as F

from deqgen.training.config import load_config
from deqgen.training.distributed import DistInfo
from deqgen.training.task import ModelRole
from deqgen.training.tasks.generation import GenerationTask
from deqgen.training.tasks.generation.checkpointing import CheckpointedBlock, checkpoint_explicit_blocks

MNIST = Path(__file__).resolve().parents[2] / "recipes" / "mnist_cpu.yaml"


def _model(role: str, checkpointed: bool, tmp_path: Path) -> torch.nn.Module:
    overrides = [
        f"logging.out_dir={tmp_path}",
        "model.drop_path_rate=0.2",
        "baseline.drop_path_rate=0.2",
        "model.embed_dim=32",
        "model.num_heads=2",
        "baseline.embed_dim=32",
        "baseline.num_heads=2",
        f"training.activation_checkpointing={str(checkpointed).lower()}",
    ]
    cfg = load_config(MNIST, overrides, check_paths=False)
    task = GenerationTask(cfg, DistInfo(), tmp_path, cast(Any, None), cast(Any, None))
    name = "viar" if role == "model" else "var"
    return task.build_model(ModelRole(role, name), torch.Generator().manual_seed(0))


def _step(model: torch.nn.Module) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor]:
    """One training forward/backward on fixed random inputs: the gradients, the loss and the generator's
    state afterwards."""
    cfg = model.cfg  # type: ignore[attr-defined]
    g = torch.Generator().manual_seed(1)
    feats = torch.randn(4, cfg.seq_len - cfg.patch_nums[0] ** 2, cfg.z_channels, generator=g)
    labels = torch.randint(0, cfg.num_classes, (4,), generator=g)
    target = torch.randint(0, cfg.vocab_size, (4, cfg.seq_len), generator=g)
    rank, shared = torch.Generator().manual_seed(2), torch.Generator().manual_seed(3)
    logits, _ = model.train()(labels, feats, generator=rank, shared_generator=shared)
    loss = F.cross_entropy(logits.flatten(0, 1), target.flatten())
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return grads, loss.detach(), rank.get_state()


@pytest.mark.parametrize("role", ["model", "baseline"])  # VIAR (pre/post blocks), VAR (all blocks)
def test_gradients_equal_with_and_without_checkpointing(role: str, tmp_path: Path) -> None:
    plain, ckpt = _model(role, False, tmp_path), _model(role, True, tmp_path)
    assert not any(isinstance(m, CheckpointedBlock) for m in plain.modules())
    assert sum(isinstance(m, CheckpointedBlock) for m in ckpt.modules()) >= 2
    assert plain.state_dict().keys() == ckpt.state_dict().keys()
    g1, l1, s1 = _step(plain)
    g2, l2, s2 = _step(ckpt)
    assert torch.equal(l1, l2) and torch.equal(s1, s2)
    assert g1.keys() == g2.keys() and len(g1) > 10
    worst = max(float((g1[k] - g2[k]).abs().max()) for k in g1)
    assert worst <= 1e-7, worst


def test_without_the_replay_the_gradients_differ(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The check above can fail: recomputing with a generator that moved on draws other drop-path masks
    (and leaves the stream elsewhere)."""
    from deqgen.training.tasks.generation import checkpointing

    g1, _, s1 = _step(_model("model", False, tmp_path))
    monkeypatch.setattr(checkpointing._GeneratorReplay, "__call__", lambda self, *args: self.fn(*args))
    g2, _, s2 = _step(_model("model", True, tmp_path))
    assert not torch.equal(s1, s2)
    assert max(float((g1[k] - g2[k]).abs().max()) for k in g1) > 1e-6


def test_models_without_a_block_trunk_are_refused() -> None:
    with pytest.raises(TypeError, match="activation_checkpointing"):
        checkpoint_explicit_blocks(torch.nn.Linear(2, 2))


def test_tasks_without_it_refuse_before_writing(tmp_path: Path) -> None:
    from deqgen.training.train import run

    out = tmp_path / "run"
    cfg = load_config(
        Path(__file__).resolve().parents[2] / "recipes" / "mdeq_digits.yaml",
        [f"logging.out_dir={out}", "training.activation_checkpointing=true"],
        check_paths=False,
    )
    with pytest.raises(ValueError, match="training.activation_checkpointing=true: task 'classification'"):
        run(cfg)
    assert not out.exists()
