"""Structured states and separable layers: what they cost.

1. Structured vs packed: the two-resolution cell of ``tests/test_structured.py`` (``(B, C, 16, 16)`` and
   ``(B, 2C, 8, 8)``), solved as a tuple state and as the same problem packed into one tensor by hand.
   Goal: the structured solve takes at most 1.1x the packed one.
2. Separable layer on the tutorial's model (docs/tutorial_own_model.md: the digits classifier trained by the
   page's own code, Anderson at tol 1e-5 with ImplicitDiff): f rows evaluated per sample over all 1797 images
   with and without ``separable=True`` (without is what the previous release did), against the mean
   per-sample NFE.

Run: ``OMP_NUM_THREADS=1 python benchmarks/structured_bench.py``
"""

from __future__ import annotations

import contextlib
import io
import re
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import deqgen
from deqgen import Anderson, ImplicitLayer


class TwoScale(nn.Module):
    def __init__(self, C: int) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.C = C
        self.conv_a = nn.Conv2d(C, C, 3, padding=1)
        self.conv_b = nn.Conv2d(2 * C, 2 * C, 3, padding=1)
        self.down = nn.Conv2d(C, 2 * C, 3, stride=2, padding=1)
        self.up = nn.Conv2d(2 * C, C, 1)

    def branches(self, a: Tensor, b: Tensor, xa: Tensor, xb: Tensor) -> tuple[Tensor, Tensor]:
        a_new = torch.tanh(0.3 * self.conv_a(a) + 0.2 * F.interpolate(self.up(b), scale_factor=2.0) + xa)
        b_new = torch.tanh(0.3 * self.conv_b(b) + 0.2 * self.down(a) + xb)
        return a_new, b_new


def _median_time(fn, rounds: int = 7) -> float:
    fn()
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def structured_vs_packed(B: int = 32, C: int = 8, H: int = 16) -> None:
    cell = TwoScale(C)
    xa, xb = torch.randn(B, C, H, H), torch.randn(B, 2 * C, H // 2, H // 2)
    na = C * H * H
    z0 = (torch.zeros(B, C, H, H), torch.zeros(B, 2 * C, H // 2, H // 2))
    solver = Anderson(tol=1e-5, max_iter=60)

    def f_tuple(z: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
        return cell.branches(z[0], z[1], xa, xb)

    def f_packed(z: Tensor) -> Tensor:
        n = z.shape[0]
        a_new, b_new = cell.branches(
            z[:, :na].reshape(n, C, H, H), z[:, na:].reshape(n, 2 * C, H // 2, H // 2), xa, xb
        )
        return torch.cat([a_new.reshape(n, -1), b_new.reshape(n, -1)], 1)

    z0_packed = torch.cat([z0[0].reshape(B, -1), z0[1].reshape(B, -1)], 1)
    with torch.no_grad():
        rows = []
        for _ in range(3):  # interleaved rounds
            t_s = _median_time(lambda: deqgen.fixed_point(f_tuple, z0, solver))
            t_p = _median_time(lambda: deqgen.fixed_point(f_packed, z0_packed, solver))
            rows.append((t_s, t_p))
        nfe = deqgen.fixed_point(f_tuple, z0, solver).stats.iterations
        nfe_p = deqgen.fixed_point(f_packed, z0_packed, solver).stats.iterations
    ratio = statistics.median(s / p for s, p in rows)
    t_s, t_p = statistics.median(r[0] for r in rows), statistics.median(r[1] for r in rows)
    print(
        f"| structured vs packed, B={B}, ({C},{H},{H}) + ({2 * C},{H // 2},{H // 2}), Anderson tol 1e-5 "
        f"| {t_s * 1e3:.1f} ms | {t_p * 1e3:.1f} ms | {ratio:.3f}x | iterations {nfe} / {nfe_p} |"
    )


def _tutorial_model() -> tuple[nn.Module, Tensor]:
    """The tutorial's classifier trained by the tutorial's own code (its first two blocks), and its images."""
    page = (Path(__file__).resolve().parents[1] / "docs" / "tutorial_own_model.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", page, flags=re.DOTALL)[:2]
    namespace: dict[str, object] = {"__name__": "tutorial"}
    with contextlib.redirect_stdout(io.StringIO()):
        exec(compile("\n".join(blocks), "tutorial_own_model.md", "exec"), namespace)  # noqa: S102
    return namespace["model"], namespace["images"]  # type: ignore[return-value]


def separable_rows() -> None:
    model, images = _tutorial_model()
    x = model.encode(images.flatten(1)).detach()
    B = x.shape[0]
    old = model.implicit
    print(f"| tutorial classifier, B={B} | rows evaluated / B | mean per-sample NFE | iterations |")
    print("|---|---|---|---|")
    for separable in (False, True):  # separable=False is what the previous release's layer did
        layer = ImplicitLayer(old.f, old.gradient, old.train_solver, old.eval_solver, separable=separable)
        for mode in ("train", "eval"):
            layer.train(mode == "train")
            _, info = layer(x, torch.zeros_like(x))
            st = info.forward.stats
            print(
                f"| separable={separable}, {mode} | {st.rows_evaluated / B:.2f} | "
                f"{st.nfe.double().mean().item():.2f} | {st.iterations} |"
            )


if __name__ == "__main__":
    torch.set_num_threads(1)
    print("| case | structured | packed | ratio | |")
    print("|---|---|---|---|---|")
    structured_vs_packed()
    structured_vs_packed(B=8, C=4, H=8)
    separable_rows()
