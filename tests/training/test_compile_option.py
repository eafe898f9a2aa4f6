"""``training.compile: true`` in a recipe resolves the attention kernels for the autocast dtype, then compiles
the model in place (wiring only: compile speed is not measured here)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from deqgen.training.distributed import DistInfo
from deqgen.training.engine import compile_model
from deqgen.training.schema import TrainConfig


class _Spy(nn.Linear):
    def __init__(self) -> None:
        super().__init__(2, 2)
        self.prepared: list[tuple[torch.device, torch.dtype]] = []

    def prepare_attention(self, device: torch.device, dtype: torch.dtype) -> None:
        self.prepared.append((device, dtype))


def _cfg(compile: bool, dtype: str) -> TrainConfig:
    return TrainConfig.model_validate(
        {"training": {"compile": compile, "max_steps": 2}, "precision": {"dtype": dtype}}
    )


@pytest.mark.parametrize(("dtype", "expected"), [("bf16", torch.bfloat16), ("fp32", torch.float32)])
def test_compile_true_prepares_then_compiles(dtype: str, expected: torch.dtype) -> None:
    model = _Spy()
    compile_model(model, _cfg(True, dtype), DistInfo())
    assert model.prepared == [(torch.device("cpu"), expected)]
    assert model._compiled_call_impl is not None
    assert list(model.state_dict()) == ["weight", "bias"]  # checkpoints keep their keys


def test_compile_false_leaves_the_model_alone() -> None:
    model = _Spy()
    compile_model(model, _cfg(False, "bf16"), DistInfo())
    assert model.prepared == [] and model._compiled_call_impl is None


def test_compile_defaults_to_off() -> None:
    assert TrainConfig.model_validate({"training": {"max_steps": 2}}).training.compile is False
