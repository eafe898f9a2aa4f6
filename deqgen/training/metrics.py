"""Metric sinks and console logging for training runs, gated on rank 0.

:func:`make_metric_logger` returns a :class:`MetricLogger` that fans ``log(step, metrics)`` out to sinks:
stdout (through :mod:`logging`), a JSONL file (one JSON object per line, flushed each time) and optionally
TensorBoard and Weights & Biases (``logging.wandb``; ``pip install deqgen[logging]``). Ranks other than 0
get a logger with no sinks, so call sites never test the rank. Average
values over ranks first (:func:`deqgen.training.distributed.all_reduce_mean`). :func:`progress_bar` gives a tqdm
bar on a terminal and a no-op otherwise.

The module is not named ``logging`` so it never shadows the standard :mod:`logging`.
"""

from __future__ import annotations

import json
import logging
import math
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, Protocol

from deqgen.training.distributed import DistInfo

if TYPE_CHECKING:
    from typing_extensions import Self

__all__ = [
    "JsonlSink",
    "MetricLogger",
    "MetricSink",
    "NullProgress",
    "StdoutSink",
    "TensorBoardSink",
    "WandbSink",
    "make_metric_logger",
    "progress_bar",
    "setup_logging",
]

logger = logging.getLogger(__name__)


def _scalar(value: Any) -> float | int | str | None:
    """A JSON-friendly scalar from a number, a 0-d tensor or a string (NaN/inf become null)."""
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, (bool, int, str)):
        return value
    value = float(value)
    return value if math.isfinite(value) else None


class MetricSink(Protocol):
    """Something that records scalar metrics at a step."""

    def log(self, step: int, metrics: Mapping[str, Any]) -> None:
        """Record ``metrics`` (numbers, 0-d tensors or strings, keyed by name) at optimizer step ``step``."""
        ...

    def close(self) -> None:
        """Flush and release the sink's file or writer; no ``log`` calls may follow."""
        ...


class StdoutSink:
    """Metrics as one ``logging`` INFO line: ``step 100 | loss 3.2100 | lr 1.6e-04``."""

    def __init__(self, log: logging.Logger | None = None) -> None:
        self._log = log or logging.getLogger("deqgen.training.metrics")

    def log(self, step: int, metrics: Mapping[str, Any]) -> None:
        """Emit one INFO line; floats are printed with 4 significant digits, other values as they are."""
        parts = [f"step {step}"]
        for key, value in metrics.items():
            v = _scalar(value)
            parts.append(f"{key} {v:.4g}" if isinstance(v, float) else f"{key} {v}")
        self._log.info(" | ".join(parts))

    def close(self) -> None:
        """Nothing to release: the lines go through :mod:`logging`."""


class JsonlSink:
    """Appends ``{"step": .., "time": .., **metrics}`` per call to a file, flushed at once (safe to tail)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 - closed in close()

    def log(self, step: int, metrics: Mapping[str, Any]) -> None:
        """Append one JSON line; 0-d tensors become numbers and NaN/inf become ``null``."""
        record = {"step": step, "time": round(time.time(), 3), **{k: _scalar(v) for k, v in metrics.items()}}
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()

    def close(self) -> None:
        """Close the file."""
        self._file.close()


class TensorBoardSink:
    """TensorBoard scalars via ``torch.utils.tensorboard.SummaryWriter`` (imported here, lazily).

    Raises:
        ImportError: the ``tensorboard`` package is missing (the message gives the pip command).
    """

    def __init__(self, log_dir: str | Path) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise ImportError(
                "logging.tensorboard is true but the 'tensorboard' package is not installed: "
                "pip install tensorboard, or set logging.tensorboard=false"
            ) from None
        self._writer = SummaryWriter(log_dir=str(log_dir))

    def log(self, step: int, metrics: Mapping[str, Any]) -> None:
        """Add each finite number in ``metrics`` at ``step``; strings, booleans and NaN/inf are skipped."""
        for key, value in metrics.items():
            v = _scalar(value)
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                self._writer.add_scalar(key, v, step)
        self._writer.flush()

    def close(self) -> None:
        """Close the event file."""
        self._writer.close()


class WandbSink:
    """Weights & Biases scalars: one ``wandb`` run per model, its files under ``directory`` (imported lazily).

    ``mode="offline"`` writes the run locally (``wandb sync`` uploads it later); ``WANDB_MODE`` in the
    environment overrides ``mode``, as wandb documents.

    Args:
        project: the wandb project.
        mode: ``online``, ``offline`` or ``disabled``.
        directory: where wandb writes (``out_dir/wandb``).
        name: the run's name (e.g. ``model``).
        config: the recipe as a plain dict, stored with the run.

    Raises:
        ImportError: the ``wandb`` package is missing (the message gives the pip command).
    """

    def __init__(
        self,
        project: str,
        mode: str,
        directory: str | Path,
        name: str,
        config: Mapping[str, Any] | None = None,
    ) -> None:
        try:
            import wandb
        except ImportError:
            raise ImportError(
                "logging.wandb is set but the 'wandb' package is not installed: "
                "pip install wandb "
                "(or deqgen[logging]), or set logging.wandb=null"
            ) from None
        Path(directory).mkdir(parents=True, exist_ok=True)
        self._run = wandb.init(
            project=project,
            mode=mode,
            dir=str(directory),
            name=name,
            config=dict(config or {}),
            reinit="create_new",
        )

    def log(self, step: int, metrics: Mapping[str, Any]) -> None:
        """Log each finite number in ``metrics`` at ``step``; strings, booleans and NaN/inf are skipped."""
        values = {
            k: v
            for k, v in ((k, _scalar(v)) for k, v in metrics.items())
            if isinstance(v, (int, float)) and not isinstance(v, bool)
        }
        self._run.log(values, step=step)

    def close(self) -> None:
        """Finish the run (offline: its files are complete)."""
        self._run.finish()


class MetricLogger:
    """Fans metrics out to its sinks; with no sinks (non-main ranks) every call is a no-op.

    Use as a context manager, or call :meth:`close`.
    """

    def __init__(self, sinks: Sequence[MetricSink] = ()) -> None:
        self.sinks = tuple(sinks)

    def log(self, step: int, metrics: Mapping[str, Any]) -> None:
        """Record ``metrics`` (numbers or 0-d tensors) at ``step`` in every sink."""
        for sink in self.sinks:
            sink.log(step, metrics)

    def close(self) -> None:
        """Close every sink."""
        for sink in self.sinks:
            sink.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


def make_metric_logger(
    logging_cfg: Any,
    info: DistInfo,
    out_dir: str | Path | None = None,
    *,
    prefix: str = "",
    run_config: Mapping[str, Any] | None = None,
) -> MetricLogger:
    """The sinks a recipe's ``logging`` section asks for, on rank 0 only.

    Args:
        logging_cfg: :class:`deqgen.training.schema.LoggingSection` (``jsonl``, ``tensorboard``, ``out_dir``).
        info: this process's :class:`DistInfo`.
        out_dir: where ``{prefix}metrics.jsonl`` and ``tb/`` go (default ``logging_cfg.out_dir``).
        prefix: names one model's files, e.g. ``"model_"``: ``model_metrics.jsonl``, ``tb/model`` and the
            wandb run ``model``.
        run_config: the recipe as a plain dict, stored with the wandb run.
    """
    if not info.is_main:
        return MetricLogger()
    root = Path(out_dir if out_dir is not None else logging_cfg.out_dir)
    sinks: list[MetricSink] = [StdoutSink()]
    if logging_cfg.jsonl:
        sinks.append(JsonlSink(root / f"{prefix}metrics.jsonl"))
    if logging_cfg.tensorboard:
        sinks.append(TensorBoardSink(root / "tb" / prefix.rstrip("_") if prefix else root / "tb"))
    wandb_cfg = getattr(logging_cfg, "wandb", None)
    if wandb_cfg is not None:
        sinks.append(
            WandbSink(
                wandb_cfg.project, wandb_cfg.mode, root / "wandb", prefix.rstrip("_") or "run", run_config
            )
        )
    return MetricLogger(sinks)


def setup_logging(info: DistInfo, level: str | int = "INFO", log_file: str | Path | None = None) -> None:
    """Configure the root logger for a recipe process: ``level`` on rank 0, WARNING elsewhere.

    Recipes call this once at start-up (library modules never add handlers). Lines carry the rank when
    there are several. ``log_file`` (rank 0) also receives every line.
    """
    prefix = f"[rank{info.rank}] " if info.is_distributed else ""
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    if log_file is not None and info.is_main:
        Path(log_file).parent.mkdir(parents=True, exist_ok=True)
        handlers.append(logging.FileHandler(log_file, encoding="utf-8"))
    logging.basicConfig(
        level=level if info.is_main else logging.WARNING,
        format=f"%(asctime)s {prefix}%(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        handlers=handlers,
        force=True,
    )


class NullProgress:
    """The do-nothing progress bar used off rank 0, without a terminal, or without tqdm."""

    def update(self, n: int = 1) -> None:
        """Ignore ``n`` steps of progress (tqdm's ``update``)."""

    def set_postfix(self, *args: Any, **kwargs: Any) -> None:
        """Ignore the values tqdm would show after the bar."""

    def close(self) -> None:
        """Nothing to close."""

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def progress_bar(
    total: int | None, info: DistInfo, *, enabled: bool = True, desc: str = "", initial: int = 0
) -> Any:
    """A tqdm bar on rank 0 (quiet without a TTY: ``disable=None``), else :class:`NullProgress`.

    Args:
        total: expected updates (e.g. total steps), or None.
        info: this process's DistInfo.
        enabled: ``cfg.logging.progress_bar``.
        desc: label.
        initial: starting count (the resumed step).
    """
    if not (enabled and info.is_main):
        return NullProgress()
    try:
        from tqdm import tqdm
    except ImportError:
        logger.debug("tqdm is not installed; no progress bar")
        return NullProgress()
    return tqdm(total=total, initial=initial, desc=desc, disable=None, dynamic_ncols=True)
