"""Gradient methods for implicit layers: how a detached forward solve becomes a tensor with a chosen backward.

Each method is a frozen object with ``attach(step, z0, solver, generator) -> (z, GradInfo)``, where
``step(z, k)`` applies the layer's map once (``f(z, x, k)``) with autograd recording as usual. Forward solves
run under ``torch.no_grad()`` through deqgen's solver loop, so no-grad iterations never cost training memory.

===============  ======================================  ============================  =======================
method           backward                                extra memory                  bias
===============  ======================================  ============================  =======================
``Unrolled(k)``  backprop through k steps from z0        k steps of activations        exact for the unroll
``JFB(k)``       backprop through k steps after z*       k steps                       drops (I - J)^-1
``SJFB``         k1 ~ U no-grad steps, k2 ~ U tracked    k2 steps                      as JFB, randomised
``Phantom(k)``   k damped tracked steps after z*         k steps                       -> 0 as k grows
``ImplicitDiff`` solves u = J^T u + g at z*              one step (recomputed)         solver tolerance only
===============  ======================================  ============================  =======================
"""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from collections.abc import Callable
from types import MappingProxyType
from typing import Any, ClassVar

import torch
from torch import Tensor

from deqgen.problem import FixedPointProblem
from deqgen.solvers.anderson import Anderson
from deqgen.solvers.base import Solver, run
from deqgen.stats import Solution

__all__ = [
    "GradInfo",
    "forward_solve",
    "GradientMethod",
    "Unrolled",
    "JFB",
    "SJFB",
    "Phantom",
    "ImplicitDiff",
    "GRADIENTS",
    "get",
]

Step = Callable[[Tensor, int], Tensor]
"""``step(z, k) -> f(z, x, k)``: one application of the layer's map, ``z: (B, *S)``."""


@dataclasses.dataclass(frozen=True)
class GradInfo:
    """What a gradient method did in one forward call.

    Attributes:
        no_grad_steps: evaluations made without autograd (S-JFB's k1, or the solver's iterations).
        grad_steps: evaluations recorded for backprop (S-JFB's k2, JFB's k, ...).
        forward: the forward solve's :class:`~deqgen.stats.Solution` (None for ``Unrolled``).
    """

    no_grad_steps: int
    grad_steps: int
    forward: Solution | None = None


class GradientMethod(ABC):
    """Base class: turn a forward solve into a tensor whose backward is the method's."""

    name: ClassVar[str] = "gradient"

    @abstractmethod
    def attach(
        self, step: Step, z0: Tensor, solver: Solver[Any], generator: torch.Generator | None = None
    ) -> tuple[Tensor, GradInfo]:
        """Run the forward pass and return ``(z, info)``; ``z: (B, *S)`` carries the method's graph."""


def forward_solve(step: Step, z0: Tensor, solver: Solver[Any]) -> Solution:
    """Solve ``z = step(z, k)`` from ``z0: (B, *S)`` without autograd; ``k`` is passed on to ``step``."""

    def f(z: Tensor, k: int) -> Tensor:
        return step(z, k).to(z.dtype)  # under autocast f may return a lower precision

    return run(FixedPointProblem(f, z0.detach(), indexed=True), solver)


def _tracked_steps(step: Step, z: Tensor, k_start: int, k: int, damping: float = 1.0) -> Tensor:
    for i in range(k):
        fz = step(z, k_start + i)
        z = fz if damping == 1.0 else z + damping * (fz - z)
    return z


def _check_int(cls: str, field: str, value: Any, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{cls} got {field}={value!r}; use an integer >= {low}")


@dataclasses.dataclass(frozen=True)
class Unrolled(GradientMethod):
    """Plain backprop through ``k`` recorded steps from ``z0``: the exact gradient of the unrolled map.

    Memory grows with ``k``; use it as the reference the other methods approximate.
    """

    k: int = 30
    name: ClassVar[str] = "unrolled"

    def __post_init__(self) -> None:
        _check_int("Unrolled", "k", self.k, 1)

    def attach(self, step, z0, solver, generator=None):
        return _tracked_steps(step, z0, 0, self.k), GradInfo(0, self.k)


@dataclasses.dataclass(frozen=True)
class JFB(GradientMethod):
    """Jacobian-free backprop (Fung et al., AAAI 2022, "JFB: Jacobian-free backpropagation for implicit
    networks"): solve without autograd, then backprop through ``k`` recorded steps from the fixed point.

    With ``k=1`` the backward is ``dL/dtheta = (dL/dz) df/dtheta`` at ``z*``: the implicit gradient with
    ``(I - J)^-1`` replaced by ``I``. Cheap and constant in memory; biased when ``f`` contracts weakly.
    """

    k: int = 1
    name: ClassVar[str] = "jfb"

    def __post_init__(self) -> None:
        _check_int("JFB", "k", self.k, 1)

    def attach(self, step, z0, solver, generator=None):
        sol = forward_solve(step, z0, solver)
        z = _tracked_steps(step, sol.z, sol.stats.iterations, self.k)
        return z, GradInfo(sol.stats.iterations, self.k, sol)


@dataclasses.dataclass(frozen=True)
class SJFB(GradientMethod):
    """Stochastic JFB, as VIAR trains its implicit block: per call draw ``k1 ~ U[no_grad]`` and
    ``k2 ~ U[with_grad]`` (inclusive integer ranges) from the caller's generator, run ``k1`` evaluations of
    the solver in fixed-budget mode without autograd, then ``k2`` recorded plain steps (iteration numbers
    ``k1, k1 + 1, ...``).

    Unlike the official VIAR code, which runs the "no-grad" phase under a ``nullcontext`` and so records it,
    the ``k1`` phase here runs under ``torch.no_grad()``: training memory does not grow with ``k1``.

    Random draws: each call draws two integers from ``generator`` (k1 first), on the CPU. Give every rank
    its own seeded generator for reproducible, rank-specific draws, or the same seed everywhere for
    identical schedules across ranks.
    """

    no_grad: tuple[int, int] = (0, 10)
    with_grad: tuple[int, int] = (1, 12)
    name: ClassVar[str] = "sjfb"

    def __post_init__(self) -> None:
        for field, low in (("no_grad", 0), ("with_grad", 1)):
            lo_hi = tuple(getattr(self, field))
            if len(lo_hi) != 2 or any(isinstance(v, bool) or not isinstance(v, int) for v in lo_hi):
                raise ValueError(f"SJFB got {field}={getattr(self, field)!r}; use a pair of integers (low, high)")
            if not (low <= lo_hi[0] <= lo_hi[1]):
                raise ValueError(f"SJFB got {field}={lo_hi}; use {low} <= low <= high")
            object.__setattr__(self, field, lo_hi)

    def draw(self, generator: torch.Generator | None) -> tuple[int, int]:
        """``(k1, k2)``, each uniform over its inclusive range."""
        k1 = int(torch.randint(self.no_grad[0], self.no_grad[1] + 1, (1,), generator=generator))
        k2 = int(torch.randint(self.with_grad[0], self.with_grad[1] + 1, (1,), generator=generator))
        return k1, k2

    def attach(self, step, z0, solver, generator=None):
        k1, k2 = self.draw(generator)
        sol = None
        z = z0.detach()
        if k1 > 0:
            sol = forward_solve(step, z, dataclasses.replace(solver, tol=None, max_iter=k1))
            z = sol.z
        return _tracked_steps(step, z, k1, k2), GradInfo(k1, k2, sol)


@dataclasses.dataclass(frozen=True)
class Phantom(GradientMethod):
    """Phantom gradients (Geng et al., NeurIPS 2021, "On training implicit models"): from the fixed point,
    ``k`` recorded damped steps ``z <- z + damping (f(z) - z)``. The backward approximates the implicit
    gradient by a truncated Neumann series; the error shrinks like ``||(1 - damping) I + damping J||^k``.
    """

    k: int = 5
    damping: float = 0.5
    name: ClassVar[str] = "phantom"

    def __post_init__(self) -> None:
        _check_int("Phantom", "k", self.k, 1)
        if not (isinstance(self.damping, (int, float)) and 0 < self.damping <= 1):
            raise ValueError(f"Phantom got damping={self.damping!r}; use 0 < damping <= 1")

    def attach(self, step, z0, solver, generator=None):
        sol = forward_solve(step, z0, solver)
        z = _tracked_steps(step, sol.z, sol.stats.iterations, self.k, self.damping)
        return z, GradInfo(sol.stats.iterations, self.k, sol)


@dataclasses.dataclass(frozen=True)
class ImplicitDiff(GradientMethod):
    """Implicit differentiation (Bai et al., NeurIPS 2019, "Deep equilibrium models"): at ``z* = f(z*)`` the
    backward solves the adjoint fixed point ``u = J^T u + g`` (``J = df/dz`` at ``z*``, ``g`` the incoming
    gradient) with any deqgen solver, then backpropagates ``u`` through one step of ``f``.

    It is an ``autograd.Function`` (no hooks stored on modules), so a layer may be called several times per
    step and under DDP. The adjoint is per sample; its stop test is relative (``||u - J^T u - g|| /
    ||J^T u + g||``), so the tolerance scales with the gradient. ``recorder``, if given, receives the backward
    :class:`~deqgen.stats.Solution` of every backward call (non-convergence is then visible); with
    ``throw=True`` a sample whose adjoint did not converge raises.

    Args:
        solver: the backward solver (default: Anderson, rel tol 1e-8, 100 iterations).
        recorder: called with each backward solution.
        throw: raise :class:`~deqgen.stats.SolverError` when the adjoint does not converge.
    """

    solver: Solver[Any] = dataclasses.field(default_factory=lambda: Anderson(tol=1e-8, max_iter=100))
    recorder: Callable[[Solution], None] | None = None
    throw: bool = False
    name: ClassVar[str] = "implicit"

    def __post_init__(self) -> None:
        if not isinstance(self.solver, Solver):
            raise TypeError(f"ImplicitDiff needs a deqgen Solver for the backward, got {type(self.solver).__name__}")

    def attach(self, step, z0, solver, generator=None):
        sol = forward_solve(step, z0, solver)
        z_star = sol.z.detach().requires_grad_()
        k = sol.stats.iterations
        fz = step(z_star, k)  # one recorded step: the graph to the parameters and the injection
        z = _AdjointBackward.apply(fz, z_star, self)
        return z, GradInfo(sol.stats.iterations, 1, sol)


class _AdjointBackward(torch.autograd.Function):
    """Identity forward on ``f(z*)``; backward replaces the incoming ``g`` by ``u = J^T u + g``."""

    @staticmethod
    def forward(ctx: Any, fz: Tensor, z_star: Tensor, method: ImplicitDiff) -> Tensor:
        ctx.method = method
        ctx.save_for_backward(fz, z_star)
        return fz.detach().clone()

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, None, None]:
        fz, z_star = ctx.saved_tensors
        method: ImplicitDiff = ctx.method

        def adjoint(u: Tensor) -> Tensor:
            (jtu,) = torch.autograd.grad(fz, z_star, u.to(fz.dtype), retain_graph=True)
            return (jtu + grad).to(u.dtype)

        sol = run(FixedPointProblem(adjoint, grad.detach()), method.solver, throw=method.throw)
        if method.recorder is not None:
            method.recorder(sol)
        return sol.z, None, None


GRADIENTS: MappingProxyType[str, type[GradientMethod]] = MappingProxyType(
    {"unrolled": Unrolled, "jfb": JFB, "sjfb": SJFB, "phantom": Phantom, "implicit": ImplicitDiff}
)
"""Read-only name -> gradient class table used by configs."""


def get(name: str, **opts: Any) -> GradientMethod:
    """Build a gradient method by name: ``get("sjfb", no_grad=(0, 10), with_grad=(1, 12))``.

    Raises:
        ValueError: unknown name or bad value. TypeError: an option the method does not have.
    """
    key = str(name).strip().lower()
    if key not in GRADIENTS:
        raise ValueError(f"unknown gradient method {name!r}; choose one of {sorted(GRADIENTS)}")
    cls = GRADIENTS[key]
    valid = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(opts) - set(valid))
    if unknown:
        raise TypeError(f"gradient method {name!r} has no option(s) {unknown}; valid options: {valid}")
    return cls(**opts)
