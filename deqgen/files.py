"""Atomic file and directory writes with ordinary permissions.

Everything deqgen writes goes through here: a reader sees either the old content or the complete new
content, never a torn file, and a crash leaves at most a hidden temp entry beside the target.

**Permissions.** The temp file is created with ``os.open(..., 0o666)`` and the temp directory with
``os.mkdir(..., 0o777)``, so the kernel applies the user's umask exactly as for any ordinary file or
directory (umask 022 gives ``0644`` / ``0755``, umask 077 gives ``0600`` / ``0700``). ``tempfile.mkstemp``
and ``mkdtemp`` would create ``0600`` / ``0700`` whatever the umask, and the rename would keep that, so
colleagues on a shared machine could not read a converted model or a checkpoint. The umask is never read or
changed (it is process-wide state).

**Durability.** File contents are ``fsync``-ed before the rename and the parent directory after it, so the
new name survives a power cut once the function returns.

Example:
    >>> import tempfile, pathlib
    >>> d = pathlib.Path(tempfile.mkdtemp())
    >>> atomic_write_text(d / "note.txt", "hello").read_text()
    'hello'
    >>> with atomic_dir(d / "model") as tmp:
    ...     _ = (tmp / "config.json").write_text("{}")
    >>> sorted(p.name for p in (d / "model").iterdir())
    ['config.json']
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import shutil
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

__all__ = [
    "fsync_dir",
    "atomic_dir",
    "atomic_file",
    "atomic_open",
    "atomic_write_bytes",
    "atomic_write_text",
    "move_dir_into_place",
]

logger = logging.getLogger(__name__)

_FILE_MODE = 0o666  # before the umask, as open() / touch use
_DIR_MODE = 0o777  # before the umask, as mkdir uses
_TRIES = 100


def _temp_name(target: Path, suffix: str) -> Path:
    return target.with_name(f".{target.name}.{secrets.token_hex(6)}{suffix}")


def fsync_dir(path: str | os.PathLike[str]) -> None:
    """Flush a directory's entries (a rename into it) to disk; best effort where directories cannot be opened."""
    _fsync_path(Path(path), directory=True)


def _fsync_path(path: Path, *, directory: bool = False) -> None:
    flags = os.O_RDONLY | (getattr(os, "O_DIRECTORY", 0) if directory else 0)
    try:
        fd = os.open(path, flags)
    except OSError:  # some filesystems (and Windows) do not open directories; durability is best effort there
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            _fsync_path(Path(dirpath) / name)
        _fsync_path(Path(dirpath), directory=True)


def _new_temp_file(target: Path) -> Path:
    for _ in range(_TRIES):
        tmp = _temp_name(target, ".tmp")
        try:
            os.close(os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, _FILE_MODE))
            return tmp
        except FileExistsError:
            continue
    raise FileExistsError(f"could not create a temp file beside {target} after {_TRIES} tries")


def _new_temp_dir(target: Path) -> Path:
    for _ in range(_TRIES):
        tmp = _temp_name(target, ".tmpdir")
        try:
            os.mkdir(tmp, _DIR_MODE)
            return tmp
        except FileExistsError:
            continue
    raise FileExistsError(f"could not create a temp directory beside {target} after {_TRIES} tries")


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temp path beside ``path``; on a clean exit it is synced and renamed onto ``path``.

    For writers that want a file name (``safetensors.torch.save_file``, ``numpy.savez``, ``PIL`` ``save``
    with an explicit ``format``, ``torch.save``). The temp file already exists (empty, with the umask's
    permissions); write to it by name. A writer that replaces the file instead of writing into it (as
    safetensors does) is fine: the umask's permissions are restored before the rename. On an exception the
    temp file is removed and ``path`` is untouched.

    Args:
        path: the final file. Its parent directories are created.

    Yields:
        The temp file's path.

    Raises:
        IsADirectoryError: ``path`` is an existing directory.
    """
    target = Path(path)
    if target.is_dir():
        raise IsADirectoryError(f"cannot write the file {target}: a directory of that name exists")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = _new_temp_file(target)
    mode = stat.S_IMODE(tmp.stat().st_mode)
    try:
        yield tmp
        _restore_mode(tmp, mode)
        _fsync_path(tmp)
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_path(target.parent, directory=True)


def _restore_mode(tmp: Path, mode: int) -> None:
    """Give ``tmp`` back the umask's ``mode`` when the writer replaced it with a file of its own.

    ``safetensors.torch.save_file`` writes a private temp file and renames it onto the name it is given,
    so the file it leaves is ``0600`` whatever the umask.
    """
    if stat.S_IMODE(tmp.stat().st_mode) != mode:
        os.chmod(tmp, mode)


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike[str]) -> Iterator[BinaryIO]:
    """Yield a binary file handle whose content becomes ``path`` on a clean exit (see :func:`atomic_file`).

    For writers that take an open file (``numpy.savez``, ``torch.save``, ``zipfile.ZipFile``, ``json.dump``
    via a text wrapper). The handle is closed, synced and renamed onto ``path`` when the block ends; on an
    exception ``path`` is untouched and no temp file is left.

    Args:
        path: the final file. Its parent directories are created.

    Yields:
        The open temp file (``"wb"``).

    Example:
        >>> import tempfile, pathlib
        >>> p = pathlib.Path(tempfile.mkdtemp()) / "blob.bin"
        >>> with atomic_open(p) as fh:
        ...     _ = fh.write(b"abc")
        >>> p.read_bytes()
        b'abc'
    """
    with atomic_file(path) as tmp, open(tmp, "wb") as fh:
        yield fh


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (see :func:`atomic_file`).

    Args:
        path: the final file.
        data: its complete content.

    Returns:
        ``path`` as a :class:`~pathlib.Path`.
    """
    with atomic_open(path) as fh:
        fh.write(data)
    return Path(path)


def atomic_write_text(path: str | os.PathLike[str], text: str, encoding: str = "utf-8") -> Path:
    """Write ``text`` to ``path`` atomically (see :func:`atomic_file`).

    Args:
        path: the final file.
        text: its complete content.
        encoding: text encoding.

    Returns:
        ``path`` as a :class:`~pathlib.Path`.
    """
    return atomic_write_bytes(path, text.encode(encoding))


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike[str], *, replace: bool = False) -> Iterator[Path]:
    """Yield an empty temp directory beside ``path``; on a clean exit it becomes ``path``.

    Files written inside with ordinary ``open`` get the umask's permissions; the directory itself is made
    with ``mkdir``'s. On a clean exit every file is synced, then the directory is renamed onto ``path``. An
    existing ``path`` is moved aside first and deleted only after the new one is in place, so a crash
    leaves either the old or the new directory (and possibly a hidden ``.<name>.*`` entry to delete).

    Args:
        path: the final directory. Its parent directories are created.
        replace: allow replacing an existing directory at ``path`` (its whole content is deleted: the caller
            decides whether that is acceptable).

    Yields:
        The temp directory's path.

    Raises:
        FileExistsError: ``path`` exists and ``replace`` is False, or it exists and is not a directory.
    """
    target = Path(path)
    _check_dir_target(target, replace)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = _new_temp_dir(target)
    try:
        yield tmp
        # move_dir_into_place looks at the target again: the caller's work took time
        move_dir_into_place(tmp, target, replace=replace)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def move_dir_into_place(
    finished: str | os.PathLike[str], path: str | os.PathLike[str], *, replace: bool = False
) -> Path:
    """Sync every file under the finished directory ``finished`` and rename it onto ``path``.

    For writers that build a directory under a fixed name of their own so that an interrupted write can be
    resumed (where :func:`atomic_dir`'s fresh temp directory would not do). ``finished`` must be on the
    same filesystem as ``path``; make it with ``mkdir`` (not ``tempfile.mkdtemp``) so it has the umask's
    permissions. An existing ``path`` is handled as in :func:`atomic_dir`.

    Args:
        finished: the complete directory to publish.
        path: its final name.
        replace: allow replacing an existing directory at ``path``.

    Returns:
        ``path`` as a :class:`~pathlib.Path`.

    Raises:
        FileExistsError: ``path`` exists and ``replace`` is False, or it exists and is not a directory.
    """
    src, target = Path(finished), Path(path)
    _check_dir_target(target, replace)
    _fsync_tree(src)
    _swap_in(src, target)
    _fsync_path(target.parent, directory=True)
    return target


def _check_dir_target(target: Path, replace: bool) -> None:
    if target.exists() and not target.is_dir():
        raise FileExistsError(f"cannot write the directory {target}: a file of that name exists")
    if target.exists() and not replace:
        raise FileExistsError(f"{target} already exists; choose a new directory name or remove it first")


def _swap_in(tmp: Path, target: Path) -> None:
    if not target.exists():
        os.replace(tmp, target)
        return
    old = _temp_name(target, ".old")
    os.replace(target, old)
    try:
        os.replace(tmp, target)
    except BaseException:
        os.replace(old, target)  # put the previous directory back
        raise
    shutil.rmtree(old, ignore_errors=True)
