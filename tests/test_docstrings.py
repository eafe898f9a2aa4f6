"""Docstring coverage: every public module, function, class and method under ``deqgen`` has a docstring.

Public means: a module path with no component starting with ``_``; in a module, the names in ``__all__`` when
it is defined, else the classes and functions defined there whose names do not start with ``_``; in a public
class, the methods, properties, class methods and static methods it defines whose names do not start with
``_``. An object is checked once, in the module that defines it, so a re-export (``deqgen.Picard``) counts
as its home module's (``deqgen.solvers.picard``). A method without a docstring of its own passes when it
overrides a documented method of a deqgen base class (it inherits the contract, as autodoc shows it).
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import pkgutil
from collections.abc import Iterator
from types import ModuleType
from typing import Any

import pytest

import deqgen

IN_PROGRESS: set[str] = set()
EDITED_ELSEWHERE: set[str] = set()
SKIPPED = IN_PROGRESS | EDITED_ELSEWHERE

# torch.nn.Module hooks that torch documents and calls itself; an override needs no docstring of its own.
FRAMEWORK_HOOKS = {"extra_repr"}


def public_modules() -> list[str]:
    """Dotted names of deqgen's public modules, the skipped ones included (filtered per test)."""
    names = ["deqgen"]
    for info in pkgutil.walk_packages(deqgen.__path__, "deqgen."):
        if not any(part.startswith("_") for part in info.name.split(".")):
            names.append(info.name)
    return sorted(names)


MODULES = [name for name in public_modules() if name not in SKIPPED]


def _import(name: str) -> ModuleType:
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as e:
        if e.name and not e.name.startswith("deqgen"):
            pytest.skip(f"{name} needs the optional package {e.name!r}")
        raise


def _has_doc(obj: Any) -> bool:
    doc = getattr(obj, "__doc__", None)
    return isinstance(doc, str) and bool(doc.strip())


def _class_has_doc(cls: type) -> bool:
    """A class docstring written by hand (dataclasses and named tuples make one up: ``Name(a, b)``)."""
    if not _has_doc(cls):
        return False
    generated = dataclasses.is_dataclass(cls) or (issubclass(cls, tuple) and hasattr(cls, "_fields"))
    return not (generated and cls.__doc__.startswith(f"{cls.__name__}("))  # type: ignore[union-attr]


def _function_of(attr: Any) -> Any:
    """The function behind a class attribute, or None when it is not a method-like attribute."""
    if isinstance(attr, (staticmethod, classmethod)):
        return attr.__func__
    if isinstance(attr, property):
        return attr.fget
    if hasattr(attr, "func") and type(attr).__name__ == "cached_property":
        return attr.func
    if inspect.isfunction(attr):
        return attr
    return None


def _method_has_doc(cls: type, name: str) -> bool:
    """Documented in ``cls`` or in the nearest deqgen base class that defines ``name``."""
    for klass in cls.__mro__:
        if name not in vars(klass):
            continue
        if klass is not cls and not klass.__module__.startswith("deqgen"):
            return name in FRAMEWORK_HOOKS
        func = _function_of(vars(klass)[name])
        if func is not None and _has_doc(func):
            return True
    return False


def _public_objects(module: ModuleType) -> Iterator[tuple[str, Any]]:
    """``(name, object)`` for the module's public classes and functions that it defines itself."""
    if hasattr(module, "__all__"):
        names = list(module.__all__)
    else:
        names = [n for n in vars(module) if not n.startswith("_")]
    for name in names:
        obj = getattr(module, name)
        if not (inspect.isclass(obj) or inspect.isfunction(obj) or inspect.isbuiltin(obj)):
            continue  # constants, type aliases, modules
        if getattr(obj, "__module__", None) != module.__name__:
            continue  # a re-export or an import: checked in its home module
        yield name, obj


def undocumented(module: ModuleType) -> list[str]:
    """Qualified names of the public objects of ``module`` that have no docstring."""
    missing = []
    for name, obj in _public_objects(module):
        if inspect.isclass(obj):
            if not _class_has_doc(obj):
                missing.append(name)
            for attr_name, attr in vars(obj).items():
                if attr_name.startswith("_") or _function_of(attr) is None:
                    continue
                if not _method_has_doc(obj, attr_name):
                    missing.append(f"{name}.{attr_name}")
        elif not _has_doc(obj):
            missing.append(name)
    return missing


def test_the_walk_finds_the_library() -> None:
    # Guards the walk itself: a broken walk would make every other test here pass vacuously.
    for name in (
        "deqgen.solvers.anderson",
        "deqgen.models.viar.convert",
        "deqgen.training.tasks.generation.config",
    ):
        assert name in MODULES
    assert not any(part.startswith("_") for name in MODULES for part in name.split("."))


def test_the_checks_catch_missing_docstrings() -> None:
    probe = ModuleType("deqgen._probe")

    class Documented:
        """Has a docstring."""

        def method(self) -> None:
            """Has one too."""

    class Bare(Documented):
        def method(self) -> None:  # inherits the contract of Documented.method
            pass

        def other(self) -> None:
            pass

        @property
        def value(self) -> int:
            return 0

    def function() -> None:
        pass

    @dataclasses.dataclass
    class Record:
        x: int

    for obj in (Documented, Bare, function, Record):
        obj.__module__ = probe.__name__
        setattr(probe, obj.__name__, obj)
    assert sorted(undocumented(probe)) == ["Bare", "Bare.other", "Bare.value", "Record", "function"]


@pytest.mark.parametrize("name", MODULES)
def test_public_module_has_a_docstring(name: str) -> None:
    assert _has_doc(_import(name)), f"module {name} has no docstring"


@pytest.mark.parametrize("name", MODULES)
def test_public_names_have_docstrings(name: str) -> None:
    missing = undocumented(_import(name))
    assert not missing, f"{name}: no docstring for {', '.join(missing)}"
