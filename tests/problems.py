"""The problem bank shared by the tests and the benchmarks.

Four families, each built in float64 from seeded generators and then cast, so every dtype solves the same
problem. At their benchmark sizes they are P1-P4 of the solver benchmark (``docs/benchmarks.md``), the problems on
which torchdeq's figures were measured:

* ``linear``: ``f(z) = z A^T + b`` with ``||A||_2 = 0.9``; exact ``z* = (I - A)^{-1} b`` (P1: B=64, D=512).
* ``tanh_mlp``: ``f(z) = tanh(z (0.95 W)^T + inj)``, ``W`` symmetric with ``||W||_2 = 1`` (P2: B=64, D=1024).
* ``mixed``: rows with contraction ``c_b`` from 0.3 to 0.99, easy and hard rows in one batch (P3).
* ``attention``: a VIAR-like fuse-MLP + pre-LN transformer block, contraction ~0.6 (P4: B=8, L=256, C=256).

Every ``f`` is batch-separable: it takes ``rows=`` (original row indices, or None for all rows).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["BankProblem", "linear", "tanh_mlp", "mixed", "attention", "benchmark_problem", "BENCHMARKS"]


@dataclass(frozen=True)
class BankProblem:
    """A named problem: ``f(z, rows=None)``, the start ``z0: (B, *S)``, the budget, optionally the exact z*."""

    name: str
    f: Callable[..., Tensor]
    z0: Tensor
    max_iter: int
    exact: Tensor | None = None

    def full(self, z: Tensor) -> Tensor:
        """``f`` on all rows (the signature torchdeq and scipy expect)."""
        return self.f(z)


def _scaled(M: Tensor, s: float) -> Tensor:
    return M * (s / torch.linalg.matrix_norm(M, 2))


def _pick(t: Tensor, rows: Tensor | None) -> Tensor:
    """The rows of ``t`` that ``f`` is evaluated on (``index_select``: on CPU several times faster than
    ``t[rows]``, the same rows)."""
    return t if rows is None else t.index_select(0, rows)


def linear(B: int = 64, D: int = 512, seed: int = 1001, dtype: torch.dtype = torch.float64) -> BankProblem:
    g = torch.Generator().manual_seed(seed)
    A = _scaled(torch.randn(D, D, generator=g, dtype=torch.float64), 0.9)
    b = torch.randn(B, D, generator=g, dtype=torch.float64)
    exact = torch.linalg.solve(torch.eye(D, dtype=torch.float64) - A, b.T).T
    At, bc = A.T.contiguous().to(dtype), b.to(dtype)

    def f(z: Tensor, rows: Tensor | None = None) -> Tensor:
        return torch.addmm(_pick(bc, rows), z, At)

    return BankProblem(f"linear{B}x{D}", f, torch.zeros(B, D, dtype=dtype), 100, exact.to(dtype))


def _mlp_parts(B: int, D: int, seed: int) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    G = torch.randn(D, D, generator=g, dtype=torch.float64)
    U = torch.randn(D, D, generator=g, dtype=torch.float64) / D**0.5
    x = torch.randn(B, D, generator=g, dtype=torch.float64)
    W = _scaled((G + G.T) / 2, 1.0)
    return W, 0.3 * x @ U.T


def tanh_mlp(B: int = 64, D: int = 1024, seed: int = 1002, dtype: torch.dtype = torch.float64) -> BankProblem:
    W, inj = _mlp_parts(B, D, seed)
    Wt, injc = (0.95 * W).T.contiguous().to(dtype), inj.to(dtype)

    def f(z: Tensor, rows: Tensor | None = None) -> Tensor:
        return torch.tanh(torch.addmm(_pick(injc, rows), z, Wt))

    return BankProblem(f"tanh_mlp{B}x{D}", f, torch.zeros(B, D, dtype=dtype), 100)


def mixed(B: int = 64, D: int = 1024, seed: int = 1002, dtype: torch.dtype = torch.float64) -> BankProblem:
    W, inj = _mlp_parts(B, D, seed)
    perm = torch.randperm(B, generator=torch.Generator().manual_seed(1003))
    c = torch.linspace(0.3, 0.99, B, dtype=torch.float64)[perm]
    Wt, injc, cc = W.T.contiguous().to(dtype), inj.to(dtype), c[:, None].to(dtype)

    def f(z: Tensor, rows: Tensor | None = None) -> Tensor:
        return torch.tanh(torch.addcmul(_pick(injc, rows), _pick(cc, rows), z @ Wt))

    return BankProblem(f"mixed{B}x{D}", f, torch.zeros(B, D, dtype=dtype), 200)


class _Block(nn.Module):
    """Fuse MLP on ``[z; x]`` then a pre-LN attention block with half-weighted residual branches."""

    def __init__(self, C: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.fuse = nn.Sequential(nn.Linear(2 * C, 2 * C), nn.GELU(approximate="tanh"), nn.Linear(2 * C, C))
        with torch.no_grad():
            self.fuse[0].weight[:, :C] *= 3
        self.ln1, self.ln2 = nn.LayerNorm(C), nn.LayerNorm(C)
        self.qkv, self.proj = nn.Linear(C, 3 * C), nn.Linear(C, C)
        self.fc1, self.fc2 = nn.Linear(C, 4 * C), nn.Linear(4 * C, C)

    def forward(self, z: Tensor, x: Tensor) -> Tensor:
        B, L, C = z.shape
        h = self.fuse(torch.cat([z, x], dim=-1))
        q, k, v = self.qkv(self.ln1(h)).view(B, L, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, L, C)
        h = h + 0.5 * self.proj(a)
        return h + 0.5 * self.fc2(F.gelu(self.fc1(self.ln2(h)), approximate="tanh"))


def attention(
    B: int = 8,
    L: int = 256,
    C: int = 256,
    heads: int = 4,
    seed: int = 1004,
    dtype: torch.dtype = torch.float64,
) -> BankProblem:
    rng_state = torch.get_rng_state()
    try:
        torch.manual_seed(seed)
        block = _Block(C, heads)
        block = block.double().eval()
        x = torch.randn(B, L, C, dtype=torch.float64)
    finally:
        torch.set_rng_state(rng_state)
    block = block.to(dtype).requires_grad_(False)
    xc = x.to(dtype)

    def f(z: Tensor, rows: Tensor | None = None) -> Tensor:
        return block(z, _pick(xc, rows))

    return BankProblem(f"attention{B}x{L}x{C}", f, torch.zeros(B, L, C, dtype=dtype), 100)


BENCHMARKS: dict[str, Callable[[torch.dtype], BankProblem]] = {
    "P1": lambda dt: linear(dtype=dt),
    "P2": lambda dt: tanh_mlp(dtype=dt),
    "P3": lambda dt: mixed(dtype=dt),
    "P4": lambda dt: attention(dtype=dt),
}
"""The P1-P4 problems of docs/benchmarks.md at their benchmark sizes."""


def benchmark_problem(name: str, dtype: torch.dtype = torch.float32) -> BankProblem:
    return BENCHMARKS[name](dtype)


def rowwise_tanh(
    B: int = 6,
    D: int = 16,
    seed: int = 1005,
    spread: tuple[float, float] = (0.3, 0.95),
    dtype: torch.dtype = torch.float64,
) -> BankProblem:
    """``f(z)_b = tanh(c_b W_b z_b + x_b)``: every row has its own matrix (``||W_b||_2 = 1``) and contraction
    rate ``c_b`` (spread evenly over ``spread``, shuffled), so rows need different iteration counts.

    Built from per-row operations only (``bmm`` and elementwise ops), so a row's arithmetic is bitwise the
    same whichever rows share its batch: the problem for batch-invariance and NaN-isolation tests. Like the
    rest of the bank, ``f`` takes ``rows=``.
    """
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(B, D, D, generator=g, dtype=torch.float64)
    W = W / torch.linalg.matrix_norm(W, 2)[:, None, None]
    c = torch.linspace(spread[0], spread[1], B, dtype=torch.float64)[torch.randperm(B, generator=g)]
    x = torch.randn(B, D, generator=g, dtype=torch.float64)
    Wc, cc, xc = W.to(dtype), c[:, None].to(dtype), x.to(dtype)

    def f(z: Tensor, rows: Tensor | None = None) -> Tensor:
        Wz = torch.bmm(_pick(Wc, rows), z.unsqueeze(-1)).squeeze(-1)
        return torch.tanh(_pick(cc, rows) * Wz + _pick(xc, rows))

    return BankProblem(f"rowwise_tanh{B}x{D}", f, torch.zeros(B, D, dtype=dtype), 200)
