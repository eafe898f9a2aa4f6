"""Packaging: one version, shipped recipe YAMLs resolved by bare name, package data in the wheel."""

from __future__ import annotations

import importlib.metadata
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

import deqgen
from deqgen.training.config import load_config, packaged_recipes, resolve_recipe
from deqgen.training.schema import ConfigError

ROOT = Path(__file__).resolve().parents[1]


def test_version_is_written_once_and_matches_the_metadata() -> None:
    assert deqgen.__version__ == importlib.metadata.version("deqgen")
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert (
        'dynamic = ["version"]' in pyproject
        and "\nversion = " not in pyproject.split("[tool.setuptools.dynamic]")[0]
    )


def test_shipped_recipes_are_the_checkout_recipes() -> None:
    shipped = packaged_recipes()
    assert {"mnist_cpu", "viar_imagenet"} <= set(shipped)
    for name, path in shipped.items():  # recipes/NAME.yaml in a checkout is the same file
        assert (ROOT / "recipes" / f"{name}.yaml").resolve() == path.resolve()


@pytest.mark.parametrize("arg", ["mnist_cpu", "mnist_cpu.yaml"])
def test_bare_recipe_name_resolves_to_the_shipped_file(arg: str, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)  # no recipes/ folder here: only the package can answer
    assert resolve_recipe(arg) == packaged_recipes()["mnist_cpu"]
    cfg = load_config(arg, check_paths=False)
    assert (
        cfg.model.embed_dim
        == load_config(ROOT / "recipes" / "mnist_cpu.yaml", check_paths=False).model.embed_dim
    )


def test_a_path_still_means_that_file(tmp_path: Path, monkeypatch) -> None:
    own = tmp_path / "mnist_cpu.yaml"  # a local file of the same name wins over the shipped one
    own.write_text(
        (ROOT / "recipes" / "mnist_cpu.yaml").read_text().replace("embed_dim: 128", "embed_dim: 64", 1)
    )
    monkeypatch.chdir(tmp_path)
    assert resolve_recipe("mnist_cpu.yaml") == Path("mnist_cpu.yaml")
    assert load_config("mnist_cpu.yaml", check_paths=False).model.embed_dim == 64
    assert resolve_recipe(str(own)) == own


def test_unknown_name_lists_the_shipped_recipes(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match=r"no_such_recipe.*mnist_cpu.*viar_imagenet"):
        load_config("no_such_recipe")
    with pytest.raises(ConfigError, match="cannot read"):  # a missing path is not looked up by name
        load_config(tmp_path / "missing" / "mnist_cpu.yaml")


@pytest.mark.slow
def test_wheel_ships_py_typed_and_the_recipes(tmp_path: Path) -> None:
    """Build the wheel from a copy of the tracked files (no network, no build isolation) and list it."""
    pytest.importorskip("setuptools", minversion="77")  # the build backend pyproject.toml asks for
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("needs a git checkout to copy the tracked files")
    src = tmp_path / "src"
    src.mkdir()
    archive = subprocess.run(
        ["git", "-C", str(ROOT), "ls-files", "-z"], capture_output=True, check=True
    ).stdout
    for rel in filter(None, archive.decode().split("\0")):
        f = ROOT / rel
        if f.is_file():
            (src / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(f, src / rel)  # follows the recipes/*.yaml links
    env = {**os.environ, "PIP_NO_INDEX": "1"}
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            "-w",
            str(tmp_path / "dist"),
            str(src),
        ],
        check=True,
        env=env,
        capture_output=True,
    )
    (wheel,) = (tmp_path / "dist").glob("deqgen-*.whl")
    assert wheel.name.startswith(f"deqgen-{deqgen.__version__}-")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert {"deqgen/py.typed", "deqgen/recipes/mnist_cpu.yaml", "deqgen/recipes/viar_imagenet.yaml"} <= names
