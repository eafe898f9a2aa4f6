"""``training.ema_decay``: the average follows its formula, is saved in checkpoints, resumes bitwise, and is
what the run exports; an EMA under FSDP2 is a config error."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from torch import nn

from deqgen.training.ema import EMA

pytest.importorskip("mlxtend")

from deqgen.training.config import load_config
from deqgen.training.schema import ConfigError
from deqgen.training.train import run
from tests.training import test_train
from tests.training.test_train import MNIST, _tiny, _weights

tokenizer_dir = test_train.tokenizer_dir  # the module's fixture: a barely trained tokenizer


def test_update_is_the_moving_average_and_state_round_trips() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    ema = EMA(net, decay=0.75)
    expected = {k: v.clone() for k, v in net.state_dict().items()}
    for _ in range(3):
        with torch.no_grad():
            for p in net.parameters():
                p.add_(torch.randn_like(p))
        net.train()(torch.randn(5, 3))  # moves the BatchNorm running statistics (buffers are copied)
        ema.update(net)
        for name, p in net.named_parameters():
            expected[name] = 0.75 * expected[name] + 0.25 * p.detach()
    state = ema.state_dict()
    for name, _ in net.named_parameters():
        torch.testing.assert_close(state[name], expected[name], rtol=1e-6, atol=1e-6)
    assert torch.equal(state["1.running_mean"], net[1].running_mean)
    assert not torch.equal(state["0.weight"], net[0].weight.detach())
    other = EMA(net, decay=0.75)
    other.load_state_dict(state)
    assert all(torch.equal(other.state_dict()[k], v) for k, v in state.items())
    with pytest.raises(ValueError, match="missing"):
        other.load_state_dict({"0.weight": state["0.weight"]})
    with pytest.raises(ValueError, match="training.ema_decay"):
        EMA(net, decay=1.0)


def test_ema_with_fsdp2_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"training\.ema_decay: got 0\.99; an EMA of FSDP2"):
        load_config(
            MNIST,
            [f"logging.out_dir={tmp_path}", "training.ema_decay=0.99", "distributed.strategy=fsdp2"],
            check_paths=False,
        )


def _ema_args(out: Path, tokenizer: Path, *extra: str) -> list[str]:
    return _tiny(
        out, tokenizer, "training.max_steps=8", "checkpoint.every_n_steps=4", "training.ema_decay=0.5", *extra
    )


def _saved_ema(ckpt: Path) -> dict[str, torch.Tensor]:
    return torch.load(ckpt / "state.pt", map_location="cpu", weights_only=True)["ema"]


def test_resume_from_a_mid_checkpoint_gives_the_same_ema_bitwise(tokenizer_dir: Path, tmp_path: Path) -> None:
    full = tmp_path / "full"
    run(load_config(MNIST, _ema_args(full, tokenizer_dir), device="cpu"))
    final = full / "checkpoints" / "model" / "ckpt_00000008"
    ema, trained = _saved_ema(final), _weights(full / "viar")
    assert ema.keys() == trained.keys()
    # the export is the average, not the last weights (decay 0.5 over 8 steps differs from them)
    assert all(torch.equal(ema[k], trained[k]) for k in ema)
    from safetensors.torch import load_file

    raw = load_file(str(final / "model.safetensors"))
    assert any(not torch.equal(raw[k], ema[k]) for k in ema)

    resumed = tmp_path / "resumed"
    shutil.copytree(full, resumed)
    shutil.rmtree(resumed / "checkpoints" / "model" / "ckpt_00000008")
    shutil.rmtree(resumed / "viar")
    run(load_config(MNIST, [*_ema_args(resumed, tokenizer_dir), "checkpoint.resume=auto"], device="cpu"))
    again = _saved_ema(resumed / "checkpoints" / "model" / "ckpt_00000008")
    assert all(torch.equal(again[k], ema[k]) for k in ema)
    exported = _weights(resumed / "viar")
    assert all(torch.equal(exported[k], ema[k]) for k in ema)
