"""Reusable parts for any cell: attention kernel dispatch (:mod:`deqgen.nn.attention`), VAR's block-causal
masks (:mod:`deqgen.nn.masks`), iteration-consistent dropout (:mod:`deqgen.nn.dropout`) and weight/spectral
normalisation computed once per solve (:mod:`deqgen.nn.normalization`). KV caches live in
:mod:`deqgen.kv_cache`."""

from deqgen.nn.attention import (
    AttentionBackend,
    BackendUnavailableError,
    attention,
    probe_backend,
    resolve_backend,
)
from deqgen.nn.dropout import VariationalDropout, dropout_mask, new_solve
from deqgen.nn.masks import block_causal_bias, block_causal_mask, level_index, scale_slices, tokens_per_scale
from deqgen.nn.normalization import apply_norm, normalized_once, spectral_norm, weight_norm

__all__ = [
    "AttentionBackend",
    "BackendUnavailableError",
    "VariationalDropout",
    "apply_norm",
    "attention",
    "block_causal_bias",
    "block_causal_mask",
    "dropout_mask",
    "level_index",
    "new_solve",
    "normalized_once",
    "probe_backend",
    "resolve_backend",
    "scale_slices",
    "spectral_norm",
    "tokens_per_scale",
    "weight_norm",
]
