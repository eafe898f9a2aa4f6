"""Per-scale iteration schedules: official numbers, exact rounding, budgets, solver mapping, spec parsing."""

from __future__ import annotations

import dataclasses
import itertools
import math
from fractions import Fraction

import numpy as np
import pytest
import torch
import yaml

from deqgen import Anderson, Broyden, Picard, fixed_point
from deqgen.models.viar.schedules import (
    BUDGET_RULES,
    Adaptive,
    Budget,
    Constant,
    Explicit,
    Linear,
    Schedule,
    parse_schedule,
)

# From running the official VIAR code (mobiushy/VIAR) (numpy linspace over 10 scales, cast to int).
OFFICIAL = {
    (10, 10): [10] * 10,
    (10, 5): [10, 9, 8, 8, 7, 7, 6, 6, 5, 5],
    (6, 1): [6, 5, 4, 4, 3, 3, 2, 2, 1, 1],
    (10, 1): [10, 9, 8, 7, 6, 5, 4, 3, 2, 1],
    (1, 10): [1, 2, 3, 4, 5, 6, 7, 8, 9, 10],
}
PN_256 = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)


# ------------------------------------------------------------------------------------------------ Linear


@pytest.mark.parametrize(("pair", "want"), list(OFFICIAL.items()))
def test_floor_reproduces_the_official_schedules(pair: tuple[int, int], want: list[int]) -> None:
    assert Linear(*pair, rounding="floor").iterations(10) == tuple(want)


def test_floor_is_numpy_linspace_astype_int_bit_for_bit() -> None:
    # The implementation repeats numpy's float64 operations in Python; numpy here is the independent reference,
    # over a grid that includes many values landing within an ulp of an integer.
    for first in range(1, 25):
        for last in range(1, 25):
            for S in range(1, 21):
                want = tuple(int(v) for v in np.linspace(first, last, S).astype(int))
                assert Linear(first, last, "floor").iterations(S) == want, (first, last, S)


def _round_ref(first: int, last: int, S: int) -> tuple[int, ...]:
    if S == 1:
        return (first,)
    vals = [Fraction(first) + Fraction(last - first) * s / (S - 1) for s in range(S)]
    return tuple(math.floor(v + Fraction(1, 2)) for v in vals)  # half away from zero (values are > 0)


def test_round_is_exact_half_away_from_zero() -> None:
    assert Linear(10, 5).iterations(10) == (10, 9, 9, 8, 8, 7, 7, 6, 6, 5)
    assert Linear(6, 1).iterations(10) == (6, 5, 5, 4, 4, 3, 3, 2, 2, 1)
    # exact halves: 1.5 -> 2, 2.5 -> 3 (numpy's banker's rounding would give 2), 3.5 -> 4
    assert Linear(1, 2).iterations(3) == (1, 2, 2)
    assert Linear(2, 3).iterations(3) == (2, 3, 3)
    assert Linear(3, 2).iterations(3) == (3, 3, 2)
    assert Linear(1, 6).iterations(3) == (1, 4, 6)  # 3.5
    for first in range(1, 16):
        for last in range(1, 16):
            for S in range(1, 16):
                assert Linear(first, last).iterations(S) == _round_ref(first, last, S), (first, last, S)


@pytest.mark.parametrize("rounding", ["round", "floor"])
def test_linear_works_for_any_number_of_scales(rounding: str) -> None:
    # the official code hard-codes 10 scales and raises IndexError for the 14 of 1024 px
    for S in (1, 2, 7, 10, 14, 40):
        ks = Linear(10, 1, rounding).iterations(S)  # type: ignore[arg-type]
        assert len(ks) == S and ks[0] == 10 and min(ks) >= 1
        assert ks[-1] == (1 if S > 1 else 10)
        assert all(a >= b for a, b in itertools.pairwise(ks))


# ---------------------------------------------------------------------------------- Constant / Explicit


def test_constant_and_explicit() -> None:
    assert Constant(10).iterations(14) == (10,) * 14
    assert Explicit([3, 2, 1]).iterations(3) == (3, 2, 1)
    assert Explicit([3, 2, 1]) == Explicit((3, 2, 1))
    assert Explicit(np.array([3, 2])).per_scale == (3, 2)
    with pytest.raises(ValueError, match="3 counts but the model has 4 scales"):
        Explicit((3, 2, 1)).iterations(4)


@pytest.mark.parametrize("bad", [0, -1, True, 2.0, "3", None])
def test_counts_must_be_positive_ints(bad: object) -> None:
    with pytest.raises(ValueError, match="int >= 1"):
        Constant(bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"per_scale\[1\] must be an int >= 1"):
        Explicit((2, bad))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="Linear.last must be an int >= 1"):
        Linear(2, bad)  # type: ignore[arg-type]


def test_numpy_ints_are_accepted_and_normalised() -> None:
    c = Constant(np.int64(4))  # type: ignore[arg-type]
    assert c == Constant(4) and type(c.k) is int and c.to_spec() == "constant:4"
    with pytest.raises(ValueError, match="at least one"):
        Explicit(())
    with pytest.raises(ValueError, match="num_scales"):
        Constant(3).iterations(0)
    with pytest.raises(ValueError, match="rounding"):
        Linear(3, 2, "ceil")  # type: ignore[arg-type]


def test_schedules_are_frozen() -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        Constant(3).k = 4  # type: ignore[misc]


# ------------------------------------------------------------------------------------------------ Budget


@pytest.mark.parametrize("rule", BUDGET_RULES)
@pytest.mark.parametrize("total", [10, 11, 17, 60, 99, 1000])
def test_budget_sums_to_total_with_every_scale_at_least_one(rule: str, total: int) -> None:
    ks = Budget(total, rule, PN_256).iterations(10)  # type: ignore[arg-type]
    assert sum(ks) == total and min(ks) >= 1 and len(ks) == 10


def test_budget_rules_by_hand() -> None:
    assert Budget(60).iterations(10) == (6,) * 10
    assert Budget(13).iterations(10) == (2, 2, 2) + (1,) * 7  # largest remainder, ties to the coarser scale
    assert Budget(55, "coarse_heavy").iterations(10) == tuple(range(10, 0, -1))  # weights 10..1, sum 55
    assert Budget(110, "coarse_heavy").iterations(10) == tuple(range(20, 0, -2))
    assert Budget(55, "fine_heavy").iterations(10) == tuple(range(1, 11))
    assert Budget(12, "tokens", (1, 1, 2)).iterations(3) == (2, 2, 8)  # weights 1, 1, 4
    assert Budget(10, "inverse_tokens", (1, 2)).iterations(2) == (8, 2)  # weights 1, 1/4
    # quotas 4.57, 1.14, 0.29: the last is raised to 1, the other 5 split 1 : 1/4 -> 4, 1
    assert Budget(6, "inverse_tokens", (1, 2, 4)).iterations(3) == (4, 1, 1)
    # equal compute per scale where the floor of one iteration allows: K_s * p_s^2 about constant
    ks = Budget(1000, "inverse_tokens", PN_256).iterations(10)
    cost = [k * p * p for k, p in zip(ks, PN_256)]
    assert max(cost[:5]) / min(cost[:5]) < 1.1 and ks[0] > ks[1] > ks[2]


def test_budget_errors() -> None:
    with pytest.raises(ValueError, match="budget total 9 is less than the 10 scales"):
        Budget(9).iterations(10)
    with pytest.raises(ValueError, match="needs patch_nums"):
        Budget(60, "tokens")
    with pytest.raises(ValueError, match="10 scales but the model has 9 scales"):
        Budget(60, "tokens", PN_256).iterations(9)
    with pytest.raises(ValueError, match="rule must be one of"):
        Budget(60, "front_loaded")  # type: ignore[arg-type]


# -------------------------------------------------------------------------------------------- Adaptive


def test_adaptive_reports_its_budget_and_builds_tolerance_solvers() -> None:
    a = Adaptive(1e-3, 12)
    assert a.iterations(14) == (12,) * 14
    assert a.solver_for_scale(0, 10) == Picard(tol=1e-3, stop_mode="rel", max_iter=12)
    got = a.solver_for_scale(3, 10, Anderson(m=3, norm="inf", tol=None))
    assert got == Anderson(m=3, norm="inf", tol=1e-3, stop_mode="rel", max_iter=12)
    assert Adaptive(1e-4, 5, "abs", "broyden").solver_for_scale(0, 2) == Broyden(
        tol=1e-4, stop_mode="abs", max_iter=5
    )
    with pytest.raises(ValueError, match="names solver 'broyden' but the sampler was given Anderson"):
        Adaptive(1e-4, 5, solver="broyden").solver_for_scale(0, 2, Anderson())
    for bad in (0.0, -1.0, math.inf, math.nan, True):
        with pytest.raises(ValueError, match="positive finite"):
            Adaptive(bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="stop_mode"):
        Adaptive(1e-3, 5, "max")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="solver must be one of"):
        Adaptive(1e-3, 5, solver="newton")


# ------------------------------------------------------------------------------ solvers and K -> max_iter


def test_fixed_schedules_give_fixed_budget_picard_or_the_base_type() -> None:
    s = Linear(10, 5, "floor")
    assert [s.solver_for_scale(i, 10) for i in range(10)] == [
        Picard(tol=None, max_iter=k) for k in OFFICIAL[10, 5]
    ]
    assert s.solver_for_scale(9, 10, Anderson(m=3, tol=None)) == Anderson(m=3, tol=None, max_iter=5)
    # a fixed-count schedule is exactly K_s evaluations: the base keeps its type and options, not its tol
    assert Constant(7).solver_for_scale(0, 3, Picard(tol=1e-5, damping=0.5)) == Picard(
        tol=None, damping=0.5, max_iter=7
    )
    with pytest.raises(ValueError, match="outside"):
        s.solver_for_scale(10, 10)
    with pytest.raises(TypeError, match="deqgen Solver"):
        s.solver_for_scale(0, 10, "picard")  # type: ignore[arg-type]


@pytest.mark.parametrize("K", [1, 2, 5])
def test_k_iterations_are_k_applications_of_the_block(K: int) -> None:
    """``solver_for_scale`` with K_s = K evaluates the map exactly K times, with iteration indices 0..K-1 (the
    iteration-keyed cache's keys), and returns f^K(z0): the official loop of K block applications."""
    calls: list[int] = []
    W = torch.tensor([[0.3, -0.2], [0.1, 0.4]], dtype=torch.float64)

    def block(z: torch.Tensor, k: int) -> torch.Tensor:
        calls.append(k)
        return torch.tanh(z @ W.T + 1.0)

    z0 = torch.tensor([[0.5, -1.0], [2.0, 0.0]], dtype=torch.float64)
    solver = Explicit((K, 9)).solver_for_scale(0, 2)
    sol = fixed_point(block, z0, solver, indexed=True)
    ref = z0
    for _ in range(K):
        ref = torch.tanh(ref @ W.T + 1.0)
    assert calls == list(range(K))
    assert torch.equal(sol.z, ref) and sol.stats.nfe.tolist() == [K, K]


# ----------------------------------------------------------------------------------------------- parsing

CANONICAL = [
    "constant:10",
    "linear:10:5",
    "linear:10:5:floor",
    "list:10,9,8",
    "adaptive:0.001:20",
    "adaptive:1e-05:8:abs:anderson",
    "budget:60:uniform",
    "budget:60:inverse_tokens:1,2,3,4,5,6,8,10,13,16",
]


@pytest.mark.parametrize("spec", CANONICAL)
def test_canonical_specs_round_trip(spec: str) -> None:
    s = parse_schedule(spec)
    assert isinstance(s, Schedule) and s.to_spec() == spec and parse_schedule(s.to_spec()) == s


@pytest.mark.parametrize(
    ("spec", "want"),
    [
        ("constant:10", Constant(10)),
        (10, Constant(10)),
        (" Linear : 10 : 5 : FLOOR ", Linear(10, 5, "floor")),
        ("list:10,9,8", Explicit((10, 9, 8))),
        ("explicit:2,1", Explicit((2, 1))),
        ("adaptive:1e-3:20", Adaptive(1e-3, 20)),
        ("adaptive:1e-3:20:anderson", Adaptive(1e-3, 20, solver="anderson")),
        ("budget:60:uniform", Budget(60)),
        ("budget:30:coarse_heavy", Budget(30, "coarse_heavy")),
        ({"kind": "linear", "first": 10, "last": 5}, Linear(10, 5)),
        ({"kind": "list", "per_scale": [3, 2, 1]}, Explicit((3, 2, 1))),
        (
            {"kind": "budget", "total": 40, "rule": "tokens", "patch_nums": [1, 2, 4]},
            Budget(40, "tokens", (1, 2, 4)),
        ),
        (Constant(3), Constant(3)),
    ],
)
def test_parse_forms(spec: object, want: Schedule) -> None:
    got = parse_schedule(spec)  # type: ignore[arg-type]
    assert got == want and parse_schedule(got.to_spec()) == got


def test_every_schedule_round_trips_through_its_spec() -> None:
    schedules = [
        Constant(1),
        Linear(1, 30),
        Linear(7, 2, "floor"),
        Explicit((1,)),
        Adaptive(1.2345678901234e-7, 3),
        Adaptive(0.5, 1, "abs"),
        Budget(14, "fine_heavy"),
        Budget(20, "uniform", (1, 2, 3)),
    ]
    for s in schedules:
        assert parse_schedule(s.to_spec()) == s, s


def test_yaml_config_with_an_unsuffixed_exponent() -> None:
    cfg = yaml.safe_load(
        "schedule:\n  kind: adaptive\n  tol: 1e-3\n  max_iter: 5\n"
    )  # YAML 1.1: tol is a str
    assert parse_schedule(cfg["schedule"]) == Adaptive(1e-3, 5)


@pytest.mark.parametrize(
    ("spec", "named"),
    [
        ("linear:10", "linear takes FIRST:LAST"),
        ("linear:10:x", "LAST 'x' is not an integer"),
        ("linear:10:5:ceil", "rounding 'ceil'"),
        ("constant:0", "Constant.k must be an int >= 1, got 0"),
        ("constant:", "K '' is not an integer"),
        ("list:3,,1", "list entry '' is not an integer"),
        ("list:3,0", r"per_scale\[1\]"),
        ("adaptive:fast:3", "TOL 'fast' is not a number"),
        ("adaptive:1e-3", "adaptive takes TOL:MAX_ITER"),
        ("adaptive:1e-3:5:newton", "'newton' is neither a stop mode"),
        ("budget:60:lumpy", "rule 'lumpy'"),
        ("budget:60:tokens", "needs patch_nums"),
        ("cosine:10:1", "unknown kind 'cosine'"),
        ({"kind": "linear", "first": 10, "lst": 5}, r"no field\(s\) \['lst'\]"),
        ({"kind": "linear", "first": 10}, "last"),
        ({"first": 10}, "'kind' must be one of"),
    ],
)
def test_bad_specs_name_the_bad_part_and_list_the_forms(spec: object, named: str) -> None:
    with pytest.raises(ValueError, match="accepted forms: constant:K") as info:
        parse_schedule(spec)  # type: ignore[arg-type]
    assert info.match(named)


def test_wrong_spec_type() -> None:
    with pytest.raises(TypeError, match="float"):
        parse_schedule(1.5)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        parse_schedule(True)  # type: ignore[arg-type]
