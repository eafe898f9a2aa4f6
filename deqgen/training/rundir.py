"""The run directory: checked before anything is written, held by one run at a time.

:func:`open_run_dir` is what ``deqgen train`` does before it writes a byte. In order:

1. ``logging.out_dir`` must be a directory (or not exist yet) under a writable parent.
2. No other run may hold it: an exclusive ``fcntl.flock`` on ``out_dir/.deqgen.lock``. The OS drops the lock
   when the process ends, however it ends, so a ``kill -9`` leaves no stale lock; the file keeps the pid, host
   and start time of the holder for the next run's error message.
3. A non-empty directory is used only when the run resumes it (``checkpoint.resume`` ``auto`` or a path)
   or when the user passed ``overwrite`` (``deqgen train --overwrite``), which clears it first. Files that
   are not a deqgen run's are never cleared: choose another directory.
4. A resumed directory's ``config.yaml`` (and an explicit checkpoint's) must build the same model as this run,
   so a refused resume leaves ``config.yaml`` and ``tokenizer/`` as they were.

Under torchrun rank 0 does all of this and holds the lock; the other ranks wait for its answer and raise the
same error when it fails.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import fcntl
import json
import logging
import os
import shutil
import socket
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import torch.distributed as tdist

from deqgen.training.checkpoint import CONFIG_FILE, CheckpointConfigMismatch, CheckpointError, ConfigCheck
from deqgen.training.distributed import DistInfo
from deqgen.training.schema import TrainConfig

if TYPE_CHECKING:
    from typing_extensions import Self

__all__ = [
    "LOCK_FILE",
    "RunDirBusy",
    "RunDirError",
    "RunLock",
    "check_run_dir",
    "lock_holder",
    "open_run_dir",
]

logger = logging.getLogger(__name__)

#: The lock file inside a run directory (kept after the run: it holds no lock once its process is gone).
LOCK_FILE = ".deqgen.lock"
#: What marks a directory as a deqgen run's (``--overwrite`` clears only these).
_RUN_MARKERS = (CONFIG_FILE, LOCK_FILE, "checkpoints")

T = TypeVar("T")


class RunDirError(ValueError):
    """A run directory that cannot be used as asked; the message names it and says what to do."""


class RunDirBusy(RunDirError):
    """Another process holds the run directory's lock."""


class RunLock:
    """An exclusive ``flock`` held on ``directory/.deqgen.lock`` until :meth:`release` (or process exit).

    Example:
        >>> with RunLock.acquire(tmp / "run") as lock:  # doctest: +SKIP
        ...     ...  # a second acquire here, from any process, raises RunDirBusy
    """

    def __init__(self, path: Path, fd: int) -> None:
        self.path, self._fd = path, fd

    @classmethod
    def acquire(cls, directory: Path) -> RunLock:
        """Create ``directory`` if needed and lock it; write this process's pid, host and start time.

        Raises:
            RunDirBusy: another process holds the lock (the message names it).
        """
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / LOCK_FILE
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise RunDirBusy(_busy_message(directory, _read_holder(path))) from None
            raise
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps(_holder_info()).encode())
        os.fsync(fd)
        return cls(path, fd)

    def release(self) -> None:
        """Drop the lock (the file stays; it locks nothing by itself)."""
        if self._fd >= 0:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def _holder_info() -> dict[str, Any]:
    started = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
    return {"pid": os.getpid(), "host": socket.gethostname(), "started": started, "argv": sys.argv}


def _read_holder(path: Path) -> dict[str, Any]:
    try:
        info = json.loads(path.read_text() or "{}")
    except (OSError, ValueError):
        return {}
    return info if isinstance(info, dict) else {}


def _busy_message(directory: Path, holder: dict[str, Any]) -> str:
    pid, host, started = (holder.get(k, "?") for k in ("pid", "host", "started"))
    who = f"pid {pid} on host {host}, started {started}" if holder else "a process that has not named itself"
    return (
        f"logging.out_dir={directory} is in use by another deqgen run ({who}); wait for it to finish, "
        "stop it, or choose another logging.out_dir"
    )


def lock_holder(directory: Path) -> dict[str, Any] | None:
    """Who holds ``directory``'s lock (``pid``, ``host``, ``started``), or None when nobody does.

    Probes without creating anything: a directory without a lock file is free.
    """
    path = directory / LOCK_FILE
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return _read_holder(path)
    else:
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


# ---- read-only checks --------------------------------------------------------------------------------------


def check_writable(out: Path) -> None:
    """``out`` is a directory, or can be created under a writable directory.

    Raises:
        RunDirError: ``out`` (or a parent) is an existing file, or its nearest existing parent is not
            writable.
    """
    if out.exists() and not out.is_dir():
        raise RunDirError(
            f"logging.out_dir={out} is an existing file, not a directory; choose a directory path"
        )
    existing = out
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise RunDirError(f"logging.out_dir={out}: its parent {existing} is a file; choose a directory path")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise RunDirError(
            f"logging.out_dir={out} is not writable (no write permission on {existing}); "
            "choose a writable location"
        )


def _entries(out: Path) -> list[str]:
    return sorted(p.name for p in out.iterdir() if p.name != LOCK_FILE) if out.is_dir() else []


def _is_run_dir(out: Path) -> bool:
    return any((out / marker).exists() for marker in _RUN_MARKERS)


def _inside(path: str, out: Path) -> bool:
    return Path(path).resolve().is_relative_to(out.resolve())


def check_contents(out: Path, resume: str, overwrite: bool) -> None:
    """A non-empty ``out`` is used only to resume it, or with ``overwrite`` when it is a deqgen run directory.

    Raises:
        RunDirError: what to do instead (resume, ``--overwrite``, another ``logging.out_dir``).
    """
    entries = _entries(out)
    if not entries:
        return
    shown = ", ".join(entries[:5]) + (", ..." if len(entries) > 5 else "")
    if not _is_run_dir(out):
        raise RunDirError(
            f"logging.out_dir={out} holds files that are not a deqgen run ({shown}); "
            "nothing there is touched: choose a new or empty logging.out_dir"
        )
    if overwrite:
        if resume not in ("auto", "none") and _inside(resume, out):
            raise RunDirError(
                f"--overwrite would delete checkpoint.resume={resume}, which lies inside "
                f"logging.out_dir={out}; drop one of them"
            )
        return
    if resume == "none":
        raise RunDirError(
            f"logging.out_dir={out} already holds a run ({shown}) and checkpoint.resume=none: "
            "resume it (--resume auto), clear it first (--overwrite), or choose another "
            "logging.out_dir"
        )


def check_resume_compatible(cfg: TrainConfig, out: Path, check: ConfigCheck) -> None:
    """The config a resumed run was started with (``out/config.yaml``) and the explicit checkpoint's builds
    the same model as ``cfg``.

    Raises:
        CheckpointConfigMismatch: from ``check``; names the differing fields.
    """
    sources = [out / CONFIG_FILE]
    resume = cfg.checkpoint.resume
    if resume not in ("auto", "none"):
        sources.append(Path(resume) / CONFIG_FILE)
    for source in sources:
        if source.is_file():
            check(source.read_text(), cfg, str(source))


def check_run_dir(cfg: TrainConfig, check: ConfigCheck, *, overwrite: bool = False) -> None:
    """Every read-only check of :func:`open_run_dir` (nothing is created or written).

    Raises:
        RunDirError: a bad ``logging.out_dir``, a busy one, or a non-empty one used without resume/overwrite.
        CheckpointConfigMismatch: the run being resumed built a different model.
    """
    out = Path(cfg.logging.out_dir)
    check_writable(out)
    holder = lock_holder(out)
    if holder is not None:
        raise RunDirBusy(_busy_message(out, holder))
    check_contents(out, cfg.checkpoint.resume, overwrite)
    if not overwrite:
        check_resume_compatible(cfg, out, check)


def clear_run_dir(out: Path) -> None:
    """Delete everything in the run directory ``out`` but its lock file (``--overwrite``)."""
    for path in out.iterdir():
        if path.name == LOCK_FILE:
            continue
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()
    logger.info("--overwrite: cleared %s", out)


def _prepare(cfg: TrainConfig, check: ConfigCheck, overwrite: bool) -> RunLock:
    """Rank 0: check, lock, clear when overwriting; the lock is held on return."""
    out = Path(cfg.logging.out_dir)
    check_run_dir(cfg, check, overwrite=overwrite)
    lock = RunLock.acquire(out)
    try:
        check_contents(out, cfg.checkpoint.resume, overwrite)  # again, now that no other run can change it
        if overwrite:
            clear_run_dir(out)
    except BaseException:
        lock.release()
        raise
    return lock


@contextlib.contextmanager
def open_run_dir(
    cfg: TrainConfig, dist: DistInfo, check: ConfigCheck, *, overwrite: bool = False
) -> Iterator[RunLock | None]:
    """Check and lock ``cfg.logging.out_dir`` for the duration of the ``with`` block (rank 0 holds the lock).

    Args:
        cfg: the validated recipe.
        dist: this process's distributed facts.
        check: compares a stored config with ``cfg`` (:func:`deqgen.training.config.check_config_compatible`).
        overwrite: clear a previous run in the directory first (``deqgen train --overwrite``).

    Raises:
        RunDirError: see :func:`check_run_dir`; raised on every rank when rank 0's checks fail.
        CheckpointConfigMismatch: see :func:`check_resume_compatible`.
    """
    lock = _on_main(lambda: _prepare(cfg, check, overwrite), dist)
    try:
        yield lock
    finally:
        if lock is not None:
            lock.release()


_ERRORS: dict[str, type[Exception]] = {
    cls.__name__: cls
    for cls in (RunDirError, RunDirBusy, CheckpointConfigMismatch, CheckpointError, ValueError, OSError)
}


def _on_main(fn: Callable[[], T], dist: DistInfo) -> T | None:
    """``fn()`` on rank 0; the other ranks get None once it succeeded, or the same error when it failed."""
    grouped = dist.is_distributed and tdist.is_available() and tdist.is_initialized()
    if not grouped:
        return fn() if dist.is_main else None
    box: list[Any] = [None]
    result: T | None = None
    if dist.is_main:
        try:
            result = fn()
        except tuple(_ERRORS.values()) as e:
            box[0] = (type(e).__name__, str(e))
            tdist.broadcast_object_list(box, src=0)
            raise
    tdist.broadcast_object_list(box, src=0)
    if box[0] is not None:
        name, message = box[0]
        raise _ERRORS.get(name, RunDirError)(f"rank 0: {message}")
    return result
