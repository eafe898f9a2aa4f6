"""Moré-Garbow-Hillstrom nonlinear equations ``F(x) = 0``, written from the definitions in Moré, Garbow and
Hillstrom, "Testing unconstrained optimization software", ACM TOMS 7(1), 1981, at their standard dimensions and
starting points. Only the square systems (``m = n``) are included.

Each problem is posed for deqgen as the fixed-point map ``g(z) = z + F(z)``, whose fixed points are the roots
of ``F`` and whose residual ``g(z) - z`` is ``F(z)``. Every ``F`` takes ``x: (B, n)`` float64 and returns
``(B, n)``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["MGHProblem", "MGH_PROBLEMS", "fixed_point_map"]


@dataclass(frozen=True)
class MGHProblem:
    """A named system ``F: (B, n) -> (B, n)`` with its standard starting point ``x0: (n,)``."""

    name: str
    F: Callable[[Tensor], Tensor]
    x0: tuple[float, ...]

    @property
    def n(self) -> int:
        return len(self.x0)

    def start(self, dtype: torch.dtype = torch.float64) -> Tensor:
        """``(1, n)``: the standard starting point as a batch of one."""
        return torch.tensor([self.x0], dtype=dtype)


def fixed_point_map(F: Callable[[Tensor], Tensor]) -> Callable[[Tensor], Tensor]:
    """``g(z) = z + F(z)``: its fixed points are the roots of ``F``."""
    return lambda z: z + F(z)


def rosenbrock(x: Tensor) -> Tensor:
    return torch.stack([10 * (x[:, 1] - x[:, 0] ** 2), 1 - x[:, 0]], dim=1)


def freudenstein_roth(x: Tensor) -> Tensor:
    x1, x2 = x[:, 0], x[:, 1]
    return torch.stack([-13 + x1 + ((5 - x2) * x2 - 2) * x2, -29 + x1 + ((x2 + 1) * x2 - 14) * x2], dim=1)


def powell_badly_scaled(x: Tensor) -> Tensor:
    x1, x2 = x[:, 0], x[:, 1]
    return torch.stack([1e4 * x1 * x2 - 1, torch.exp(-x1) + torch.exp(-x2) - 1.0001], dim=1)


def helical_valley(x: Tensor) -> Tensor:
    x1, x2, x3 = x[:, 0], x[:, 1], x[:, 2]
    theta = torch.atan(x2 / x1) / (2 * math.pi) + torch.where(x1 < 0, 0.5, 0.0)
    return torch.stack([10 * (x3 - 10 * theta), 10 * (torch.sqrt(x1**2 + x2**2) - 1), x3], dim=1)


def powell_singular(x: Tensor) -> Tensor:
    x1, x2, x3, x4 = x.unbind(1)
    return torch.stack(
        [x1 + 10 * x2, math.sqrt(5) * (x3 - x4), (x2 - 2 * x3) ** 2, math.sqrt(10) * (x1 - x4) ** 2], dim=1
    )


def chebyquad(x: Tensor) -> Tensor:
    """``f_i = (1/n) sum_j T_i(x_j) - int_0^1 T_i``, ``T_i`` the Chebyshev polynomial shifted to [0, 1]."""
    n = x.shape[1]
    y = 2 * x - 1
    t_prev, t = torch.ones_like(y), y
    rows = []
    for i in range(1, n + 1):
        integral = -1.0 / (i * i - 1) if i % 2 == 0 else 0.0
        rows.append(t.mean(dim=1) - integral)
        t_prev, t = t, 2 * y * t - t_prev
    return torch.stack(rows, dim=1)


def brown_almost_linear(x: Tensor) -> Tensor:
    n = x.shape[1]
    head = x[:, :-1] + x.sum(dim=1, keepdim=True) - (n + 1)
    return torch.cat([head, (x.prod(dim=1) - 1)[:, None]], dim=1)


def _grid(n: int, x: Tensor) -> tuple[float, Tensor]:
    h = 1.0 / (n + 1)
    return h, torch.arange(1, n + 1, dtype=x.dtype, device=x.device) * h


def discrete_boundary_value(x: Tensor) -> Tensor:
    h, t = _grid(x.shape[1], x)
    padded = torch.nn.functional.pad(x, (1, 1))  # x_0 = x_{n+1} = 0
    return 2 * x - padded[:, :-2] - padded[:, 2:] + h * h * (x + t + 1) ** 3 / 2


def discrete_integral_equation(x: Tensor) -> Tensor:
    h, t = _grid(x.shape[1], x)
    c = (x + t + 1) ** 3
    lower = torch.cumsum(t * c, dim=1)  # sum_{j <= i} t_j c_j
    upper = torch.flip(torch.cumsum(torch.flip((1 - t) * c, [1]), dim=1), [1]) - (1 - t) * c  # sum_{j > i}
    return x + h * ((1 - t) * lower + t * upper) / 2


def trigonometric(x: Tensor) -> Tensor:
    n = x.shape[1]
    i = torch.arange(1, n + 1, dtype=x.dtype, device=x.device)
    return n - torch.cos(x).sum(dim=1, keepdim=True) + i * (1 - torch.cos(x)) - torch.sin(x)


def broyden_tridiagonal(x: Tensor) -> Tensor:
    padded = torch.nn.functional.pad(x, (1, 1))
    return (3 - 2 * x) * x - padded[:, :-2] - 2 * padded[:, 2:] + 1


def broyden_banded(x: Tensor) -> Tensor:
    n = x.shape[1]
    idx = torch.arange(n)
    band = (idx[None, :] >= (idx[:, None] - 5).clamp_min(0)) & (idx[None, :] <= idx[:, None] + 1)
    band &= idx[None, :] != idx[:, None]  # J_i = {j != i : max(1, i - 5) <= j <= min(n, i + 1)}
    s = (x * (1 + x)) @ band.to(x.dtype).T
    return x * (2 + 5 * x * x) + 1 - s


def _points(*values: float) -> tuple[float, ...]:
    return tuple(float(v) for v in values)


_N = 10
_T = [(i + 1) / (_N + 1) for i in range(_N)]

MGH_PROBLEMS: tuple[MGHProblem, ...] = (
    MGHProblem("Rosenbrock", rosenbrock, _points(-1.2, 1.0)),
    MGHProblem("Freudenstein-Roth", freudenstein_roth, _points(0.5, -2.0)),
    MGHProblem("Powell badly scaled", powell_badly_scaled, _points(0.0, 1.0)),
    MGHProblem("Helical valley", helical_valley, _points(-1.0, 0.0, 0.0)),
    MGHProblem("Powell singular", powell_singular, _points(3.0, -1.0, 0.0, 1.0)),
    MGHProblem("Chebyquad n=5", chebyquad, _points(*[(j + 1) / 6 for j in range(5)])),
    MGHProblem("Brown almost-linear n=10", brown_almost_linear, _points(*[0.5] * _N)),
    MGHProblem("Discrete boundary value n=10", discrete_boundary_value, _points(*[t * (t - 1) for t in _T])),
    MGHProblem(
        "Discrete integral equation n=10", discrete_integral_equation, _points(*[t * (t - 1) for t in _T])
    ),
    MGHProblem("Trigonometric n=10", trigonometric, _points(*[1.0 / _N] * _N)),
    MGHProblem("Broyden tridiagonal n=10", broyden_tridiagonal, _points(*[-1.0] * _N)),
    MGHProblem("Broyden banded n=10", broyden_banded, _points(*[-1.0] * _N)),
)
"""The square systems of the set, in the paper's order."""
