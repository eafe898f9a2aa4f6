"""``ImplicitLayer``: an ``nn.Module`` that owns a map ``f``, forward solvers and a gradient method; and
``implicit_solve``, the same thing as a function."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from deqgen.gradients import SJFB, GradientMethod, GradInfo, forward_solve
from deqgen.nn.dropout import new_solve, solve_rows
from deqgen.nn.normalization import normalized_once
from deqgen.solvers.base import Solver
from deqgen.solvers.picard import Picard
from deqgen.tree import State, TreeSpec, is_structured, spec_of, take

__all__ = ["ImplicitLayer", "implicit_solve"]

logger = logging.getLogger(__name__)

States = int | Sequence[int] | None
"""Fixed-point correction: ``n`` evenly spaced states, or the evaluation counts to return states at."""


@dataclasses.dataclass
class _Call:
    """``step(z, k) = f(z, x, k)`` on the packed iterate: binds the injection so gradient methods see a
    one-argument map, and unpacks/packs a structured state.

    One is built per forward call (it holds that call's captures, never shared between calls).

    Attributes:
        f: the user's map ``f(z, x, k)``.
        x: the injection; with ``separable`` every tensor in it is indexed by ``rows``.
        spec: the structured state's spec, or None for a plain tensor state.
        separable: ``f`` is row-wise, so the solve may pass it only the rows still running.
        trace: the forward solve records residual traces.
        jacobian: capture the first recorded step after a no-grad phase as ``(fz, z_in)``.
        snapshot_at: evaluation counts at which to keep the iterate (fixed-point correction).
    """

    f: Callable[..., Any]
    x: Any
    spec: TreeSpec | None = None
    separable: bool = False
    trace: bool = False
    jacobian: bool = False
    snapshot_at: frozenset[int] = frozenset()
    snapshots: dict[int, Tensor] = dataclasses.field(default_factory=dict)
    last: Tensor | None = None  # (B, D) the last iterate seen per row (separable snapshots only)
    captured: tuple[Tensor, Tensor] | None = None
    saw_no_grad: bool = False

    def __call__(self, z: Tensor, k: int, rows: Tensor | None = None) -> Tensor:
        if torch.is_grad_enabled():
            if self.jacobian and self.saw_no_grad and self.captured is None and not z.requires_grad:
                z = z.detach().requires_grad_()
        else:
            self.saw_no_grad = True
            if self.snapshot_at and (k in self.snapshot_at or self.separable):
                self._snapshot(z, k, rows)
        fz = self._apply(z, k, rows)
        if self.jacobian and self.captured is None and self.saw_no_grad and z.requires_grad:
            self.captured = (fz, z)
        return fz

    def _apply(self, z: Tensor, k: int, rows: Tensor | None) -> Tensor:
        if not self.separable:
            return self._call_f(z, self.x, k)
        with solve_rows(self.f, rows):  # dropout masks follow the rows still running
            return self._call_f(z, take(self.x, rows), k)

    def _call_f(self, z: Tensor, x: Any, k: int) -> Tensor:
        if self.spec is None:
            return self.f(z, x, k)
        return self.spec.pack(self.f(self.spec.unpack(z), x, k), "f's output")

    def _snapshot(self, z: Tensor, k: int, rows: Tensor | None) -> None:
        if rows is not None:  # a separable solve passes the running rows only: keep the others' last iterate
            if self.last is None:
                raise AssertionError("the first evaluation of a solve sees every row")
            self.last = self.last.index_copy(0, rows, z.reshape(z.shape[0], -1))
        else:
            self.last = z.reshape(z.shape[0], -1)
        if k in self.snapshot_at:
            self.snapshots[k] = self.last.reshape(self.last.shape[0], *z.shape[1:]).clone()


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


def _state_counts(states: States, max_iter: int) -> tuple[int, ...]:
    """Evaluation counts of the trajectory states (see ``states`` in :func:`implicit_solve`)."""
    if states is None:
        return ()
    if isinstance(states, int) and not isinstance(states, bool):
        if states < 1:
            raise ValueError(
                f"states={states}; use an integer >= 1 (evenly spaced states) or a list of counts"
            )
        return tuple(math.ceil(max_iter * (i + 1) / states) for i in range(states))
    counts = tuple(states)
    if not counts or any(isinstance(c, bool) or not isinstance(c, int) or c < 1 for c in counts):
        raise ValueError(
            f"states={states!r}; use an integer >= 1 or a non-empty list of evaluation counts >= 1"
        )
    return counts


@contextlib.contextmanager
def _one_solve(f: Any, generator: torch.Generator | None) -> Iterator[None]:
    """Per forward solve: fresh dropout masks, and each normalised weight computed once."""
    new_solve(f, generator)
    with normalized_once(f):
        yield


def _pack(z0: State) -> tuple[Tensor, TreeSpec | None]:
    if is_structured(z0):
        spec = spec_of(z0, "z0")
        return spec.pack(z0, "z0"), spec
    if not isinstance(z0, Tensor):
        raise TypeError(
            f"z0 must be a tensor (B, *S) or a tuple/list/dict of tensors, got {type(z0).__name__}"
        )
    return z0, None


def _unpack_info(info: GradInfo, spec: TreeSpec | None, states: tuple[Tensor, ...]) -> GradInfo:
    out = tuple(states) if spec is None else tuple(spec.unpack(s) for s in states)
    if spec is None or info.forward is None:
        return dataclasses.replace(info, states=out)
    forward = dataclasses.replace(info.forward, z=spec.unpack(info.forward.z))
    return dataclasses.replace(info, forward=forward, states=out)


def implicit_solve(
    f: Callable[..., Any],
    x: Any,
    z0: State,
    gradient: GradientMethod,
    solver: Solver[Any],
    *,
    generator: torch.Generator | None = None,
    separable: bool = False,
    trace: bool = False,
    jacobian: bool = False,
    states: States = None,
) -> tuple[State, GradInfo]:
    """Solve ``z* = f(z*, x, k)`` and attach ``gradient``'s backward: the functional form of
    :class:`ImplicitLayer` in training mode.

    Args:
        f: the map ``f(z, x, k) -> (B, *S)``; ``k`` is the iteration number.
        x: the injection, passed to ``f`` unchanged; gradients reach it through the recorded steps.
        z0: start point ``(B, *S)``, or a tuple/list/dict of tensors sharing the batch dim (``f`` then takes
            and returns that structure; see :mod:`deqgen.tree`). Only
            :class:`~deqgen.gradients.Unrolled` differentiates through it.
        gradient: a :class:`~deqgen.gradients.GradientMethod`.
        solver: the forward solver (S-JFB uses its type for ``k1`` fixed-budget evaluations).
        generator: random source for stochastic gradient methods (S-JFB's ``k1``, ``k2``) and for the
            masks of :class:`~deqgen.nn.VariationalDropout` modules inside ``f``.
        separable: ``f`` is row-wise (row ``b`` of its output depends only on row ``b`` of ``z`` and of
            every tensor in ``x``): the forward solve passes it only the rows still running, with ``x``'s
            tensors indexed to match, so converged rows are never evaluated again.
        trace: the forward solve records residual traces (``info.forward.stats.abs_trace``, ``(K, B)``).
        jacobian: return one recorded step at the answer as ``info.jacobian_step = (fz, z_in)`` (packed
            ``(B, D)``, ``z_in`` requiring grad) for :func:`deqgen.regularization.jac_reg`. It reuses the
            gradient method's first recorded step after the forward solve (no extra evaluation of ``f``);
            None for ``Unrolled`` or an S-JFB draw with ``k1 = 0``.
        states: fixed-point correction (Bai et al., CVPR 2022, "Deep equilibrium optical flow estimation"):
            ``n`` returns ``n`` states at evenly spaced evaluation counts ``ceil(max_iter * i / n)``; a list
            returns the states after those counts. A count at or past the end of the solve gives the answer
            ``z``. Each state carries the gradient method's backward from that state (JFB, Phantom or
            ImplicitDiff). They are in ``info.states``; weight their losses with
            :func:`deqgen.regularization.fp_correction`.

    Returns:
        ``(z, info)``: ``z: (B, *S)`` (or the structure of ``z0``) with the method's graph (detached if grad
        mode is off), and :class:`~deqgen.gradients.GradInfo` (``no_grad_steps``, ``grad_steps``, the forward
        ``Solution``, and ``jacobian_step`` / ``states`` when asked).
    """
    if not isinstance(gradient, GradientMethod):
        raise TypeError(
            f"gradient must be a deqgen GradientMethod (JFB, SJFB, ...), got {type(gradient).__name__}"
        )
    z0_flat, spec = _pack(z0)
    counts = _state_counts(states, solver.max_iter)
    if counts and type(gradient).backprop_from is GradientMethod.backprop_from:
        gradient.backprop_from(_Call(f, x), z0_flat, 0)  # raises: the method has no backward from a state
    step = _Call(f, x, spec, separable, trace, jacobian, frozenset(counts))
    with _one_solve(f, generator):
        z, info = gradient.attach(step, z0_flat, solver, generator)
        done = info.no_grad_steps
        trajectory = tuple(
            z if n >= done or n not in step.snapshots else gradient.backprop_from(step, step.snapshots[n], n)
            for n in counts
        )
    info = dataclasses.replace(info, jacobian_step=step.captured)
    return (z if spec is None else spec.unpack(z)), _unpack_info(info, spec, trajectory)


class ImplicitLayer(nn.Module):
    """``z* = f(z*, x)`` as a layer: solve in the forward, differentiate with a chosen gradient method.

    ``f`` is called as ``f(z, x, k)`` with ``z: (B, *S)`` (or a tuple/list/dict of tensors sharing ``B``, see
    :mod:`deqgen.tree`), the injection ``x`` (anything, passed through) and the iteration number ``k``
    (0, 1, ...; VIAR keys its attention cache by it). The recorded steps of a gradient method continue the
    count of the solve before them. If ``f`` is an ``nn.Module`` it is registered as a submodule, so its
    parameters belong to this layer (and to a DDP wrapper around it).

    Each forward is one solve for the parts of :mod:`deqgen.nn` inside ``f``: every
    :class:`~deqgen.nn.VariationalDropout` draws one mask (from ``generator``) shared by all iterations and
    recorded steps, and every weight/spectral-normalised weight is computed once, with its graph.

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
        separable: ``f`` is row-wise, so converged rows are never evaluated again, in training and eval
            (``info.forward.stats.rows_evaluated / B`` is then the mean per-sample NFE); see
            :func:`implicit_solve`.
        trace: record the forward solve's residual traces ``(K, B)`` in ``info.forward.stats``.
        jacobian: in training, return ``info.jacobian_step`` for Jacobian regularisation (see
            :func:`implicit_solve`).
        states: fixed-point correction: return trajectory states in ``info.states`` (see
            :func:`implicit_solve`).

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
        f: Callable[..., Any],
        gradient: GradientMethod | None = None,
        train_solver: Solver[Any] | int | None = None,
        eval_solver: Solver[Any] | int | None = None,
        *,
        separable: bool = False,
        trace: bool = False,
        jacobian: bool = False,
        states: States = None,
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
        self.separable, self.trace, self.jacobian = bool(separable), bool(trace), bool(jacobian)
        _state_counts(states, self.train_solver.max_iter)  # validate now
        self.states = states

    def forward(self, x: Any, z0: State, generator: torch.Generator | None = None) -> tuple[State, GradInfo]:
        """Solve for ``z*``.

        Args:
            x: the injection, passed to ``f`` unchanged (e.g. ``(B, L, C)``).
            z0: start point ``(B, *S)``, or a structured state.
            generator: random source for stochastic gradient methods (S-JFB needs one in training) and
                for dropout masks.

        Returns:
            ``(z, info)``: ``z: (B, *S)`` (or ``z0``'s structure) with the gradient method's graph in
            training, detached otherwise.
        """
        if self.training and torch.is_grad_enabled():
            return implicit_solve(
                self.f,
                x,
                z0,
                self.gradient,
                self.train_solver,
                generator=generator,
                separable=self.separable,
                trace=self.trace,
                jacobian=self.jacobian,
                states=self.states,
            )
        return self._solve_detached(x, z0, generator)

    def _solve_detached(self, x: Any, z0: State, generator: torch.Generator | None) -> tuple[State, GradInfo]:
        z0_flat, spec = _pack(z0)
        counts = _state_counts(self.states, self.eval_solver.max_iter)
        step = _Call(self.f, x, spec, self.separable, self.trace, snapshot_at=frozenset(counts))
        with _one_solve(self.f, generator):
            sol = forward_solve(step, z0_flat, self.eval_solver)
        done = sol.stats.iterations
        trajectory = tuple(sol.z if n >= done else step.snapshots[n] for n in counts)
        info = _unpack_info(GradInfo(done, 0, sol), spec, trajectory)
        return info.forward.z if info.forward is not None else sol.z, info

    def extra_repr(self) -> str:
        solvers = f"train_solver={self.train_solver!r}, eval_solver={self.eval_solver!r}"
        extra = "".join(
            f", {name}=True" for name in ("separable", "trace", "jacobian") if getattr(self, name)
        )
        return f"gradient={self.gradient!r}, {solvers}{extra}"
