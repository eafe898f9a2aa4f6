"""Memory measurements shared by training, ``deqgen report`` and the benchmarks.

One peak-memory helper, two calls: :func:`reset_peak_memory` starts a measurement and returns the baseline,
:func:`peak_memory_bytes` reads the high-water mark; their difference is what one phase added. On a GPU they
are ``torch.cuda.reset_peak_memory_stats`` / ``memory_allocated`` / ``max_memory_allocated``. On CPU the mark
is the peak resident set size: on Linux ``VmHWM``, which writing ``5`` to ``/proc/self/clear_refs`` resets
to the current ``VmRSS`` (proc(5)); elsewhere ``ru_maxrss``, which never resets, so only a peak above
everything before the phase counts there.

Counting the bytes autograd holds for backward, device-independently (CPU included):

:class:`SavedTensorBytes` is a ``torch.autograd.graph.saved_tensors_hooks`` pack/unpack pair: every tensor
autograd saves is counted once per storage (parameters excluded) until autograd drops it, and the peak is
kept. It is how the gradient-memory benchmark and ``deqgen report`` show that S-JFB's no-grad iterations
cost no training memory.

Example:
    >>> import torch
    >>> base = reset_peak_memory("cpu")
    >>> x = torch.ones(4 * 2**20)  # 16 MiB, touched
    >>> peak_memory_bytes("cpu") - base >= 0
    True
    >>> w = torch.randn(8, 8, requires_grad=True)
    >>> counter = SavedTensorBytes({w.untyped_storage().data_ptr()})
    >>> with torch.autograd.graph.saved_tensors_hooks(counter.pack, counter.unpack):
    ...     y = torch.tanh(torch.randn(4, 8) @ w).sum()
    >>> counter.peak > 0
    True
"""

from __future__ import annotations

import resource
import sys
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

__all__ = ["SavedTensorBytes", "peak_memory_bytes", "reset_peak_memory"]


_PROC_STATUS = Path("/proc/self/status")
_PROC_CLEAR_REFS = Path("/proc/self/clear_refs")


def peak_memory_bytes(device: torch.device | str = "cpu") -> int:
    """This process's memory high-water mark, in bytes (since the last :func:`reset_peak_memory`).

    Args:
        device: a CUDA device: ``torch.cuda.max_memory_allocated``; otherwise the peak resident set size
            (``VmHWM`` on Linux, ``ru_maxrss`` elsewhere).
    """
    device = torch.device(device)
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    hwm = _proc_status_bytes("VmHWM")
    return hwm if hwm is not None else _ru_maxrss_bytes()


def reset_peak_memory(device: torch.device | str = "cpu") -> int:
    """Start a peak measurement: reset the high-water mark where the platform allows, return the baseline.

    ``peak_memory_bytes(device) - reset_peak_memory(device)`` (baseline taken first) is then the most memory
    the phase in between added. Where the mark cannot be reset (CPU outside Linux) the baseline is the mark
    itself, so only a rise above every earlier peak of the process counts.

    Args:
        device: as :func:`peak_memory_bytes`.

    Returns:
        The baseline in bytes: allocated CUDA memory, or the current resident set size after the reset.
    """
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return int(torch.cuda.memory_allocated(device))
    try:
        _PROC_CLEAR_REFS.write_text("5")
    except OSError:
        return _ru_maxrss_bytes()
    rss = _proc_status_bytes("VmRSS")
    return rss if rss is not None else _ru_maxrss_bytes()


def _proc_status_bytes(key: str) -> int | None:
    """A ``kB`` field of ``/proc/self/status`` in bytes; None where that file or field does not exist."""
    try:
        text = _PROC_STATUS.read_text()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    return None


def _ru_maxrss_bytes() -> int:
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024)  # macOS reports bytes, Linux KiB


class SavedTensorBytes:
    """Pack/unpack hooks tracking ``live`` and ``peak`` bytes of tensors saved for backward.

    Args:
        exclude: storage data pointers not to count (e.g. the parameters').

    Attributes:
        live: bytes currently held.
        peak: the most bytes held at any moment since construction.
    """

    def __init__(self, exclude: set[int]) -> None:
        self.exclude = exclude
        self.refs: dict[int, list[int]] = {}
        self.live = 0
        self.peak = 0

    def pack(self, t: Tensor) -> Any:
        """Count ``t``'s storage (once per storage) and wrap it so its release is noticed."""
        ptr = t.untyped_storage().data_ptr()
        if ptr in self.exclude:
            return t
        if ptr not in self.refs:
            self.refs[ptr] = [0, t.untyped_storage().nbytes()]
            self.live += self.refs[ptr][1]
            self.peak = max(self.peak, self.live)
        self.refs[ptr][0] += 1
        return _Saved(t, ptr, self)

    def unpack(self, saved: Any) -> Tensor:
        """The saved tensor back."""
        return saved.t if isinstance(saved, _Saved) else saved

    def release(self, ptr: int) -> None:
        """One saved reference to storage ``ptr`` died; its bytes leave ``live`` with the last one."""
        self.refs[ptr][0] -= 1
        if self.refs[ptr][0] == 0:
            self.live -= self.refs.pop(ptr)[1]


class _Saved:
    """A saved tensor; when autograd frees its graph this object dies and its bytes are released."""

    def __init__(self, t: Tensor, ptr: int, owner: SavedTensorBytes) -> None:
        self.t, self.ptr, self.owner = t, ptr, owner

    def __del__(self) -> None:
        self.owner.release(self.ptr)
