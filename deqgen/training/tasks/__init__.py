"""The task registry: the one place the training engine meets model families.

``task: generation`` in a recipe (the default) trains class-conditional VIAR/VAR generation
(:class:`~deqgen.training.tasks.generation.GenerationTask`). A new family adds a subpackage here with a
:class:`~deqgen.training.task.Task` and one line in :data:`TASKS`.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType

from deqgen.training.task import Task
from deqgen.training.tasks.classification import ClassificationTask
from deqgen.training.tasks.generation import GenerationTask
from deqgen.training.tasks.inr import INRTask

__all__ = ["TASKS", "get", "names"]

#: Read-only ``name -> task class``.
TASKS: Mapping[str, type[Task]] = MappingProxyType(
    {"generation": GenerationTask, "classification": ClassificationTask, "inr": INRTask}
)


def names() -> tuple[str, ...]:
    """The registered task names."""
    return tuple(TASKS)


def get(name: str) -> type[Task]:
    """The task class registered as ``name``.

    Raises:
        ValueError: an unknown name (the message lists the registered ones).
    """
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; choose one of {sorted(TASKS)}")
    return TASKS[name]
