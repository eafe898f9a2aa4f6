"""KV caches: cached decoding against full-sequence references, the iteration-keyed semantics, the missing-key
rule, memory accounting and argument checks.

References are built here, independently of deqgen.nn.masks and of the cache code: masks from a Python loop
over token levels, attention in float64 from the textbook formula, and the "training" computation as K joint
iterations over the whole block-causally masked sequence.
"""

from __future__ import annotations

import doctest
import importlib
from typing import Any

import pytest
import torch
from torch import Tensor

from deqgen import Picard, fixed_point
from deqgen.kv_cache import (
    AppendCache,
    CacheSlot,
    EquilibriumCache,
    IterationKeyedCache,
    KVCache,
    MissingIterationError,
)
from deqgen.nn import attention

PATCH_NUMS = (1, 2, 3, 4)  # L = 30
B, H, D = 2, 3, 5  # odd head dim; C = 15


def _levels(patch_nums: tuple[int, ...]) -> list[int]:
    return [s for s, p in enumerate(patch_nums) for _ in range(p * p)]


def _ref_mask(patch_nums: tuple[int, ...]) -> Tensor:
    lv = _levels(patch_nums)
    return torch.tensor([[lv[i] >= lv[j] for j in range(len(lv))] for i in range(len(lv))])


def _ref_attention(q: Tensor, k: Tensor, v: Tensor, allowed: Tensor | None = None) -> Tensor:
    q, k, v = q.double(), k.double(), v.double()
    logits = q @ k.transpose(-2, -1) / q.shape[-1] ** 0.5
    if allowed is not None:
        logits = logits.masked_fill(~allowed, float("-inf"))
    return (logits.softmax(-1) @ v).float()


def _bounds(patch_nums: tuple[int, ...]) -> list[tuple[int, int]]:
    out, begin = [], 0
    for p in patch_nums:
        out.append((begin, begin + p * p))
        begin += p * p
    return out


def _filled(n: int, value: float, dtype: torch.dtype = torch.float32) -> Tensor:
    return torch.full((B, H, n, D), float(value), dtype=dtype)


# ---------------------------------------------------------------- AppendCache


def test_append_cache_decoding_equals_full_block_causal_attention() -> None:
    L = sum(p * p for p in PATCH_NUMS)
    q, k, v = torch.randn(3, B, H, L, D).unbind(0)
    full = _ref_attention(q, k, v, _ref_mask(PATCH_NUMS))
    cache = AppendCache()
    for s, (b, e) in enumerate(_bounds(PATCH_NUMS)):
        k_all, v_all = cache.update(k[:, :, b:e], v[:, :, b:e], scale=s)
        assert torch.equal(k_all, k[:, :, :e]) and torch.equal(v_all, v[:, :, :e])
        out = attention(q[:, :, b:e], k_all, v_all)  # current scale's queries, no mask
        torch.testing.assert_close(out, full[:, :, b:e], atol=1e-5, rtol=0)


def test_append_cache_token_by_token_equals_causal_attention() -> None:
    L = 7  # patch_nums of ones: one token per step, so block-causal is plain causal
    q, k, v = torch.randn(3, 1, 2, L, 4).unbind(0)
    full = _ref_attention(q, k, v, torch.ones(L, L, dtype=torch.bool).tril())
    cache = AppendCache()
    for t in range(L):
        k_all, v_all = cache.update(k[:, :, t : t + 1], v[:, :, t : t + 1], scale=t)
        torch.testing.assert_close(
            attention(q[:, :, t : t + 1], k_all, v_all), full[:, :, t : t + 1], atol=1e-5, rtol=0
        )


def test_append_cache_rewrite_replaces_and_rejects_iterations() -> None:
    cache = AppendCache()
    cache.update(_filled(1, 0), _filled(1, 0), scale=0)
    cache.update(_filled(4, 1), _filled(4, 1), scale=1)
    k_all, _ = cache.update(_filled(4, 2), _filled(4, 2), scale=1)  # re-run of scale 1
    assert k_all[0, 0, :, 0].tolist() == [0, 2, 2, 2, 2]
    assert cache.nbytes() == B * (1 + 4) * 2 * H * D * 4
    with pytest.raises(ValueError, match="iteration=1.*IterationKeyedCache"):
        cache.update(_filled(4, 2), _filled(4, 2), scale=1, iteration=1)


# ---------------------------------------------------------------- IterationKeyedCache: stream contents


def test_iteration_keyed_streams_constant_k() -> None:
    cache = IterationKeyedCache()
    K = 3
    for s, (b, e) in enumerate(_bounds(PATCH_NUMS)):
        for it in range(K):
            k_all, v_all = cache.update(
                _filled(e - b, 100 * s + it), _filled(e - b, -(100 * s + it)), scale=s, iteration=it
            )
            expected = [100 * r + it for r in range(s + 1) for _ in range(PATCH_NUMS[r] ** 2)]
            assert k_all[:, :, :, 0].unique(dim=0).unique(dim=1).flatten().tolist() == expected
            assert (v_all == -k_all).all()
    assert cache.iterations_per_scale == (K,) * len(PATCH_NUMS)


def test_rewriting_an_iteration_replaces_it() -> None:
    cache = IterationKeyedCache()
    for it in range(2):
        cache.update(_filled(1, it), _filled(1, it), scale=0, iteration=it)
    cache.update(_filled(1, 7), _filled(1, 7), scale=0, iteration=1)  # same (scale, iteration) again
    cache.update(_filled(4, 8), _filled(4, 8), scale=1, iteration=0)
    k_all, _ = cache.update(_filled(4, 9), _filled(4, 9), scale=1, iteration=1)
    assert k_all[0, 0, :, 0].tolist() == [7, 9, 9, 9, 9]
    assert cache.iterations_per_scale == (2, 2)
    assert cache.nbytes() == B * (2 * 1 + 2 * 4) * 2 * H * D * 4


# ---------------------------------------------------------------- IterationKeyedCache: against training


class _ToyImplicitAttention:
    """z <- tanh(Attn(z) Wo + x): a one-layer implicit attention map with small (contractive) weights."""

    def __init__(self, heads: int, head_dim: int) -> None:
        c = heads * head_dim
        self.heads, self.head_dim = heads, head_dim
        self.w_qkv = 0.4 * torch.randn(c, 3 * c) / c**0.5
        self.w_o = 0.4 * torch.randn(c, c) / c**0.5

    def qkv(self, z_BNC: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        b, n, _ = z_BNC.shape
        qkv = (z_BNC @ self.w_qkv).view(b, n, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        return qkv[0], qkv[1], qkv[2]  # views into one buffer: the cache must not keep it whole

    def out(self, a_BHND: Tensor, x_BNC: Tensor) -> Tensor:
        b, _, n, _ = a_BHND.shape
        return torch.tanh(a_BHND.transpose(1, 2).reshape(b, n, -1) @ self.w_o + x_BNC)


def _joint_reference(layer: _ToyImplicitAttention, x_BLC: Tensor, iterations: int) -> Tensor:
    """Training semantics: `iterations` joint steps over the whole sequence under the block-causal mask."""
    allowed, z = _ref_mask(PATCH_NUMS), x_BLC
    for _ in range(iterations):
        q, k, v = layer.qkv(z)
        z = layer.out(_ref_attention(q, k, v, allowed), x_BLC)
    return z


def _cached_inference(
    layer: _ToyImplicitAttention, x_BLC: Tensor, schedule: list[int], cache: KVCache
) -> Tensor:
    """Scale by scale, `schedule[s]` Picard steps each, keys/values from `cache`."""
    outs = []
    for s, (b, e) in enumerate(_bounds(PATCH_NUMS)):
        x_s, z = x_BLC[:, b:e], x_BLC[:, b:e]
        for it in range(schedule[s]):
            q, k, v = layer.qkv(z)
            k_all, v_all = cache.update(k, v, scale=s, iteration=it)
            z = layer.out(attention(q, k_all, v_all), x_s)
        outs.append(z)
    return torch.cat(outs, dim=1)


@pytest.mark.parametrize("iterations", [1, 2, 4])
def test_iteration_keyed_cache_equals_joint_training_iterations(iterations: int) -> None:
    layer = _ToyImplicitAttention(H, D)
    x = torch.randn(B, sum(p * p for p in PATCH_NUMS), H * D)
    ref = _joint_reference(layer, x, iterations)
    got = _cached_inference(layer, x, [iterations] * len(PATCH_NUMS), IterationKeyedCache())
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=0)


def test_equilibrium_cache_differs_before_convergence_and_agrees_after() -> None:
    layer = _ToyImplicitAttention(H, D)
    x = torch.randn(B, sum(p * p for p in PATCH_NUMS), H * D)
    few = _cached_inference(layer, x, [2] * len(PATCH_NUMS), EquilibriumCache())
    assert (
        few - _joint_reference(layer, x, 2)
    ).abs().max() > 1e-4  # the lean cache is not training semantics
    many = _cached_inference(layer, x, [12] * len(PATCH_NUMS), EquilibriumCache())
    torch.testing.assert_close(many, _joint_reference(layer, x, 12), atol=1e-5, rtol=0)


def test_iteration_keyed_cache_inside_an_indexed_fixed_point_solve() -> None:
    """f(z, k) of FixedPointProblem(indexed=True) drives the cache; K fixed-budget Picard steps = K joint."""
    layer, K = _ToyImplicitAttention(H, D), 3
    x = torch.randn(B, sum(p * p for p in PATCH_NUMS), H * D)
    cache, outs = IterationKeyedCache(missing="error"), []
    for s, (b, e) in enumerate(_bounds(PATCH_NUMS)):

        def f(z: Tensor, x_s: Tensor, it: int, s: int = s) -> Tensor:
            q, k, v = layer.qkv(z)
            k_all, v_all = cache.at(scale=s, iteration=it).update(k, v)
            return layer.out(attention(q, k_all, v_all), x_s)

        sol = fixed_point(f, x[:, b:e], Picard(tol=None, max_iter=K), x=x[:, b:e], indexed=True)
        outs.append(sol.z)
    assert cache.iterations_per_scale == (K,) * len(PATCH_NUMS)
    torch.testing.assert_close(torch.cat(outs, dim=1), _joint_reference(layer, x, K), atol=1e-5, rtol=0)


# ---------------------------------------------------------------- the missing-key rule


def _run_increasing_schedule(cache: IterationKeyedCache) -> list[Tensor]:
    """Scale 0 runs iterations 0..1, scale 1 runs 0..3, scale 2 runs 0..3; values are 100 * scale + iteration.

    Returns scale 2's k_all per iteration."""
    for it in range(2):
        cache.update(_filled(1, it), _filled(1, it), scale=0, iteration=it)
    for it in range(4):
        cache.update(_filled(4, 100 + it), _filled(4, 100 + it), scale=1, iteration=it)
    return [
        cache.update(_filled(9, 200 + it), _filled(9, 200 + it), scale=2, iteration=it)[0] for it in range(4)
    ]


def test_missing_last_uses_the_last_stored_iteration() -> None:
    cache = IterationKeyedCache()  # missing="last" is the default
    assert cache.missing == "last"
    k_alls = _run_increasing_schedule(cache)
    # scale 0 stopped at iteration 1, so iterations 2 and 3 see its iteration 1; scale 1 has them all
    for it, k_all in enumerate(k_alls):
        assert k_all[0, 0, :, 0].tolist() == [min(it, 1)] + [100 + it] * 4 + [200 + it] * 9
    assert cache.nbytes() == B * (2 * 1 + 4 * 4 + 4 * 9) * 2 * H * D * 4


def test_missing_error_names_scale_and_iteration_and_leaves_the_cache_usable() -> None:
    cache = IterationKeyedCache(missing="error")
    for it in range(2):
        cache.update(_filled(1, it), _filled(1, it), scale=0, iteration=it)
    cache.update(_filled(4, 100), _filled(4, 100), scale=1, iteration=0)
    cache.update(_filled(4, 101), _filled(4, 101), scale=1, iteration=1)
    before = cache.nbytes()
    with pytest.raises(MissingIterationError, match=r"scale 1 iteration 2 .*earlier scale 0.*0\.\.1"):
        cache.update(_filled(4, 102), _filled(4, 102), scale=1, iteration=2)
    assert cache.nbytes() == before and cache.iterations_per_scale == (2, 2)
    cache.update(_filled(9, 200), _filled(9, 200), scale=2, iteration=0)  # a failed update wrote nothing
    k_all, _ = cache.update(_filled(9, 201), _filled(9, 201), scale=2, iteration=1)
    assert k_all[0, 0, :, 0].tolist() == [1] + [101] * 4 + [201] * 9


def test_missing_skip_reproduces_upstream_dropping() -> None:
    cache = IterationKeyedCache(missing="skip")
    k_alls = _run_increasing_schedule(cache)
    assert [k.shape[2] for k in k_alls] == [14, 14, 13, 13]  # upstream's shrinking key lengths
    assert k_alls[3][0, 0, :, 0].tolist() == [103] * 4 + [203] * 9  # scale 0 silently left out


def test_unknown_missing_policy() -> None:
    with pytest.raises(ValueError, match="missing='first'"):
        IterationKeyedCache(missing="first")  # type: ignore[arg-type]


# ---------------------------------------------------------------- memory


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_nbytes_matches_the_formula(dtype: torch.dtype) -> None:
    schedule = [4, 3, 2, 1]
    itemsize = torch.empty((), dtype=dtype).element_size()
    C = H * D
    keyed = IterationKeyedCache()
    lean, append = EquilibriumCache(), AppendCache()
    for s, p in enumerate(PATCH_NUMS):
        n = p * p
        for it in range(schedule[s]):
            # K and V as views into one fused (3, B, H, n, D) buffer, as a QKV projection gives them
            qkv = torch.randn(3, B, H, n, D, dtype=dtype)
            keyed.update(qkv[1], qkv[2], scale=s, iteration=it)
            lean.update(qkv[1], qkv[2], scale=s, iteration=it)
        append.update(qkv[1], qkv[2], scale=s)
    expected_keyed = B * sum(k * p * p for k, p in zip(schedule, PATCH_NUMS, strict=True)) * 2 * C * itemsize
    expected_lean = B * sum(p * p for p in PATCH_NUMS) * 2 * C * itemsize
    assert keyed.nbytes() == expected_keyed
    assert lean.nbytes() == append.nbytes() == expected_lean
    assert lean.iterations_per_scale == tuple(schedule)
    for cache in (keyed, lean, append):
        cache.reset()
        assert cache.nbytes() == 0 and cache.num_scales == 0
        cache.update(_filled(1, 0, dtype), _filled(1, 0, dtype), scale=0)  # usable again from scale 0


def test_nbytes_on_meta_tensors() -> None:
    cache = IterationKeyedCache()
    for s, p in enumerate(PATCH_NUMS):
        for it in range(2):
            k = torch.empty(1, 30, p * p, 64, dtype=torch.float16, device="meta")
            cache.update(k, k, scale=s, iteration=it)
    assert cache.nbytes() == 1 * 2 * sum(p * p for p in PATCH_NUMS) * 2 * 30 * 64 * 2


# ---------------------------------------------------------------- argument checks


@pytest.mark.parametrize("cache_cls", [AppendCache, IterationKeyedCache, EquilibriumCache])
def test_scales_must_come_in_order(cache_cls: type[KVCache]) -> None:
    cache = cache_cls()
    with pytest.raises(ValueError, match=r"scale=1 but expected 0"):
        cache.update(_filled(4, 0), _filled(4, 0), scale=1)
    cache.update(_filled(1, 0), _filled(1, 0), scale=0)
    cache.update(_filled(4, 0), _filled(4, 0), scale=1)
    with pytest.raises(ValueError, match=r"scale=0 but expected 1 \(again\) or 2.*reset\(\)"):
        cache.update(_filled(1, 0), _filled(1, 0), scale=0)
    with pytest.raises(ValueError, match=r"scale=3"):
        cache.update(_filled(16, 0), _filled(16, 0), scale=3)
    with pytest.raises(TypeError, match="scale must be an int"):
        cache.update(_filled(4, 0), _filled(4, 0), scale=True)


@pytest.mark.parametrize("cache_cls", [AppendCache, IterationKeyedCache, EquilibriumCache])
def test_shape_dtype_checks(cache_cls: type[KVCache]) -> None:
    cache = cache_cls()
    with pytest.raises(ValueError, match=r"k_new must be \(B, heads, n_s, head_dim\)"):
        cache.update(torch.zeros(B, 1, D), torch.zeros(B, 1, D), scale=0)
    with pytest.raises(ValueError, match="differ in"):
        cache.update(_filled(1, 0), torch.zeros(B, H, 2, D), scale=0)
    cache.update(_filled(1, 0), _filled(1, 0), scale=0)
    with pytest.raises(ValueError, match=r"\(B, heads, head_dim\) = \(3, 3, 5\).*reset\(\)"):
        cache.update(torch.zeros(3, H, 4, D), torch.zeros(3, H, 4, D), scale=1)
    with pytest.raises(TypeError, match="float64"):
        cache.update(_filled(4, 0).double(), _filled(4, 0).double(), scale=1)
    with pytest.raises(TypeError, match="torch.Tensor"):
        cache.update([0.0], _filled(4, 0), scale=1)  # type: ignore[arg-type]


def test_iterations_must_come_in_order() -> None:
    cache = IterationKeyedCache()
    with pytest.raises(ValueError, match=r"iteration=1 but holds iterations 0\.\.-1"):
        cache.update(_filled(1, 0), _filled(1, 0), scale=0, iteration=1)
    assert cache.num_scales == 0  # nothing was written
    bad: Any
    for bad in (-1, 1.0, True):
        with pytest.raises(ValueError, match="iteration must be an int >= 0"):
            cache.update(_filled(1, 0), _filled(1, 0), scale=0, iteration=bad)
        with pytest.raises(ValueError, match="iteration must be an int >= 0"):
            EquilibriumCache().update(_filled(1, 0), _filled(1, 0), scale=0, iteration=bad)


def test_cache_slot() -> None:
    cache = IterationKeyedCache()
    slot = cache.at(scale=0, iteration=0)
    assert slot == CacheSlot(cache, 0, 0)
    k_all, _ = slot.update(_filled(1, 5), _filled(1, 5))
    assert k_all.shape == (B, H, 1, D) and cache.iterations_per_scale == (1,)


def test_doctests() -> None:
    result = doctest.testmod(importlib.import_module("deqgen.kv_cache"), verbose=False)
    assert result.attempted > 0 and result.failed == 0
