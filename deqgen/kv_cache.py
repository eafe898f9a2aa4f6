"""Key/value caches for next-scale sampling, with explicit and implicit (fixed-point) layers.

A cache is an explicit object: the sampler creates one per attention layer, passes it into the layer, and
calls :meth:`KVCache.reset` between batches. The layer computes the current scale's keys and values and asks
the cache what to attend over::

    k_all, v_all = cache.update(k_new, v_new, scale=s, iteration=k)   # (B, heads, n_<=s, head_dim) each
    out = attention(q, k_all, v_all)                                   # queries: scale s only, no mask

``update`` stores ``(k_new, v_new)`` as scale ``s``'s entry and returns the earlier scales' stored K/V
followed by the new ones, concatenated along the sequence dim. Scales are written in order 0, 1, 2, ...;
the first update with scale ``s + 1`` *commits* scale ``s`` (it can no longer be written). Writing the same
``(scale, iteration)`` again replaces that entry, so re-running a step is harmless.

Three policies, one class each:

- :class:`AppendCache`: one K/V per scale, for explicit layers (VAR's cache). ``iteration`` must be 0.
- :class:`IterationKeyedCache`: one K/V stream per fixed-point iteration index ``k``; iteration ``k`` of
  scale ``s`` attends to what iteration ``k`` stored at every earlier scale (VIAR's semantics). **Only this
  cache reproduces training exactly**: teacher forcing runs ``K`` joint iterations over the whole
  block-causally masked sequence, so there iteration ``k`` of scale ``s`` also sees iteration ``k`` of the
  coarser scales. Memory grows with ``sum_s K_s * n_s``. The *missing-key rule* covers a scale that runs more
  iterations than an earlier scale stored (``missing=``): ``"last"`` (default) uses that earlier scale's last
  stored iteration, its most converged state; ``"error"`` raises :class:`MissingIterationError` naming the
  scales and the iteration; ``"skip"`` leaves the earlier scale out, which is what the official VIAR code
  does silently and is offered only for golden comparisons with it.
- :class:`EquilibriumCache`: memory-lean, the size of an :class:`AppendCache`. Each earlier scale keeps only
  the K/V of its last iteration, and every iteration of the current scale attends to those. It matches
  training only once every scale has converged; ``benchmarks/attention_bench.py`` measures the drift.

In a fixed-point map ``f(z, k)`` (``FixedPointProblem(indexed=True)`` passes ``k = 0, 1, 2, ...``, 0 for the
call on ``z0``) pass ``iteration=k``. The stored tensors are kept as given (copied only if they are views
into a larger buffer), so sample under ``torch.no_grad()`` or ``torch.inference_mode()``, and do not modify
them in place. A cache holds one batch: ``f`` must see all ``B`` rows on every call (no
``FixedPointProblem(separable=True)`` row subsets).

Example:
    >>> import torch
    >>> cache = IterationKeyedCache()
    >>> B, H, D = 1, 2, 8
    >>> for s, n in enumerate((1, 4)):  # two scales of 1 and 4 tokens
    ...     for k in range(3):  # three fixed-point iterations each
    ...         k_new, v_new = torch.randn(B, H, n, D), torch.randn(B, H, n, D)
    ...         k_all, v_all = cache.update(k_new, v_new, scale=s, iteration=k)
    >>> k_all.shape  # scale 0 (iteration 2) + scale 1
    torch.Size([1, 2, 5, 8])
    >>> cache.iterations_per_scale, cache.nbytes() == 3 * (1 + 4) * 2 * B * H * D * 4
    ((3, 3), True)
"""

from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

__all__ = [
    "KVCache",
    "CacheSlot",
    "AppendCache",
    "IterationKeyedCache",
    "EquilibriumCache",
    "MissingIterationError",
    "MissingPolicy",
]

MissingPolicy = Literal["last", "error", "skip"]
_MISSING_POLICIES = ("last", "error", "skip")


class MissingIterationError(LookupError):
    """An iteration-keyed cache was asked for an iteration that an earlier scale never stored."""


class KVCache(abc.ABC):
    """A per-layer key/value cache over VAR's scales. See the module docstring for the protocol."""

    def __init__(self) -> None:
        self._num_scales = 0  # scales started; scale self._num_scales - 1 is the one being written

    @abc.abstractmethod
    def update(
        self, k_new: Tensor, v_new: Tensor, *, scale: int, iteration: int = 0
    ) -> tuple[Tensor, Tensor]:
        """Store the current scale's K/V and return everything the current queries attend over.

        Args:
            k_new: keys of scale ``scale``, ``(B, heads, n_s, head_dim)``.
            v_new: values of scale ``scale``, ``(B, heads, n_s, head_dim_v)``.
            scale: index of the scale being generated: the current scale again, or the next one.
            iteration: fixed-point iteration index ``k`` (0 for explicit layers).

        Returns:
            ``(k_all, v_all)``, ``(B, heads, n_earlier + n_s, head_dim)`` and ``(..., head_dim_v)``: the
            earlier scales' stored entries, coarse to fine, then ``k_new`` / ``v_new``.

        Raises:
            ValueError: a scale out of order, a bad iteration, or shapes that differ from what is stored.
            TypeError: non-tensors, or a dtype or device that differs from what is stored.
        """

    @abc.abstractmethod
    def _stored(self) -> list[Tensor]:
        """Every tensor the cache holds."""

    @abc.abstractmethod
    def _first_entry(self) -> tuple[Tensor, Tensor] | None:
        """Some stored ``(K, V)``, to check new entries against; ``None`` when empty."""

    def reset(self) -> None:
        """Forget everything; the next update must be scale 0. Call between batches."""
        self._num_scales = 0
        self._clear()

    @abc.abstractmethod
    def _clear(self) -> None: ...

    def nbytes(self) -> int:
        """Bytes of the stored keys and values, counted per entry."""
        return sum(t.nbytes for t in self._stored())

    @property
    def num_scales(self) -> int:
        """Scales written so far, the current one included."""
        return self._num_scales

    def at(self, *, scale: int, iteration: int = 0) -> CacheSlot:
        """This cache bound to one ``(scale, iteration)``, for layers that should not know either.

        Example:
            >>> import torch
            >>> slot = AppendCache().at(scale=0)
            >>> k_all, v_all = slot.update(torch.zeros(1, 2, 1, 4), torch.zeros(1, 2, 1, 4))
        """
        return CacheSlot(self, scale, iteration)

    def _is_new_scale(self, scale: int) -> bool:
        """Check ``scale`` is the current or the next one; ``True`` when it would start a new scale."""
        if isinstance(scale, bool) or not isinstance(scale, int):
            raise TypeError(f"{type(self).__name__}.update: scale must be an int, got {scale!r}")
        if scale == self._num_scales:
            return True
        if scale == self._num_scales - 1:
            return False
        expected = "0" if self._num_scales == 0 else f"{self._num_scales - 1} (again) or {self._num_scales}"
        raise ValueError(
            f"{type(self).__name__}.update got scale={scale} but expected {expected}: scales are written in "
            "order 0, 1, 2, ... and a started scale commits the ones before it; call reset() between batches"
        )

    def _check_new(self, k_new: Tensor, v_new: Tensor) -> None:
        name = type(self).__name__
        for arg, t in (("k_new", k_new), ("v_new", v_new)):
            if not isinstance(t, Tensor):
                raise TypeError(f"{name}.update: {arg} must be a torch.Tensor, got {type(t).__name__}")
            if t.dim() != 4:
                raise ValueError(
                    f"{name}.update: {arg} must be (B, heads, n_s, head_dim), got {tuple(t.shape)}"
                )
        if k_new.shape[:3] != v_new.shape[:3]:
            raise ValueError(
                f"{name}.update: k_new {tuple(k_new.shape)} and v_new {tuple(v_new.shape)} "
                "differ in (B, heads, n_s)"
            )
        first = self._first_entry()
        if first is None:
            return
        k_ref, v_ref = first
        for arg, t, ref in (("k_new", k_new, k_ref), ("v_new", v_new, v_ref)):
            got, held = (t.shape[0], t.shape[1], t.shape[3]), (ref.shape[0], ref.shape[1], ref.shape[3])
            if got != held:
                raise ValueError(
                    f"{name}.update: {arg} has (B, heads, head_dim) = {got} but the cache holds {held}; "
                    "call reset() before a new batch (a cache needs all B rows on every call)"
                )
            if t.dtype != ref.dtype or t.device != ref.device:
                raise TypeError(
                    f"{name}.update: {arg} is {t.dtype} on {t.device} but the cache holds "
                    f"{ref.dtype} on {ref.device}"
                )


@dataclass(frozen=True)
class CacheSlot:
    """A cache bound to one ``(scale, iteration)``; ``slot.update(k, v)`` is ``cache.update(k, v, ...)``."""

    cache: KVCache
    scale: int
    iteration: int = 0

    def update(self, k_new: Tensor, v_new: Tensor) -> tuple[Tensor, Tensor]:
        """:meth:`KVCache.update` at this slot: ``(B, heads, n_s, .)`` in, ``(B, heads, n_<=s, .)`` out."""
        return self.cache.update(k_new, v_new, scale=self.scale, iteration=self.iteration)


class _OnePerScaleCache(KVCache):
    """Storage of :class:`AppendCache` and :class:`EquilibriumCache`: one K/V per scale, last write wins."""

    def __init__(self) -> None:
        super().__init__()
        self._keys: list[Tensor] = []
        self._values: list[Tensor] = []

    def _write(self, k_new: Tensor, v_new: Tensor, scale: int) -> tuple[Tensor, Tensor]:
        self._check_new(k_new, v_new)
        if self._is_new_scale(scale):
            self._num_scales += 1
            self._keys.append(_owned(k_new))
            self._values.append(_owned(v_new))
        else:
            self._keys[scale], self._values[scale] = _owned(k_new), _owned(v_new)
        return _cat(self._keys[:-1], k_new), _cat(self._values[:-1], v_new)

    def _stored(self) -> list[Tensor]:
        return [t for pair in zip(self._keys, self._values, strict=True) for t in pair]

    def _first_entry(self) -> tuple[Tensor, Tensor] | None:
        return (self._keys[0], self._values[0]) if self._keys else None

    def _clear(self) -> None:
        self._keys.clear()
        self._values.clear()


class AppendCache(_OnePerScaleCache):
    """VAR's per-layer cache for explicit (non-iterated) layers: appends each scale's K/V.

    Holds ``sum_s n_s`` tokens of K and V per layer. Re-writing the current scale replaces its entry.
    ``iteration`` must be 0: inside a fixed-point map use :class:`IterationKeyedCache` or
    :class:`EquilibriumCache`, so the choice between them is explicit.

    Example:
        >>> import torch
        >>> cache = AppendCache()
        >>> k0, _ = cache.update(torch.zeros(2, 4, 1, 8), torch.zeros(2, 4, 1, 8), scale=0)
        >>> k1, _ = cache.update(torch.ones(2, 4, 4, 8), torch.ones(2, 4, 4, 8), scale=1)
        >>> k1.shape, cache.nbytes() == 2 * (1 + 4) * 2 * 4 * 8 * 4
        (torch.Size([2, 4, 5, 8]), True)
    """

    def update(
        self, k_new: Tensor, v_new: Tensor, *, scale: int, iteration: int = 0
    ) -> tuple[Tensor, Tensor]:
        """See :meth:`KVCache.update`. Raises ``ValueError`` if ``iteration`` is not 0."""
        _check_iteration(self, iteration)
        if iteration != 0:
            raise ValueError(
                f"AppendCache holds one K/V per scale but got iteration={iteration!r}; inside a fixed-point "
                "map use IterationKeyedCache (training semantics) or EquilibriumCache (last iterate only)"
            )
        return self._write(k_new, v_new, scale)


class EquilibriumCache(_OnePerScaleCache):
    """Memory-lean cache for an implicit layer: each earlier scale keeps only its final iterate's K/V.

    Every iteration ``k`` of scale ``s`` attends to the last K/V written by each earlier scale, plus its own
    current K/V. Memory equals an :class:`AppendCache`'s, whatever the iteration counts. The entry of a scale
    is whatever its last update wrote: when the solver returns an iterate other than the last one evaluated
    (a best-iterate fallback), evaluate ``f`` once more on it so the cache holds its K/V.

    This does **not** reproduce training, where iteration ``k`` sees iteration ``k`` of the coarser scales
    (:class:`IterationKeyedCache`); the two agree once every scale has converged.

    Example:
        >>> import torch
        >>> cache = EquilibriumCache()
        >>> for k in range(3):
        ...     k_new = torch.full((1, 1, 1, 2), float(k))
        ...     _ = cache.update(k_new, torch.zeros(1, 1, 1, 2), scale=0, iteration=k)
        >>> k_all, _ = cache.update(torch.zeros(1, 1, 4, 2), torch.zeros(1, 1, 4, 2), scale=1, iteration=0)
        >>> k_all[0, 0, 0].tolist()  # scale 0's last iterate
        [2.0, 2.0]
    """

    def __init__(self) -> None:
        super().__init__()
        self._iterations: list[int] = []

    def update(
        self, k_new: Tensor, v_new: Tensor, *, scale: int, iteration: int = 0
    ) -> tuple[Tensor, Tensor]:
        """See :meth:`KVCache.update`; any ``iteration >= 0`` replaces the current scale's entry."""
        _check_iteration(self, iteration)
        started = self._num_scales
        out = self._write(k_new, v_new, scale)
        if self._num_scales > started:
            self._iterations.append(0)
        self._iterations[scale] = max(self._iterations[scale], iteration + 1)
        return out

    @property
    def iterations_per_scale(self) -> tuple[int, ...]:
        """Per scale, one more than the highest iteration index written."""
        return tuple(self._iterations)

    def _clear(self) -> None:
        super()._clear()
        self._iterations.clear()


class IterationKeyedCache(KVCache):
    """One K/V stream per fixed-point iteration index: VIAR's cache, and the training semantics.

    Iteration ``k`` of scale ``s`` attends to the K/V that iteration ``k`` stored at every earlier scale,
    then its own. Iterations of a scale are written in order ``0, 1, 2, ...`` (re-writing one replaces it).
    Memory is ``B * sum_s K_s * n_s * 2 * heads * head_dim * itemsize`` per layer, with ``K_s`` the
    iterations scale ``s`` ran.

    **Missing-key rule.** Iteration ``k`` of scale ``s`` may need an earlier scale ``r`` that stopped before
    ``k`` (a schedule that runs later scales longer). ``missing`` decides:

    - ``"last"`` (default): use scale ``r``'s last stored iteration, its most converged state.
    - ``"error"``: raise :class:`MissingIterationError` naming ``s``, ``k`` and ``r``.
    - ``"skip"``: leave scale ``r`` out. The official VIAR code does this silently; use it only to compare
      against it.

    Args:
        missing: the missing-key policy.

    Raises:
        ValueError: unknown ``missing``.

    Example:
        >>> import torch
        >>> cache = IterationKeyedCache(missing="last")
        >>> kv = lambda n, x: torch.full((1, 1, n, 2), float(x))
        >>> for k in range(2):  # scale 0 runs 2 iterations
        ...     _ = cache.update(kv(1, k), kv(1, k), scale=0, iteration=k)
        >>> for k in range(4):  # scale 1 runs 4
        ...     k_all, _ = cache.update(kv(4, 9), kv(4, 9), scale=1, iteration=k)
        >>> k_all[0, 0, :, 0].tolist()  # iteration 3: scale 0's iteration 1 (its last), then scale 1
        [1.0, 9.0, 9.0, 9.0, 9.0]
    """

    def __init__(self, missing: MissingPolicy = "last") -> None:
        if missing not in _MISSING_POLICIES:
            raise ValueError(f"IterationKeyedCache got missing={missing!r}; use one of {_MISSING_POLICIES}")
        super().__init__()
        self.missing: MissingPolicy = missing
        self._streams: list[list[tuple[Tensor, Tensor]]] = []  # [scale][iteration] -> (K, V)

    def update(
        self, k_new: Tensor, v_new: Tensor, *, scale: int, iteration: int = 0
    ) -> tuple[Tensor, Tensor]:
        """See :meth:`KVCache.update`.

        Raises:
            MissingIterationError: ``missing="error"`` and an earlier scale has no entry for ``iteration``.
            ValueError: ``iteration`` skips ahead of the next unwritten one, or other bad arguments.
        """
        _check_iteration(self, iteration)
        self._check_new(k_new, v_new)
        new_scale = self._is_new_scale(scale)
        entries: list[tuple[Tensor, Tensor]] = [] if new_scale else self._streams[scale]
        if iteration > len(entries):
            raise ValueError(
                f"IterationKeyedCache.update: scale {scale} got iteration={iteration} but holds iterations "
                f"0..{len(entries) - 1}; write iterations in order 0, 1, 2, ..."
            )
        earlier = [self._lookup(r, scale, iteration) for r in range(scale)]  # may raise: before any write
        if new_scale:
            self._num_scales += 1
            self._streams.append(entries)
        pair = (_owned(k_new), _owned(v_new))
        if iteration == len(entries):
            entries.append(pair)
        else:
            entries[iteration] = pair
        picked = [p for p in earlier if p is not None]
        return _cat([p[0] for p in picked], k_new), _cat([p[1] for p in picked], v_new)

    def _lookup(self, r: int, scale: int, iteration: int) -> tuple[Tensor, Tensor] | None:
        entries = self._streams[r]
        if iteration < len(entries):
            return entries[iteration]
        if self.missing == "last":
            return entries[-1]
        if self.missing == "skip":
            return None
        raise MissingIterationError(
            f"IterationKeyedCache(missing='error'): scale {scale} iteration {iteration} needs iteration "
            f"{iteration} of earlier scale {r}, which stored only iterations 0..{len(entries) - 1}; give "
            "later scales no more iterations than earlier ones, or use missing='last'"
        )

    @property
    def iterations_per_scale(self) -> tuple[int, ...]:
        """Iterations stored per scale, ``(K_0, ..., K_s)``."""
        return tuple(len(entries) for entries in self._streams)

    def _stored(self) -> list[Tensor]:
        return [t for entries in self._streams for pair in entries for t in pair]

    def _first_entry(self) -> tuple[Tensor, Tensor] | None:
        return self._streams[0][0] if self._streams else None  # a started scale holds >= 1 entry

    def _clear(self) -> None:
        self._streams.clear()


def _check_iteration(cache: KVCache, iteration: int) -> None:
    if isinstance(iteration, bool) or not isinstance(iteration, int) or iteration < 0:
        raise ValueError(
            f"{type(cache).__name__}.update: iteration must be an int >= 0 (the solver's k), "
            f"got {iteration!r}"
        )


def _owned(t: Tensor) -> Tensor:
    """``t`` itself if it is contiguous and owns its whole storage, else a compact copy.

    Storing a view would keep its whole base (e.g. a fused QKV projection) alive and make ``nbytes()`` lie.
    """
    if t.is_contiguous() and t.storage_offset() == 0 and t.untyped_storage().nbytes() == t.nbytes:
        return t
    return t.clone(memory_format=torch.contiguous_format)


def _cat(earlier: list[Tensor], new: Tensor) -> Tensor:
    return torch.cat([*earlier, new], dim=2) if earlier else new
