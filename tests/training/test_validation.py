"""Held-out validation each epoch: the generation task's held-out digits give one ``val_*`` entry per epoch
in the metrics log, equal to the loss and accuracy recomputed from the epoch's checkpointed weights."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("mlxtend")

from deqgen.training.config import load_config
from deqgen.training.distributed import DistInfo
from deqgen.training.task import ModelRole
from deqgen.training.tasks.generation import GenerationTask
from deqgen.training.tasks.generation.data import digit_splits
from deqgen.training.tasks.generation.tokens import teacher_forcing, tokenize
from deqgen.training.train import run
from tests.training import test_train
from tests.training.test_train import MNIST, _tiny

tokenizer_dir = test_train.tokenizer_dir  # the module's fixture: a barely trained tokenizer


def _recompute(cfg: object, out: Path, step: int) -> tuple[float, float]:
    """Loss and token accuracy of the step's checkpointed weights on every held-out digit, in one batch."""
    from safetensors.torch import load_file

    task = GenerationTask.setup(cfg, DistInfo(), out)  # type: ignore[arg-type]
    model = task.build_model(ModelRole("model", "viar"), torch.Generator().manual_seed(0))
    ckpt = out / "checkpoints" / "model" / f"ckpt_{step:08d}"
    model.load_state_dict(load_file(str(ckpt / "model.safetensors")))
    held = digit_splits(cfg)[1]
    with torch.no_grad():
        idx = tokenize(task.vae, held.images)
        logits, _ = model.eval()(held.labels, teacher_forcing(task.vae, idx))
    loss = F.cross_entropy(logits.flatten(0, 1).float(), idx.flatten())
    return float(loss), float((logits.argmax(-1) == idx).float().mean())


def test_val_rows_once_per_epoch_equal_a_recomputation(tokenizer_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    # 898 training / 899 held-out sklearn digits, 7 steps of 128 per epoch, 2 epochs
    cfg = load_config(
        MNIST,
        _tiny(
            out,
            tokenizer_dir,
            "data.source=sklearn",
            "training.global_batch_size=128",
            "training.micro_batch_size=64",
            "training.max_steps=null",
            "training.epochs=2",
            "optim.warmup_steps=null",
            "optim.warmup_epochs=0.5",
            "checkpoint.every_n_epochs=1",
        ),
        device="cpu",
    )
    run(cfg)
    rows = [json.loads(line) for line in (out / "model_metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 15))  # each step once, val rows included
    val = [r for r in rows if "val_loss" in r]
    assert [(r["step"], r["epoch"]) for r in val] == [(7, 0), (14, 1)]
    for r in val:
        loss, acc = _recompute(cfg, out, r["step"])
        assert r["val_loss"] == pytest.approx(loss, rel=1e-5), r
        assert r["val_acc"] == pytest.approx(acc, abs=1e-6), r
    assert val[0]["val_loss"] != val[1]["val_loss"]


def test_batch_larger_than_the_data_is_refused_before_anything_is_written(tmp_path: Path) -> None:
    """The digits' training split has 898 items: refused before the tokenizer would be trained and saved."""
    out = tmp_path / "run"
    cfg = load_config(
        MNIST,
        [
            f"logging.out_dir={out}",
            "data.source=sklearn",
            "data.val_fraction=0.5",
            "training.global_batch_size=1024",
            "training.micro_batch_size=512",
        ],
        device="cpu",
    )
    assert cfg.tokenizer.checkpoint is None and cfg.tokenizer.train is not None
    with pytest.raises(ValueError, match=r"training\.global_batch_size=1024 .*898 training samples"):
        run(cfg)
    assert not out.exists()
