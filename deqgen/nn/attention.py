"""Multi-head attention with pluggable kernels: xformers, torch SDPA, or a plain reference.

:func:`attention` computes ``softmax(q @ k^T * scale + bias) @ v`` per batch row and head. The backend is
an :class:`AttentionBackend`:

- ``xformers``: ``xformers.ops.memory_efficient_attention``. An optional extra (``pip install
  deqgen[xformers]``); the wheel only works with the torch build it was compiled against, so deqgen uses it
  only after a tiny probe call succeeds on the same device, dtype, head dim and mask kind.
- ``sdpa``: ``torch.nn.functional.scaled_dot_product_attention``; torch picks its own fused kernel.
- ``math``: the textbook formula, computed in at least float32. Slow, always available, the reference.
- ``auto``: the first of xformers, sdpa, math that runs; the choice is logged once per
  (device, dtype, head dim, mask kind) through :mod:`logging`.

Layers that call attention on every forward hold a :class:`ResolvedAttention`, which resolves the kernel
once per (device, dtype, head dim, mask kind) and then calls it directly (no per-call lookup, so
``torch.compile`` traces it without graph breaks).

Probe results, and ``auto``'s choice (so it is logged once), are memoised per (backend, device, dtype,
head dim, mask kind) by ``functools.lru_cache``; there is no other module state.

Example:
    >>> import torch
    >>> q = k = v = torch.randn(2, 4, 5, 8)
    >>> out = attention(q, k, v, backend="math")
    >>> out.shape
    torch.Size([2, 4, 5, 8])
    >>> bool(torch.allclose(out, attention(q, k, v, backend="sdpa"), atol=1e-5))
    True
"""

from __future__ import annotations

import enum
import functools
import importlib.util
import logging
import math
import types
import warnings
from collections.abc import Callable
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "AttentionBackend",
    "AttentionKernel",
    "BackendUnavailableError",
    "ResolvedAttention",
    "attention",
    "probe_backend",
    "resolve_backend",
    "resolve_kernel",
]

logger = logging.getLogger(__name__)

MaskKind = Literal["none", "bool", "float"]

#: A concrete kernel: ``(q, k, v, mask, scale) -> out`` with the shapes of :func:`attention`.
AttentionKernel = Callable[[Tensor, Tensor, Tensor, "Tensor | None", float], Tensor]

_XFORMERS_HINT = (
    "install it with `pip install deqgen[xformers]` next to a torch build that the xformers wheel was "
    "compiled against (xformers imports with another torch, but its kernels fail), and run on a CUDA device; "
    "or use backend='sdpa'"
)


class AttentionBackend(str, enum.Enum):
    """Which attention kernel to run. Plain strings (``"sdpa"``) are accepted wherever this is."""

    AUTO = "auto"
    XFORMERS = "xformers"
    SDPA = "sdpa"
    MATH = "math"


_AUTO_ORDER = (AttentionBackend.XFORMERS, AttentionBackend.SDPA, AttentionBackend.MATH)


class BackendUnavailableError(RuntimeError):
    """A backend named explicitly cannot run on the given device, dtype, head dim or mask kind."""


def attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    mask: Tensor | None = None,
    scale: float | None = None,
    backend: AttentionBackend | str = AttentionBackend.AUTO,
) -> Tensor:
    """Multi-head scaled dot-product attention.

    Args:
        q: queries ``(B, heads, Lq, head_dim)``.
        k: keys ``(B, heads, Lk, head_dim)``.
        v: values ``(B, heads, Lk, head_dim_v)``. ``q``, ``k``, ``v`` share dtype and device.
        mask: optional, broadcastable to ``(B, heads, Lq, Lk)``. A bool mask is ``True`` where a query may
            attend; a floating mask is added to the logits (``0`` / ``-inf`` for block-causal, see
            :mod:`deqgen.nn.masks`). Every query must be allowed at least one key, or its row is NaN.
        scale: logit scale; ``None`` means ``head_dim ** -0.5``. VAR with l2-normalised q/k uses ``1.0``.
        backend: an :class:`AttentionBackend` or its name.

    Returns:
        ``(B, heads, Lq, head_dim_v)``, dtype of ``q``.

    Raises:
        ValueError: bad shapes, an unknown backend name, or a non-finite ``scale``.
        TypeError: non-floating inputs, mixed dtypes or devices, or a mask that is neither bool nor floating.
        BackendUnavailableError: ``backend`` is named explicitly and cannot run here; the message says why
            and what to install.
    """
    _check_inputs(q, k, v, mask)
    head_dim = q.shape[-1]
    scale = head_dim**-0.5 if scale is None else float(scale)
    if not math.isfinite(scale):
        raise ValueError(f"attention got scale={scale}; use a finite float, or None for head_dim ** -0.5")
    chosen = resolve_backend(
        backend, device=q.device, dtype=q.dtype, head_dim=head_dim, mask_kind=_mask_kind(mask)
    )
    return _KERNELS[chosen](q, k, v, mask, scale)


def resolve_backend(
    backend: AttentionBackend | str,
    *,
    device: torch.device | str,
    dtype: torch.dtype,
    head_dim: int,
    mask_kind: MaskKind = "none",
) -> AttentionBackend:
    """The concrete backend :func:`attention` runs for inputs of this kind.

    Args:
        backend: requested backend; ``auto`` returns the first of xformers, sdpa, math that runs.
        device: the inputs' device.
        dtype: the inputs' dtype.
        head_dim: size of the last dim of ``q`` and ``k``.
        mask_kind: ``"none"``, ``"bool"`` or ``"float"``.

    Returns:
        ``XFORMERS``, ``SDPA`` or ``MATH``, never ``AUTO``.

    Raises:
        ValueError: unknown backend name or mask kind.
        BackendUnavailableError: a named backend cannot run; the message gives the probe's reason.
    """
    requested = _as_backend(backend)
    if mask_kind not in ("none", "bool", "float"):
        raise ValueError(f"mask_kind must be 'none', 'bool' or 'float', got {mask_kind!r}")
    key = (str(torch.device(device)), dtype, int(head_dim), mask_kind)
    if requested is AttentionBackend.AUTO:
        return _auto_backend(*key)
    reason = _probe(requested, *key)
    if reason is not None:
        hint = (
            f"; {_XFORMERS_HINT}"
            if requested is AttentionBackend.XFORMERS
            else "; use backend='auto' or 'math'"
        )
        raise BackendUnavailableError(
            f"attention backend={requested.value!r} cannot run on device={key[0]}, dtype={dtype}, "
            f"head_dim={head_dim}, mask={mask_kind}: {reason}{hint}"
        )
    return requested


def probe_backend(
    backend: AttentionBackend | str,
    *,
    device: torch.device | str,
    dtype: torch.dtype,
    head_dim: int,
    mask_kind: MaskKind = "none",
) -> str | None:
    """Why ``backend`` cannot run on inputs of this kind, or ``None`` when it can.

    Useful to skip tests or benchmarks. The answer is memoised; the first xformers probe imports it
    (about 2 s).

    Args:
        backend: ``xformers``, ``sdpa`` or ``math`` (``auto`` always runs, so it returns ``None``).
        device: the inputs' device.
        dtype: the inputs' dtype.
        head_dim: size of the last dim of ``q`` and ``k``.
        mask_kind: ``"none"``, ``"bool"`` or ``"float"``.

    Returns:
        ``None`` if the backend works, else a one-line reason.
    """
    requested = _as_backend(backend)
    if requested is AttentionBackend.AUTO:
        return None
    return _probe(requested, str(torch.device(device)), dtype, int(head_dim), mask_kind)


def resolve_kernel(
    backend: AttentionBackend | str,
    *,
    device: torch.device | str,
    dtype: torch.dtype,
    head_dim: int,
    mask_kind: MaskKind = "none",
) -> AttentionKernel:
    """The kernel function :func:`attention` would call for inputs of this kind (see :func:`resolve_backend`).

    Calling the kernel skips :func:`attention`'s input checks and backend lookup, so it suits hot code that
    has resolved once and traces cleanly under ``torch.compile``.

    Args:
        backend: requested backend (``auto`` picks the first of xformers, sdpa, math that runs).
        device: the inputs' device.
        dtype: the inputs' dtype.
        head_dim: size of the last dim of ``q`` and ``k``.
        mask_kind: ``"none"``, ``"bool"`` or ``"float"``.

    Returns:
        ``kernel(q, k, v, mask, scale) -> (B, heads, Lq, head_dim_v)``; ``scale`` is a float, never ``None``.

    Raises:
        ValueError, BackendUnavailableError: as :func:`resolve_backend`.
    """
    chosen = resolve_backend(backend, device=device, dtype=dtype, head_dim=head_dim, mask_kind=mask_kind)
    return _KERNELS[chosen]


class ResolvedAttention:
    """Attention whose kernel is resolved once per (device, dtype, head dim, mask kind) and then reused.

    A model layer holds one of these instead of calling :func:`attention`, which re-checks its inputs and
    looks the backend up on every call. The first eager call for an input kind resolves the kernel (probing
    backends for ``auto``); :meth:`prepare` does it ahead of time. Under ``torch.compile`` a resolved kernel
    is a plain function call in the graph; a call traced before any resolution does not probe (that would
    run kernels inside the trace) and uses the named backend, or SDPA for ``auto``.

    Args:
        backend: requested backend, as for :func:`attention`.

    Example:
        >>> import torch
        >>> attend = ResolvedAttention("sdpa")
        >>> q = k = v = torch.randn(2, 4, 5, 8)
        >>> attend.prepare(device="cpu", dtype=torch.float32, head_dim=8, mask_kinds=("none",))
        >>> attend(q, k, v, scale=8**-0.5).shape
        torch.Size([2, 4, 5, 8])
    """

    def __init__(self, backend: AttentionBackend | str = AttentionBackend.AUTO) -> None:
        self.backend = _as_backend(backend)
        self._kernels: dict[tuple[torch.device, torch.dtype, int, str], AttentionKernel] = {}

    def prepare(
        self,
        *,
        device: torch.device | str,
        dtype: torch.dtype,
        head_dim: int,
        mask_kinds: tuple[MaskKind, ...] = ("none", "bool", "float"),
    ) -> None:
        """Resolve the kernels for these input kinds now (before ``torch.compile`` traces a call).

        Args:
            device: the inputs' device.
            dtype: the dtype ``q`` will have (the autocast dtype under autocast).
            head_dim: size of the last dim of ``q`` and ``k``.
            mask_kinds: the mask kinds the caller will pass.
        """
        dev = torch.device(device)
        if dev.type == "cuda" and dev.index is None:  # tensors report cuda:N, never bare cuda
            dev = torch.device("cuda", torch.cuda.current_device())
        for kind in mask_kinds:
            self._resolve(dev, dtype, int(head_dim), kind)

    def __call__(
        self, q: Tensor, k: Tensor, v: Tensor, *, mask: Tensor | None = None, scale: float
    ) -> Tensor:
        """Attention with the resolved kernel; no input checks (the caller builds consistent shapes).

        Args:
            q: ``(B, heads, Lq, head_dim)``.
            k: ``(B, heads, Lk, head_dim)``.
            v: ``(B, heads, Lk, head_dim_v)``.
            mask: optional bool (``True`` = attend) or additive mask broadcastable to ``(B, heads, Lq, Lk)``.
            scale: logit scale.

        Returns:
            ``(B, heads, Lq, head_dim_v)``, dtype of ``q``.
        """
        key = (q.device, q.dtype, q.shape[-1], _mask_kind(mask))
        kernel = self._kernels.get(key)
        if kernel is None and torch.compiler.is_compiling():
            kernel = self._traced_kernel()
        elif kernel is None:
            kernel = self._resolve(*key)
        return kernel(q, k, v, mask, scale)

    def _traced_kernel(self) -> AttentionKernel:
        """The kernel for a call traced before :meth:`prepare`: no probe (it would run kernels inside the
        trace); ``auto`` takes SDPA, which every device runs and ``torch.compile`` fuses."""
        if self.backend is AttentionBackend.MATH:  # if/else, not _KERNELS: dynamo cannot index a mappingproxy
            return _math_attention
        if self.backend is AttentionBackend.XFORMERS:
            return _xformers_attention
        return _sdpa_attention

    def _resolve(
        self, device: torch.device, dtype: torch.dtype, head_dim: int, mask_kind: str
    ) -> AttentionKernel:
        kind: MaskKind = mask_kind  # type: ignore[assignment]
        kernel = resolve_kernel(self.backend, device=device, dtype=dtype, head_dim=head_dim, mask_kind=kind)
        self._kernels[(device, dtype, head_dim, mask_kind)] = kernel
        return kernel

    def __repr__(self) -> str:
        return f"ResolvedAttention(backend={self.backend.value!r}, resolved={len(self._kernels)})"


def _as_backend(backend: AttentionBackend | str) -> AttentionBackend:
    try:
        return AttentionBackend(backend)
    except ValueError:
        names = ", ".join(repr(b.value) for b in AttentionBackend)
        raise ValueError(f"unknown attention backend={backend!r}; use one of {names}") from None


def _mask_kind(mask: Tensor | None) -> MaskKind:
    if mask is None:
        return "none"
    return "bool" if mask.dtype == torch.bool else "float"


def _check_inputs(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, Tensor):
            raise TypeError(f"attention: {name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"attention: {name} must be (B, heads, L, head_dim), got shape {tuple(t.shape)}")
        if t.dtype != q.dtype or t.device != q.device:
            raise TypeError(
                f"attention: q, k, v must share dtype and device; got q {q.dtype} on {q.device}, "
                f"{name} {t.dtype} on {t.device}"
            )
    if not q.is_floating_point():
        raise TypeError(f"attention: q, k, v must be floating point, got {q.dtype}")
    if not (q.shape[:2] == k.shape[:2] == v.shape[:2]):
        raise ValueError(
            f"attention: q, k, v must share (B, heads); got q {tuple(q.shape)}, k {tuple(k.shape)}, "
            f"v {tuple(v.shape)}"
        )
    if k.shape[2] != v.shape[2]:
        raise ValueError(
            f"attention: k and v must have the same length Lk; got k {tuple(k.shape)}, v {tuple(v.shape)}"
        )
    if q.shape[3] != k.shape[3]:
        raise ValueError(
            f"attention: q and k must share head_dim; got q {tuple(q.shape)}, k {tuple(k.shape)}"
        )
    if mask is not None:
        _check_mask(mask, (q.shape[0], q.shape[1], q.shape[2], k.shape[2]), q.device)


def _check_mask(mask: Tensor, target: tuple[int, int, int, int], device: torch.device) -> None:
    if not isinstance(mask, Tensor):
        raise TypeError(f"attention: mask must be a torch.Tensor or None, got {type(mask).__name__}")
    if mask.dtype != torch.bool and not mask.is_floating_point():
        raise TypeError(
            f"attention: mask must be bool (True = attend) or floating (added to logits), got {mask.dtype}"
        )
    if mask.device != device:
        raise TypeError(f"attention: mask is on {mask.device} but q is on {device}")
    try:
        ok = mask.dim() <= 4 and torch.broadcast_shapes(mask.shape, target) == torch.Size(target)
    except RuntimeError:
        ok = False
    if not ok:
        raise ValueError(
            f"attention: mask of shape {tuple(mask.shape)} does not broadcast to "
            f"(B, heads, Lq, Lk) = {target}"
        )


def _math_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, scale: float) -> Tensor:
    compute = torch.promote_types(q.dtype, torch.float32)  # fp16/bf16 logits and softmax in fp32
    logits = torch.matmul(q.to(compute), k.to(compute).transpose(-2, -1)) * scale  # (B, H, Lq, Lk)
    if mask is not None and mask.dtype == torch.bool:
        logits = logits.masked_fill(~mask, float("-inf"))
    elif mask is not None:
        logits = logits + mask.to(compute)
    weights = torch.softmax(logits, dim=-1)
    return torch.matmul(weights, v.to(compute)).to(q.dtype)  # (B, H, Lq, Dv)


def _sdpa_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, scale: float) -> Tensor:
    if mask is not None and mask.dtype != torch.bool:
        mask = mask.to(q.dtype)  # SDPA wants a float mask in the query's dtype
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)


def _xformers_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, scale: float) -> Tensor:
    import xformers.ops as xops  # already imported by the probe that admitted this call

    bias = (
        None
        if mask is None
        else _xformers_bias(mask, q.shape[0], q.shape[1], q.shape[2], k.shape[2], q.dtype)
    )
    # xformers takes (B, L, heads, head_dim); a transpose keeps the last dim contiguous, all it needs.
    out: Tensor = xops.memory_efficient_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_bias=bias, scale=scale
    )
    return out.transpose(1, 2)


def _xformers_bias(mask: Tensor, b: int, h: int, lq: int, lk: int, dtype: torch.dtype) -> Tensor:
    """A dense ``(B, H, Lq, Lk)`` additive bias in ``dtype`` whose rows start on 8-element boundaries.

    xformers wants tensor biases in the query dtype, fully materialised, with an aligned row stride; the
    usual way is to slice a wider buffer. Bool masks become ``0 / -inf``.
    """
    buf = torch.empty(b, h, lq, lk + (-lk) % 8, dtype=dtype, device=mask.device)[..., :lk]
    if mask.dtype == torch.bool:
        buf.zero_().masked_fill_(~mask.expand(b, h, lq, lk), float("-inf"))
    else:
        buf.copy_(mask.expand(b, h, lq, lk))
    return buf


_KERNELS = types.MappingProxyType(  # read-only: backends are not registered at run time
    {
        AttentionBackend.XFORMERS: _xformers_attention,
        AttentionBackend.SDPA: _sdpa_attention,
        AttentionBackend.MATH: _math_attention,
    }
)


@functools.lru_cache(maxsize=256)
def _probe(
    backend: AttentionBackend, device: str, dtype: torch.dtype, head_dim: int, mask_kind: str
) -> str | None:
    """Run ``backend`` once on tiny inputs of this kind; ``None`` if it works, else the reason."""
    if backend is AttentionBackend.XFORMERS:
        reason = _xformers_import_problem(device)
        if reason is not None:
            return reason
    try:
        q = torch.zeros(1, 2, 3, head_dim, dtype=dtype, device=device)
        mask = None
        if mask_kind == "bool":
            mask = torch.ones(3, 3, dtype=torch.bool, device=device)
        elif mask_kind == "float":
            mask = torch.zeros(3, 3, dtype=dtype, device=device)
        # Warnings (an error under `-W error`) must not decide availability; the real call still emits them.
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            out = _KERNELS[backend](q, q, q, mask, 1.0)
        if out.shape != q.shape:
            return f"the probe call returned shape {tuple(out.shape)}, expected {tuple(q.shape)}"
    except Exception as exc:  # any failure means "do not use this kernel here"; the reason is reported
        return (
            f"a probe call failed with {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        )
    return None


def _xformers_import_problem(device: str) -> str | None:
    if importlib.util.find_spec("xformers") is None:
        return "xformers is not installed"
    if torch.device(device).type != "cuda":
        return f"xformers' memory_efficient_attention runs on CUDA devices only, got device={device}"
    # A torch/xformers version mismatch is reported through this logger, not `warnings`; keep it quiet unless
    # the user configured the logger, because the probe below decides (and reports) whether the kernel works.
    xformers_logger = logging.getLogger("xformers")
    if xformers_logger.level == logging.NOTSET:
        xformers_logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import xformers.ops  # noqa: F401
    except Exception as exc:
        return f"`import xformers.ops` failed with {type(exc).__name__}: {exc}"
    return None


@functools.lru_cache(maxsize=256)
def _auto_backend(device: str, dtype: torch.dtype, head_dim: int, mask_kind: str) -> AttentionBackend:
    """First working backend in ``_AUTO_ORDER``; memoised, so the choice is logged once per input kind."""
    skipped: list[tuple[str, str]] = []
    for backend in _AUTO_ORDER:
        reason = _probe(backend, device, dtype, head_dim, mask_kind)
        if reason is None:
            logger.info(
                "attention backend 'auto' chose %r for device=%s dtype=%s head_dim=%d mask=%s%s",
                backend.value,
                device,
                dtype,
                head_dim,
                mask_kind,
                "".join(f"; skipped {name!r}: {why}" for name, why in skipped),
            )
            return backend
        skipped.append((backend.value, reason))
    raise BackendUnavailableError(
        f"no attention backend runs on device={device}, dtype={dtype}, head_dim={head_dim}, "
        f"mask={mask_kind}: " + "; ".join(f"{name}: {why}" for name, why in skipped)
    )
