"""Gradient methods for implicit layers: how a detached forward solve becomes a tensor with a chosen backward.

Each method is a frozen object with ``attach(step, z0, solver, generator) -> (z, GradInfo)``, where
``step(z, k)`` applies the layer's map once (``f(z, x, k)``) with autograd recording as usual. Forward solves
run under ``torch.no_grad()`` through deqgen's solver loop, so no-grad iterations never cost training memory.
Recorded steps continue the iteration count of the solve before them (``k1, k1 + 1, ...``), so a map that
keys state by ``k`` (VIAR's attention cache) sees one consistent trajectory.

===============  ======================================  ============================  =======================
method           backward                                extra memory                  bias
===============  ======================================  ============================  =======================
``Unrolled(k)``  backprop through k steps from z0        k steps of activations        exact for the unroll
``JFB(k)``       backprop through k steps after z*       k steps                       drops (I - J)^-1
``SJFB``         k1 ~ U no-grad steps, k2 ~ U tracked    k2 steps                      as JFB, randomised
``Phantom(k)``   k damped tracked steps after z*         k steps                       -> 0 as k grows
``ImplicitDiff`` solves u = J^T u + g at z*              one step (recomputed)         solver tolerance only
===============  ======================================  ============================  =======================

Only ``Unrolled`` differentiates with respect to ``z0``: the others estimate the gradient at the fixed point,
which does not depend on where the solve started, so they start from ``z0.detach()``.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from typing import Any, ClassVar, Literal

import torch
from torch import Tensor

from deqgen import solvers as _solvers
from deqgen._registry import Registry
from deqgen.problem import FixedPointProblem
from deqgen.solvers.anderson import Anderson
from deqgen.solvers.base import Solver, check_int, run
from deqgen.stats import Solution, SolverError

__all__ = [
    "GRADIENTS",
    "JFB",
    "ROUNDING_FLOOR",
    "SJFB",
    "BackwardStatsRecorder",
    "GradInfo",
    "GradientMethod",
    "ImplicitDiff",
    "Phantom",
    "Unrolled",
    "forward_solve",
    "get",
    "options",
]

logger = logging.getLogger(__name__)

Step = Callable[[Tensor, int], Tensor]
"""``step(z, k) -> f(z, x, k)``: one application of the layer's map, ``z: (B, *S)``.

A step may carry two attributes that :func:`forward_solve` honours: ``separable`` (True when the step also
accepts ``rows=``, a LongTensor of the original rows of ``z``, so converged rows are never evaluated again)
and ``trace`` (record the residual traces). :class:`~deqgen.layer.ImplicitLayer` sets them."""

ROUNDING_FLOOR = 4.0
"""The adjoint tolerance is never below ``ROUNDING_FLOOR * eps`` of the lowest precision the backward computes
in (the step's output dtype, or the autocast dtype): below that the residual is rounding noise and the solve
would only burn its ``max_iter``."""


@dataclasses.dataclass(frozen=True)
class GradInfo:
    """What a gradient method did in one forward call.

    Attributes:
        no_grad_steps: evaluations made without autograd: S-JFB's ``k1``, or the forward solver's iterations.
        grad_steps: evaluations recorded for backprop: S-JFB's ``k2``, JFB's ``k``, ... (0 in eval mode).
        forward: the no-grad solve's :class:`~deqgen.stats.Solution` (``z: (B, *S)`` and per-sample stats);
            None when there was no no-grad phase (``Unrolled``, S-JFB with ``k1 = 0``).
        jacobian_step: ``(fz, z_in)``, both ``(B, D)``, one recorded step ``fz = f(z_in)`` at the solve's
            answer with ``z_in`` requiring grad, for :mod:`deqgen.regularization`; set by
            :class:`~deqgen.layer.ImplicitLayer` when asked (``jacobian=True``), else None.
        states: the trajectory states asked for with ``states=`` (fixed-point correction), each with the
            gradient method's backward; empty otherwise.
    """

    no_grad_steps: int
    grad_steps: int
    forward: Solution | None = None
    jacobian_step: tuple[Tensor, Tensor] | None = None
    states: tuple[Any, ...] = ()


class GradientMethod(ABC):
    """Base class: turn a forward solve into a tensor whose backward is the method's."""

    name: ClassVar[str] = "gradient"

    @abstractmethod
    def attach(
        self, step: Step, z0: Tensor, solver: Solver[Any], generator: torch.Generator | None = None
    ) -> tuple[Tensor, GradInfo]:
        """Run the forward pass and return ``(z, info)``.

        Args:
            step: ``step(z, k)``, one recorded application of the map.
            z0: start point ``(B, *S)``.
            solver: the forward solver (its ``tol``/``max_iter`` set the no-grad budget).
            generator: random source, for stochastic methods only.

        Returns:
            ``z: (B, *S)`` carrying the method's graph, and a :class:`GradInfo`.
        """

    def backprop_from(self, step: Step, z: Tensor, k: int) -> Tensor:
        """The method's backward attached at a given no-grad state ``z: (B, *S)`` reached after ``k``
        evaluations (fixed-point correction uses it on intermediate states of one solve).

        Raises:
            ValueError: for methods whose backward is not defined from a state (``Unrolled``, ``SJFB``).
        """
        raise ValueError(
            f"{type(self).__name__} has no backward from an intermediate state; fixed-point correction "
            "(states=) needs JFB, Phantom or ImplicitDiff"
        )


def forward_solve(step: Step, z0: Tensor, solver: Solver[Any]) -> Solution:
    """Solve ``z = step(z, k)`` from ``z0: (B, *S)`` without autograd; ``k`` counts evaluations from 0.

    The iterate stays in ``z0``'s dtype: under ``torch.autocast`` ``f`` computes in low precision but the
    solver accumulates in ``z0``'s (usually float32).
    """

    if getattr(step, "separable", False):

        def f_rows(z: Tensor, k: int, rows: Tensor | None = None) -> Tensor:
            return step(z, k, rows=rows).to(z.dtype)  # type: ignore[call-arg]

        problem = FixedPointProblem(f_rows, z0.detach(), indexed=True, separable=True)
    else:

        def f(z: Tensor, k: int) -> Tensor:
            return step(z, k).to(z.dtype)

        problem = FixedPointProblem(f, z0.detach(), indexed=True)
    return run(problem, solver, trace=bool(getattr(step, "trace", False)))


def _tracked_steps(step: Step, z: Tensor, k_start: int, k: int, damping: float = 1.0) -> Tensor:
    for i in range(k):
        fz = step(z, k_start + i)
        z = fz if damping == 1.0 else z + damping * (fz - z)
    return z


@dataclasses.dataclass(frozen=True)
class Unrolled(GradientMethod):
    """Plain backprop through ``k`` recorded steps from ``z0`` (iterations ``0 .. k-1``): the exact gradient
    of the unrolled map, including the gradient with respect to ``z0``.

    Memory grows with ``k``; use it as the reference the other methods approximate (for a contraction it
    tends to the implicit gradient of Bai et al., 2019, as ``k`` grows). The forward solver is not used.

    Args:
        k: recorded steps, ``>= 1``.
    """

    k: int = 30
    name: ClassVar[str] = "unrolled"

    def __post_init__(self) -> None:
        check_int("Unrolled", "k", self.k, 1)

    def attach(
        self, step: Step, z0: Tensor, solver: Solver[Any], generator: torch.Generator | None = None
    ) -> tuple[Tensor, GradInfo]:
        return _tracked_steps(step, z0, 0, self.k), GradInfo(0, self.k)


@dataclasses.dataclass(frozen=True)
class JFB(GradientMethod):
    """Jacobian-free backprop (Fung et al., AAAI 2022, "JFB: Jacobian-free backpropagation for implicit
    networks"): solve without autograd, then backprop through ``k`` recorded steps from the fixed point.

    With ``k=1`` the backward is ``dL/dtheta = (dL/dz) df/dtheta`` at ``z*``: the implicit gradient with
    ``(I - J)^-1`` replaced by ``I``. Cheap and constant in memory; a descent direction when ``f`` contracts,
    biased when it contracts weakly. The recorded steps are iterations ``n, n + 1, ...`` where ``n`` is the
    number of evaluations the forward solve made.

    Args:
        k: recorded steps, ``>= 1``.
    """

    k: int = 1
    name: ClassVar[str] = "jfb"

    def __post_init__(self) -> None:
        check_int("JFB", "k", self.k, 1)

    def attach(
        self, step: Step, z0: Tensor, solver: Solver[Any], generator: torch.Generator | None = None
    ) -> tuple[Tensor, GradInfo]:
        sol = forward_solve(step, z0, solver)
        return self.backprop_from(step, sol.z, sol.stats.iterations), GradInfo(
            sol.stats.iterations, self.k, sol
        )

    def backprop_from(self, step: Step, z: Tensor, k: int) -> Tensor:
        return _tracked_steps(step, z, k, self.k)


@dataclasses.dataclass(frozen=True)
class SJFB(GradientMethod):
    """Stochastic JFB, as VIAR trains its implicit block: per call draw ``k1 ~ U[no_grad]`` and
    ``k2 ~ U[with_grad]`` (inclusive integer ranges), run ``k1`` evaluations of the forward solver in
    fixed-budget mode without autograd, then ``k2`` recorded plain steps at iterations ``k1 .. k1 + k2 - 1``.
    A JFB variant (Fung et al., AAAI 2022) with a random truncation.

    Unlike the official VIAR code, which runs the "no-grad" phase under a ``nullcontext`` and so records it,
    the ``k1`` phase here runs under ``torch.no_grad()``: training memory does not grow with ``k1``.

    Random stream: every call draws exactly two integers from the caller's ``generator``, ``k1`` then
    ``k2`` (``torch.randint`` on the generator's device). Under DDP give every rank a generator with the
    **same** seed (e.g. ``torch.Generator().manual_seed(seed)``): all ranks then run the same ``k1, k2`` in
    lock step, so no rank waits for a slower one at the gradient all-reduce, and a run is reproducible from
    the seed. Save ``generator.get_state()`` with checkpoints to resume the same schedule.

    Args:
        no_grad: ``(low, high)`` for ``k1``, ``0 <= low <= high`` (VIAR: ``(0, 10)``).
        with_grad: ``(low, high)`` for ``k2``, ``1 <= low <= high`` (VIAR: ``(1, 12)``).
    """

    no_grad: tuple[int, int] = (0, 10)
    with_grad: tuple[int, int] = (1, 12)
    name: ClassVar[str] = "sjfb"

    def __post_init__(self) -> None:
        for field, low in (("no_grad", 0), ("with_grad", 1)):
            value = getattr(self, field)
            pair = tuple(value) if isinstance(value, (tuple, list)) else (value,)
            if len(pair) != 2 or any(isinstance(v, bool) or not isinstance(v, int) for v in pair):
                raise ValueError(f"SJFB got {field}={value!r}; use a pair of integers (low, high)")
            if not (low <= pair[0] <= pair[1]):
                raise ValueError(f"SJFB got {field}={pair}; use {low} <= low <= high")
            object.__setattr__(self, field, pair)

    def draw(self, generator: torch.Generator) -> tuple[int, int]:
        """``(k1, k2)``, each uniform over its inclusive range; consumes two draws from ``generator``."""
        if not isinstance(generator, torch.Generator):
            raise TypeError(
                f"SJFB draws k1, k2 from a torch.Generator you pass, got {type(generator).__name__}; pass "
                "generator=torch.Generator().manual_seed(seed) (the same seed on every rank) to the layer's "
                "forward"
            )
        dev = generator.device
        k1 = int(torch.randint(self.no_grad[0], self.no_grad[1] + 1, (1,), generator=generator, device=dev))
        k2 = int(
            torch.randint(self.with_grad[0], self.with_grad[1] + 1, (1,), generator=generator, device=dev)
        )
        return k1, k2

    def attach(
        self, step: Step, z0: Tensor, solver: Solver[Any], generator: torch.Generator | None = None
    ) -> tuple[Tensor, GradInfo]:
        k1, k2 = self.draw(generator)  # type: ignore[arg-type]  # draw() explains a missing generator
        sol = None
        z = z0.detach()
        if k1 > 0:
            sol = forward_solve(step, z, dataclasses.replace(solver, tol=None, max_iter=k1))
            z = sol.z
        return _tracked_steps(step, z, k1, k2), GradInfo(k1, k2, sol)


@dataclasses.dataclass(frozen=True)
class Phantom(GradientMethod):
    """Phantom gradients (Geng et al., NeurIPS 2021, "On training implicit models"): from the fixed point,
    ``k`` recorded damped steps ``z <- z + damping (f(z) - z)``. The backward is a truncated Neumann series
    of the implicit gradient; its error shrinks like ``||(1 - damping) I + damping J||^k``.

    Args:
        k: recorded steps, ``>= 1``.
        damping: step size in ``(0, 1]``; ``damping=1`` is ``JFB(k)``.
    """

    k: int = 5
    damping: float = 0.5
    name: ClassVar[str] = "phantom"

    def __post_init__(self) -> None:
        check_int("Phantom", "k", self.k, 1)
        if (
            isinstance(self.damping, bool)
            or not isinstance(self.damping, (int, float))
            or not 0 < self.damping <= 1
        ):
            raise ValueError(f"Phantom got damping={self.damping!r}; use 0 < damping <= 1")

    def attach(
        self, step: Step, z0: Tensor, solver: Solver[Any], generator: torch.Generator | None = None
    ) -> tuple[Tensor, GradInfo]:
        sol = forward_solve(step, z0, solver)
        return self.backprop_from(step, sol.z, sol.stats.iterations), GradInfo(
            sol.stats.iterations, self.k, sol
        )

    def backprop_from(self, step: Step, z: Tensor, k: int) -> Tensor:
        return _tracked_steps(step, z, k, self.k, self.damping)


class BackwardStatsRecorder:
    """Collects the adjoint :class:`~deqgen.stats.Solution` of every :class:`ImplicitDiff` backward.

    Pass it as ``ImplicitDiff(recorder=...)``; read it after ``backward()`` and ``clear()`` it each step (it
    keeps every solution it is given, adjoints ``u: (B, *S)`` included).

    Example:
        >>> rec = BackwardStatsRecorder()
        >>> method = ImplicitDiff(recorder=rec)
        >>> len(rec.solutions)
        0
    """

    def __init__(self) -> None:
        self.solutions: list[Solution] = []

    def __call__(self, solution: Solution) -> None:
        self.solutions.append(solution)

    def clear(self) -> None:
        """Forget the recorded solutions."""
        self.solutions.clear()

    @property
    def all_converged(self) -> bool:
        """True when every recorded adjoint solve converged for every sample (a host sync)."""
        return all(s.stats.all_converged for s in self.solutions)

    def summary(self) -> str:
        """One line per recorded backward solve."""
        return "\n".join(f"backward {i}: {s.stats.summary()}" for i, s in enumerate(self.solutions))


def _default_adjoint_solver() -> Solver[Any]:
    return Anderson(tol=1e-6, max_iter=50)


@dataclasses.dataclass(frozen=True)
class ImplicitDiff(GradientMethod):
    """Implicit differentiation (Bai et al., NeurIPS 2019, "Deep equilibrium models"): at ``z* = f(z*)`` the
    backward solves the adjoint fixed point ``u = J^T u + g`` (``J = df/dz`` at ``z*``, ``g`` the incoming
    gradient) with any deqgen solver, then backpropagates ``u`` through one recorded step of ``f``. Exact up
    to the adjoint's tolerance; memory is one step of ``f`` plus the backward solver's history.

    It is an ``autograd.Function`` defined once at module level: no hooks are stored on modules, so a layer
    may be called several times per step (each call gets its own backward) and under DDP.

    Tolerance: each sample's incoming gradient is normalised to unit norm before the solve (the adjoint is
    linear, so ``u`` is scaled back exactly), so ``tol`` is relative to ``||g||`` in either stop mode, and a
    GradScaler factor or a tiny loss does not change the work. The tolerance is also raised to
    ``ROUNDING_FLOOR * eps`` of the backward's compute dtype (bf16 under autocast: about 3e-2; float32:
    about 5e-7), below which the residual is rounding noise. The adjoint iterates in float32 or wider.

    Non-convergence is never silent: the backward :class:`~deqgen.stats.Solution` goes to ``recorder``;
    with ``throw=True`` a sample whose adjoint did not converge raises :class:`~deqgen.stats.SolverError`
    from ``backward()``; with neither, a warning is logged.

    Args:
        solver: the backward solver (default ``Anderson(tol=1e-6, max_iter=50)``, relative stop test).
        recorder: called with each backward solution, e.g. a :class:`BackwardStatsRecorder`.
        throw: raise when the adjoint does not converge.
        init: the adjoint's start point: ``"grad"`` (``u0 = g``, the JFB answer, one Neumann term ahead) or
            ``"zero"``.
    """

    solver: Solver[Any] = dataclasses.field(default_factory=_default_adjoint_solver)
    recorder: Callable[[Solution], None] | None = None
    throw: bool = False
    init: Literal["grad", "zero"] = "grad"
    name: ClassVar[str] = "implicit"

    def __post_init__(self) -> None:
        if not isinstance(self.solver, Solver):
            raise TypeError(
                f"ImplicitDiff needs a deqgen Solver for the backward, got {type(self.solver).__name__}; "
                "e.g. ImplicitDiff(Anderson(tol=1e-6)), or gradients.get('implicit', solver='anderson')"
            )
        if self.recorder is not None and not callable(self.recorder):
            raise TypeError(f"ImplicitDiff recorder must be callable, got {type(self.recorder).__name__}")
        if self.init not in ("grad", "zero"):
            raise ValueError(f"ImplicitDiff got init={self.init!r}; use 'grad' or 'zero'")

    def attach(
        self, step: Step, z0: Tensor, solver: Solver[Any], generator: torch.Generator | None = None
    ) -> tuple[Tensor, GradInfo]:
        sol = forward_solve(step, z0, solver)
        return self.backprop_from(step, sol.z, sol.stats.iterations), GradInfo(sol.stats.iterations, 1, sol)

    def backprop_from(self, step: Step, z: Tensor, k: int) -> Tensor:
        z_star = z.detach().requires_grad_()
        fz = step(z_star, k)  # the one recorded step: graph to the parameters and x
        return _AdjointBackward.apply(fz, z_star, self, _compute_eps(fz))

    def adjoint_tol(self, eps: float) -> float | None:
        """The tolerance the backward uses when the step computes with machine epsilon ``eps``."""
        if self.solver.tol is None:
            return None
        return max(self.solver.tol, ROUNDING_FLOOR * eps)


def _compute_eps(fz: Tensor) -> float:
    """Machine epsilon of the lowest precision the step's backward runs in."""
    eps = torch.finfo(fz.dtype).eps
    dev = fz.device.type
    if torch.amp.is_autocast_available(dev) and torch.is_autocast_enabled(dev):
        eps = max(eps, torch.finfo(torch.get_autocast_dtype(dev)).eps)
    return eps


class _AdjointBackward(torch.autograd.Function):
    """Identity forward on ``f(z*)``; the backward replaces the incoming ``g`` by ``u = J^T u + g``."""

    @staticmethod
    def forward(ctx: Any, fz: Tensor, z_star: Tensor, method: ImplicitDiff, eps: float) -> Tensor:
        ctx.method, ctx.eps = method, eps
        ctx.save_for_backward(fz, z_star)
        return fz.detach().clone()

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None, None, None]:
        if torch.is_grad_enabled():  # create_graph=True: u's own dependence on theta and x would be dropped
            raise RuntimeError(
                "ImplicitDiff has no double backward (backward with create_graph=True, e.g. a gradient "
                "penalty or a Hessian-vector product); use Unrolled, JFB or Phantom for higher-order "
                "gradients"
            )
        fz, z_star = ctx.saved_tensors
        u = _solve_adjoint(fz, z_star, grad, ctx.method, ctx.eps)
        return u.to(fz.dtype), None, None, None


def _solve_adjoint(fz: Tensor, z_star: Tensor, grad: Tensor, method: ImplicitDiff, eps: float) -> Tensor:
    """``u: (B, *S)`` with ``u = J^T u + grad`` (``J = d fz / d z_star``), solved with ``method.solver``."""
    work = torch.promote_types(grad.dtype, torch.float32)
    g = grad.detach().to(work)
    ord_ = math.inf if method.solver.norm == "inf" else 2.0  # tol is relative to ||g|| in the solver's norm
    scale = torch.linalg.vector_norm(g.reshape(g.shape[0], -1), ord=ord_, dim=1)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale)).view(-1, *([1] * (g.dim() - 1)))
    g_unit = g / scale

    def adjoint(u: Tensor) -> Tensor:
        (jtu,) = torch.autograd.grad(fz, z_star, u.to(fz.dtype), retain_graph=True, allow_unused=True)
        return g_unit if jtu is None else jtu.to(u.dtype) + g_unit

    u0 = g_unit if method.init == "grad" else torch.zeros_like(g_unit)
    solver = dataclasses.replace(method.solver, tol=method.adjoint_tol(eps))
    sol = run(FixedPointProblem(adjoint, u0), solver)
    if method.recorder is not None:
        method.recorder(sol)
    if method.throw:
        try:
            sol.raise_for_status()
        except SolverError as err:
            raise SolverError(
                f"ImplicitDiff: the adjoint solve u = J^T u + g did not converge ({err}). Raise the backward "
                "solver's max_iter or tol, use Anderson, or check that f contracts at z*"
            ) from None
    elif method.recorder is None and solver.tol is not None and not sol.stats.all_converged:
        logger.warning(
            "ImplicitDiff: the adjoint solve did not converge (%s); gradients are approximate. Pass "
            "recorder= to inspect, throw=True to raise, or raise the backward solver's max_iter",
            sol.stats.summary(),
        )
    return sol.z * scale


_REGISTRY: Registry[GradientMethod] = Registry(
    "gradient method", (Unrolled, JFB, SJFB, Phantom, ImplicitDiff)
)
GRADIENTS = _REGISTRY.table
"""Read-only name -> gradient class table used by configs."""


def options(name: str) -> tuple[str, ...]:
    """The option names a gradient method accepts, e.g. ``options("sjfb") == ("no_grad", "with_grad")``."""
    return _REGISTRY.options(name)


def get(name: str, **opts: Any) -> GradientMethod:
    """Build a gradient method by name: ``get("sjfb", no_grad=(0, 10), with_grad=(1, 12))``.

    For ``"implicit"``, ``solver`` may also be a solver name or a mapping ``{"name": ..., **options}``, built
    with :func:`deqgen.solvers.get`: ``get("implicit", solver={"name": "anderson", "tol": 1e-6})``.

    Raises:
        ValueError: unknown name or bad value. TypeError: an option the method does not have.
    """
    cls = _REGISTRY.check_options(name, opts)
    if cls is ImplicitDiff and "solver" in opts:
        opts["solver"] = _solver_from_config(opts["solver"])
    return cls(**opts)


def _solver_from_config(spec: Any) -> Any:
    if isinstance(spec, str):
        return _solvers.get(spec)
    if isinstance(spec, Mapping):
        if "name" not in spec:
            raise ValueError(
                f"backward solver config {dict(spec)!r} needs a 'name' key, e.g. {{'name': 'anderson'}}"
            )
        rest = {k: v for k, v in spec.items() if k != "name"}
        return _solvers.get(spec["name"], **rest)
    return spec  # a Solver object, or something ImplicitDiff will reject with its own message
