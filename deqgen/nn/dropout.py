"""Iteration-consistent ("variational") dropout for implicit cells.

A fixed-point solve iterates one map; redrawing a dropout mask at every evaluation would make it a different
map each time, so the iteration need not converge and the gradient methods would differentiate a map that
was never solved. Following Gal and Ghahramani (NeurIPS 2016, "A theoretically grounded application of
dropout in recurrent neural networks") and its use in DEQs (Bai et al., NeurIPS 2019), the mask here is drawn
**once per forward solve** and shared by every iteration and every recorded gradient step.

:class:`~deqgen.layer.ImplicitLayer` starts a new solve on every ``VariationalDropout`` inside its map at the
start of each forward (with the layer's generator). The mask is drawn lazily on the first evaluation, sized to
that input's batch and created on its device, so a smaller last batch or a GPU input just works. In a separable
solve, later evaluations see only the rows still running: the layer names them with :func:`solve_rows`, and
each row keeps its own mask row.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import Tensor, nn

__all__ = ["VariationalDropout", "dropout_mask", "new_solve", "solve_rows"]


def dropout_mask(
    shape: tuple[int, ...], p: float, like: Tensor, generator: torch.Generator | None = None
) -> Tensor:
    """A Bernoulli(1 - p) keep mask of ``shape`` scaled by ``1 / (1 - p)``, in ``like``'s dtype and device.

    Draws ``torch.rand(shape)`` on the generator's device (``like``'s when no generator is given) and moves
    the mask to ``like``'s device, so a CPU generator can feed a GPU model reproducibly.

    Args:
        shape: mask shape, broadcastable against the tensor it multiplies.
        p: drop probability in ``[0, 1)``.
        like: a tensor whose dtype and device the mask takes.
        generator: random source; None uses torch's default generator of ``like``'s device.
    """
    dev = like.device if generator is None else generator.device
    u = torch.rand(shape, generator=generator, device=dev)
    return ((u >= p).to(like.dtype) / (1.0 - p)).to(like.device)


class VariationalDropout(nn.Module):
    """Dropout whose mask stays fixed for a whole fixed-point solve.

    The mask has the input's shape except along ``shared_dims`` (size 1 there, broadcast): e.g.
    ``shared_dims=(2, 3)`` on ``(B, C, H, W)`` drops whole channels (torchdeq's ``VariationalDropout2d``),
    ``shared_dims=(1,)`` on ``(B, L, C)`` drops the same features at every token.

    Args:
        p: drop probability in ``[0, 1)``.
        shared_dims: non-batch dims along which one mask value is shared.

    Example:
        >>> import torch
        >>> drop = VariationalDropout(0.5, shared_dims=(2,))
        >>> drop.new_solve(torch.Generator().manual_seed(0))
        >>> a, b = drop(torch.ones(2, 3, 4)), drop(torch.ones(2, 3, 4))
        >>> bool((a == b).all()), tuple(drop.mask.shape)
        (True, (2, 3, 1))
    """

    def __init__(self, p: float = 0.0, shared_dims: tuple[int, ...] = ()) -> None:
        super().__init__()
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0.0 <= p < 1.0:
            raise ValueError(f"VariationalDropout got p={p!r}; use 0 <= p < 1")
        if any(isinstance(d, bool) or not isinstance(d, int) or d < 1 for d in shared_dims):
            raise ValueError(
                f"VariationalDropout got shared_dims={shared_dims!r}; use non-batch dims (integers >= 1)"
            )
        self.p = float(p)
        self.shared_dims = tuple(shared_dims)
        self.mask: Tensor | None = None
        self.rows: Tensor | None = None  # the solve's rows in the current input (separable solves)
        self._generator: torch.Generator | None = None

    def new_solve(self, generator: torch.Generator | None = None) -> None:
        """Forget the mask: the next training call draws a new one (from ``generator`` when given)."""
        self.mask = None
        self._generator = generator

    def _mask_shape(self, x: Tensor) -> tuple[int, ...]:
        if self.shared_dims and max(self.shared_dims) >= x.dim():
            raise ValueError(
                f"VariationalDropout has shared_dims={self.shared_dims} but its input has {x.dim()} dims "
                f"(shape {tuple(x.shape)}); use dims < {x.dim()}"
            )
        return tuple(1 if d in self.shared_dims else n for d, n in enumerate(x.shape))

    def forward(self, x: Tensor) -> Tensor:
        """``x * mask`` in training (mask drawn on the first call of the solve), ``x`` in eval mode."""
        if not self.training or self.p == 0.0:
            return x
        shape = self._mask_shape(x)
        if self.mask is None:
            self.mask = dropout_mask(shape, self.p, x, self._generator)
        mask = self.mask if self.rows is None else self.mask.index_select(0, self.rows.to(self.mask.device))
        if tuple(mask.shape) != shape:
            raise ValueError(
                f"VariationalDropout's mask for this solve has shape {tuple(self.mask.shape)} but the input "
                f"needs {shape}: its shape changed within one solve (a separable layer passes subsets of "
                "rows without naming them with solve_rows). Call new_solve() between independent solves"
            )
        return x * mask.to(x.dtype)

    def extra_repr(self) -> str:
        return f"p={self.p}, shared_dims={self.shared_dims}"


def new_solve(model: nn.Module | object, generator: torch.Generator | None = None) -> None:
    """Call :meth:`VariationalDropout.new_solve` on every such submodule of ``model`` (a no-op for a
    callable that is not an ``nn.Module``)."""
    if not isinstance(model, nn.Module):
        return
    for mod in model.modules():
        if isinstance(mod, VariationalDropout):
            mod.new_solve(generator)


@contextlib.contextmanager
def solve_rows(model: nn.Module | object, rows: Tensor | None) -> Iterator[None]:
    """Within the block, every :class:`VariationalDropout` of ``model`` applies the rows ``rows`` (a LongTensor
    ``(B_act,)`` of indices into the batch the mask was drawn for) of its mask; None means the whole batch.

    A separable solve passes its map only the rows still running; :class:`~deqgen.layer.ImplicitLayer` wraps
    each such evaluation in this block, so every sample keeps the mask drawn for it at the solve's start.
    """
    mods = (
        [m for m in model.modules() if isinstance(m, VariationalDropout)]
        if isinstance(model, nn.Module)
        else []
    )
    if rows is None or not mods:
        yield
        return
    for m in mods:
        m.rows = rows
    try:
        yield
    finally:
        for m in mods:
            m.rows = None
