"""``ImplicitLayer``: an ``nn.Module`` that owns a map ``f``, forward solvers and a gradient method; and
``implicit_solve``, the same thing as a function."""

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

__all__ = ["ImplicitLayer", "implicit_solve"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class _Call:
    """``step(z, k) = f(z, x, k)``: binds the injection so gradient methods see a one-argument map."""

    f: Callable[..., Tensor]
    x: Any

    def __call__(self, z: Tensor, k: int) -> Tensor:
        return self.f(z, self.x, k)


def _as_solver(name: str, spec: Solver[Any] | int | None, default: Solver[Any]) -> Solver[Any]:
    if spec is None:
        return default
    if isinstance(spec, Solver):
        return spec
    if isinstance(spec, int) and not isinstance(spec, bool):
        if spec < 1:
            raise ValueError(f"{name}={spec} is a fixed budget of evaluations; use an integer >= 1")
        return Picard(tol=None, max_iter=spec)
    raise TypeError(
        f"{name} must be a deqgen Solver (Picard, Anderson, Broyden) or an int fixed budget, "
        f"got {type(spec).__name__}"
    )


def implicit_solve(
    f: Callable[..., Tensor],
    x: Any,
    z0: Tensor,
    gradient: GradientMethod,
    solver: Solver[Any],
    *,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, GradInfo]:
    """Solve ``z* = f(z*, x, k)`` and attach ``gradient``'s backward: the functional form of
    :class:`ImplicitLayer` in training mode.

    Args:
        f: the map ``f(z, x, k) -> (B, *S)``; ``k`` is the iteration number.
        x: the injection, passed to ``f`` unchanged; gradients reach it through the recorded steps.
        z0: start point ``(B, *S)``; only :class:`~deqgen.gradients.Unrolled` differentiates through it.
        gradient: a :class:`~deqgen.gradients.GradientMethod`.
        solver: the forward solver (S-JFB uses its type for ``k1`` fixed-budget evaluations).
        generator: random source for stochastic gradient methods (S-JFB's ``k1``, ``k2``).

    Returns:
        ``(z, info)``: ``z: (B, *S)`` with the method's graph (detached if grad mode is off), and
        :class:`~deqgen.gradients.GradInfo` (``no_grad_steps``, ``grad_steps``, the forward ``Solution``).
    """
    if not isinstance(gradient, GradientMethod):
        raise TypeError(
            f"gradient must be a deqgen GradientMethod (JFB, SJFB, ...), got {type(gradient).__name__}"
        )
    if not isinstance(z0, Tensor):
        raise TypeError(f"z0 must be a tensor (B, *S), got {type(z0).__name__}")
    return gradient.attach(_Call(f, x), z0, solver, generator)


class ImplicitLayer(nn.Module):
    """``z* = f(z*, x)`` as a layer: solve in the forward, differentiate with a chosen gradient method.

    ``f`` is called as ``f(z, x, k)`` with ``z: (B, *S)``, the injection ``x`` (anything, passed through) and
    the iteration number ``k`` (0, 1, ...; VIAR keys its attention cache by it). The recorded steps of a
    gradient method continue the count of the solve before them. If ``f`` is an ``nn.Module`` it is
    registered as a submodule, so its parameters belong to this layer (and to a DDP wrapper around it).

    Modes:
        * training, grad enabled: ``gradient.attach`` with ``train_solver``. For S-JFB that is ``k1`` no-grad
          evaluations then ``k2`` recorded steps. Every parameter of ``f`` takes part in the recorded steps,
          so DDP needs no ``find_unused_parameters``.
        * eval mode, or grad disabled: solve with ``eval_solver`` and return the **detached** fixed point (no
          random draws, no graph; validation without ``torch.no_grad()`` costs no training memory). For
          gradients through a layer in eval mode call :func:`implicit_solve`.

    Args:
        f: the map ``f(z, x, k) -> (B, *S)``, same shape and dtype as ``z`` (lower precision under autocast
            is fine: the solver iterates in ``z0``'s dtype).
        gradient: a :class:`~deqgen.gradients.GradientMethod` (default: ``SJFB()`` with VIAR's ranges).
        train_solver: forward solver in training, or an int ``n`` for a fixed budget of ``n`` Picard
            evaluations (default ``Picard(tol=1e-4, max_iter=50)``).
        eval_solver: solver in eval / no-grad mode, or an int fixed budget (default
            ``Picard(tol=1e-4, max_iter=50)``; VIAR samples with ``10``).

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
        train_solver: Solver[Any] | int | None = None,
        eval_solver: Solver[Any] | int | None = None,
    ) -> None:
        super().__init__()
        if not callable(f):
            raise TypeError(f"ImplicitLayer needs a callable f(z, x, k), got {type(f).__name__}")
        if gradient is not None and not isinstance(gradient, GradientMethod):
            raise TypeError(
                f"gradient must be a deqgen GradientMethod (JFB, SJFB, ...), got {type(gradient).__name__}; "
                "for a config string use deqgen.gradients.get(name, **options)"
            )
        self.f = f  # an nn.Module f is registered by nn.Module.__setattr__
        self.gradient = gradient if gradient is not None else SJFB()
        self.train_solver = _as_solver("train_solver", train_solver, Picard(tol=1e-4, max_iter=50))
        self.eval_solver = _as_solver("eval_solver", eval_solver, Picard(tol=1e-4, max_iter=50))

    def forward(
        self, x: Any, z0: Tensor, generator: torch.Generator | None = None
    ) -> tuple[Tensor, GradInfo]:
        """Solve for ``z*``.

        Args:
            x: the injection, passed to ``f`` unchanged (e.g. ``(B, L, C)``).
            z0: start point ``(B, *S)``.
            generator: random source for stochastic gradient methods (S-JFB needs one in training).

        Returns:
            ``(z, info)``: ``z: (B, *S)`` with the gradient method's graph in training, detached otherwise.
        """
        if self.training and torch.is_grad_enabled():
            return implicit_solve(self.f, x, z0, self.gradient, self.train_solver, generator=generator)
        sol = forward_solve(_Call(self.f, x), z0, self.eval_solver)
        return sol.z, GradInfo(sol.stats.iterations, 0, sol)

    def extra_repr(self) -> str:
        solvers = f"train_solver={self.train_solver!r}, eval_solver={self.eval_solver!r}"
        return f"gradient={self.gradient!r}, {solvers}"
