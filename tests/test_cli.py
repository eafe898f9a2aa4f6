"""The deqgen command: convert, sample and edit write their files; errors exit 2 and write nothing."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

pytest.importorskip("PIL")

from deqgen.cli import main  # noqa: E402
from deqgen.images import save_grid  # noqa: E402


@pytest.fixture(scope="module")
def dirs(tiny_viar_dirs: tuple[Path, Path]) -> tuple[Path, Path]:
    return tiny_viar_dirs


def test_sample_writes_a_png(dirs: tuple[Path, Path], tmp_path: Path) -> None:
    out = tmp_path / "grid.png"
    rc = main(
        [
            "sample",
            str(dirs[0]),
            "--vqvae",
            str(dirs[1]),
            "--classes",
            "1",
            "2",
            "--per-class",
            "2",
            "--schedule",
            "linear:4:2",
            "--top-k",
            "5",
            "--out",
            str(out),
        ]
    )
    assert rc == 0 and out.read_bytes()[:4] == b"\x89PNG"


def test_edit_writes_input_and_edits(dirs: tuple[Path, Path], tmp_path: Path) -> None:
    src = tmp_path / "in.png"
    save_grid(src, torch.rand(1, 3, 60, 60), nrow=1)
    out = tmp_path / "edit.png"
    rc = main(
        [
            "edit",
            str(dirs[0]),
            "--vqvae",
            str(dirs[1]),
            "--image",
            str(src),
            "--box",
            "16",
            "16",
            "48",
            "48",
            "--class",
            "3",
            "--samples",
            "2",
            "--out",
            str(out),
            "--solver",
            "anderson",
            "--schedule",
            "adaptive:1e-3:10",
        ]
    )
    assert rc == 0 and out.stat().st_size > 0


def test_errors_exit_2_and_write_nothing(
    dirs: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = tmp_path / "bad.pth"
    torch.save({"fc.weight": torch.zeros(2)}, bad)
    assert main(["convert", str(bad), str(tmp_path / "out")]) == 2
    assert "cannot tell the model kind" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
    out = tmp_path / "x.png"
    assert (
        main(
            [
                "sample",
                str(dirs[0]),
                "--vqvae",
                str(dirs[1]),
                "--classes",
                "1",
                "--schedule",
                "linear:4",
                "--out",
                str(out),
            ]
        )
        == 2
    )
    assert "accepted forms" in capsys.readouterr().err and not out.exists()
