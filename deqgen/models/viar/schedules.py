"""Per-scale iteration schedules for VIAR sampling, usable from Python, YAML and the CLI.

A schedule says how many implicit-block applications ``K_s`` each scale ``s`` gets (:class:`Constant`,
:class:`Linear`, :class:`Explicit`, :class:`Budget`), or a tolerance at which each sample stops
(:class:`Adaptive`). Every schedule works for any number of scales (the official code hard-codes 10).
:meth:`Schedule.solver_for_scale` turns a schedule into the deqgen solver used at one scale.

**What "K iterations" means.** deqgen's :func:`~deqgen.solvers.run` with ``tol=None`` (the fixed-budget
mode) evaluates the map exactly ``max_iter`` times, steps after every evaluation, and returns the last
step's result: ``Picard(tol=None, max_iter=K)`` returns ``f^K(z0)``, the official ``K`` applications
``z <- Block(P([z; inj]))`` (and the iteration-keyed KV cache gets entries ``0 .. K-1``). So ``K_s`` is the
solver's ``max_iter``, one to one. With a tolerance (:class:`Adaptive`, or a base solver that has one),
``max_iter`` is the most evaluations per sample, and the solver returns each sample's lowest-residual
*evaluated* iterate (an input of ``f``): a sample that converges at evaluation ``j`` (1-based) comes back as
``z_{j-1}``, ``j - 1`` applications and ``j`` evaluations.

Spec strings (:func:`parse_schedule`, :meth:`Schedule.to_spec`)::

    constant:10                     10 at every scale
    linear:10:5                     10 -> 5, rounded half away from zero (exact rational arithmetic)
    linear:10:5:floor               the official numpy.linspace(10, 5, S).astype(int)
    list:10,9,8                     one count per scale
    adaptive:1e-3:20                stop a sample once its relative residual <= 1e-3, at most 20 evaluations
    adaptive:1e-3:20:abs:anderson   ... absolute residual, Anderson
    budget:60:uniform               60 iterations in total, split by a rule (see :class:`Budget`)
    budget:60:inverse_tokens:1,2,3,4,5,6,8,10,13,16
"""

from __future__ import annotations

import abc
import dataclasses
import math
import numbers
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from fractions import Fraction
from typing import Any, ClassVar, Literal

from deqgen import solvers as _solvers
from deqgen.solvers import SOLVERS
from deqgen.solvers.base import Solver
from deqgen.solvers.picard import Picard

__all__ = [
    "ACCEPTED_FORMS",
    "BUDGET_RULES",
    "Adaptive",
    "Budget",
    "Constant",
    "Explicit",
    "Linear",
    "Schedule",
    "parse_schedule",
]

ACCEPTED_FORMS = (
    "constant:K | linear:FIRST:LAST[:round|floor] | list:K1,K2,... | "
    "adaptive:TOL:MAX_ITER[:rel|abs][:picard|anderson|broyden] | budget:TOTAL:RULE[:P1,P2,...] "
    '(or a mapping such as {"kind": "linear", "first": 10, "last": 5})'
)
"""The spec forms :func:`parse_schedule` accepts, quoted in its error messages."""

BUDGET_RULES = ("uniform", "coarse_heavy", "fine_heavy", "tokens", "inverse_tokens")
"""The split rules of :class:`Budget`; the last two need ``patch_nums``."""


def _count(name: str, v: object) -> int:
    """``v`` as a Python int ``>= 1`` (integral types such as numpy ints are accepted, bools are not).

    Schedules mostly come from YAML and the command line, so a bad type and a bad value raise the same
    ValueError (deqgen's solvers raise TypeError for a wrong type).
    """
    if isinstance(v, bool) or not isinstance(v, numbers.Integral):
        raise ValueError(f"{name} must be an int >= 1, got {v!r} ({type(v).__name__})")  # noqa: TRY004
    if int(v) < 1:
        raise ValueError(f"{name} must be an int >= 1, got {int(v)}")
    return int(v)


def _counts(name: str, v: object) -> tuple[int, ...]:
    """``v`` (a non-empty sequence or array of ints ``>= 1``) as a tuple of Python ints."""
    if isinstance(v, (str, bytes, Mapping)) or not hasattr(v, "__iter__"):
        raise ValueError(f"{name} must be a sequence of ints >= 1, got {v!r}")
    out = tuple(_count(f"{name}[{i}]", k) for i, k in enumerate(v))  # type: ignore[attr-defined]
    if not out:
        raise ValueError(f"{name} needs at least one count")
    return out


def _num_scales(num_scales: object) -> int:
    return _count("num_scales", num_scales)


class Schedule(abc.ABC):
    """A per-scale iteration schedule.

    Subclasses are frozen dataclasses. ``iterations(S)`` gives ``K_s`` for each of ``S`` scales (the budget,
    ``max_iter``, for :class:`Adaptive`); ``solver_for_scale`` gives the solver for one scale.
    """

    kind: ClassVar[str]

    @abc.abstractmethod
    def iterations(self, num_scales: int) -> tuple[int, ...]:
        """``K_s >= 1`` for each of ``num_scales`` scales, coarse to fine.

        Args:
            num_scales: the number of scales ``S`` (``len(patch_nums)``), ``>= 1``.

        Returns:
            A tuple of ``S`` ints.

        Raises:
            ValueError: ``num_scales`` does not fit the schedule (e.g. an :class:`Explicit` list of another
                length).
        """

    @abc.abstractmethod
    def to_spec(self) -> str:
        """The canonical spec string; ``parse_schedule(s.to_spec()) == s``."""

    def solver_for_scale(self, si: int, num_scales: int, base: Solver[Any] | None = None) -> Solver[Any]:
        """The solver that runs scale ``si``: a budget of ``max_iter = K_si`` evaluations.

        Args:
            si: scale index in ``[0, num_scales)``.
            num_scales: number of scales ``S``.
            base: ``None`` for the official fixed-count Picard, ``Picard(tol=None, max_iter=K_si)`` (exactly
                ``K_si`` applications); or a deqgen solver whose type and other fields are kept, with
                ``tol=None`` and ``max_iter=K_si``: a fixed-count schedule always means exactly ``K_si``
                evaluations. For per-sample early stopping use :class:`Adaptive`.

        Returns:
            A deqgen solver.
        """
        k = self.iterations(num_scales)[_check_si(si, num_scales)]
        if base is None:
            return Picard(tol=None, max_iter=k)
        _check_base(base)
        return dataclasses.replace(base, tol=None, max_iter=k)


def _check_si(si: object, num_scales: int) -> int:
    _num_scales(num_scales)
    if isinstance(si, bool) or not isinstance(si, numbers.Integral) or not 0 <= int(si) < num_scales:
        raise ValueError(f"scale index {si!r} is outside [0, {num_scales})")
    return int(si)


def _check_base(base: object) -> None:
    if not isinstance(base, Solver):
        raise TypeError(
            f"base must be a deqgen Solver (Picard, Anderson, Broyden) or None, got {type(base).__name__}"
        )


@dataclass(frozen=True)
class Constant(Schedule):
    """``k`` applications at every scale (the official default and FID setting is ``Constant(10)``).

    Attributes:
        k: iterations per scale, ``>= 1``.
    """

    k: int
    kind: ClassVar[str] = "constant"

    def __post_init__(self) -> None:
        object.__setattr__(self, "k", _count("Constant.k", self.k))

    def iterations(self, num_scales: int) -> tuple[int, ...]:
        return (self.k,) * _num_scales(num_scales)

    def to_spec(self) -> str:
        return f"constant:{self.k}"


def _linspace_floor(first: int, last: int, num: int) -> list[int]:
    """``numpy.linspace(first, last, num).astype(int)`` in float64, operation for operation.

    numpy computes ``step = (last - first) / (num - 1)``, then ``arange(num) * step + first`` and sets the
    last element to ``last``; ``astype(int)`` truncates toward zero. Python floats are IEEE float64, so the
    same operations give the same bits (checked against numpy in the tests).
    """
    if num == 1:
        return [first]
    step = float(last - first) / float(num - 1)
    vals = [float(s) * step + float(first) for s in range(num - 1)] + [float(last)]
    return [math.trunc(v) for v in vals]


def _linspace_round(first: int, last: int, num: int) -> list[int]:
    """``first + (last - first) * s / (num - 1)`` rounded half away from zero, computed exactly.

    With ``d = num - 1`` the value is ``q / d`` for the integer ``q = first * d + (last - first) * s >= d``
    (both ends are ``>= 1``), and rounding half away from zero of a positive ``q / d`` is
    ``floor((2q + d) / 2d)``.
    """
    if num == 1:
        return [first]
    d = num - 1
    return [(2 * (first * d + (last - first) * s) + d) // (2 * d) for s in range(num)]


@dataclass(frozen=True)
class Linear(Schedule):
    """``first`` iterations at the coarsest scale to ``last`` at the finest, linearly in the scale index.

    ``K_s = first + (last - first) * s / (S - 1)`` (``first`` when ``S == 1``), made an integer by:

    * ``"round"`` (default): round half away from zero, in exact rational arithmetic (no float ties);
      10 -> 5 over 10 scales gives ``[10, 9, 9, 8, 8, 7, 7, 6, 6, 5]``.
    * ``"floor"``: truncate exactly like the official ``numpy.linspace(first, last, S).astype(int)``, float64
      rounding included; 10 -> 5 gives ``[10, 9, 8, 8, 7, 7, 6, 6, 5, 5]``, 6 -> 1 gives
      ``[6, 5, 4, 4, 3, 3, 2, 2, 1, 1]``. Unlike the official code, it uses the model's number of scales.

    Attributes:
        first: iterations at scale 0, ``>= 1``.
        last: iterations at the last scale, ``>= 1``.
        rounding: ``"round"`` or ``"floor"``.
    """

    first: int
    last: int
    rounding: Literal["round", "floor"] = "round"
    kind: ClassVar[str] = "linear"

    def __post_init__(self) -> None:
        object.__setattr__(self, "first", _count("Linear.first", self.first))
        object.__setattr__(self, "last", _count("Linear.last", self.last))
        if self.rounding not in ("round", "floor"):
            raise ValueError(f"Linear.rounding must be 'round' or 'floor', got {self.rounding!r}")

    def iterations(self, num_scales: int) -> tuple[int, ...]:
        fn = _linspace_floor if self.rounding == "floor" else _linspace_round
        return tuple(fn(self.first, self.last, _num_scales(num_scales)))

    def to_spec(self) -> str:
        return f"linear:{self.first}:{self.last}" + (":floor" if self.rounding == "floor" else "")


@dataclass(frozen=True)
class Explicit(Schedule):
    """One count per scale, coarse to fine; its length must equal the model's number of scales.

    Attributes:
        per_scale: ``K_s`` for each scale, each ``>= 1`` (a list is converted to a tuple).
    """

    per_scale: tuple[int, ...]
    kind: ClassVar[str] = "list"

    def __post_init__(self) -> None:
        object.__setattr__(self, "per_scale", _counts("Explicit.per_scale", self.per_scale))

    def iterations(self, num_scales: int) -> tuple[int, ...]:
        if len(self.per_scale) != _num_scales(num_scales):
            raise ValueError(
                f"schedule lists {len(self.per_scale)} counts but the model has {num_scales} scales"
            )
        return self.per_scale

    def to_spec(self) -> str:
        return "list:" + ",".join(map(str, self.per_scale))


@dataclass(frozen=True)
class Adaptive(Schedule):
    """Each sample stops at a scale once its residual is ``<= tol``, after at most ``max_iter`` evaluations.

    Per-sample stopping is the solver's job: :meth:`solver_for_scale` returns a deqgen solver with
    ``tol``, ``stop_mode`` and ``max_iter`` set. ``iterations`` reports the budget ``max_iter`` per scale.

    Attributes:
        tol: positive, finite tolerance.
        max_iter: most evaluations per sample and scale, ``>= 1``.
        stop_mode: ``"rel"`` (``||f(z) - z|| / ||f(z)||``, default) or ``"abs"``.
        solver: a solver name (``"picard"``, ``"anderson"``, ``"broyden"``), or ``None`` for the ``base``
            solver's type (Picard when there is none).
    """

    tol: float
    max_iter: int = 20
    stop_mode: Literal["rel", "abs"] = "rel"
    solver: str | None = None
    kind: ClassVar[str] = "adaptive"

    def __post_init__(self) -> None:
        if isinstance(self.tol, bool) or not isinstance(self.tol, numbers.Real):
            raise ValueError(f"Adaptive.tol must be a positive finite number, got {self.tol!r}")  # noqa: TRY004
        tol = float(self.tol)
        if not (tol > 0 and math.isfinite(tol)):
            raise ValueError(f"Adaptive.tol must be a positive finite number, got {self.tol!r}")
        object.__setattr__(self, "tol", tol)
        object.__setattr__(self, "max_iter", _count("Adaptive.max_iter", self.max_iter))
        if self.stop_mode not in ("rel", "abs"):
            raise ValueError(f"Adaptive.stop_mode must be 'rel' or 'abs', got {self.stop_mode!r}")
        if self.solver is not None:
            if not isinstance(self.solver, str) or self.solver.strip().lower() not in SOLVERS:
                raise ValueError(
                    f"Adaptive.solver must be one of {sorted(SOLVERS)} or None, got {self.solver!r}"
                )
            object.__setattr__(self, "solver", self.solver.strip().lower())

    def iterations(self, num_scales: int) -> tuple[int, ...]:
        return (self.max_iter,) * _num_scales(num_scales)

    def solver_for_scale(self, si: int, num_scales: int, base: Solver[Any] | None = None) -> Solver[Any]:
        """The same solver at every scale: ``tol``, ``stop_mode`` and ``max_iter`` from the schedule.

        Args:
            si: scale index in ``[0, num_scales)``.
            num_scales: number of scales.
            base: a solver whose type and other fields (``m``, ``damping``, ``norm``, ...) are kept; its
                ``tol``, ``stop_mode`` and ``max_iter`` are replaced. ``None``: the named ``solver`` with its
                defaults (Picard when unnamed).

        Raises:
            ValueError: ``solver`` names a type other than ``base``'s.
        """
        _check_si(si, num_scales)
        fields = {"tol": self.tol, "stop_mode": self.stop_mode, "max_iter": self.max_iter}
        if base is None:
            return _solvers.get(self.solver or "picard", **fields)
        _check_base(base)
        if self.solver is not None and base.name != self.solver:
            raise ValueError(
                f"the adaptive schedule names solver {self.solver!r} but the sampler was given "
                f"{type(base).__name__}; drop one of the two"
            )
        return dataclasses.replace(base, **fields)

    def to_spec(self) -> str:
        spec = f"adaptive:{self.tol!r}:{self.max_iter}"
        if self.stop_mode != "rel":
            spec += f":{self.stop_mode}"
        return spec + (f":{self.solver}" if self.solver else "")


def _apportion(total: int, weights: Sequence[Fraction]) -> list[int]:
    """Split ``total >= len(weights)`` into ints ``>= 1`` proportional to positive ``weights``.

    Scales whose quota ``total * w_s / sum(w)`` is below 1 get exactly 1 and leave the pool; this repeats with
    the rest (at least one quota is always >= 1, since the remaining total is at least the number of
    remaining scales). The remaining quotas are all >= 1; each scale gets its floor, and the leftover goes one
    by one to the largest fractional parts, ties to the coarser scale (largest-remainder rounding). Exact
    rational arithmetic: the sum is ``total``.
    """
    out = [0] * len(weights)
    free = list(range(len(weights)))
    while True:
        rest = total - (len(weights) - len(free))
        wsum = sum(weights[s] for s in free)
        low = [s for s in free if rest * weights[s] < wsum]
        if not low:
            break
        for s in low:
            out[s] = 1
        free = [s for s in free if s not in low]
    quotas = {s: rest * weights[s] / wsum for s in free}
    for s in free:
        out[s] = math.floor(quotas[s])
    leftover = rest - sum(out[s] for s in free)
    for s in sorted(free, key=lambda s: (-(quotas[s] - out[s]), s))[:leftover]:
        out[s] += 1
    return out


@dataclass(frozen=True)
class Budget(Schedule):
    """A total of ``total`` iterations split across the scales (``sum(K_s) == total``, every ``K_s >= 1``).

    The split is proportional to a weight per scale, with scales whose share is below one raised to one and
    largest-remainder rounding (ties to the coarser scale); see :func:`_apportion`. Rules, for scale ``s`` of
    ``S`` with ``p_s`` tokens per side:

    * ``"uniform"``: ``w_s = 1``, equal counts (``total / S`` when it divides).
    * ``"coarse_heavy"``: ``w_s = S - s``, linearly more iterations at the coarse scales, which have few
      tokens and so cost little per iteration.
    * ``"fine_heavy"``: ``w_s = s + 1``.
    * ``"tokens"``: ``w_s = p_s ** 2``, iterations proportional to the scale's token count.
    * ``"inverse_tokens"``: ``w_s = 1 / p_s ** 2``, about the same block compute (``K_s * p_s ** 2``) at every
      scale, within the ``K_s >= 1`` floor.

    Attributes:
        total: the total number of iterations, at least the number of scales.
        rule: one of :data:`BUDGET_RULES`.
        patch_nums: tokens per side of each scale; required by ``"tokens"`` and ``"inverse_tokens"``, optional
            (a consistency check) for the other rules. When given, its length must equal the number of scales.
    """

    total: int
    rule: Literal["uniform", "coarse_heavy", "fine_heavy", "tokens", "inverse_tokens"] = "uniform"
    patch_nums: tuple[int, ...] | None = None
    kind: ClassVar[str] = "budget"

    def __post_init__(self) -> None:
        object.__setattr__(self, "total", _count("Budget.total", self.total))
        if self.rule not in BUDGET_RULES:
            raise ValueError(f"Budget.rule must be one of {list(BUDGET_RULES)}, got {self.rule!r}")
        if self.patch_nums is not None:
            object.__setattr__(self, "patch_nums", _counts("Budget.patch_nums", self.patch_nums))
        elif self.rule in ("tokens", "inverse_tokens"):
            raise ValueError(f"Budget rule {self.rule!r} needs patch_nums (tokens per side of each scale)")

    def _weights(self, num_scales: int) -> list[Fraction]:
        if self.patch_nums is not None and len(self.patch_nums) != num_scales:
            raise ValueError(
                f"budget patch_nums has {len(self.patch_nums)} scales but the model has {num_scales} scales"
            )
        if self.rule == "uniform":
            return [Fraction(1)] * num_scales
        if self.rule == "coarse_heavy":
            return [Fraction(num_scales - s) for s in range(num_scales)]
        if self.rule == "fine_heavy":
            return [Fraction(s + 1) for s in range(num_scales)]
        assert self.patch_nums is not None  # checked in __post_init__
        if self.rule == "tokens":
            return [Fraction(p * p) for p in self.patch_nums]
        return [Fraction(1, p * p) for p in self.patch_nums]

    def iterations(self, num_scales: int) -> tuple[int, ...]:
        S = _num_scales(num_scales)
        if self.total < S:
            raise ValueError(
                f"budget total {self.total} is less than the {S} scales; every scale needs at least one iteration"
            )
        return tuple(_apportion(self.total, self._weights(S)))

    def to_spec(self) -> str:
        spec = f"budget:{self.total}:{self.rule}"
        return spec + (":" + ",".join(map(str, self.patch_nums)) if self.patch_nums is not None else "")


_KINDS: dict[str, type[Schedule]] = {
    "constant": Constant,
    "linear": Linear,
    "list": Explicit,
    "explicit": Explicit,
    "adaptive": Adaptive,
    "budget": Budget,
}


class _SpecError(ValueError):
    """A spec error whose message already names the spec and lists the accepted forms."""


def _bad(spec: object, why: str) -> _SpecError:
    return _SpecError(f"bad schedule {spec!r}: {why}; accepted forms: {ACCEPTED_FORMS}")


def _int(spec: str, what: str, text: str) -> int:
    try:
        return int(text.strip())
    except ValueError:
        raise _bad(spec, f"{what} {text!r} is not an integer") from None


def _ints(spec: str, what: str, text: str) -> tuple[int, ...]:
    return tuple(_int(spec, f"{what} entry", p) for p in text.split(","))


def _float(spec: object, what: str, text: str) -> float:
    try:
        return float(text.strip())
    except ValueError:
        raise _bad(spec, f"{what} {text!r} is not a number") from None


def _parse_string(spec: str) -> Schedule:
    kind, *parts = [p.strip() for p in spec.strip().split(":")]
    kind = kind.lower()
    n = len(parts)
    if kind == "constant":
        if n != 1:
            raise _bad(spec, f"constant takes K, got {n} part(s)")
        return Constant(_int(spec, "K", parts[0]))
    if kind == "linear":
        if n not in (2, 3):
            raise _bad(spec, f"linear takes FIRST:LAST[:round|floor], got {n} part(s)")
        rounding = parts[2].lower() if n == 3 else "round"
        if rounding not in ("round", "floor"):
            raise _bad(spec, f"rounding {parts[2]!r} is not 'round' or 'floor'")
        return Linear(_int(spec, "FIRST", parts[0]), _int(spec, "LAST", parts[1]), rounding)  # type: ignore[arg-type]
    if kind in ("list", "explicit"):
        if n != 1 or not parts[0]:
            raise _bad(spec, "list takes comma-separated counts K1,K2,...")
        return Explicit(_ints(spec, "list", parts[0]))
    if kind == "adaptive":
        if n < 2 or n > 4:
            raise _bad(spec, f"adaptive takes TOL:MAX_ITER[:rel|abs][:SOLVER], got {n} part(s)")
        stop_mode, solver = "rel", None
        for extra in parts[2:]:
            word = extra.lower()
            if word in ("rel", "abs"):
                stop_mode = word
            elif word in SOLVERS:
                solver = word
            else:
                raise _bad(
                    spec, f"{extra!r} is neither a stop mode (rel, abs) nor a solver {sorted(SOLVERS)}"
                )
        return Adaptive(_float(spec, "TOL", parts[0]), _int(spec, "MAX_ITER", parts[1]), stop_mode, solver)  # type: ignore[arg-type]
    if kind == "budget":
        if n not in (2, 3):
            raise _bad(spec, f"budget takes TOTAL:RULE[:P1,P2,...], got {n} part(s)")
        rule = parts[1].lower()
        if rule not in BUDGET_RULES:
            raise _bad(spec, f"rule {parts[1]!r} is not one of {list(BUDGET_RULES)}")
        pn = _ints(spec, "patch_nums", parts[2]) if n == 3 else None
        return Budget(_int(spec, "TOTAL", parts[0]), rule, pn)  # type: ignore[arg-type]
    raise _bad(spec, f"unknown kind {kind!r}")


def _parse_mapping(spec: Mapping[str, Any]) -> Schedule:
    d = dict(spec)
    kind = d.pop("kind", None)
    key = kind.strip().lower() if isinstance(kind, str) else kind
    if key not in _KINDS:
        raise _bad(dict(spec), f"'kind' must be one of {sorted(_KINDS)}, got {kind!r}")
    cls = _KINDS[key]
    names = [f.name for f in dataclasses.fields(cls)]  # type: ignore[arg-type]
    unknown = sorted(set(d) - set(names))
    if unknown:
        raise _bad(dict(spec), f"{key} has no field(s) {unknown}; its fields are {names}")
    if cls is Adaptive and isinstance(d.get("tol"), str):  # YAML 1.1 reads 1e-3 (no dot) as a string
        d["tol"] = _float(dict(spec), "tol", d["tol"])
    try:
        return cls(**d)
    except TypeError as e:
        raise _bad(dict(spec), str(e)) from None


def parse_schedule(spec: Schedule | str | Mapping[str, Any] | int) -> Schedule:
    """A :class:`Schedule` from a schedule object, an int (constant), a spec string or a mapping.

    Args:
        spec: a :class:`Schedule` (returned as is); an int ``K`` (``Constant(K)``); a spec string such as
            ``"linear:10:5:floor"`` (see the module docstring; kinds and words are case-insensitive); or a
            mapping with ``"kind"`` (``constant``, ``linear``, ``list``/``explicit``, ``adaptive``,
            ``budget``) and the class's fields, e.g. ``{"kind": "linear", "first": 10, "last": 5}``.

    Returns:
        The schedule.

    Raises:
        ValueError: a malformed spec or a bad value; the message names the bad part and lists the accepted
            forms.
        TypeError: ``spec`` is of none of the accepted types.
    """
    if isinstance(spec, Schedule):
        return spec
    if isinstance(spec, numbers.Integral) and not isinstance(spec, bool):
        return Constant(int(spec))
    if isinstance(spec, (str, Mapping)):
        try:
            return _parse_string(spec) if isinstance(spec, str) else _parse_mapping(spec)
        except _SpecError:
            raise
        except ValueError as e:  # a value the schedule class refused (e.g. constant:0)
            raise _bad(spec if isinstance(spec, str) else dict(spec), str(e)) from None
    raise TypeError(f"schedule must be a Schedule, int, str or mapping, got {type(spec).__name__}: {spec!r}")
