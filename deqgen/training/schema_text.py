"""How a recipe config is shown to people: as YAML (``config_to_yaml``), as readable validation errors
(``format_validation_error``, naming the field, the value and what is allowed), and as the generated
configuration reference of the docs (``config_reference_markdown``)."""

from __future__ import annotations

import types
import typing
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ValidationError,
)
from pydantic_core import PydanticUndefined

__all__ = ["config_reference_markdown", "config_to_yaml", "format_validation_error", "submodel", "type_name"]


class _Dumper(yaml.SafeDumper):
    """Block-style sections with lists of scalars on one line (``patch_nums: [1, 2, 3]``)."""


def submodel(annotation: Any) -> type[BaseModel] | None:
    """The pydantic section class inside ``annotation`` (``X``, ``X | None``), else None."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in typing.get_args(annotation):
        found = submodel(arg)
        if found is not None:
            return found
    return None


def _represent_list(dumper: yaml.SafeDumper, value: list[Any]) -> yaml.Node:
    flow = all(not isinstance(v, (dict, list)) for v in value)
    return dumper.represent_sequence("tag:yaml.org,2002:seq", value, flow_style=flow)


_Dumper.add_representer(list, _represent_list)


def config_to_yaml(cfg: BaseModel) -> str:
    """YAML text that :func:`deqgen.training.config.load_config_text` turns back into an equal config."""
    return yaml.dump(cfg.model_dump(mode="json"), Dumper=_Dumper, sort_keys=False, width=110)


# ---- error messages ------------------------------------------------------------------------------------------------


def _field_at(schema: type[BaseModel], loc: Sequence[int | str]) -> tuple[type[BaseModel] | None, Any]:
    """(the section class holding the last key of ``loc``, that field's annotation or None)."""
    cls: type[BaseModel] | None = schema
    annotation: Any = None
    for i, key in enumerate(loc):
        if cls is None or not isinstance(key, str) or key not in cls.model_fields:
            return (cls if i == len(loc) - 1 else None), None
        annotation = cls.model_fields[key].annotation
        if i < len(loc) - 1:
            cls = submodel(annotation)
    return cls, annotation


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _one_error(schema: type[BaseModel], err: Any) -> str:
    loc = tuple(err["loc"])
    path = ".".join(str(k) for k in loc) or "(top level)"
    kind = err["type"]
    if kind == "extra_forbidden":
        parent, _ = _field_at(schema, loc)
        valid = ", ".join(parent.model_fields) if parent is not None else "?"
        return f"{path}: unknown key; valid keys here: {valid}"
    if kind == "missing":
        return f"{path}: required field is missing"
    got = f"got {_short(err['input'])}"
    if kind == "literal_error":
        return f"{path}: {got}; allowed values: {err['ctx']['expected']}"
    msg = str(err["msg"]).removeprefix("Value error, ").removeprefix("Assertion failed, ")
    _, annotation = _field_at(schema, loc)
    if submodel(annotation) is not None and isinstance(err["input"], Mapping):
        return f"{path}: {msg}"  # a whole section failed its own check; the message names the fields
    typed = annotation is not None and kind not in ("recipe", "value_error", "assertion_error")
    expected = f" (expected {type_name(annotation)})" if typed else ""
    return f"{path}: {got}; {msg}{expected}"


def format_validation_error(
    e: ValidationError,
    source: str,
    overridden: Mapping[str, str] | None,
    schema: type[BaseModel],
) -> str:
    """One line per pydantic error of ``schema`` (the validated config class): ``dotted.path: got VALUE; what
    is wrong (expected TYPE)``."""
    lines = [f"invalid config {source} ({e.error_count()} error{'s' * (e.error_count() != 1)}):"]
    for err in e.errors():
        line = _one_error(schema, err)
        path = ".".join(str(k) for k in err["loc"])
        for key, raw in (overridden or {}).items():
            if path == key or path.startswith(key + ".") or key.startswith(path + "."):
                line += f" [set by override {raw!r}]"
        lines.append("  - " + line)
    return "\n".join(lines)


def type_name(annotation: Any) -> str:
    """A short readable name of a field annotation (``int | None``, ``'fp32' | 'bf16'``, ``tuple[int, ...]``)."""
    if annotation is None or annotation is type(None):
        return "None"
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is Literal:
        return " | ".join(repr(a) for a in args)
    if origin in (typing.Union, types.UnionType):
        return " | ".join(type_name(a) for a in args)
    if origin is not None:
        inner = ", ".join("..." if a is Ellipsis else type_name(a) for a in args)
        return f"{getattr(origin, '__name__', str(origin))}[{inner}]"
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return "section"
    return getattr(annotation, "__name__", str(annotation))


# ---- reference documentation --------------------------------------------------------------------------------------


def _default_text(field: Any) -> str:
    if field.default_factory is not None:
        value = field.default_factory()
    elif field.default is PydanticUndefined:
        return "(required)"
    else:
        value = field.default
    if isinstance(value, BaseModel):
        return "(section)"
    if isinstance(value, Path):
        value = str(value)
    if isinstance(value, tuple):
        value = list(value)
    text = yaml.safe_dump(value, default_flow_style=True, width=10**6).strip().removesuffix("...").strip()
    return f"`{text}`"


def _reference_rows(cls: type[BaseModel], prefix: str) -> Iterable[str]:
    for name, field in cls.model_fields.items():
        path = f"{prefix}{name}"
        cells = [
            f"`{path}`",
            f"`{type_name(field.annotation)}`",
            _default_text(field),
            field.description or "",
        ]
        yield "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"
        sub = submodel(field.annotation)
        if sub is not None:
            yield from _reference_rows(sub, path + ".")


def config_reference_markdown(schema: type[BaseModel]) -> str:
    """A markdown table of every field of ``schema``: dotted path, type, default and description."""
    header = ["| field | type | default | description |", "|---|---|---|---|"]
    return "\n".join(header + list(_reference_rows(schema, ""))) + "\n"
