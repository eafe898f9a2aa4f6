"""Attention kernel dispatch and VAR's block-causal masks.

Every backend is checked against a float64 reference written out here (softmax(q k^T * scale + bias) v)
with a mask built from a Python loop over token levels, not from deqgen.nn.masks. xformers cases skip with
the probe's reason wherever it cannot run (always on CPU).
"""

from __future__ import annotations

import doctest
import importlib
import logging
import sys
import types
from typing import Any

import pytest
import torch
from torch import Tensor

from deqgen.nn import (
    AttentionBackend,
    BackendUnavailableError,
    attention,
    block_causal_bias,
    block_causal_mask,
    level_index,
    probe_backend,
    resolve_backend,
    scale_slices,
    tokens_per_scale,
)
from deqgen.nn.attention import MaskKind

# deqgen.nn.attention is also the name of the function re-exported by deqgen.nn, so fetch the module itself
attention_module = importlib.import_module("deqgen.nn.attention")

VAR_256 = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _levels(patch_nums: tuple[int, ...]) -> list[int]:
    return [s for s, p in enumerate(patch_nums) for _ in range(p * p)]


def _ref_allowed(patch_nums: tuple[int, ...]) -> Tensor:
    lv = _levels(patch_nums)
    return torch.tensor([[lv[i] >= lv[j] for j in range(len(lv))] for i in range(len(lv))])


def _reference(q: Tensor, k: Tensor, v: Tensor, allowed: Tensor | None, scale: float) -> Tensor:
    q, k, v = q.double(), k.double(), v.double()
    logits = torch.einsum("bhqd,bhkd->bhqk", q, k) * scale
    if allowed is not None:
        logits = logits.masked_fill(~allowed.to(q.device), float("-inf"))
    weights = torch.exp(logits - logits.amax(-1, keepdim=True))
    return torch.einsum("bhqk,bhkd->bhqd", weights / weights.sum(-1, keepdim=True), v)


def _skip_unless_runs(
    backend: str, device: str, dtype: torch.dtype, head_dim: int, mask_kind: MaskKind
) -> None:
    reason = probe_backend(backend, device=device, dtype=dtype, head_dim=head_dim, mask_kind=mask_kind)
    if reason is not None:
        pytest.skip(f"{backend} cannot run here: {reason}")


# ---------------------------------------------------------------- masks


@pytest.mark.parametrize("patch_nums", [VAR_256, (1, 2, 3), (3,), (2, 1, 4)])
def test_masks_match_the_level_rule(patch_nums: tuple[int, ...]) -> None:
    allowed = _ref_allowed(patch_nums)
    L = len(_levels(patch_nums))
    assert tokens_per_scale(patch_nums) == tuple(p * p for p in patch_nums)
    assert level_index(patch_nums).tolist() == _levels(patch_nums)
    assert torch.equal(block_causal_mask(patch_nums), allowed)
    bias = block_causal_bias(patch_nums)
    assert bias.shape == (L, L) and bias.dtype == torch.float32
    assert torch.equal(bias == 0, allowed) and torch.equal(bias == float("-inf"), ~allowed)
    assert block_causal_bias(patch_nums, dtype=torch.bfloat16).dtype == torch.bfloat16
    slices = scale_slices(patch_nums)
    assert [sl.stop - sl.start for sl in slices] == [p * p for p in patch_nums] and slices[-1].stop == L
    for s, sl in enumerate(slices):
        assert set(level_index(patch_nums)[sl].tolist()) == {s}


def test_var_256_pyramid_has_680_tokens() -> None:
    assert block_causal_mask(VAR_256).shape == (680, 680)
    assert block_causal_mask(VAR_256).sum() == sum(
        n * sum(p * p for p in VAR_256[: s + 1]) for s, n in enumerate(p * p for p in VAR_256)
    )


@pytest.mark.parametrize("bad", [(), (0, 2), (1, 2.0), (True,), "12", None])
def test_masks_reject_bad_patch_nums(bad: object) -> None:
    with pytest.raises(ValueError, match="patch_nums"):
        block_causal_mask(bad)  # type: ignore[arg-type]


def test_bias_needs_a_floating_dtype() -> None:
    with pytest.raises(TypeError, match="dtype=torch.int64"):
        block_causal_bias((1, 2), dtype=torch.int64)


# ---------------------------------------------------------------- backends agree


CASES = [
    # (patch_nums, heads, head_dim): odd head dims and odd lengths
    ((1, 2, 3), 3, 7),  # L = 14
    ((1, 2, 3, 4, 5), 2, 33),  # L = 55
    ((1, 3, 5), 1, 64),  # L = 35
    ((1, 2, 3, 4, 5, 6, 8), 4, 16),  # L = 155
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mask_kind", ["float", "bool"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"L{sum(p * p for p in c[0])}-H{c[1]}-D{c[2]}")
@pytest.mark.parametrize("backend", ["math", "sdpa", "xformers", "auto"])
def test_backends_agree_with_block_causal_mask(
    backend: str, case: tuple[tuple[int, ...], int, int], mask_kind: MaskKind, device: str
) -> None:
    patch_nums, heads, head_dim = case
    _skip_unless_runs(backend, device, torch.float32, head_dim, mask_kind)
    L = len(_levels(patch_nums))
    q, k, v = torch.randn(3, 2, heads, L, head_dim, device=device).unbind(0)
    mask = (
        block_causal_bias(patch_nums, device=device)
        if mask_kind == "float"
        else block_causal_mask(patch_nums, device=device)
    )
    out = attention(q, k, v, mask=mask, backend=backend)
    ref = _reference(q, k, v, _ref_allowed(patch_nums), head_dim**-0.5)
    assert out.dtype == torch.float32 and out.shape == q.shape
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=0)


@pytest.mark.parametrize("backend", ["math", "sdpa", "xformers"])
def test_backends_agree_without_mask_cross_lengths_and_scale(backend: str) -> None:
    """Queries of one scale against keys of all scales (the cached case), value dim != key dim, scale 1."""
    _skip_unless_runs(backend, "cpu", torch.float32, 9, "none")
    q = torch.randn(3, 5, 13, 9)
    k = torch.randn(3, 5, 30, 9)
    v = torch.randn(3, 5, 30, 11)
    out = attention(q, k, v, scale=1.0, backend=backend)
    torch.testing.assert_close(out.double(), _reference(q, k, v, None, 1.0), atol=1e-5, rtol=0)


def test_partial_broadcast_mask() -> None:
    """A per-batch-row mask (B, 1, Lq, Lk) broadcasts over heads."""
    q, k, v = torch.randn(3, 2, 3, 6, 8).unbind(0)
    allowed = torch.rand(2, 1, 6, 6) > 0.5
    allowed[..., 0] = True  # every query sees at least one key
    for backend in ("math", "sdpa"):
        out = attention(q, k, v, mask=allowed, backend=backend)
        torch.testing.assert_close(out.double(), _reference(q, k, v, allowed, 8**-0.5), atol=1e-5, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_math_backend_computes_in_float32(dtype: torch.dtype) -> None:
    q, k, v = (t.to(dtype) for t in torch.randn(3, 2, 2, 14, 8).unbind(0))
    mask = block_causal_bias((1, 2, 3))
    out = attention(q, k, v, mask=mask, backend="math")
    expected = _reference(q.float(), k.float(), v.float(), _ref_allowed((1, 2, 3)), 8**-0.5).to(dtype)
    assert out.dtype == dtype
    # fp32 accumulation, one rounding at the end: within one ulp of the correctly rounded result
    torch.testing.assert_close(out, expected, atol=0, rtol=2 * torch.finfo(dtype).eps)


def test_xformers_call_layout_and_bias_with_a_stand_in(monkeypatch: pytest.MonkeyPatch) -> None:
    """The xformers glue (layout, bias dtype and alignment), checked against a pure-torch stand-in for
    ``xformers.ops`` that follows its documented contract: (B, M, heads, K) tensors, a dense additive
    (B, heads, Mq, Mk) bias in the query dtype whose row stride is a multiple of 8."""
    seen: dict[str, Any] = {}

    def memory_efficient_attention(query, key, value, attn_bias=None, p=0.0, scale=None):  # noqa: ANN001, ANN202
        seen["bias"] = attn_bias
        logits = torch.einsum("bqhd,bkhd->bhqk", query, key) * scale
        if attn_bias is not None:
            assert attn_bias.dtype == query.dtype and attn_bias.stride(-2) % 8 == 0
            logits = logits + attn_bias
        return torch.einsum("bhqk,bkhd->bqhd", logits.softmax(-1), value)

    fake_ops = types.ModuleType("xformers.ops")
    fake_ops.memory_efficient_attention = memory_efficient_attention  # type: ignore[attr-defined]
    fake_pkg = types.ModuleType("xformers")
    fake_pkg.ops = fake_ops  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "xformers", fake_pkg)
    monkeypatch.setitem(sys.modules, "xformers.ops", fake_ops)

    patch_nums = (1, 2, 3)  # Lk = 14, not a multiple of 8
    q, k, v = torch.randn(3, 2, 3, 14, 7).unbind(0)
    for mask in (block_causal_mask(patch_nums), block_causal_bias(patch_nums), None):
        out = attention_module._xformers_attention(q, k, v, mask, 7**-0.5)
        allowed = None if mask is None else _ref_allowed(patch_nums)
        torch.testing.assert_close(out.double(), _reference(q, k, v, allowed, 7**-0.5), atol=1e-5, rtol=0)
        if mask is not None:
            assert seen["bias"].shape == (2, 3, 14, 14)


# ---------------------------------------------------------------- choosing a backend


def test_auto_picks_sdpa_on_cpu_and_logs_once(caplog: pytest.LogCaptureFixture) -> None:
    attention_module._auto_backend.cache_clear()  # so this test sees the first (logged) resolution
    q = torch.randn(1, 2, 3, 6)
    with caplog.at_level(logging.INFO, logger="deqgen.nn.attention"):
        for _ in range(3):
            attention(q, q, q)
    choice = resolve_backend("auto", device="cpu", dtype=torch.float32, head_dim=6)
    assert choice is AttentionBackend.SDPA  # xformers never runs on CPU, and sdpa comes before math
    records = [r for r in caplog.records if r.name == "deqgen.nn.attention"]
    assert len(records) == 1
    assert "chose 'sdpa'" in records[0].getMessage() and "skipped 'xformers'" in records[0].getMessage()


def test_named_xformers_on_cpu_raises_with_reason_and_install_hint() -> None:
    q = torch.randn(1, 2, 3, 8)
    with pytest.raises(
        BackendUnavailableError,
        match=r"backend='xformers' cannot run on device=cpu.*pip install deqgen\[xformers\]",
    ):
        attention(q, q, q, backend="xformers")
    reason = probe_backend("xformers", device="cpu", dtype=torch.float32, head_dim=8)
    assert reason is not None and ("not installed" in reason or "CUDA" in reason)


def test_backend_enum_and_names_are_interchangeable() -> None:
    q = torch.randn(1, 2, 3, 8)
    assert torch.equal(attention(q, q, q, backend=AttentionBackend.MATH), attention(q, q, q, backend="math"))
    assert probe_backend("sdpa", device="cpu", dtype=torch.float32, head_dim=8) is None
    assert probe_backend("auto", device="cpu", dtype=torch.float32, head_dim=8) is None


def test_unknown_backend_and_mask_kind() -> None:
    q = torch.randn(1, 2, 3, 8)
    with pytest.raises(ValueError, match=r"backend='flash'.*'xformers', 'sdpa', 'math'"):
        attention(q, q, q, backend="flash")
    with pytest.raises(ValueError, match="mask_kind"):
        bad_kind: Any = "causal"
        resolve_backend("sdpa", device="cpu", dtype=torch.float32, head_dim=8, mask_kind=bad_kind)


# ---------------------------------------------------------------- argument checks


def test_input_checks() -> None:
    q = torch.randn(2, 3, 5, 8)
    with pytest.raises(ValueError, match=r"q must be \(B, heads, L, head_dim\), got shape \(3, 5, 8\)"):
        attention(q[0], q[0], q[0])
    with pytest.raises(ValueError, match="share head_dim"):
        attention(q, torch.randn(2, 3, 5, 7), torch.randn(2, 3, 5, 7))
    with pytest.raises(ValueError, match=r"share \(B, heads\)"):
        attention(q, torch.randn(2, 4, 5, 8), torch.randn(2, 4, 5, 8))
    with pytest.raises(ValueError, match="same length Lk"):
        attention(q, q, torch.randn(2, 3, 6, 8))
    with pytest.raises(TypeError, match="share dtype"):
        attention(q, q.double(), q)
    with pytest.raises(TypeError, match="floating point"):
        attention(q.long(), q.long(), q.long())
    with pytest.raises(ValueError, match=r"mask of shape \(4, 4\) does not broadcast to .*\(2, 3, 5, 5\)"):
        attention(q, q, q, mask=torch.zeros(4, 4))
    with pytest.raises(TypeError, match="mask must be bool"):
        attention(q, q, q, mask=torch.zeros(5, 5, dtype=torch.int64))
    with pytest.raises(ValueError, match="scale=inf"):
        attention(q, q, q, scale=float("inf"))


@pytest.mark.parametrize("module", ["deqgen.nn.attention", "deqgen.nn.masks"])
def test_doctests(module: str) -> None:
    result = doctest.testmod(importlib.import_module(module), verbose=False)
    assert result.attempted > 0 and result.failed == 0


@pytest.mark.parametrize("backend", ["sdpa", "math", "auto"])
def test_resolved_attention_equals_attention_and_resolves_once(backend: str) -> None:
    from deqgen.nn.attention import ResolvedAttention

    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(2, 3, 7, 8, generator=g) for _ in range(3))
    mask = torch.ones(7, 7, dtype=torch.bool).tril()
    attend = ResolvedAttention(backend)
    attend.prepare(device="cpu", dtype=torch.float32, head_dim=8, mask_kinds=("bool",))
    assert "resolved=1" in repr(attend)
    for m in (mask, None, torch.zeros(7, 7).masked_fill(~mask, float("-inf"))):
        want = attention(q, k, v, mask=m, scale=0.5, backend=backend)
        assert torch.equal(attend(q, k, v, mask=m, scale=0.5), want)
    assert "resolved=3" in repr(attend)  # bool (prepared), none and float: one kernel per mask kind
    with pytest.raises(ValueError, match="unknown attention backend"):
        ResolvedAttention("flash")
