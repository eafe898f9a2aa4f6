"""Weight and spectral normalisation for any cell, computed once per forward solve.

Built on :mod:`torch.nn.utils.parametrizations`: :func:`weight_norm` (Salimans and Kingma, NeurIPS 2016)
and :func:`spectral_norm` (Miyato et al., ICLR 2018) register a parametrisation on a module's weight, and
:func:`apply_norm` does it for every Linear / Conv layer of a cell. An implicit layer evaluates its cell
tens of times per forward; :func:`normalized_once` makes it compute each normalised weight **once** per
solve (and, for spectral norm, run one power iteration per solve instead of one per evaluation).

The trap it avoids: inside ``torch.nn.utils.parametrize.cached()`` the first read of a weight is cached.
If that first read happens in the no-grad forward solve, the cached tensor has no graph, the recorded
steps reuse it, and the raw weights silently get no gradient. :func:`normalized_once` fills the cache
with grad enabled before the solve, so the same tensor serves the no-grad iterations (no graph is
recorded there) and the recorded steps (whose graph reaches the raw weights).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Literal

from torch import nn
from torch.nn.utils import parametrizations, parametrize

__all__ = ["NORMALIZABLE", "apply_norm", "normalized_once", "spectral_norm", "weight_norm"]

NORMALIZABLE: tuple[type[nn.Module], ...] = (
    nn.Linear,
    nn.Conv1d,
    nn.Conv2d,
    nn.Conv3d,
    nn.ConvTranspose1d,
    nn.ConvTranspose2d,
    nn.ConvTranspose3d,
)
"""Layer types :func:`apply_norm` normalises by default."""


def weight_norm(module: nn.Module, name: str = "weight", dim: int = 0) -> nn.Module:
    """Reparametrise ``module.<name>`` as ``g v / ||v||`` (norm over all dims but ``dim``); returns ``module``.

    The raw parameters are ``module.parametrizations.<name>.original0`` (``g``) and ``.original1`` (``v``).
    """
    return parametrizations.weight_norm(module, name=name, dim=dim)


def spectral_norm(module: nn.Module, name: str = "weight", n_power_iterations: int = 1) -> nn.Module:
    """Reparametrise ``module.<name>`` as ``W / sigma(W)``, ``sigma`` estimated by power iteration in
    training; returns ``module``. The raw weight is ``module.parametrizations.<name>.original``.
    """
    if (
        isinstance(n_power_iterations, bool)
        or not isinstance(n_power_iterations, int)
        or n_power_iterations < 1
    ):
        raise ValueError(f"spectral_norm got n_power_iterations={n_power_iterations!r}; use an integer >= 1")
    return parametrizations.spectral_norm(module, name=name, n_power_iterations=n_power_iterations)


def apply_norm(
    model: nn.Module,
    kind: Literal["weight", "spectral"] = "weight",
    *,
    types: tuple[type[nn.Module], ...] = NORMALIZABLE,
    include: Callable[[str, nn.Module], bool] | None = None,
) -> list[str]:
    """Normalise the ``weight`` of every submodule of ``model`` that is one of ``types``.

    Args:
        model: the cell (or any module).
        kind: ``"weight"`` (:func:`weight_norm`, ``dim=0``) or ``"spectral"`` (:func:`spectral_norm`).
        types: layer types to normalise.
        include: optional ``include(qualified_name, module) -> bool`` filter.

    Returns:
        The qualified names of the modules that were normalised (already parametrised ones are skipped).

    Example:
        >>> cell = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4))
        >>> apply_norm(cell, "weight")
        ['0', '2']
    """
    if kind not in ("weight", "spectral"):
        raise ValueError(f"apply_norm got kind={kind!r}; use 'weight' or 'spectral'")
    norm = weight_norm if kind == "weight" else spectral_norm
    done = []
    for qualname, mod in list(model.named_modules()):
        if not isinstance(mod, types) or parametrize.is_parametrized(mod, "weight"):
            continue
        if include is not None and not include(qualname, mod):
            continue
        norm(mod)
        done.append(qualname)
    return done


def _parametrized(model: nn.Module) -> list[tuple[nn.Module, str]]:
    return [
        (mod, name)
        for mod in model.modules()
        if parametrize.is_parametrized(mod)
        for name in mod.parametrizations  # type: ignore[union-attr]
    ]


@contextlib.contextmanager
def normalized_once(model: nn.Module | object) -> Iterator[None]:
    """Within the block, every parametrised weight of ``model`` is computed once (on first use of the block).

    The cache is filled here, with autograd in its current mode (grad enabled in training), so tensors
    first used under ``torch.no_grad()`` inside the block still carry the graph to the raw weights.
    A ``model`` that is not an ``nn.Module`` or has no parametrisations makes this a no-op.

    Example:
        >>> import torch
        >>> lin = weight_norm(nn.Linear(3, 3))
        >>> with normalized_once(lin):
        ...     with torch.no_grad():
        ...         _ = lin(torch.ones(1, 3))   # uses the cached weight
        ...     y = lin(torch.ones(1, 3)).sum()
        >>> y.backward()
        >>> lin.parametrizations.weight.original1.grad is not None
        True
    """
    targets = _parametrized(model) if isinstance(model, nn.Module) else []
    if not targets:
        yield
        return
    with parametrize.cached():
        for mod, name in targets:
            getattr(mod, name)  # fills the cache now, with the graph when grad is enabled
        yield
