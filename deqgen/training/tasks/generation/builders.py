"""The generation task's builders: names in its config become deqgen objects here and nowhere else
(solvers through :func:`deqgen.solvers.get`, gradients through :func:`deqgen.gradients.get`, schedules through
:func:`deqgen.models.viar.schedules.parse_schedule`)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from deqgen import gradients as _gradients
from deqgen import solvers as _solvers
from deqgen.models.viar.schedules import Schedule, parse_schedule

__all__ = ["build_gradient", "build_schedule", "build_solver", "build_solvers", "gradient_method"]


def build_solver(name: str, options: Mapping[str, Any] | None = None) -> _solvers.Solver[Any]:
    """A deqgen solver from its config name and options (``"anderson", {"m": 5}``).

    Raises:
        ValueError: an unknown name. TypeError: an option the solver does not take.
    """
    return _solvers.get(name, **dict(options or {}))


def build_gradient(cfg: Any, section: Any = None) -> _gradients.GradientMethod | None:
    """The implicit block's training gradient; None for a VAR model. S-JFB takes its ranges from
    ``model.implicit`` (or from ``section.implicit`` when building the baseline)."""
    m = section or cfg.model
    if m.implicit is None:
        return None
    return gradient_method(cfg.gradient.method, cfg.gradient.options, m.implicit)


def gradient_method(
    method: str, options: Mapping[str, Any], implicit: Any = None
) -> _gradients.GradientMethod:
    """A gradient method by name; ``sjfb`` takes its ranges from ``implicit`` (a model's ``ImplicitSpec``)."""
    if method == "sjfb" and implicit is not None:
        return _gradients.get("sjfb", no_grad=implicit.train_no_grad, with_grad=implicit.train_with_grad)
    return _gradients.get(method, **dict(options))


def build_solvers(cfg: Any) -> tuple[_solvers.Solver[Any] | None, _solvers.Solver[Any] | None]:
    """``(train_solver, eval_solver)``; None means the model's default (fixed-count Picard)."""
    train, ev = cfg.solver.train, cfg.solver.eval
    return (
        None if train is None else build_solver(train.name, train.options),
        None if ev is None else build_solver(ev.name, ev.options),
    )


def build_schedule(spec: str) -> Schedule:
    """A per-scale iteration schedule from ``evaluation.schedule`` / ``sampling.schedule``."""
    return parse_schedule(spec)
