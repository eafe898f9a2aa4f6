"""A read-only name -> class table for configs, with errors that name the bad key (torchdeq asserts)."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from types import MappingProxyType
from typing import Any, Generic, TypeVar

T = TypeVar("T")

__all__ = ["Registry"]


class Registry(Generic[T]):
    """Frozen-dataclass classes of one ``kind`` ("solver", "gradient method") under their ``name`` class
    attribute, looked up case-insensitively: the class attribute is the one source of each config name."""

    def __init__(self, kind: str, classes: Iterable[type[T]]) -> None:
        self.kind = kind
        self.table: Mapping[str, type[T]] = MappingProxyType({c.name: c for c in classes})  # type: ignore[attr-defined]

    def lookup(self, name: str) -> type[T]:
        """The class registered as ``name``; ValueError listing the choices otherwise."""
        if not isinstance(name, str):
            raise TypeError(f"{self.kind} name must be a string, got {type(name).__name__}")
        key = name.strip().lower()
        if key not in self.table:
            raise ValueError(f"unknown {self.kind} {name!r}; choose one of {sorted(self.table)}")
        return self.table[key]

    def options(self, name: str) -> tuple[str, ...]:
        """The field names the class ``name`` accepts."""
        return tuple(f.name for f in dataclasses.fields(self.lookup(name)))  # type: ignore[arg-type]

    def check_options(self, name: str, opts: Mapping[str, Any]) -> type[T]:
        """The class ``name``, after checking every key of ``opts`` is one of its options."""
        cls = self.lookup(name)
        valid = self.options(name)
        unknown = sorted(set(opts) - set(valid))
        if unknown:
            raise TypeError(f"{self.kind} {name!r} has no option(s) {unknown}; valid options: {list(valid)}")
        return cls
