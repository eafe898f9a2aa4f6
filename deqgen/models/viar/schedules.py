"""Per-scale iteration schedules for VIAR sampling, usable from Python, YAML and the CLI.

A schedule says how many implicit-block applications ``K_s`` each scale gets, or (``Adaptive``) a tolerance
at which each sample stops. ``solver_for_scale`` turns it into the deqgen solver for scale ``s``. deqgen's
``Picard(tol=None, max_iter=K)`` applies the block exactly ``K`` times (the official behaviour), so
``K_s`` is the solver's ``max_iter``.

Spec strings: ``constant:10``, ``linear:10:5`` (rounded), ``linear:10:5:floor`` (the official
``linspace(...).astype(int)``), ``list:10,9,8``, ``adaptive:1e-3:20``.
"""

from __future__ import annotations

import abc
import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from deqgen.solvers.base import Solver
from deqgen.solvers.picard import Picard

__all__ = ["Schedule", "Constant", "Linear", "Explicit", "Adaptive", "parse_schedule"]


def _pos_int(name: str, v: object) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise ValueError(f"{name} must be an int >= 1, got {v!r}")
    return v


class Schedule(abc.ABC):
    """Base class: ``iterations(S)`` gives ``K_s`` per scale; ``solver_for_scale`` the solver."""

    @abc.abstractmethod
    def iterations(self, num_scales: int) -> tuple[int, ...]:
        """``K_s`` for each of ``num_scales`` scales (the budget for :class:`Adaptive`)."""

    @abc.abstractmethod
    def to_spec(self) -> str:
        """The spec string that :func:`parse_schedule` turns back into this schedule."""

    def solver_for_scale(self, si: int, num_scales: int, base: Solver[Any] | None = None) -> Solver[Any]:
        """``K_s`` fixed applications: ``Picard(tol=None, max_iter=K_s)``, or ``base``'s type with that budget."""
        k = self.iterations(num_scales)[si]
        if base is None:
            return Picard(tol=None, max_iter=k)
        return dataclasses.replace(base, tol=None, max_iter=k)


@dataclass(frozen=True)
class Constant(Schedule):
    """``k`` applications at every scale."""

    k: int

    def __post_init__(self) -> None:
        _pos_int("Constant.k", self.k)

    def iterations(self, num_scales: int) -> tuple[int, ...]:
        return (self.k,) * num_scales

    def to_spec(self) -> str:
        return f"constant:{self.k}"


@dataclass(frozen=True)
class Linear(Schedule):
    """``first`` at the coarsest scale to ``last`` at the finest, linearly.

    ``rounding="round"`` rounds half up; ``"floor"`` truncates like the official
    ``numpy.linspace(first, last, S).astype(int)`` (10 -> 5 over 10 scales gives [10, 9, 8, 8, 7, 7, 6, 6, 5, 5]).
    """

    first: int
    last: int
    rounding: Literal["round", "floor"] = "round"

    def __post_init__(self) -> None:
        _pos_int("Linear.first", self.first)
        _pos_int("Linear.last", self.last)
        if self.rounding not in ("round", "floor"):
            raise ValueError(f"Linear.rounding must be 'round' or 'floor', got {self.rounding!r}")

    def iterations(self, num_scales: int) -> tuple[int, ...]:
        vals = np.linspace(self.first, self.last, num_scales)
        out = vals.astype(int) if self.rounding == "floor" else np.floor(vals + 0.5).astype(int)
        return tuple(max(1, int(v)) for v in out)

    def to_spec(self) -> str:
        return f"linear:{self.first}:{self.last}" + (":floor" if self.rounding == "floor" else "")


@dataclass(frozen=True)
class Explicit(Schedule):
    """One count per scale."""

    per_scale: tuple[int, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "per_scale", tuple(self.per_scale))
        if not self.per_scale:
            raise ValueError("Explicit schedule needs at least one count")
        for i, k in enumerate(self.per_scale):
            _pos_int(f"Explicit.per_scale[{i}]", k)

    def iterations(self, num_scales: int) -> tuple[int, ...]:
        if len(self.per_scale) != num_scales:
            raise ValueError(f"schedule lists {len(self.per_scale)} counts but the model has {num_scales} scales")
        return self.per_scale

    def to_spec(self) -> str:
        return "list:" + ",".join(map(str, self.per_scale))


@dataclass(frozen=True)
class Adaptive(Schedule):
    """Each sample stops at a scale once its relative residual is below ``tol`` (at most ``max_iter``)."""

    tol: float
    max_iter: int = 20

    def __post_init__(self) -> None:
        if not self.tol > 0:
            raise ValueError(f"Adaptive.tol must be > 0, got {self.tol}")
        _pos_int("Adaptive.max_iter", self.max_iter)

    def iterations(self, num_scales: int) -> tuple[int, ...]:
        return (self.max_iter,) * num_scales

    def solver_for_scale(self, si: int, num_scales: int, base: Solver[Any] | None = None) -> Solver[Any]:
        """``base``'s type (Picard by default) with ``tol``, relative stopping and the ``max_iter`` budget."""
        base = base if base is not None else Picard()
        return dataclasses.replace(base, tol=self.tol, stop_mode="rel", max_iter=self.max_iter)

    def to_spec(self) -> str:
        return f"adaptive:{self.tol:g}:{self.max_iter}"


_FORMS = "constant:K, linear:FIRST:LAST[:floor], list:K1,K2,..., adaptive:TOL:MAX_ITER"


def parse_schedule(spec: Schedule | str | Mapping[str, Any] | int) -> Schedule:
    """A :class:`Schedule` from an object, an int (constant), a spec string or a ``{"kind": ...}`` mapping."""
    if isinstance(spec, Schedule):
        return spec
    if isinstance(spec, int) and not isinstance(spec, bool):
        return Constant(spec)
    if isinstance(spec, Mapping):
        d = dict(spec)
        kind = d.pop("kind", None)
        table = {"constant": Constant, "linear": Linear, "list": Explicit, "adaptive": Adaptive}
        if kind not in table:
            raise ValueError(f"schedule kind {kind!r} is not one of {sorted(table)}")
        try:
            return table[kind](**d)
        except TypeError as e:
            raise ValueError(f"schedule {spec!r}: {e}") from None
    if not isinstance(spec, str):
        raise TypeError(f"schedule must be a Schedule, int, str or mapping, got {type(spec).__name__}")
    kind, _, rest = spec.strip().partition(":")
    parts = rest.split(":") if rest else []
    try:
        if kind == "constant" and len(parts) == 1:
            return Constant(int(parts[0]))
        if kind == "linear" and len(parts) in (2, 3):
            rounding = parts[2] if len(parts) == 3 else "round"
            return Linear(int(parts[0]), int(parts[1]), rounding)  # type: ignore[arg-type]
        if kind == "list" and len(parts) == 1:
            return Explicit(tuple(int(p) for p in parts[0].split(",")))
        if kind == "adaptive" and len(parts) in (1, 2):
            return Adaptive(float(parts[0]), int(parts[1]) if len(parts) == 2 else 20)
    except ValueError as e:
        raise ValueError(f"bad schedule {spec!r}: {e}; accepted forms: {_FORMS}") from None
    raise ValueError(f"bad schedule {spec!r}; accepted forms: {_FORMS}")
