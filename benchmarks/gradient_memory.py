"""Training memory and step time of one S-JFB step against the number of no-grad iterations k1.

    python benchmarks/gradient_memory.py            # prints a markdown table (~1 min on 2 cores)

Each point runs in a fresh subprocess and reports its peak resident memory (``ru_maxrss``) above the
high-water mark it had after building the model and inputs, so the columns compare like with like. Two
implementations of the same step (k1 no-grad iterations, then k2 = 2 recorded ones, then backward):

* ``deqgen``: :class:`deqgen.SJFB` in an :class:`deqgen.ImplicitLayer` (the k1 phase runs under
  ``torch.no_grad()`` in deqgen's solver loop);
* ``nullcontext``: the official VIAR pattern, the k1 phase inside ``contextlib.nullcontext()``, so autograd
  records it and keeps its activations until backward.

The layer is the VIAR-like block of the solver benchmark (fuse MLP + pre-LN attention), B=8, L=256, C=128.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
K1S = (0, 4, 8, 16)
K2 = 2


def _point(impl: str, k1: int) -> dict[str, float]:
    sys.path.insert(0, str(ROOT))
    import torch

    from deqgen import SJFB, ImplicitLayer, Picard
    from tests.problems import _Block

    torch.set_num_threads(1)
    torch.manual_seed(0)
    B, L, C = 8, 256, 128
    block = _Block(C, heads=4)
    x = torch.randn(B, L, C)
    z0 = torch.zeros(B, L, C)

    def f(z, xx, k):
        return block(z, xx)

    with torch.no_grad():  # warm-up: one-time allocations (thread pools, kernels) outside the measurement
        f(f(z0, x, 0), x, 1)
    saved = 0

    def pack(t):  # bytes autograd keeps for backward: an exact count, free of allocator noise
        nonlocal saved
        saved += t.numel() * t.element_size()
        return t

    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        if impl == "deqgen":
            layer = ImplicitLayer(f, SJFB(no_grad=(k1, k1), with_grad=(K2, K2)), Picard(tol=None, max_iter=1))
            z, _ = layer(x, z0, torch.Generator().manual_seed(0))
        else:
            z = z0
            with contextlib.nullcontext():  # what the official code does for its "no-grad" phase
                for k in range(k1):
                    z = f(z, x, k)
            for k in range(k1, k1 + K2):
                z = f(z, x, k)
    z.square().mean().backward()
    seconds = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"peak_mb": (after - before) / 1024, "saved_mb": saved / 2**20, "seconds": seconds}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--point", nargs=2, metavar=("IMPL", "K1"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.point:
        print(json.dumps(_point(args.point[0], int(args.point[1]))))
        return
    rows = {}
    for impl in ("deqgen", "nullcontext"):
        for k1 in K1S:
            out = subprocess.run(
                [sys.executable, __file__, "--point", impl, str(k1)], capture_output=True, text=True, check=True
            )
            rows[(impl, k1)] = json.loads(out.stdout.strip().splitlines()[-1])
    print(f"k2 = {K2} recorded iterations; MB above the pre-step high-water mark; saved = bytes kept for backward\n")
    print("| k1 (no-grad iterations) | deqgen peak MB | nullcontext peak MB | deqgen saved MB | nullcontext saved MB "
          "| deqgen s | nullcontext s |")
    print("|---|---|---|---|---|---|---|")
    for k1 in K1S:
        d, n = rows[("deqgen", k1)], rows[("nullcontext", k1)]
        print(f"| {k1} | {d['peak_mb']:.1f} | {n['peak_mb']:.1f} | {d['saved_mb']:.1f} | {n['saved_mb']:.1f} "
              f"| {d['seconds']:.2f} | {n['seconds']:.2f} |")
    d0, d16 = rows[("deqgen", 0)]["peak_mb"], rows[("deqgen", K1S[-1])]["peak_mb"]
    print(f"\ndeqgen peak from k1=0 to k1={K1S[-1]}: {100 * (d16 - d0) / d0:+.1f}%")


if __name__ == "__main__":
    main()
