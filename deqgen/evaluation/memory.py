"""Memory measurements shared by training, ``deqgen report`` and the benchmarks.

:func:`peak_memory_bytes` is the process's high-water mark: peak allocated CUDA memory on a GPU, the peak
resident set size (``ru_maxrss``) on CPU.

Counting the bytes autograd holds for backward, device-independently (CPU included):

:class:`SavedTensorBytes` is a ``torch.autograd.graph.saved_tensors_hooks`` pack/unpack pair: every tensor
autograd saves is counted once per storage (parameters excluded) until autograd drops it, and the peak is
kept. It is how the gradient-memory benchmark and ``deqgen report`` show that S-JFB's no-grad iterations
cost no training memory.

Example:
    >>> import torch
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
from typing import Any

import torch
from torch import Tensor

__all__ = ["SavedTensorBytes", "peak_memory_bytes"]


def peak_memory_bytes(device: torch.device | str = "cpu") -> int:
    """Peak memory of this process so far, in bytes.

    Args:
        device: a CUDA device: ``torch.cuda.max_memory_allocated`` (reset it with
            ``torch.cuda.reset_peak_memory_stats``); otherwise the peak resident set size, which only grows
            (subtract an earlier reading to measure one phase).
    """
    device = torch.device(device)
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
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
