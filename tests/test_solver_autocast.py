"""Under autocast a half-precision start is iterated in float32 by default (issue 16, item 7)."""

from __future__ import annotations

import pytest
import torch

from deqgen import Anderson, Broyden, Picard, Status, fixed_point

SOLVERS = [Picard, Anderson, Broyden]
IDS = ["picard", "anderson", "broyden"]


@pytest.mark.parametrize("cls", SOLVERS, ids=IDS)
@pytest.mark.parametrize("upcast", [True, False], ids=["upcast", "keep_half"])
def test_half_start_under_autocast_is_iterated_in_float32(cls, upcast: bool) -> None:
    W = torch.nn.Linear(32, 32, bias=False)
    with torch.no_grad():
        W.weight.copy_(torch.randn(32, 32, generator=torch.Generator().manual_seed(3)) * 0.9 / 32**0.5 / 2)
    seen: list[torch.dtype] = []

    def f(z):
        seen.append(z.dtype)
        return torch.tanh(W(z) + 0.5)  # under autocast the Linear returns bf16 whatever z's dtype

    z0 = torch.zeros(4, 32, dtype=torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        sol = fixed_point(f, z0, cls(tol=1e-2, max_iter=100, upcast_half=upcast))
    assert sol.z.dtype == torch.bfloat16
    assert set(seen) == {torch.float32 if upcast else torch.bfloat16}
    assert bool((sol.stats.status == Status.CONVERGED).all()), sol.stats.summary()


def test_without_autocast_a_half_start_keeps_its_dtype() -> None:
    seen: list[torch.dtype] = []

    def f(z):
        seen.append(z.dtype)
        return 0.5 * z + 1

    sol = fixed_point(f, torch.zeros(2, 3, dtype=torch.bfloat16), Picard(tol=1e-2, max_iter=50))
    assert set(seen) == {torch.bfloat16} and sol.z.dtype == torch.bfloat16


def test_upcast_half_must_be_a_bool() -> None:
    with pytest.raises(TypeError, match="upcast_half=1"):
        Picard(upcast_half=1)
