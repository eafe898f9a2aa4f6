"""The fixed-point problem: a map ``f``, a start point, an optional injection. It knows nothing of solvers."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

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

    Args:
        f: the map. Takes ``z: (B_act, *S)`` and returns a tensor of the same shape and dtype.
        z0: the start point, ``(B, *S)``, any floating dtype (fp16/bf16/fp32/fp64).
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

    f: Callable[..., Tensor]
    z0: Tensor
    x: Any = None
    indexed: bool = False
    separable: bool = False

    def __post_init__(self) -> None:
        if not callable(self.f):
            raise TypeError(f"FixedPointProblem.f must be callable, got {type(self.f).__name__}")
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
        if isinstance(self.x, Tensor) and self.separable and (self.x.dim() == 0 or self.x.shape[0] != self.batch_size):
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
