"""Atomic writes: ordinary permissions under the user's umask, all-or-nothing content, no temp left behind."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from deqgen.files import (
    atomic_dir,
    atomic_file,
    atomic_open,
    atomic_write_bytes,
    atomic_write_text,
    move_dir_into_place,
)

pytestmark = pytest.mark.skipif(os.name != "posix", reason="POSIX permission bits")


@pytest.fixture
def umask() -> Iterator[object]:
    """Set a umask for one test and restore the previous one after it."""
    previous = os.umask(0o022)
    os.umask(previous)

    def set_(mask: int) -> None:
        os.umask(mask)

    yield set_
    os.umask(previous)


def _mode(p: Path) -> int:
    return stat.S_IMODE(p.stat().st_mode)


@pytest.mark.parametrize(
    ("mask", "file_mode", "dir_mode"), [(0o022, 0o644, 0o755), (0o077, 0o600, 0o700), (0o002, 0o664, 0o775)]
)
def test_modes_follow_the_umask(  # type: ignore[no-untyped-def]
    umask, tmp_path: Path, mask: int, file_mode: int, dir_mode: int
) -> None:
    umask(mask)
    f = atomic_write_text(tmp_path / "a" / "note.txt", "x")
    with atomic_dir(tmp_path / "model") as tmp:
        (tmp / "config.json").write_text("{}")
        with atomic_file(tmp / "weights.bin") as w:
            w.write_bytes(b"123")
    assert _mode(f) == file_mode
    assert _mode(tmp_path / "model") == dir_mode
    assert _mode(tmp_path / "model" / "config.json") == file_mode
    assert _mode(tmp_path / "model" / "weights.bin") == file_mode
    assert (tmp_path / "model" / "weights.bin").read_bytes() == b"123"


def test_a_failed_write_leaves_the_old_content_and_no_temp(tmp_path: Path) -> None:
    p = atomic_write_bytes(tmp_path / "f.bin", b"old")
    with pytest.raises(RuntimeError, match="boom"), atomic_file(p) as tmp:
        tmp.write_bytes(b"half")
        raise RuntimeError("boom")
    assert p.read_bytes() == b"old"
    d = tmp_path / "d"
    with atomic_dir(d) as tmp:
        (tmp / "keep.txt").write_text("v1")
    with pytest.raises(RuntimeError, match="boom"), atomic_dir(d, replace=True) as tmp:
        (tmp / "keep.txt").write_text("v2")
        raise RuntimeError("boom")
    assert (d / "keep.txt").read_text() == "v1"
    assert sorted(x.name for x in tmp_path.iterdir()) == ["d", "f.bin"]


def test_directory_replace_is_explicit(tmp_path: Path) -> None:
    d = tmp_path / "d"
    with atomic_dir(d) as tmp:
        (tmp / "a.txt").write_text("1")
    with pytest.raises(FileExistsError, match="already exists"), atomic_dir(d):
        pass
    with atomic_dir(d, replace=True) as tmp:
        (tmp / "b.txt").write_text("2")
    assert sorted(x.name for x in d.iterdir()) == ["b.txt"]
    assert sorted(x.name for x in tmp_path.iterdir()) == ["d"]
    (tmp_path / "plain").write_text("")
    plain = tmp_path / "plain"
    with pytest.raises(FileExistsError, match="a file of that name"), atomic_dir(plain, replace=True):
        pass
    with pytest.raises(IsADirectoryError, match="a directory of that name"), atomic_file(d):
        pass


def test_png_grids_get_ordinary_permissions(umask, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    pytest.importorskip("PIL")
    import torch

    from deqgen.images import save_grid

    umask(0o022)
    p = save_grid(tmp_path / "grid.png", torch.rand(2, 3, 4, 4), nrow=2)
    assert _mode(p) == 0o644 and p.read_bytes()[:4] == b"\x89PNG"
    assert sorted(x.name for x in tmp_path.iterdir()) == ["grid.png"]


def test_a_writer_that_replaces_the_temp_file_still_gets_ordinary_permissions(  # type: ignore[no-untyped-def]
    umask, tmp_path: Path
) -> None:
    import torch
    from safetensors.torch import load_file, save_file

    umask(0o022)
    with atomic_file(tmp_path / "w.safetensors") as tmp:
        save_file({"a": torch.zeros(2)}, str(tmp))  # safetensors renames a private 0600 file onto tmp
    assert _mode(tmp_path / "w.safetensors") == 0o644
    assert torch.equal(load_file(tmp_path / "w.safetensors")["a"], torch.zeros(2))
    with atomic_open(tmp_path / "n.bin") as fh:
        fh.write(b"xyz")
    assert _mode(tmp_path / "n.bin") == 0o644 and (tmp_path / "n.bin").read_bytes() == b"xyz"
    assert sorted(x.name for x in tmp_path.iterdir()) == ["n.bin", "w.safetensors"]


def test_move_dir_into_place_publishes_a_resumable_directory(  # type: ignore[no-untyped-def]
    umask, tmp_path: Path
) -> None:
    umask(0o022)
    part = tmp_path / "tokens.partial"
    part.mkdir()
    atomic_write_text(part / "progress.json", "{}")
    final = move_dir_into_place(part, tmp_path / "tokens")
    assert sorted(x.name for x in tmp_path.iterdir()) == ["tokens"]
    assert _mode(final) == 0o755 and _mode(final / "progress.json") == 0o644
    part.mkdir()
    with pytest.raises(FileExistsError, match="already exists"):
        move_dir_into_place(part, final)
