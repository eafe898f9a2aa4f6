"""Training recipes: the YAML schema, checkpoints, distributed set-up, schedules, logging and the loop.

The YAML files themselves live in the repository's ``recipes/`` folder; run them with ``deqgen train``.
"""
