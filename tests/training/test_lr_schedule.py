"""lr / wd schedules against the official VIAR-d30 figures (from the official VIAR training script,
mobiushy/VIAR), and AdamW groups."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
import torch
from torch import nn

from deqgen.training.config import load_config
from deqgen.training.lr_schedule import (
    LRSchedule,
    WDSchedule,
    apply_schedules,
    build_schedules,
    is_no_weight_decay,
    lr_at,
    param_groups,
    peak_lr,
    wd_at,
)

RECIPES = Path(__file__).resolve().parents[2] / "recipes"
IT_PER_EPOCH, EPOCHS, WARMUP_EPOCHS = 2503, 550, 11
TOTAL, WARMUP = IT_PER_EPOCH * EPOCHS, round(WARMUP_EPOCHS * IT_PER_EPOCH)
PEAK = peak_lr(8e-5, 512)


def official_lr(step: int) -> float:
    return lr_at(step, peak=PEAK, total_steps=TOTAL, warmup_steps=WARMUP, kind="lin0", end_ratio=0.01)


def test_peak_is_the_linear_scaling_rule() -> None:
    assert PEAK == pytest.approx(1.6e-4)
    assert (TOTAL, WARMUP) == (1_376_650, 27_533)


@pytest.mark.parametrize(("step", "expected"), [(1000, 6.58e-6), (700_000, 8.52e-5)])
def test_lr_matches_the_official_figures(step: int, expected: float) -> None:
    assert official_lr(step) == pytest.approx(expected, rel=0.01)


def test_wd_matches_the_official_figure() -> None:
    assert wd_at(700_000, start=0.05, end=0.08, total_steps=TOTAL) == pytest.approx(0.0654, rel=0.01)
    assert wd_at(0, start=0.05, end=0.08, total_steps=TOTAL) == pytest.approx(0.05)
    assert wd_at(TOTAL - 1, start=0.05, end=0.08, total_steps=TOTAL) == pytest.approx(0.08)


def test_lin0_shape() -> None:
    assert official_lr(0) == pytest.approx(8e-7)  # 0.005 * peak
    hold_end = WARMUP + 0.05 * (TOTAL - 1 - WARMUP)  # about it 94,990
    assert official_lr(WARMUP) == official_lr(int(hold_end) - 1) == pytest.approx(PEAK)
    assert official_lr(int(hold_end) + 10) < PEAK
    assert official_lr(TOTAL - 1) == pytest.approx(0.01 * PEAK)
    tail = [official_lr(s) for s in range(int(hold_end) + 1, TOTAL, 50_000)]
    assert all(a > b for a, b in itertools.pairwise(tail))


def test_cosine_and_constant() -> None:
    kw = {"peak": 1.0, "total_steps": 101, "warmup_steps": 10, "end_ratio": 0.1}
    assert lr_at(10, kind="cosine", **kw) == pytest.approx(1.0)  # type: ignore[arg-type]
    assert lr_at(100, kind="cosine", **kw) == pytest.approx(0.1)  # type: ignore[arg-type]
    assert lr_at(55, kind="cosine", **kw) == pytest.approx(0.55)  # type: ignore[arg-type]
    assert lr_at(100, kind="constant", **kw) == 1.0  # type: ignore[arg-type]
    assert lr_at(5, kind="constant", **kw) == pytest.approx(0.005 + 0.995 * 0.5)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="unknown lr schedule kind"):
        lr_at(50, kind="step", **kw)  # type: ignore[arg-type]


def test_schedule_objects_validate() -> None:
    with pytest.raises(ValueError, match="warmup_steps"):
        LRSchedule(peak=1e-3, total_steps=10, warmup_steps=10)
    with pytest.raises(ValueError, match="positive"):
        LRSchedule(peak=0.0, total_steps=10, warmup_steps=0)
    assert LRSchedule(peak=1e-3, total_steps=1, warmup_steps=0)(0) == 1e-3


def test_build_schedules_from_the_imagenet_recipe() -> None:
    cfg = load_config(RECIPES / "viar_imagenet.yaml", check_paths=False)
    lr, wd = build_schedules(
        cfg.optim,
        cfg.training.global_batch_size,
        cfg.total_steps(IT_PER_EPOCH),
        cfg.warmup_steps(IT_PER_EPOCH),
    )
    assert lr == LRSchedule(PEAK, TOTAL, WARMUP, "lin0", 0.005, 0.01, 0.05)
    assert wd == WDSchedule(0.05, 0.08, TOTAL)
    assert lr(1000) == pytest.approx(6.58e-6, rel=0.01) and wd(700_000) == pytest.approx(0.0654, rel=0.01)


class _Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.pos_start = nn.Parameter(torch.zeros(1, 1, 4))
        self.proj = nn.Linear(4, 4)
        self.scale_mul_1H11 = nn.Parameter(torch.zeros(1, 2, 1, 1))
        self.frozen = nn.Parameter(torch.zeros(4, 4), requires_grad=False)


def test_param_groups_follow_the_official_rule() -> None:
    groups = param_groups(_Tiny(), ("pos_start", "scale_mul"))
    decay, no_decay = groups
    assert decay["names"] == ["proj.weight"] and decay["wd_scale"] == 1.0
    assert sorted(no_decay["names"]) == ["pos_start", "proj.bias", "scale_mul_1H11"]
    opt = torch.optim.AdamW(groups, lr=1.0, weight_decay=0.5)
    apply_schedules(opt, 1e-3, 0.05)
    assert [g["lr"] for g in opt.param_groups] == [1e-3, 1e-3]
    assert [g["weight_decay"] for g in opt.param_groups] == [0.05, 0.0]
    assert is_no_weight_decay("blocks.0.ffn.fc1.weight", 2, ()) is False
    assert is_no_weight_decay("norm.weight", 1, ()) is True
    assert is_no_weight_decay("norm.weight", 1, (), exempt_1d=False) is False
