"""Plots are drawn without pyplot: the process's matplotlib backend is never switched (a notebook keeps its
inline figures after training)."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytest.importorskip("matplotlib")


def test_plots_leave_the_backend_and_pyplot_alone(tmp_path: Path) -> None:
    script = textwrap.dedent(
        f"""
        import sys
        import matplotlib
        matplotlib.use("svg")  # a backend the library must not replace
        from deqgen.plots import new_figure, save_figure
        from deqgen.training.tasks.generation.summary import _loss_plot
        fig, ax = new_figure(1, 2, figsize=(4, 2))
        ax[0].plot([0, 1], [1, 0])
        save_figure(fig, {str(tmp_path / "a.png")!r})
        _loss_plot(__import__("pathlib").Path({str(tmp_path / "loss.png")!r}), {{"model": [(1, 2.0), (2, 1.5)]}})
        assert matplotlib.get_backend() == "svg", matplotlib.get_backend()
        assert "matplotlib.pyplot" not in sys.modules
        """
    )
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    for name in ("a.png", "loss.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
