"""The fixed-point problem: a map ``f``, a start point, an optional injection. It knows nothing of solvers."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from deqgen.tree import PackedMap, State, TreeSpec, is_structured, spec_of

__all__ = ["FixedPointProblem"]


@dataclass(frozen=True)
class FixedPointProblem:
    """Find ``z*`` with ``z* = f(z*)`` for a batch of independent samples.

    Samples are independent along dim 0: row ``b`` of ``f(z)`` depends only on row ``b`` of ``z`` (and of ``x``).
    The solver loop relies on this to freeze converged samples.

    How ``f`` is called (positional arguments, then keywords)::

        f(z)                    # x is None, indexed=False
        f(z, x)                 # x given
        f(z, k)  / f(z, x, k)   # indexed=True: k is the iteration number, 0 for the call on z0
        f(..., rows=rows)       # separable=True: rows is a LongTensor (B_act,) of the original row
                                #   indices of the rows passed in, or None meaning all B rows in order

    Structured states: ``z0`` may be a tuple, list or dict of tensors ``(B, *S_i)`` (any floating dtypes,
    one batch size), and ``f`` then takes and returns that structure. The problem packs it at construction
    (see :mod:`deqgen.tree`): afterwards ``z0`` is the packed ``(B, D)`` tensor in the widest leaf dtype,
    ``structure`` its :class:`~deqgen.tree.TreeSpec`, and the solver loop sees a plain tensor problem whose
    ``f`` unpacks views, calls the user's map and packs its output. :meth:`unpack` turns a packed solution
    back into the structure (:func:`~deqgen.fixed_point` does it for you).

    Args:
        f: the map. Takes ``z: (B_act, *S)`` and returns a tensor of the same shape and dtype (or the
            structure of ``z0``, same shapes; leaves are cast to the packed dtype).
        z0: the start point, ``(B, *S)``, any floating dtype (fp16/bf16/fp32/fp64), or a structured state.
        x: optional injection, ``(B, ...)``. When rows are frozen and ``separable=True``, ``f`` receives
            ``x[rows]``; otherwise it receives ``x`` whole.
        indexed: pass the iteration number ``k`` to ``f`` (VIAR keys its attention cache by it).
        separable: ``f`` accepts any subset of rows together with their indices (``rows=`` keyword).
            Converged rows are then never evaluated again. Without it, ``f`` always sees all ``B`` rows and
            frozen rows just keep their values.

    Example:
        >>> import torch
        >>> p = FixedPointProblem(lambda z: 0.5 * z + 1.0, torch.zeros(3, 2))
        >>> p.batch_size
        3
    """

    f: Callable[..., Any]
    z0: Tensor
    x: Any = None
    indexed: bool = False
    separable: bool = False
    structure: TreeSpec | None = field(default=None, init=False)

    def __post_init__(self) -> None:
        if not callable(self.f):
            raise TypeError(f"FixedPointProblem.f must be callable, got {type(self.f).__name__}")
        if is_structured(self.z0):
            spec = spec_of(self.z0, "FixedPointProblem.z0")
            object.__setattr__(self, "z0", spec.pack(self.z0, "FixedPointProblem.z0").detach())
            object.__setattr__(self, "f", PackedMap(self.f, spec))
            object.__setattr__(self, "structure", spec)
        if not isinstance(self.z0, Tensor):
            raise TypeError(f"FixedPointProblem.z0 must be a torch.Tensor, got {type(self.z0).__name__}")
        if self.z0.dim() < 1 or self.z0.shape[0] == 0:
            raise ValueError(
                f"FixedPointProblem.z0 must have a non-empty batch dimension 0, got shape {tuple(self.z0.shape)}; "
                "for a single sample use z0.unsqueeze(0)"
            )
        if not self.z0.is_floating_point():
            raise TypeError(f"FixedPointProblem.z0 must be floating point, got dtype {self.z0.dtype}")
        if self.separable and self.x is not None and not isinstance(self.x, Tensor):
            raise TypeError(
                f"FixedPointProblem.x must be a batched tensor when separable=True (deqgen passes f the rows "
                f"x[rows]), got {type(self.x).__name__}; keep other inputs in f's closure and index them with rows"
            )
        if (
            isinstance(self.x, Tensor)
            and self.separable
            and (self.x.dim() == 0 or self.x.shape[0] != self.batch_size)
        ):
            raise ValueError(
                f"FixedPointProblem.x has shape {tuple(self.x.shape)} but z0 has batch size {self.batch_size}; "
                "with separable=True, x must be batched along dim 0 like z0"
            )

    @property
    def batch_size(self) -> int:
        """``B``, the number of independent samples."""
        return int(self.z0.shape[0])

    @property
    def sample_shape(self) -> torch.Size:
        """``S``, the shape of one sample."""
        return self.z0.shape[1:]

    def unpack(self, z: Tensor) -> State:
        """``z: (B, *S)`` (the packed ``(B, D)`` for a structured problem) in the structure of the original
        ``z0``: views of ``z`` per leaf, cast back to each leaf's dtype. A plain tensor problem returns ``z``."""
        return z if self.structure is None else self.structure.unpack(z.reshape(z.shape[0], -1))

    def evaluate(self, z: Tensor, k: int, rows: Tensor | None, x_rows: Any) -> Tensor:
        """Call ``f`` following the convention above.

        Args:
            z: ``(B_act, *S)`` for a separable problem, else ``(B, *S)``.
            k: iteration number.
            rows: original indices of the rows in ``z`` (separable problems only), or None for all rows.
            x_rows: the injection matching ``z``'s rows.

        Returns:
            ``f``'s output, same shape as ``z``.
        """
        args: list[Any] = [z]
        if self.x is not None:
            args.append(x_rows)
        if self.indexed:
            args.append(k)
        if self.separable:
            return self.f(*args, rows=rows)
        return self.f(*args)
