"""Recipe sections and helpers shared by the zoo tasks (``classification``, ``inr``): the DEQ's gradient
method, solvers and regularisation, the loss terms they add, and the solver metrics of a step.

Names become deqgen objects here (:func:`build_gradient`, :func:`build_solvers`) and nowhere else.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import Field, field_validator, model_validator
from torch import Tensor

from deqgen import gradients as _gradients
from deqgen import solvers as _solvers
from deqgen.files import atomic_open, atomic_write_text
from deqgen.gradients import GradInfo
from deqgen.plots import matplotlib_available, new_figure, save_figure
from deqgen.regularization import fp_correction, jac_reg
from deqgen.training.schema import Section

__all__ = [
    "model_differences",
    "layer_options",
    "DEQSection",
    "GradientChoice",
    "RegularizationSection",
    "SolverChoice",
    "SolverSpec",
    "build_gradient",
    "build_solvers",
    "regularized_loss",
    "save_weights",
    "solver_metrics",
]


class GradientChoice(Section):
    """The DEQ's training gradient method, by its :mod:`deqgen.gradients` name."""

    method: Literal["jfb", "implicit", "phantom", "sjfb", "unrolled"] = Field(
        "jfb", description="deqgen.gradients name (jfb = 1-step Jacobian-free backprop, implicit = IFT)"
    )
    options: dict[str, Any] = Field(default_factory=dict, description="constructor options, e.g. {k: 2}")

    @model_validator(mode="after")
    def _buildable(self) -> GradientChoice:
        try:
            build_gradient(self)
        except TypeError as e:  # an unknown option: pydantic reports only ValueError/AssertionError
            raise ValueError(str(e)) from None
        return self


class SolverSpec(Section):
    """One deqgen solver by name."""

    name: Literal["picard", "anderson", "broyden"] = Field("picard", description="deqgen.solvers name")
    options: dict[str, Any] = Field(
        default_factory=dict, description="constructor options, e.g. {tol: 1e-4, m: 5}"
    )

    @field_validator("options")
    @classmethod
    def _buildable(cls, options: dict[str, Any], info: Any) -> dict[str, Any]:
        name = info.data.get("name")
        if name is not None:
            try:
                _solvers.get(name, **options)
            except TypeError as e:  # an unknown option: pydantic reports only ValueError/AssertionError
                raise ValueError(str(e)) from None
        return options


class SolverChoice(SolverSpec):
    """One deqgen solver by name; the zoo tasks default to Anderson at tol 1e-4 within 30 iterations."""

    name: Literal["picard", "anderson", "broyden"] = Field("anderson", description="deqgen.solvers name")
    options: dict[str, Any] = Field(
        default_factory=lambda: {"tol": 1e-4, "max_iter": 30},
        description="constructor options, e.g. {tol: 1e-4, max_iter: 30, m: 5}",
    )


class RegularizationSection(Section):
    """Jacobian regularisation (Bai et al., ICML 2021) and fixed-point correction (Bai et al., CVPR 2022)."""

    jac_weight: float = Field(0.0, ge=0, description="weight of the Hutchinson ||J||_F^2/D term; 0 = off")
    jac_vecs: int = Field(1, ge=1, description="Hutchinson probes per step")
    fp_states: int | list[int] | None = Field(
        None,
        description="fixed-point correction: n states evenly spaced over the train solver's "
        "max_iter, or a list of evaluation counts (keep them below the solve's length: a count past its "
        "end is the answer)",
    )
    fp_gamma: float = Field(0.8, gt=0, le=1, description="fixed-point correction decay (DEQ-Flow 0.8)")

    @field_validator("fp_states")
    @classmethod
    def _positive_counts(cls, states: int | list[int] | None) -> int | list[int] | None:
        counts = [states] if isinstance(states, int) else states or []
        if any(c < 1 for c in counts) or states == []:
            raise ValueError(f"fp_states={states!r}: use an integer >= 1 or a non-empty list of counts >= 1")
        return states


class DEQSection(Section):
    """How the DEQ is solved and differentiated."""

    gradient: GradientChoice = Field(default_factory=GradientChoice, description="training gradient method")
    train_solver: SolverChoice = Field(default_factory=SolverChoice, description="forward solver in training")
    eval_solver: SolverChoice | None = Field(None, description="solver in eval; null = train_solver")
    regularization: RegularizationSection = Field(
        default_factory=RegularizationSection, description="Jacobian regularisation, fixed-point correction"
    )


def build_gradient(choice: GradientChoice) -> _gradients.GradientMethod:
    """The gradient method object of ``choice``."""
    return _gradients.get(choice.method, **dict(choice.options))


def build_solvers(deq: DEQSection) -> tuple[_solvers.Solver[Any], _solvers.Solver[Any]]:
    """``(train_solver, eval_solver)``."""
    train = _solvers.get(deq.train_solver.name, **dict(deq.train_solver.options))
    ev = deq.eval_solver or deq.train_solver
    return train, _solvers.get(ev.name, **dict(ev.options))


def model_differences(saved: Any, current: Any) -> list[str]:
    """``model.<field>: checkpoint X, run Y`` for every field of the ``model`` section that differs (a resumed
    run may change everything else)."""
    return [
        f"model.{k}: checkpoint {v!r}, run {getattr(current.model, k)!r}"
        for k, v in vars(saved.model).items()
        if getattr(current.model, k) != v
    ]


def layer_options(deq: DEQSection) -> dict[str, Any]:
    """The implicit layer's keyword arguments that the ``deq`` section sets: gradient method, train and eval
    solvers, and what the regularisation needs recorded (the Jacobian step, fixed-point correction states)."""
    train_solver, eval_solver = build_solvers(deq)
    reg = deq.regularization
    return {
        "gradient": build_gradient(deq.gradient),
        "train_solver": train_solver,
        "eval_solver": eval_solver,
        "jacobian": reg.jac_weight > 0,
        "states": reg.fp_states,
    }


def regularized_loss(
    loss: Tensor,
    info: GradInfo | None,
    reg: RegularizationSection,
    state_loss: Callable[[Any], Tensor],
    generator: torch.Generator | None = None,
) -> tuple[Tensor, dict[str, Tensor | float]]:
    """``loss`` plus fixed-point correction over ``info.states`` and the weighted Jacobian term.

    Args:
        loss: the task loss at the equilibrium (scalar).
        info: the layer's :class:`~deqgen.gradients.GradInfo` (None for an explicit model: nothing is added).
        reg: the regularisation settings.
        state_loss: the task loss of one trajectory state.
        generator: random source of the Hutchinson probes.

    Returns:
        ``(total, metrics)``; metrics holds ``jac`` (the estimate) when the Jacobian term is on.
    """
    if info is None:
        return loss, {}
    metrics: dict[str, Tensor | float] = {}
    if reg.fp_states is not None and info.states:
        losses = [state_loss(s) for s in info.states[:-1]] + [loss]
        loss = fp_correction(losses, reg.fp_gamma)
    if reg.jac_weight > 0 and info.jacobian_step is not None:
        jac = jac_reg(*info.jacobian_step, vecs=reg.jac_vecs, generator=generator).mean()
        loss = loss + reg.jac_weight * jac
        metrics["jac"] = jac.detach()
    return loss, metrics


def solver_metrics(info: GradInfo | None) -> dict[str, Tensor | float]:
    """Mean forward NFE, f-rows per sample and the converged fraction of a training step's solve."""
    if info is None or info.forward is None:
        return {}
    stats = info.forward.stats
    return {
        "nfe": stats.nfe.float().mean(),
        "rows_per_sample": stats.rows_evaluated / max(1, stats.nfe.numel()),
        "converged": stats.converged.float().mean(),
    }


def save_weights(directory: Path, state: dict[str, Tensor], config: dict[str, Any], role: str) -> None:
    """``directory/model.pt`` (the weights) and ``directory/config.json`` (the recipe that built them)."""
    directory.mkdir(parents=True, exist_ok=True)
    with atomic_open(directory / "model.pt") as f:
        torch.save({k: v.detach().cpu() for k, v in state.items()}, f)
    atomic_write_text(directory / "config.json", json.dumps({"role": role, "config": config}, indent=1))


def plot_curves(path: Path, curves: dict[str, Sequence[tuple[int, float]]], ylabel: str) -> bool:
    """A line plot of ``name -> [(step, value)]``; False (and nothing written) without matplotlib."""
    if not matplotlib_available():
        return False
    fig, ax = new_figure(figsize=(5, 3.2))
    for name, points in curves.items():
        if points:
            ax.plot([p[0] for p in points], [p[1] for p in points], label=name)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel(ylabel)
    ax.legend()
    fig.tight_layout()
    save_figure(fig, path, dpi=110)
    return True
