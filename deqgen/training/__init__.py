"""The model-agnostic training engine and its tasks.

- :mod:`~deqgen.training.train`: ``deqgen train``, read top to bottom;
- :mod:`~deqgen.training.engine`: the optimizer loop (accumulation, precision, DDP/FSDP2, checkpoints);
- :mod:`~deqgen.training.task`: the interface a model family implements;
- :mod:`~deqgen.training.tasks`: the registry of tasks (``generation``: VIAR/VAR);
- :mod:`~deqgen.training.config` and :mod:`~deqgen.training.schema`: YAML -> validated, frozen config;
- :mod:`~deqgen.training.checkpoint`, :mod:`~deqgen.training.distributed`, :mod:`~deqgen.training.lr_schedule`,
  :mod:`~deqgen.training.metrics`: the engine's parts.

The YAML recipes live in the repository's ``recipes/`` folder; run them with ``deqgen train``.
"""
