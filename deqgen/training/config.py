"""Loading a recipe: read the YAML, pick the task's config class from its ``task`` field, validate.

Example:
    >>> cfg = load_config("recipes/mnist_cpu.yaml", ["optim.lr_per_256=2e-3"])  # doctest: +SKIP
    >>> cfg.task, type(cfg).__name__  # doctest: +SKIP
    ('generation', 'GenerationConfig')
"""

from __future__ import annotations

import os
from collections.abc import Collection, Sequence
from pathlib import Path

from deqgen.training import tasks
from deqgen.training.checkpoint import CheckpointConfigMismatch
from deqgen.training.schema import ConfigError, TrainConfig, read_yaml, validate_config

__all__ = [
    "DEFAULT_TASK",
    "check_config_compatible",
    "load_config",
    "load_config_text",
    "packaged_recipes",
    "resolve_recipe",
]

#: The task of a recipe without a ``task`` field (every recipe written before tasks existed).
DEFAULT_TASK = "generation"


def load_config_text(
    text: str,
    overrides: Sequence[str] = (),
    *,
    source: str = "<string>",
    check_paths: bool | Collection[str] = True,
    world_size: int | None = None,
    device: str | None = None,
) -> TrainConfig:
    """Validate YAML ``text`` (see :func:`load_config`); ``source`` names it in error messages."""
    data = read_yaml(text, source)
    name = _task_name(data, overrides, source)
    return validate_config(
        tasks.get(name).config_class,
        data,
        overrides,
        source=source,
        check_paths=check_paths,
        world_size=world_size,
        device=device,
    )


def load_config(
    path: str | os.PathLike[str],
    overrides: Sequence[str] = (),
    *,
    check_paths: bool | Collection[str] = True,
    world_size: int | None = None,
    device: str | None = None,
) -> TrainConfig:
    """Read a recipe YAML, apply ``a.b.c=value`` overrides in order, and validate it as its task's config.

    Args:
        path: the YAML file, or the bare name of a recipe shipped with deqgen (``mnist_cpu``,
            ``viar_imagenet``; see :func:`resolve_recipe`); its ``task`` field (default :data:`DEFAULT_TASK`)
            names the task.
        overrides: ``dotted.key=value`` strings (see :func:`deqgen.training.schema.validate_config`).
        check_paths: check that path fields exist: ``True`` (all), ``False`` (none), or a subset of the
            task's path sections, such as ``{"tokenizer", "checkpoint"}``.
        world_size: ranks the global batch is split over (default: ``$WORLD_SIZE`` or 1).
        device: the training device if known (``"cpu"``, ``"cuda:0"``); fp16 on CPU is then an error.

    Returns:
        The validated, frozen config, an instance of the task's ``config_class``.

    Raises:
        ConfigError: unreadable file, bad YAML, unknown task, bad override, or invalid fields (the message
            lists every bad field with its dotted path, value and the allowed values or type).
    """
    p = resolve_recipe(path)
    try:
        text = p.read_text()
    except OSError as e:
        raise ConfigError(f"{p}: cannot read the config file ({e.strerror or e})") from None
    return load_config_text(
        text, overrides, source=str(p), check_paths=check_paths, world_size=world_size, device=device
    )


def packaged_recipes() -> dict[str, Path]:
    """The recipe YAMLs shipped inside the package (``deqgen/recipes/*.yaml``), by bare name."""
    folder = Path(__file__).resolve().parents[1] / "recipes"
    return {f.stem: f for f in sorted(folder.glob("*.yaml"))}


def resolve_recipe(path: str | os.PathLike[str]) -> Path:
    """The YAML file a recipe argument names: an existing path as given, else a shipped recipe's bare name.

    ``deqgen train mnist_cpu`` (or ``mnist_cpu.yaml``) thus works after a plain ``pip install``, while
    ``deqgen train recipes/mnist_cpu.yaml`` or any other path keeps meaning that file.

    Raises:
        ConfigError: ``path`` does not exist and is not a shipped recipe's name (the message lists them).
    """
    p = Path(path)
    if p.exists() or len(p.parts) != 1:
        return p
    shipped = packaged_recipes()
    name = p.stem if p.suffix in (".yaml", ".yml") else p.name
    if name in shipped:
        return shipped[name]
    raise ConfigError(
        f"{p}: no such config file, and not the name of a shipped recipe; give a YAML path "
        f"or one of {sorted(shipped)}"
    )


def _task_name(data: dict[str, object], overrides: Sequence[str], source: str) -> str:
    name = data.get("task", DEFAULT_TASK)
    for raw in overrides:  # ``--set task=...`` picks the schema too
        if raw.strip().startswith("task="):
            name = raw.strip().removeprefix("task=").strip()
    if not isinstance(name, str) or name not in tasks.names():
        raise ConfigError(f"{source}: task: got {name!r}; choose one of {sorted(tasks.names())}")
    return name


def check_config_compatible(saved_yaml: str, current: TrainConfig, source: str = "checkpoint") -> None:
    """Raise if the config stored in checkpoint ``source`` builds a different model than ``current``.

    Raises:
        CheckpointConfigMismatch: lists every differing model-shape field, or says the stored config no
            longer validates.
    """
    try:
        saved = load_config_text(
            saved_yaml, source=f"{source} (stored config)", check_paths=False, world_size=1
        )
    except ConfigError as e:
        raise CheckpointConfigMismatch(
            f"the config stored in {source} does not validate any more:\n{e}"
        ) from None
    if saved.task != current.task:
        raise CheckpointConfigMismatch(
            f"{source} was trained for task {saved.task!r}, this run is {current.task!r}"
        )
    diffs = tasks.get(current.task).config_differences(saved, current)
    if diffs:
        raise CheckpointConfigMismatch(
            f"{source} was trained with a different model than this run's config:\n  - "
            + "\n  - ".join(diffs)
            + "\nRestore those values (or start a new run in another logging.out_dir / with checkpoint.resume=none)."
        )
