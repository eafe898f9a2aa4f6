"""The tutorial page's code blocks run, in order, as one script (so the docs cannot rot)."""

from __future__ import annotations

import re
from pathlib import Path

DOCS = Path(__file__).resolve().parents[1] / "docs"


def _python_blocks(page: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", (DOCS / page).read_text(), flags=re.DOTALL)


def test_tutorial_own_model_runs() -> None:
    blocks = _python_blocks("tutorial_own_model.md")
    assert len(blocks) == 4
    namespace: dict[str, object] = {"__name__": "tutorial"}
    exec(compile("\n".join(blocks), "tutorial_own_model.md", "exec"), namespace)  # noqa: S102
    assert namespace["accuracy"] > 0.5  # the implicit classifier learned something real
    assert namespace["sol"].stats.all_converged


def test_from_torchdeq_runs() -> None:
    blocks = _python_blocks("from_torchdeq.md")
    assert len(blocks) == 4
    namespace: dict[str, object] = {"__name__": "from_torchdeq"}
    exec(compile("\n".join(blocks), "from_torchdeq.md", "exec"), namespace)  # noqa: S102
    assert namespace["info"].forward.stats.rows_evaluated == int(namespace["st"].nfe.sum())
    rho = namespace["rho"]
    assert rho.shape == (8,) and bool((rho > 0).all())
