"""Structured states: a tuple, list or dict of batched tensors packed into one ``(B, D)`` tensor.

A multiscale DEQ (Bai et al., NeurIPS 2020, "Multiscale deep equilibrium models") iterates a tuple of feature
maps at several resolutions. deqgen's solver loop works on one flat ``(B, D)`` tensor per batch, so a structured
state is packed once before the loop and ``f`` receives views of the packed iterate in the shapes and dtypes it
was given. Packing uses the widest floating dtype among the leaves (the solver iterates in it); unpacking casts
each leaf back to its own dtype.

A state is either a tensor, or a tuple / list / dict (one level, string keys for a dict) of tensors that share
the batch size ``B`` along dim 0.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor

__all__ = ["State", "TreeSpec", "is_structured", "spec_of", "take"]

State = Tensor | tuple[Tensor, ...] | list[Tensor] | dict[str, Tensor]
"""A tensor ``(B, *S)`` or a tuple / list / dict of tensors ``(B, *S_i)`` sharing ``B``."""

Kind = Literal["tuple", "list", "dict"]


def is_structured(state: Any) -> bool:
    """True for a tuple, list or dict state (False for a plain tensor)."""
    return isinstance(state, (tuple, list, dict))


def _leaves(state: Any, what: str) -> tuple[Kind, tuple[str, ...], list[Tensor]]:
    if isinstance(state, dict):
        keys = tuple(state)
        if any(not isinstance(k, str) for k in keys):
            raise TypeError(f"{what} is a dict with non-string keys {keys!r}; use string keys")
        kind: Kind = "dict"
        leaves = [state[k] for k in keys]
    elif isinstance(state, (tuple, list)):
        kind, keys, leaves = ("tuple" if isinstance(state, tuple) else "list"), (), list(state)
    else:
        raise TypeError(
            f"{what} must be a tensor or a tuple/list/dict of tensors, got {type(state).__name__}"
        )
    for i, leaf in enumerate(leaves):
        if not isinstance(leaf, Tensor):
            name = keys[i] if keys else i
            raise TypeError(
                f"{what}[{name!r}] is a {type(leaf).__name__}; every leaf must be a tensor (B, ...) "
                "(nested containers are not supported: flatten them into one tuple or dict)"
            )
    return kind, keys, leaves


@dataclass(frozen=True)
class TreeSpec:
    """How a structured state maps to its packed ``(B, D)`` form.

    Attributes:
        kind: ``"tuple"``, ``"list"`` or ``"dict"``.
        keys: the dict's keys in order (empty for a tuple or list).
        shapes: each leaf's sample shape ``S_i`` (without the batch dim).
        dtypes: each leaf's dtype, restored on unpacking.
        dtype: the packed dtype, the widest floating dtype among the leaves.
    """

    kind: Kind
    keys: tuple[str, ...]
    shapes: tuple[torch.Size, ...]
    dtypes: tuple[torch.dtype, ...]
    dtype: torch.dtype

    @property
    def sizes(self) -> tuple[int, ...]:
        """Number of packed columns ``D_i = prod(S_i)`` of each leaf."""
        return tuple(math.prod(s) for s in self.shapes)

    @property
    def width(self) -> int:
        """``D``, the packed width."""
        return sum(self.sizes)

    def _name(self, i: int) -> str:
        return repr(self.keys[i]) if self.keys else str(i)

    def check(self, state: Any, what: str) -> list[Tensor]:
        """The leaves of ``state`` after checking that it has this structure (shapes excluding the batch).

        Raises:
            TypeError / ValueError: naming the leaf that differs, and how.
        """
        if not is_structured(state):
            raise TypeError(
                f"{what} must have the structure of z0 ({self.kind} of {len(self.shapes)} tensors); "
                f"got a {type(state).__name__}"
            )
        kind, keys, leaves = _leaves(state, what)
        if kind != self.kind or keys != self.keys or len(leaves) != len(self.shapes):
            raise TypeError(
                f"{what} must have the structure of z0 ({self.kind} of {len(self.shapes)} tensors"
                f"{', keys ' + repr(self.keys) if self.keys else ''}); got a {kind} of {len(leaves)}"
                f"{', keys ' + repr(keys) if keys else ''}"
            )
        for i, (leaf, shape) in enumerate(zip(leaves, self.shapes, strict=True)):
            if leaf.shape[1:] != shape or not leaf.is_floating_point():
                raise ValueError(
                    f"{what}[{self._name(i)}] has shape {tuple(leaf.shape)} and dtype {leaf.dtype}; "
                    f"expected (B, *{tuple(shape)}) floating point, as in z0"
                )
        return leaves

    def pack(self, state: Any, what: str = "state") -> Tensor:
        """``(B, D)`` in :attr:`dtype`: the leaves flattened per sample and concatenated (differentiable)."""
        leaves = self.check(state, what)
        B = leaves[0].shape[0]
        flat = [leaf.reshape(B, -1).to(self.dtype) for leaf in leaves]
        return flat[0] if len(flat) == 1 else torch.cat(flat, dim=1)

    def unpack(self, flat: Tensor) -> State:
        """The structure back from ``flat: (B, D)``: views when the leaf dtype is the packed one, else casts."""
        B = flat.shape[0]
        parts = flat.split(self.sizes, dim=1)
        leaves = [p.reshape(B, *s).to(dt) for p, s, dt in zip(parts, self.shapes, self.dtypes, strict=True)]
        if self.kind == "dict":
            return dict(zip(self.keys, leaves, strict=True))
        return tuple(leaves) if self.kind == "tuple" else leaves


def spec_of(state: Any, what: str = "z0") -> TreeSpec:
    """The :class:`TreeSpec` of a structured state.

    Args:
        state: a tuple / list / dict of floating tensors ``(B, *S_i)`` with one batch size ``B >= 1``.
        what: the argument's name, for error messages.

    Raises:
        TypeError: a leaf that is not a floating tensor. ValueError: no leaves, or batch sizes that differ.

    Example:
        >>> import torch
        >>> spec = spec_of((torch.zeros(2, 3, 4, 4), torch.zeros(2, 6, 2, 2, dtype=torch.float64)))
        >>> spec.width, spec.dtype
        (72, torch.float64)
        >>> [tuple(t.shape) for t in spec.unpack(spec.pack((torch.ones(2, 3, 4, 4), torch.ones(2, 6, 2, 2))))]
        [(2, 3, 4, 4), (2, 6, 2, 2)]
    """
    kind, keys, leaves = _leaves(state, what)
    if not leaves:
        raise ValueError(f"{what} is an empty {kind}; give at least one tensor (B, ...)")
    batch = {int(leaf.shape[0]) if leaf.dim() else -1 for leaf in leaves}
    if len(batch) != 1 or -1 in batch:
        shapes = [tuple(leaf.shape) for leaf in leaves]
        raise ValueError(f"{what} leaves must share batch dim 0; got shapes {shapes}")
    for i, leaf in enumerate(leaves):
        if not leaf.is_floating_point():
            raise TypeError(f"{what}[{keys[i] if keys else i!r}] has dtype {leaf.dtype}; use floating point")
    dtype = leaves[0].dtype
    for leaf in leaves[1:]:
        dtype = torch.promote_types(dtype, leaf.dtype)
    return TreeSpec(
        kind, keys, tuple(leaf.shape[1:] for leaf in leaves), tuple(leaf.dtype for leaf in leaves), dtype
    )


def take(x: Any, rows: Tensor | None) -> Any:
    """Rows ``rows`` of every tensor in ``x`` (a tensor, a tuple / list / dict of tensors, or None).

    Non-tensor leaves pass through unchanged; ``rows=None`` returns ``x``.
    """
    if rows is None or x is None:
        return x
    if isinstance(x, Tensor):  # index_select is several times faster than x[rows] on CPU, same rows
        return x[rows] if rows.dtype == torch.bool else x.index_select(0, rows)
    if isinstance(x, dict):
        return {k: take(v, rows) for k, v in x.items()}
    if isinstance(x, (tuple, list)):
        return type(x)(take(v, rows) for v in x)
    return x


@dataclass(frozen=True)
class PackedMap:
    """``f`` seen through a :class:`TreeSpec`: packed ``(B, D)`` in, packed ``(B, D)`` out.

    ``f`` receives the unpacked structure as its first argument, followed by whatever else the caller passes.
    """

    f: Callable[..., Any]
    spec: TreeSpec

    def __call__(self, z: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        return self.spec.pack(self.f(self.spec.unpack(z), *args, **kwargs), "f's output")
