"""Training memory and step time of one S-JFB step against the number of no-grad iterations k1.

    python benchmarks/gradient_memory.py            # prints a markdown table (about 1 min on 2 cores)

Two implementations of the same step on a tiny VIAR-like transformer block (fuse MLP on ``[z; x]``, then a
pre-LN attention block; B=8, L=256, C=128, 4 heads, float32, CPU, one thread), z0 = x as in VIAR:

* ``deqgen``: :class:`deqgen.SJFB` in an :class:`deqgen.ImplicitLayer`. The k1 phase runs under
  ``torch.no_grad()`` in deqgen's solver loop, then k2 recorded steps, then backward.
* ``nullcontext``: the official VIAR pattern. The k1 phase runs inside ``contextlib.nullcontext()`` from a
  detached start, so autograd records it; the result is detached, then k2 recorded steps, then backward.
  The recorded k1 graph is freed at the detach, so it raises the peak once it outgrows the k2 phase.

Each point runs in a fresh subprocess. Columns:

* ``peak RSS``: how far the resident-memory high-water mark rose during the step above the resident memory
  after building the model and a no-grad warm-up (one call of f, one 1-evaluation solve), with
  ``deqgen.evaluation.memory`` (``reset_peak_memory`` then ``peak_memory_bytes``). glibc's
  mmap threshold is fixed (``MMAP_THRESHOLD``) so that the mark follows live memory, not heap fragmentation.
* ``autograd peak``: the most bytes autograd held for backward at any moment (saved activations counted
  once per storage, parameters excluded), measured exactly with ``saved_tensors_hooks``.
* ``step s``: median wall time of 3 further steps in the same process.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
K1S = (0, 4, 8, 16)
K2 = 2
B, L, C, HEADS = 8, 256, 128, 4
MMAP_THRESHOLD = 128 * 1024
"""glibc serves allocations above this from mmap and unmaps them on free. A fixed value switches off glibc's
dynamic threshold, under which freed activations stay in a fragmented heap and peak RSS jumps by +-15 MB
from run to run; with it, peak RSS follows the peak of live memory."""


def _block(torch: Any) -> Any:
    """The layer's map: fuse MLP on [z; x], then pre-LN attention and MLP with half-weighted residuals."""
    nn, F = torch.nn, torch.nn.functional

    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fuse = nn.Sequential(
                nn.Linear(2 * C, 2 * C), nn.GELU(approximate="tanh"), nn.Linear(2 * C, C)
            )
            self.ln1, self.ln2 = nn.LayerNorm(C), nn.LayerNorm(C)
            self.qkv, self.proj = nn.Linear(C, 3 * C), nn.Linear(C, C)
            self.fc1, self.fc2 = nn.Linear(C, 4 * C), nn.Linear(4 * C, C)

        def forward(self, z_BLC: Any, x_BLC: Any, k: int) -> Any:
            h = self.fuse(torch.cat([z_BLC, x_BLC], dim=-1))  # (B, L, C)
            q, kk, v = self.qkv(self.ln1(h)).view(B, L, 3, HEADS, C // HEADS).permute(2, 0, 3, 1, 4)
            a = F.scaled_dot_product_attention(q, kk, v).transpose(1, 2).reshape(B, L, C)
            h = h + 0.5 * self.proj(a)
            return h + 0.5 * self.fc2(F.gelu(self.fc1(self.ln2(h)), approximate="tanh"))

    return Block()


def _point(impl: str, k1: int) -> dict[str, float]:
    sys.path.insert(0, str(ROOT))
    import torch

    from deqgen import SJFB, ImplicitLayer, Picard
    from deqgen.evaluation.memory import SavedTensorBytes, peak_memory_bytes, reset_peak_memory
    from deqgen.gradients import forward_solve

    torch.set_num_threads(1)
    torch.manual_seed(0)
    f = _block(torch)
    x = torch.randn(B, L, C)
    layer = ImplicitLayer(f, SJFB(no_grad=(k1, k1), with_grad=(K2, K2)), Picard(tol=None, max_iter=1))

    def step() -> None:
        if impl == "deqgen":
            z, _ = layer(x, x, torch.Generator().manual_seed(0))
        else:
            z = x.detach()
            with contextlib.nullcontext():  # what the official code does for its "no-grad" phase
                for k in range(k1):
                    z = f(z, x.detach(), k)
            z = z.detach()
            for k in range(k1, k1 + K2):
                z = f(z, x, k)
        z.square().mean().backward()
        f.zero_grad(set_to_none=True)

    # Warm-up, the same for both implementations: one call of f and one 1-evaluation solve under no_grad, so
    # one-time allocations (thread pool, kernels, the solver loop's first use, ~2 MB) fall outside the step.
    with torch.no_grad():
        f(x, x, 0)
    forward_solve(lambda z, k: f(z, x, k), x, Picard(tol=None, max_iter=1))
    counter = SavedTensorBytes({p.untyped_storage().data_ptr() for p in f.parameters()})
    before = reset_peak_memory("cpu")
    with torch.autograd.graph.saved_tensors_hooks(counter.pack, counter.unpack):
        step()
    after = peak_memory_bytes("cpu")
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return {
        "peak_mb": (after - before) / 2**20,
        "autograd_mb": counter.peak / 2**20,
        "seconds": statistics.median(times),
    }


def _table(rows: dict[tuple[str, int], dict[str, float]]) -> str:
    lines = [
        f"k2 = {K2} recorded iterations; B={B}, L={L}, C={C}, float32, CPU, 1 thread; MB = 2^20 bytes",
        "",
        (
            "| k1 (no-grad iterations) | deqgen peak RSS MB | nullcontext peak RSS MB "
            "| deqgen autograd peak MB | nullcontext autograd peak MB | deqgen step s | nullcontext step s |"
        ),
        "|---|---|---|---|---|---|---|",
    ]
    for k1 in K1S:
        d, n = rows[("deqgen", k1)], rows[("nullcontext", k1)]
        lines.append(
            f"| {k1} | {d['peak_mb']:.1f} | {n['peak_mb']:.1f} | {d['autograd_mb']:.1f} "
            f"| {n['autograd_mb']:.1f} | {d['seconds']:.3f} | {n['seconds']:.3f} |"
        )
    lines.append("")
    for impl in ("deqgen", "nullcontext"):
        first, last = rows[(impl, K1S[0])]["peak_mb"], rows[(impl, K1S[-1])]["peak_mb"]
        lines.append(
            f"{impl} peak RSS from k1={K1S[0]} to k1={K1S[-1]}: {100 * (last - first) / first:+.1f}%"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--point", nargs=2, metavar=("IMPL", "K1"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.point:
        sys.stdout.write(json.dumps(_point(args.point[0], int(args.point[1]))) + "\n")
        return
    rows = {}
    for k1 in K1S:
        for impl in ("deqgen", "nullcontext"):
            out = subprocess.run(
                [sys.executable, __file__, "--point", impl, str(k1)],
                capture_output=True,
                text=True,
                check=True,
                env={**os.environ, "MALLOC_MMAP_THRESHOLD_": str(MMAP_THRESHOLD)},
            )
            rows[(impl, k1)] = json.loads(out.stdout.strip().splitlines()[-1])
    sys.stdout.write(_table(rows) + "\n")


if __name__ == "__main__":
    main()
