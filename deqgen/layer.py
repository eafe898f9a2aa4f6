"""``ImplicitLayer``: an ``nn.Module`` that owns a map ``f``, forward solvers and a gradient method."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from deqgen.gradients import SJFB, GradientMethod, GradInfo, forward_solve
from deqgen.solvers.base import Solver
from deqgen.solvers.picard import Picard

__all__ = ["ImplicitLayer"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class _Call:
    f: Callable[..., Tensor]
    x: Any

    def __call__(self, z: Tensor, k: int) -> Tensor:
        return self.f(z, self.x, k)


class ImplicitLayer(nn.Module):
    """``z* = f(z*, x)`` as a layer: solve in the forward, differentiate with a chosen gradient method.

    ``f`` is called as ``f(z, x, k)`` with ``z: (B, *S)``, the injection ``x`` (anything, passed through) and
    the iteration number ``k`` (0, 1, ...; VIAR keys its attention cache by it). If ``f`` is an ``nn.Module``
    it is registered as a submodule, so its parameters belong to this layer.

    In training mode (with grad enabled) the forward is ``gradient.attach(...)`` with ``train_solver``: for
    S-JFB that is k1 no-grad evaluations then k2 recorded steps; every parameter of ``f`` takes part in the
    recorded steps, so DDP needs no ``find_unused_parameters``. In eval mode, or under ``torch.no_grad()``,
    the layer solves with ``eval_solver`` and returns the detached fixed point.

    Args:
        f: the map ``f(z, x, k) -> (B, *S)``.
        gradient: a :class:`~deqgen.gradients.GradientMethod` (default: S-JFB with VIAR's ranges).
        train_solver: forward solver in training (default Picard, tol 1e-4, 50 iterations; S-JFB runs it as a
            fixed budget of k1 evaluations).
        eval_solver: solver in eval / no-grad mode (default Picard, tol 1e-4, 50 iterations).

    Example:
        >>> import torch
        >>> from deqgen import Anderson
        >>> from deqgen.gradients import JFB
        >>> lin = torch.nn.Linear(4, 4)
        >>> layer = ImplicitLayer(lambda z, x, k: torch.tanh(0.5 * lin(z) + x), JFB(), Anderson(tol=1e-6))
        >>> z, info = layer(torch.randn(3, 4), torch.zeros(3, 4))
        >>> z.shape, info.grad_steps
        (torch.Size([3, 4]), 1)
    """

    def __init__(
        self,
        f: Callable[..., Tensor],
        gradient: GradientMethod | None = None,
        train_solver: Solver[Any] | None = None,
        eval_solver: Solver[Any] | None = None,
    ) -> None:
        super().__init__()
        if not callable(f):
            raise TypeError(f"ImplicitLayer needs a callable f(z, x, k), got {type(f).__name__}")
        if gradient is not None and not isinstance(gradient, GradientMethod):
            raise TypeError(f"gradient must be a deqgen GradientMethod (JFB, SJFB, ...), got {type(gradient).__name__}")
        for name, s in (("train_solver", train_solver), ("eval_solver", eval_solver)):
            if s is not None and not isinstance(s, Solver):
                raise TypeError(f"{name} must be a deqgen Solver, got {type(s).__name__}")
        self.f = f  # an nn.Module f is registered by nn.Module.__setattr__
        self.gradient = gradient if gradient is not None else SJFB()
        self.train_solver = train_solver if train_solver is not None else Picard(tol=1e-4, max_iter=50)
        self.eval_solver = eval_solver if eval_solver is not None else Picard(tol=1e-4, max_iter=50)

    def forward(
        self, x: Any, z0: Tensor, generator: torch.Generator | None = None
    ) -> tuple[Tensor, GradInfo]:
        """Solve for ``z*``.

        Args:
            x: the injection, passed to ``f`` unchanged.
            z0: start point ``(B, *S)``.
            generator: random source for stochastic gradient methods (S-JFB's k1, k2).

        Returns:
            ``(z, info)``: ``z: (B, *S)`` with the gradient method's graph in training, detached otherwise.
        """
        step = _Call(self.f, x)
        if self.training and torch.is_grad_enabled():
            return self.gradient.attach(step, z0, self.train_solver, generator)
        sol = forward_solve(step, z0, self.eval_solver)
        return sol.z, GradInfo(sol.stats.iterations, 0, sol)
