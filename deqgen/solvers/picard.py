"""Picard (fixed-point) iteration, optionally damped."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

from torch import Tensor

from deqgen.solvers.base import Solver

__all__ = ["Picard"]


@dataclasses.dataclass(frozen=True, kw_only=True)
class Picard(Solver[None]):
    """``z_{k+1} = z_k + damping * (f(z_k) - z_k)``; ``damping=1`` is plain iteration ``z_{k+1} = f(z_k)``.

    Converges linearly at the contraction rate of ``f``; ``damping < 1`` can rescue a map whose Jacobian has
    eigenvalues near or below -1. Stateless: one evaluation and no extra memory per step.

    Also takes the shared fields of :class:`~deqgen.solvers.base.Solver` (``tol``, ``stop_mode``, ``norm``,
    ``max_iter``, ``check_every``).

    Args:
        damping: step size in ``(0, 1]``.

    Example:
        >>> import torch
        >>> from deqgen import Picard, fixed_point
        >>> sol = fixed_point(lambda z: 0.5 * z + 1.0, torch.zeros(4, 3), Picard(tol=1e-8, max_iter=100))
        >>> torch.allclose(sol.z, torch.full((4, 3), 2.0), atol=1e-6)
        True
    """

    damping: float = 1.0

    name: ClassVar[str] = "picard"

    def __post_init__(self) -> None:
        super().__post_init__()
        if not (isinstance(self.damping, (int, float)) and 0.0 < self.damping <= 1.0):
            raise ValueError(f"Picard got damping={self.damping!r}; use 0 < damping <= 1")

    def init(self, z: Tensor) -> None:
        return None

    def step(self, state: None, z: Tensor, fz: Tensor, g: Tensor, res: Tensor) -> tuple[Tensor, None]:
        if self.damping == 1.0:
            return fz, None
        return z + self.damping * g, None
