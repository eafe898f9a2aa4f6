"""Attention kernels and KV-cache policies: three markdown tables, measured in one run.

    python benchmarks/attention_bench.py                  # ~1-2 min on one CPU thread
    python benchmarks/attention_bench.py --rounds 9 --batch 4 --device cuda

1. **Attention time per backend** at VAR-d16 shapes (16 heads, head_dim 64, the 10-scale 256-px pyramid,
   L = 680): the teacher-forcing call (all 680 queries, block-causal mask, as float bias and as bool mask) and
   the cached last-scale call (256 queries against 680 keys, no mask). Every backend runs once to warm up,
   then ``--rounds`` interleaved rounds (each backend once per round); the median is reported. A backend
   that cannot run is listed with the probe's reason.
2. **Cache bytes per policy** for VIAR-d30 and VAR-d30 (C = 1920, 30 heads of 64) on the 256-px pyramid,
   per image in float16 (the sampling precision): the caches are filled with meta tensors scale by scale and
   iteration by iteration, and ``nbytes()`` is read back.
3. **Drift of the lean cache.** A contractive implicit attention map ``z <- x + gamma * Attn(LN(z)) W_o``
   is iterated ``K`` times per scale with an ``IterationKeyedCache`` (the training semantics) and with an
   ``EquilibriumCache``; the table gives the relative difference of their outputs.
"""

from __future__ import annotations

import argparse
import functools
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from deqgen.kv_cache import AppendCache, EquilibriumCache, IterationKeyedCache, KVCache  # noqa: E402
from deqgen.nn import (  # noqa: E402
    attention,
    block_causal_bias,
    block_causal_mask,
    probe_backend,
    resolve_backend,
    scale_slices,
)
from deqgen.nn.attention import MaskKind  # noqa: E402

PATCH_NUMS_256 = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)
BACKENDS = ("xformers", "sdpa", "math")


# ---------------------------------------------------------------- 1. attention time


def _median_ms(fns: dict[str, Callable[[], Tensor]], rounds: int, device: str) -> dict[str, float]:
    for fn in fns.values():  # warm-up
        fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            if torch.device(device).type == "cuda":
                torch.cuda.synchronize()
            times[name].append(time.perf_counter() - t0)
    return {name: 1e3 * statistics.median(ts) for name, ts in times.items()}


def attention_table(batch: int, rounds: int, device: str, dtype: torch.dtype) -> None:
    heads, head_dim = 16, 64  # VAR-d16: C = 1024
    L = sum(p * p for p in PATCH_NUMS_256)
    n_last = PATCH_NUMS_256[-1] ** 2
    gen = torch.Generator().manual_seed(0)
    q, k, v = (
        t.to(device, dtype) for t in torch.randn(3, batch, heads, L, head_dim, generator=gen).unbind(0)
    )
    cases: dict[str, tuple[Tensor, Tensor | None]] = {  # name -> (queries, mask)
        f"teacher forcing, Lq=Lk={L}, float bias": (q, block_causal_bias(PATCH_NUMS_256, device=device)),
        f"teacher forcing, Lq=Lk={L}, bool mask": (q, block_causal_mask(PATCH_NUMS_256, device=device)),
        f"cached last scale, Lq={n_last}, Lk={L}, no mask": (q[:, :, -n_last:].contiguous(), None),
    }
    auto = resolve_backend("auto", device=device, dtype=dtype, head_dim=head_dim, mask_kind="float")
    threads = torch.get_num_threads()
    print(
        f"\nAttention forward (ms), VAR-d16 shapes: B={batch}, heads={heads}, head_dim={head_dim}, {dtype},"
    )
    print(f"{device}, torch {torch.__version__}, {threads} thread(s); median of {rounds} rounds.")
    print(f"`auto` resolves to `{auto.value}` here.\n")
    print("| case | " + " | ".join(BACKENDS) + " | math / sdpa |")
    print("|---|" + "---:|" * (len(BACKENDS) + 1))
    reasons: dict[str, str] = {}
    for name, (queries, mask) in cases.items():
        kind: MaskKind = "none" if mask is None else ("bool" if mask.dtype == torch.bool else "float")
        runnable: dict[str, Callable[[], Tensor]] = {}
        for backend in BACKENDS:
            reason = probe_backend(backend, device=device, dtype=dtype, head_dim=head_dim, mask_kind=kind)
            if reason is None:
                runnable[backend] = functools.partial(attention, queries, k, v, mask=mask, backend=backend)
            else:
                reasons[backend] = reason
        with torch.no_grad():
            ms = _median_ms(runnable, rounds, device)
        cells = [f"{ms[b]:.1f}" if b in ms else "n/a" for b in BACKENDS]
        ratio = f"{ms['math'] / ms['sdpa']:.2f}x" if {"math", "sdpa"} <= ms.keys() else "n/a"
        print(f"| {name} | " + " | ".join(cells) + f" | {ratio} |")
    for backend, reason in sorted(reasons.items()):
        print(f"\n`{backend}` n/a: {reason}.")


# ---------------------------------------------------------------- 2. cache bytes


def _fill(
    cache: KVCache, schedule: Sequence[int], heads: int, head_dim: int, dtype: torch.dtype, batch: int = 1
) -> int:
    for s, p in enumerate(PATCH_NUMS_256):
        kv = torch.empty(batch, heads, p * p, head_dim, dtype=dtype, device="meta")
        for it in range(schedule[s]):
            cache.update(kv, kv, scale=s, iteration=it)
    return cache.nbytes()


def linear_schedule(first: int, last: int, scales: int) -> list[int]:
    """VIAR's per-scale iteration counts: numpy linspace(first, last, scales) truncated to int."""
    return [int(n) for n in np.linspace(first, last, scales).astype(int)]


def cache_table() -> None:
    heads, head_dim, dtype = 30, 64, torch.float16  # d30: C = 1920
    scales = len(PATCH_NUMS_256)
    ones, const10, lin = [1] * scales, [10] * scales, linear_schedule(10, 1, scales)
    append = _fill(AppendCache(), ones, heads, head_dim, dtype)
    implicit = {
        "IterationKeyedCache, K=10 constant": _fill(IterationKeyedCache(), const10, heads, head_dim, dtype),
        f"IterationKeyedCache, linear 10->1 {lin}": _fill(IterationKeyedCache(), lin, heads, head_dim, dtype),
        "EquilibriumCache, K=10 constant": _fill(EquilibriumCache(), const10, heads, head_dim, dtype),
        "EquilibriumCache, linear 10->1": _fill(EquilibriumCache(), lin, heads, head_dim, dtype),
    }
    var_d30 = 30 * append
    mib = 2.0**20
    print(
        "\nKV-cache bytes per image, float16, C=1920 (30 heads x 64), 256 px (L=680). "
        "Filled with meta tensors,"
    )
    print("read back with nbytes(). A layer-equivalent is one AppendCache layer (680 tokens of K and V).\n")
    print(
        "| model | cache of the implicit layer | implicit layer (MiB) | layer-equiv. | whole model (MiB) "
        "| vs VAR-d30 |"
    )
    print("|---|---|---:|---:|---:|---:|")
    print(f"| VAR-d30 | (30 explicit layers, AppendCache) | - | - | {var_d30 / mib:.1f} | 100 % |")
    for name, nbytes in implicit.items():
        total = 10 * append + nbytes  # VIAR-d30: 5 pre + 5 post AppendCache layers + the implicit layer
        print(
            f"| VIAR-d30 | {name} | {nbytes / mib:.1f} | {nbytes / append:.2f} | {total / mib:.1f} "
            f"| {100 * total / var_d30:.0f} % |"
        )


# ---------------------------------------------------------------- 3. drift of the lean cache


class ContractiveAttentionMap:
    """``f(z) = x + gamma * Attn(LN(z)) W_o``: one implicit attention layer, contractive for small gamma."""

    def __init__(self, channels: int, heads: int, gamma: float, gen: torch.Generator) -> None:
        self.heads, self.head_dim = heads, channels // heads
        self.w_qkv = torch.randn(channels, 3 * channels, generator=gen) / channels**0.5
        self.w_o = gamma * torch.randn(channels, channels, generator=gen) / channels**0.5

    def __call__(self, z_BNC: Tensor, x_BNC: Tensor, cache: KVCache, scale: int, iteration: int) -> Tensor:
        b, n, c = z_BNC.shape
        qkv = F.layer_norm(z_BNC, (c,)) @ self.w_qkv  # (B, n, 3C)
        q, k, v = qkv.view(b, n, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)  # 3 x (B, H, n, D)
        k_all, v_all = cache.update(k, v, scale=scale, iteration=iteration)
        a = attention(q, k_all, v_all)  # (B, H, n, D)
        return x_BNC + a.transpose(1, 2).reshape(b, n, c) @ self.w_o


def _solve_pyramid(
    f: ContractiveAttentionMap, x_BLC: Tensor, iterations: int, cache: KVCache
) -> tuple[Tensor, float]:
    """Scale by scale, `iterations` Picard steps from z0 = x; returns z (B, L, C), last-scale residual."""
    outs, res = [], 0.0
    for s, sl in enumerate(scale_slices(PATCH_NUMS_256)):
        x_s = x_BLC[:, sl]
        z = x_s
        for it in range(iterations):
            z_next = f(z, x_s, cache, s, it)
            res = float((z_next - z).norm() / z_next.norm())
            z = z_next
        outs.append(z)
    return torch.cat(outs, dim=1), res


def drift_table(gammas: Sequence[float], iterations: Sequence[int]) -> None:
    channels, heads = 256, 4
    L = sum(p * p for p in PATCH_NUMS_256)
    last = scale_slices(PATCH_NUMS_256)[-1]
    print(
        f"\nDrift of EquilibriumCache from IterationKeyedCache (= training semantics): toy map C={channels}, "
    )
    print(
        f"{heads} heads, B=1, 256-px pyramid, float64, z0 = x, K Picard steps per scale. "
        "rel = ||a - b|| / ||b||.\n"
    )
    print("| gamma | K | keyed: last-scale residual at K | rel. diff, all tokens | rel. diff, last scale |")
    print("|---:|---:|---:|---:|---:|")
    for gamma in gammas:
        gen = torch.Generator().manual_seed(0)
        f = ContractiveAttentionMap(channels, heads, gamma, gen)
        f.w_qkv, f.w_o = f.w_qkv.double(), f.w_o.double()
        x = torch.randn(1, L, channels, generator=gen, dtype=torch.float64)
        for k in iterations:
            keyed, res = _solve_pyramid(f, x, k, IterationKeyedCache())
            lean, _ = _solve_pyramid(f, x, k, EquilibriumCache())
            rel_all = float((lean - keyed).norm() / keyed.norm())
            rel_last = float((lean[:, last] - keyed[:, last]).norm() / keyed[:, last].norm())
            print(f"| {gamma:g} | {k} | {res:.1e} | {rel_all:.1e} | {rel_last:.1e} |")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default="float32")
    parser.add_argument("--gammas", nargs="+", type=float, default=[0.25, 0.5, 0.75])
    parser.add_argument("--iterations", nargs="+", type=int, default=[1, 2, 3, 5, 10, 20])
    parser.add_argument("--skip", nargs="*", choices=["time", "bytes", "drift"], default=[])
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if "time" not in args.skip:
        attention_table(args.batch, args.rounds, args.device, getattr(torch, args.dtype))
    if "bytes" not in args.skip:
        cache_table()
    if "drift" not in args.skip:
        drift_table(args.gammas, args.iterations)


if __name__ == "__main__":
    main()
