"""Atomic, verifiable, resumable checkpoints that carry their config.

Layout of one checkpoint (``directory/ckpt_{step:08d}/``):

- ``model.safetensors``: the model's full state dict (rank 0);
- ``state.pt``: the caller's training state (optimizer, scheduler, scaler, data position, epoch, ...) plus
  ``step`` and ``config_yaml``, the validated recipe config as YAML text (rank 0);
- ``config.yaml``: the same config, for people;
- ``rng_rank{r}.pt``: rank ``r``'s RNG states (torch, CUDA, numpy, Python, named generators such as the
  S-JFB stream); every rank writes its own and reads its own;
- ``MANIFEST.json``: size and sha256 of every file above, written **last**.

Atomicity: every rank writes into ``directory/.ckpt_{step:08d}.tmp``; after a barrier rank 0 writes the
manifest and renames the directory to its final name, so a final-named directory was complete when it
appeared; the manifest then detects later damage (truncation, bit rot). Older checkpoints beyond
``keep_last`` are deleted only after the new one is in place, and only verified ones count: a damaged
checkpoint is moved aside as ``ckpt_*.corrupt`` (never loaded, never deleted), so the newest verified
checkpoint always survives. ``load("auto")`` takes the newest checkpoint that verifies, logging and setting
aside damaged ones; an explicit damaged path raises :class:`CheckpointError` naming the file (and is left
where it is). A failed write (disk full: "no space left on device") raises :class:`CheckpointWriteError`
after removing the partial save; the previous checkpoints stay.
Everything is read back with ``torch.load(weights_only=True)`` or safetensors.

All ranks must see ``directory`` (one node, or a shared filesystem) and call :meth:`CheckpointManager.save`
together. For FSDP2 (or any wrapper) gather full state dicts first with :func:`gather_full_state` (every
rank calls it) and restore with :func:`scatter_full_state`.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import pickle
import random
import re
import shutil
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as tdist
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from deqgen.errors import CheckpointError
from deqgen.files import atomic_file, atomic_open, atomic_write_text, fsync_dir
from deqgen.training.distributed import DistInfo, barrier
from deqgen.training.schema import TrainConfig, config_to_yaml

__all__ = [
    "Checkpoint",
    "CheckpointConfigMismatch",
    "CheckpointError",
    "CheckpointManager",
    "CheckpointWriteError",
    "ConfigCheck",
    "capture_rng_state",
    "gather_full_state",
    "restore_rng_state",
    "scatter_full_state",
]

logger = logging.getLogger(__name__)

MODEL_FILE = "model.safetensors"
STATE_FILE = "state.pt"
CONFIG_FILE = "config.yaml"
MANIFEST_FILE = "MANIFEST.json"
FORMAT_VERSION = 1
_FINAL = re.compile(r"^ckpt_(\d{8})$")
_TEMP = re.compile(r"^\.ckpt_(\d{8})\.(tmp|old)$")


class CheckpointWriteError(CheckpointError):
    """Saving a checkpoint failed (e.g. no space left on device); the previous checkpoints are kept."""


class CheckpointConfigMismatch(ValueError):
    """The checkpoint's stored config builds a different model than the run's config."""


#: ``check(saved_yaml, current, source)``: raise :class:`CheckpointConfigMismatch` when the config stored in
#: checkpoint ``source`` builds a different model than ``current``
#: (:func:`deqgen.training.config.check_config_compatible`).
ConfigCheck = Callable[[str, TrainConfig, str], None]


@dataclass(frozen=True)
class Checkpoint:
    """What :meth:`CheckpointManager.load` returns.

    Attributes:
        path: the checkpoint directory.
        step: the optimizer step it was saved at.
        model_state: name -> tensor, on CPU (empty on non-main ranks with ``model_on_main_only``).
        train_state: the dict given to ``save`` (plus ``step`` and ``config_yaml``).
        rng_state: this rank's RNG states for :func:`restore_rng_state`, or None when the checkpoint has
            none for this rank (it was saved with fewer ranks).
        config_yaml: the config the checkpoint was trained with.
    """

    path: Path
    step: int
    model_state: dict[str, Tensor]
    train_state: dict[str, Any]
    rng_state: dict[str, Any] | None
    config_yaml: str | None


# ---- RNG -------------------------------------------------------------------------------------------------------


def capture_rng_state(generators: Mapping[str, torch.Generator] | None = None) -> dict[str, Any]:
    """This process's RNG states as tensors and plain lists (loadable with ``weights_only=True``).

    Args:
        generators: named generators to save too, e.g. ``{"sjfb": shared_generator}``.
    """
    kind, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)  # type: ignore[misc]
    version, py_state, gauss_next = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": list(torch.cuda.get_rng_state_all()) if torch.cuda.is_available() else [],
        "numpy": {
            "kind": str(kind),
            "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
        "python": {"version": int(version), "state": list(py_state), "gauss_next": gauss_next},
        "generators": {name: g.get_state() for name, g in (generators or {}).items()},
    }


def restore_rng_state(
    state: Mapping[str, Any], generators: Mapping[str, torch.Generator] | None = None
) -> None:
    """Undo :func:`capture_rng_state`: the next random draws equal those after the capture.

    Named generators missing from ``state`` are left alone (with a warning).
    """
    torch.set_rng_state(state["torch"])
    cuda_states = state.get("cuda") or []
    if cuda_states and torch.cuda.is_available() and len(cuda_states) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda_states)
    n = state["numpy"]
    np.random.set_state(
        (n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"])
    )
    p = state["python"]
    random.setstate((p["version"], tuple(p["state"]), p["gauss_next"]))
    saved = state.get("generators", {})
    for name, g in (generators or {}).items():
        if name in saved:
            g.set_state(saved[name])
        else:
            logger.warning("checkpoint has no state for generator %r; it keeps its current state", name)


# ---- files ------------------------------------------------------------------------------------------------------


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def _for_safetensors(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """CPU, contiguous tensors with no shared storage (tied weights are cloned; safetensors refuses them)."""
    seen: set[int] = set()
    out: dict[str, Tensor] = {}
    for name, value in state.items():
        if not isinstance(value, Tensor):
            raise TypeError(
                f"model_state[{name!r}] is a {type(value).__name__}; model.safetensors holds tensors only"
            )
        t = value.detach().cpu()
        ptr = t.untyped_storage().data_ptr()
        if ptr in seen or not t.is_contiguous() or t.untyped_storage().nbytes() != t.nbytes:
            t = t.contiguous().clone()
        seen.add(t.untyped_storage().data_ptr())
        out[name] = t
    return out


def _torch_save(obj: Any, path: Path) -> None:
    with atomic_open(path) as f:
        torch.save(obj, f)


def _write_failure(e: BaseException, tmp: Path) -> str:
    """What went wrong while writing into ``tmp``, in words (disk full is named as such)."""
    if isinstance(e, OSError) and e.errno == errno.ENOSPC:
        return f"no space left on device while writing into {tmp}"
    text = str(e)
    if "unexpected pos" in text or "write failed" in text:  # torch.save's wording for a short write
        try:
            free = shutil.disk_usage(tmp.parent).free
        except OSError:
            free = -1
        return (
            f"no space left on device while writing into {tmp}? ({free} bytes free; torch said: "
            f"{text.strip().splitlines()[-1][:200]})"
        )
    return f"cannot write {tmp}: {type(e).__name__}: {text[:300]}"


def _step_of(path: Path) -> int:
    m = _FINAL.match(path.name)
    if m is None:
        raise CheckpointError(f"{path} is not a checkpoint directory (expected a name like ckpt_00001000)")
    return int(m.group(1))


# ---- the manager ------------------------------------------------------------------------------------------------


class CheckpointManager:
    """Saves, prunes, verifies and loads the checkpoints of one run directory.

    Args:
        directory: where ``ckpt_*`` directories live (e.g. ``cfg.logging.out_dir / "checkpoints"``).
        keep_last: complete checkpoints to keep (``cfg.checkpoint.keep_last``).
        dist: this process's :class:`~deqgen.training.distributed.DistInfo` (single process when None).
        config: the run's validated config: stored with every save.
        check: compares a checkpoint's stored config with ``config`` on load (none when None).
        verify_hash: check sha256 (not just sizes) before loading (``cfg.checkpoint.verify_hash``).

    Example:
        >>> mgr = CheckpointManager(tmp / "ckpts", keep_last=2, config=cfg)  # doctest: +SKIP
        >>> mgr.save(100, model.state_dict(), {"optimizer": opt.state_dict()}, generators={"sjfb": g})
        >>> ckpt = mgr.load("auto")  # None when there is nothing to resume
    """

    def __init__(
        self,
        directory: str | os.PathLike[str],
        keep_last: int = 3,
        dist: DistInfo | None = None,
        *,
        config: TrainConfig | None = None,
        check: ConfigCheck | None = None,
        verify_hash: bool = True,
    ) -> None:
        if keep_last < 1:
            raise ValueError(f"CheckpointManager got keep_last={keep_last}; use keep_last >= 1")
        self.directory = Path(directory)
        self.keep_last = keep_last
        self.dist = dist or DistInfo()
        self.config = config
        self.check = check
        self.verify_hash = verify_hash
        self._verified: set[Path] = set()  # checkpoints this process wrote or verified

    # -- saving --------------------------------------------------------------------------------------------------
    def save(
        self,
        step: int,
        model_state: Mapping[str, Tensor],
        train_state: Mapping[str, Any],
        *,
        generators: Mapping[str, torch.Generator] | None = None,
    ) -> Path:
        """Write checkpoint ``step`` atomically. Every rank calls this (it synchronises with barriers).

        Args:
            step: the optimizer step (the directory name).
            model_state: the full model state dict; read on rank 0 only (pass ``{}`` elsewhere).
            train_state: optimizer / scheduler / scaler state dicts, epoch, data position ...; read on rank 0
                only. Keep it to tensors, numbers, strings, lists and dicts (``weights_only`` loading).
            generators: named generators whose states go into this rank's RNG file with the global RNGs.

        Returns:
            The final checkpoint directory.
        """
        final, tmp = self.directory / f"ckpt_{step:08d}", self.directory / f".ckpt_{step:08d}.tmp"
        if self.dist.is_main:
            if tmp.exists():
                shutil.rmtree(tmp)
            tmp.mkdir(parents=True)
        barrier()
        failure = None
        try:
            if self.dist.is_main:
                self._write_main_files(tmp, step, model_state, train_state)
            _torch_save(capture_rng_state(generators), tmp / f"rng_rank{self.dist.rank}.pt")
        except (OSError, RuntimeError, SafetensorError) as e:
            failure = _write_failure(e, tmp)
        self._raise_if_any_failed(failure, tmp)
        if self.dist.is_main:
            self._finish(tmp, final, step)
            self._verified.add(final)
            self.prune()
        barrier()
        return final

    def _raise_if_any_failed(self, failure: str | None, tmp: Path) -> None:
        """Share every rank's write failure (a barrier too); on any, drop the partial save and raise."""
        failures = [failure]
        if self.dist.is_distributed and tdist.is_available() and tdist.is_initialized():
            failures = [None] * self.dist.world_size
            tdist.all_gather_object(failures, failure)
        found = [
            f if len(failures) == 1 else f"rank {r}: {f}" for r, f in enumerate(failures) if f is not None
        ]
        if not found:
            return
        if self.dist.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
        kept = self.complete_checkpoints()
        previous = f"the previous checkpoint {kept[-1]} is kept" if kept else "there is no earlier one"
        raise CheckpointWriteError(
            f"saving checkpoint {tmp.name} failed: {'; '.join(found)}; {previous}. "
            "Free space (or fix the file system) and resume with --resume auto"
        )

    def _write_main_files(
        self, tmp: Path, step: int, model_state: Mapping[str, Tensor], train_state: Mapping[str, Any]
    ) -> None:
        config_yaml = None if self.config is None else config_to_yaml(self.config)
        with atomic_file(tmp / MODEL_FILE) as part:
            save_file(_for_safetensors(model_state), str(part), metadata={"step": str(step)})
        _torch_save(
            {**train_state, "step": step, "config_yaml": config_yaml, "format_version": FORMAT_VERSION},
            tmp / STATE_FILE,
        )
        if config_yaml is not None:
            atomic_write_text(tmp / CONFIG_FILE, config_yaml)

    def _finish(self, tmp: Path, final: Path, step: int) -> None:
        files = {p.name: {"size": p.stat().st_size, "sha256": _sha256(p)} for p in sorted(tmp.iterdir())}
        manifest = {
            "format_version": FORMAT_VERSION,
            "step": step,
            "world_size": self.dist.world_size,
            "files": files,
        }
        atomic_write_text(
            tmp / MANIFEST_FILE, json.dumps(manifest, indent=1)
        )  # last: marks the save complete
        fsync_dir(tmp)
        if final.exists():  # re-saving a step: move the old one aside first, delete it after the swap
            old = self.directory / f".ckpt_{step:08d}.old"
            if old.exists():
                shutil.rmtree(old)
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old)
        else:
            os.replace(tmp, final)
        fsync_dir(self.directory)
        logger.info("saved checkpoint %s", final)

    def prune(self) -> None:
        """Delete verified checkpoints beyond the newest ``keep_last`` verified ones, and leftovers of
        interrupted saves. A damaged checkpoint is moved aside (``ckpt_*.corrupt``), never counted as kept;
        the newest verified checkpoint is never deleted."""
        verified = [p for p in self.complete_checkpoints() if self._check_or_set_aside(p)]
        newest = _step_of(verified[-1]) if verified else -1
        for path in verified[: -self.keep_last]:
            shutil.rmtree(path, ignore_errors=True)
            self._verified.discard(path)
            logger.info("deleted old checkpoint %s (keep_last=%d)", path, self.keep_last)
        for path in self.directory.iterdir() if self.directory.is_dir() else ():
            m = _TEMP.match(path.name)
            if m is not None and int(m.group(1)) < newest:
                shutil.rmtree(path, ignore_errors=True)

    def _check_or_set_aside(self, path: Path) -> bool:
        """True when ``path`` verifies (checked once per process); else move it aside as ``*.corrupt``."""
        if path in self._verified:
            return True
        try:
            self.verify(path)
        except CheckpointError as e:
            self.set_aside(path, str(e))
            return False
        self._verified.add(path)
        return True

    def set_aside(self, path: Path, reason: str) -> Path:
        """Rename the damaged checkpoint ``path`` to ``ckpt_*.corrupt`` (kept, never loaded again)."""
        target = path.with_name(path.name + ".corrupt")
        n = 1
        while target.exists():
            n += 1
            target = path.with_name(f"{path.name}.corrupt{n}")
        os.replace(path, target)
        logger.warning("moved damaged checkpoint aside to %s (%s)", target, reason)
        return target

    # -- finding and verifying -----------------------------------------------------------------------------------
    def complete_checkpoints(self) -> list[Path]:
        """Final-named checkpoint directories that have a manifest, oldest first (not yet verified)."""
        if not self.directory.is_dir():
            return []
        found = [
            p
            for p in self.directory.iterdir()
            if p.is_dir() and _FINAL.match(p.name) and (p / MANIFEST_FILE).is_file()
        ]
        return sorted(found, key=_step_of)

    def verify(self, path: str | os.PathLike[str]) -> None:
        """Check that ``path`` is a complete, undamaged checkpoint.

        Raises:
            CheckpointError: missing directory or manifest, a listed file missing or of the wrong size or
                hash, or an unreadable safetensors header; the message names the file.
        """
        path = Path(path)
        if not path.is_dir():
            raise CheckpointError(f"checkpoint {path} does not exist")
        manifest_path = path / MANIFEST_FILE
        if not manifest_path.is_file():
            raise CheckpointError(
                f"checkpoint {path} is incomplete: {manifest_path} is missing (interrupted save?)"
            )
        try:
            files = json.loads(manifest_path.read_text())["files"]
        except (ValueError, KeyError) as e:
            raise CheckpointError(f"checkpoint manifest {manifest_path} is unreadable ({e})") from None
        for required in (MODEL_FILE, STATE_FILE):
            if required not in files:
                raise CheckpointError(f"checkpoint {path}: {MANIFEST_FILE} does not list {required}")
        for name, meta in files.items():
            self._verify_file(path / name, meta)
        try:
            with safe_open(str(path / MODEL_FILE), framework="pt") as f:
                f.keys()
        except (SafetensorError, OSError, ValueError) as e:
            raise CheckpointError(
                f"checkpoint file {path / MODEL_FILE} has a bad safetensors header ({e})"
            ) from None

    def _verify_file(self, file: Path, meta: Mapping[str, Any]) -> None:
        if not file.is_file():
            raise CheckpointError(f"checkpoint file {file} is missing")
        size = file.stat().st_size
        if size != meta["size"]:
            raise CheckpointError(
                f"checkpoint file {file} has {size} bytes, the manifest says {meta['size']} "
                "(truncated or overwritten)"
            )
        if self.verify_hash and _sha256(file) != meta["sha256"]:
            raise CheckpointError(
                f"checkpoint file {file} does not match its sha256 in the manifest (corrupt)"
            )

    def latest_complete(self, *, set_aside: bool = False) -> Path | None:
        """The newest checkpoint that verifies; damaged newer ones are logged and skipped (and moved aside
        as ``ckpt_*.corrupt`` when ``set_aside``)."""
        for path in reversed(self.complete_checkpoints()):
            try:
                self.verify(path)
            except CheckpointError as e:
                logger.warning("skipping damaged checkpoint: %s; falling back to the previous one", e)
                if set_aside:
                    self.set_aside(path, "damaged")
                continue
            self._verified.add(path)
            return path
        for leftover in sorted(self.directory.glob(".ckpt_*.tmp")) if self.directory.is_dir() else ():
            logger.warning("ignoring %s: a save that never finished", leftover)
        return None

    # -- loading -------------------------------------------------------------------------------------------------
    def load(
        self, which: str | os.PathLike[str] = "auto", *, model_on_main_only: bool = False
    ) -> Checkpoint | None:
        """Load a checkpoint: ``"auto"`` (newest complete, or None), ``"none"`` (None) or a directory.

        Rank 0 chooses and verifies; the other ranks follow its choice. When the manager has a ``config``,
        the checkpoint's stored config must build the same model.

        Args:
            which: ``cfg.checkpoint.resume``.
            model_on_main_only: non-main ranks skip reading the model weights (FSDP2 with
                ``scatter_full_state``, which broadcasts from rank 0).

        Raises:
            CheckpointError: an explicit path that is missing, incomplete or corrupt.
            CheckpointConfigMismatch: the stored config builds a different model.
        """
        if str(which) == "none":
            return None
        chosen = self._agree(lambda: self._choose(which))
        if chosen is None:
            logger.info("no complete checkpoint in %s; starting from scratch", self.directory)
            return None
        path = Path(chosen)
        ckpt = self._read(path, read_model=self.dist.is_main or not model_on_main_only)
        if self.check is not None and self.config is not None and ckpt.config_yaml is not None:
            self.check(ckpt.config_yaml, self.config, str(path))
        logger.info("resuming from %s (step %d)", path, ckpt.step)
        return ckpt

    def _choose(self, which: str | os.PathLike[str]) -> str | None:
        if str(which) == "auto":
            found = self.latest_complete(set_aside=True)
            return None if found is None else str(found)
        self.verify(which)
        return str(which)

    def _agree(self, choose: Any) -> str | None:
        """Run ``choose`` on rank 0 and share its answer (or its CheckpointError) with every rank."""
        if not (self.dist.is_distributed and tdist.is_available() and tdist.is_initialized()):
            return choose()
        box: list[Any] = [None]
        if self.dist.is_main:
            try:
                box[0] = ("ok", choose())
            except CheckpointError as e:
                box[0] = ("error", str(e))
        tdist.broadcast_object_list(box, src=0)
        status, value = box[0]
        if status == "error":
            raise CheckpointError(value)
        return value

    def _read(self, path: Path, *, read_model: bool) -> Checkpoint:
        try:
            model_state = load_file(str(path / MODEL_FILE), device="cpu") if read_model else {}
            train_state = torch.load(path / STATE_FILE, map_location="cpu", weights_only=True)
        except (SafetensorError, RuntimeError, OSError, EOFError, pickle.UnpicklingError) as e:
            raise CheckpointError(f"cannot read checkpoint {path}: {e}") from None
        rng_file = path / f"rng_rank{self.dist.rank}.pt"
        rng_state = None
        if rng_file.is_file():
            rng_state = torch.load(rng_file, map_location="cpu", weights_only=True)
        else:
            logger.warning(
                "%s has no RNG state for rank %d (saved with fewer ranks); keeping fresh seeds",
                path,
                self.dist.rank,
            )
        return Checkpoint(
            path=path,
            step=int(train_state["step"]),
            model_state=model_state,
            train_state=train_state,
            rng_state=rng_state,
            config_yaml=train_state.get("config_yaml"),
        )


# ---- wrapped models (DDP, FSDP2) -----------------------------------------------------------------------------------


def gather_full_state(
    model: nn.Module, optimizer: torch.optim.Optimizer | None = None
) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Full (unsharded, CPU) model and optimizer state dicts of a DDP/FSDP2/plain model, keyed by parameter
    name. A collective under FSDP2: every rank calls it; pass the results to :meth:`CheckpointManager.save`
    (which reads them on rank 0)."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    model_state = get_model_state_dict(model, options=options)
    optim_state = {} if optimizer is None else get_optimizer_state_dict(model, optimizer, options=options)
    return model_state, optim_state  # type: ignore[return-value]


def scatter_full_state(
    model: nn.Module,
    model_state: Mapping[str, Tensor],
    optimizer: torch.optim.Optimizer | None = None,
    optim_state: Mapping[str, Any] | None = None,
) -> None:
    """Load full state dicts (from :func:`gather_full_state`) into a DDP/FSDP2/plain model and optimizer.

    With a process group, rank 0's dicts are broadcast (other ranks may pass empty dicts, e.g. from
    ``load(..., model_on_main_only=True)``); without one they are loaded directly.
    """
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    grouped = tdist.is_available() and tdist.is_initialized() and tdist.get_world_size() > 1
    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=grouped)
    set_model_state_dict(model, dict(model_state), options=options)
    if optimizer is not None and optim_state is not None:
        set_optimizer_state_dict(model, optimizer, dict(optim_state), options=options)
