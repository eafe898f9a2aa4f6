"""Figures without pyplot: every plot deqgen draws goes through here.

``matplotlib.use("Agg")`` or ``import matplotlib.pyplot`` in library code changes the process's global
backend: in a notebook it silently turns off inline figures. A :class:`matplotlib.figure.Figure` built
directly needs no backend at all and is written to disk with the Agg canvas, so nothing global changes.
matplotlib is an optional extra; callers decide whether its absence is an error or a skipped plot.
"""

from __future__ import annotations

import os
from typing import Any

from deqgen.files import atomic_file

__all__ = ["new_figure", "save_figure", "matplotlib_available", "tab_colors"]


def matplotlib_available() -> bool:
    """True when matplotlib can be imported."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def new_figure(
    nrows: int = 1, ncols: int = 1, *, figsize: tuple[float, float] = (6.0, 4.0)
) -> tuple[Any, Any]:
    """A pyplot-free figure and its axes (as ``Figure.subplots`` returns them: one ``Axes`` or an array).

    Raises:
        ImportError: matplotlib is not installed.
    """
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize)
    return fig, fig.subplots(nrows, ncols)


def save_figure(fig: Any, path: str | os.PathLike[str], *, dpi: int = 100) -> None:
    """Write ``fig`` as a PNG, atomically and with the user's umask permissions (see :mod:`deqgen.files`)."""
    with atomic_file(path) as tmp:
        fig.savefig(tmp, dpi=dpi, bbox_inches="tight", format="png")


def tab_colors(name: str = "tab20") -> tuple[Any, ...]:
    """The colours of one of matplotlib's qualitative colour maps."""
    import matplotlib

    return tuple(matplotlib.colormaps[name].colors)
