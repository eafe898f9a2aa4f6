"""Class-conditional VIAR/VAR generation on VQVAE tokens: the ``generation`` training task."""

from deqgen.training.tasks.generation.task import GenerationTask

__all__ = ["GenerationTask"]
