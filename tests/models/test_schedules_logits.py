"""Schedules against the official arithmetic; logits filtering against a plain per-row reference."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from deqgen import Anderson, Picard
from deqgen.models.viar.logits import (
    apply_cfg,
    cfg_ramp,
    per_sample_generators,
    sample_tokens,
    top_k_top_p_filter,
)
from deqgen.models.viar.schedules import Adaptive, Constant, Explicit, Linear, parse_schedule

# From running the official VIAR code (mobiushy/VIAR) (numpy linspace cast to int).
OFFICIAL = {
    (10, 10): [10] * 10,
    (10, 5): [10, 9, 8, 8, 7, 7, 6, 6, 5, 5],
    (6, 1): [6, 5, 4, 4, 3, 3, 2, 2, 1, 1],
    (10, 1): list(range(10, 0, -1)),
    (1, 10): list(range(1, 11)),
}


@pytest.mark.parametrize(("pair", "want"), list(OFFICIAL.items()))
def test_floor_rounding_matches_official(pair, want) -> None:
    assert list(Linear(*pair, rounding="floor").iterations(10)) == want


def test_round_rounding_and_other_pyramids() -> None:
    assert Linear(10, 5).iterations(10) == (10, 9, 9, 8, 8, 7, 7, 6, 6, 5)  # 10 - 5 s / 9, rounded half up
    assert len(Linear(10, 1).iterations(14)) == 14 and Linear(10, 1).iterations(14)[-1] == 1
    assert Linear(7, 3).iterations(1) == (7,)


def test_solver_for_scale_sets_the_budget() -> None:
    s = Linear(10, 5, "floor")
    assert s.solver_for_scale(2, 10) == Picard(tol=None, max_iter=8)
    assert s.solver_for_scale(9, 10, Anderson(m=3)) == Anderson(m=3, tol=None, max_iter=5)
    a = Adaptive(1e-3, 12).solver_for_scale(0, 10, Anderson())
    assert (a.tol, a.max_iter, a.stop_mode) == (1e-3, 12, "rel")


@pytest.mark.parametrize(
    "spec", ["constant:10", "linear:10:5", "linear:10:5:floor", "list:3,2,1", "adaptive:0.001:20"]
)
def test_spec_round_trip(spec: str) -> None:
    assert parse_schedule(spec).to_spec() == spec


def test_bad_schedules_say_what_is_accepted() -> None:
    with pytest.raises(ValueError, match="accepted forms"):
        parse_schedule("linear:10")
    with pytest.raises(ValueError, match="int >= 1"):
        Constant(0)
    with pytest.raises(ValueError, match="3 counts but the model has 4 scales"):
        Explicit((3, 2, 1)).iterations(4)
    assert parse_schedule({"kind": "linear", "first": 10, "last": 5}) == Linear(10, 5)


def test_cfg_ramp_official_formula() -> None:
    assert [cfg_ramp(s, 10, 1.5) for s in range(10)] == pytest.approx([1.5 * s / 9 for s in range(10)])
    assert cfg_ramp(3, 10, 1.5, "constant") == 1.5 and cfg_ramp(0, 1, 2.0) == 2.0
    c, u = torch.tensor([[[1.0, 2.0]]]), torch.tensor([[[0.5, 0.0]]])
    torch.testing.assert_close(apply_cfg(c, u, 2.0), torch.tensor([[[2.0, 6.0]]]))


def _reference_filter(row: np.ndarray, k: int, p: float) -> np.ndarray:
    keep = np.ones_like(row, dtype=bool)
    if 0 < k < row.size:
        keep &= row >= np.sort(row)[::-1][k - 1]
    out = np.where(keep, row, -np.inf)
    if p > 0:
        order = np.argsort(out, kind="stable")
        probs = np.exp(out[order] - out.max())
        probs /= probs.sum()
        cum = np.cumsum(probs)
        for j, idx in enumerate(order[:-1]):
            if cum[j] <= 1 - p:
                out[idx] = -np.inf
    return out


@pytest.mark.parametrize(("k", "p"), [(0, 0.0), (5, 0.0), (0, 0.9), (7, 0.5), (100, 0.96), (1, 0.0)])
def test_filter_matches_reference(k: int, p: float) -> None:
    g = torch.Generator().manual_seed(k)
    logits = torch.randn(3, 4, 20, generator=g, dtype=torch.float64)
    logits[0, 0, :4] = 1.0  # ties
    got = top_k_top_p_filter(logits, k, p).numpy()
    for b in range(3):
        for i in range(4):
            want = _reference_filter(logits[b, i].numpy(), k, p)
            np.testing.assert_array_equal(np.isinf(got[b, i]), np.isinf(want))


def test_sampling_frequencies_and_filtered_tokens_never_drawn() -> None:
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))[None, None].expand(1, 20000, 4).contiguous()
    gens = per_sample_generators(torch.Generator().manual_seed(0), 1)
    tok = sample_tokens(logits, generators=gens)
    freq = torch.bincount(tok.flatten(), minlength=4).double() / tok.numel()
    torch.testing.assert_close(
        freq, torch.tensor([0.5, 0.3, 0.15, 0.05], dtype=torch.float64), atol=0.015, rtol=0
    )
    tok_k = sample_tokens(
        logits, top_k=2, generators=per_sample_generators(torch.Generator().manual_seed(0), 1)
    )
    assert set(tok_k.unique().tolist()) == {0, 1}


def test_per_sample_generators_are_prefix_and_offset_stable() -> None:
    a = per_sample_generators(torch.Generator().manual_seed(3), 5)
    b = per_sample_generators(torch.Generator().manual_seed(3), 2, offset=3)
    assert [g.initial_seed() for g in a[3:]] == [g.initial_seed() for g in b]
    assert len({g.initial_seed() for g in a}) == 5 and not math.isnan(a[0].initial_seed())
