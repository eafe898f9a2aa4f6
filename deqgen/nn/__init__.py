"""Attention building blocks: kernel dispatch (:mod:`deqgen.nn.attention`) and VAR's block-causal masks
(:mod:`deqgen.nn.masks`). KV caches live in :mod:`deqgen.kv_cache`."""

from deqgen.nn.attention import (
    AttentionBackend,
    BackendUnavailableError,
    attention,
    probe_backend,
    resolve_backend,
)
from deqgen.nn.masks import block_causal_bias, block_causal_mask, level_index, scale_slices, tokens_per_scale

__all__ = [
    "AttentionBackend",
    "BackendUnavailableError",
    "attention",
    "probe_backend",
    "resolve_backend",
    "block_causal_bias",
    "block_causal_mask",
    "level_index",
    "scale_slices",
    "tokens_per_scale",
]
