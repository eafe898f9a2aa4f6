"""The shared problem bank (tests/problems.py) is what it says it is: exact solutions, contraction rates,
batch-separability, determinism and dtypes."""

from __future__ import annotations

import pytest
import torch

from tests.problems import BENCHMARKS, attention, linear, mixed, rowwise_tanh, tanh_mlp

F64 = torch.float64


def _rand_like(z: torch.Tensor, seed: int) -> torch.Tensor:
    return torch.randn(z.shape, generator=torch.Generator().manual_seed(seed), dtype=z.dtype)


def test_linear_exact_solution_and_norm() -> None:
    bp = linear(B=3, D=24)
    # the exact solution is a fixed point of f
    assert torch.allclose(bp.f(bp.exact), bp.exact, rtol=0, atol=1e-12)
    # recover A from the map (f(e_i) - f(0) against row 0's offset is row i of A^T) and check ||A||_2 = 0.9
    rows0 = torch.zeros(24, dtype=torch.long)
    At = bp.f(torch.eye(24, dtype=F64), rows=rows0) - bp.f(torch.zeros(24, 24, dtype=F64), rows=rows0)
    assert abs(float(torch.linalg.matrix_norm(At, 2)) - 0.9) < 1e-12
    assert bp.z0.shape == (3, 24) and not bool(bp.z0.any())


@pytest.mark.parametrize(
    "make, rate",
    [
        (lambda: tanh_mlp(B=3, D=24), 0.95),
        (lambda: mixed(B=4, D=24), 0.99),
        (lambda: rowwise_tanh(B=4, D=12, spread=(0.3, 0.9)), 0.9),
    ],
    ids=["tanh_mlp", "mixed", "rowwise_tanh"],
)
def test_maps_are_contractions(make, rate: float) -> None:
    bp = make()
    for seed in range(3):
        z1, z2 = _rand_like(bp.z0, 2 * seed), _rand_like(bp.z0, 2 * seed + 1)
        lhs = (bp.f(z1) - bp.f(z2)).norm(dim=1)
        assert bool((lhs <= rate * (z1 - z2).norm(dim=1) * (1 + 1e-12)).all())


def test_mixed_rows_have_the_documented_rates() -> None:
    # f(z)_b = tanh(inj_b + c_b (z W^T)_b): its derivative at z = 0 along a direction v shared by all rows is
    # (1 - tanh(inj_b)^2) c_b (v W^T), so dividing by (1 - f(0)_b^2) c_b must give the same vector for every
    # row
    # when c_b are the documented rates (linspace(0.3, 0.99) shuffled by seed 1003).
    B = 6
    bp = mixed(B=B, D=16)
    perm = torch.randperm(B, generator=torch.Generator().manual_seed(1003))
    c = torch.linspace(0.3, 0.99, B, dtype=F64)[perm]
    v = _rand_like(torch.zeros(1, 16, dtype=F64), 7).expand(B, 16)
    eps = 1e-6
    d = (bp.f(eps * v) - bp.f(-eps * v)) / (2 * eps)
    s = 1 - bp.f(torch.zeros(B, 16, dtype=F64)) ** 2
    vw = d / (s * c[:, None])
    assert torch.allclose(vw, vw[:1].expand_as(vw), rtol=1e-6, atol=1e-9)
    assert float(vw.abs().max()) > 0.1


@pytest.mark.parametrize(
    "make",
    [
        lambda: linear(B=5, D=12),
        lambda: tanh_mlp(B=5, D=12),
        lambda: mixed(B=5, D=12),
        lambda: attention(B=3, L=4, C=8, heads=2),
        lambda: rowwise_tanh(B=5, D=12),
    ],
    ids=["linear", "tanh_mlp", "mixed", "attention", "rowwise_tanh"],
)
def test_maps_are_batch_separable(make) -> None:
    bp = make()
    z = _rand_like(bp.z0, 3)
    full = bp.f(z)
    assert full.shape == z.shape and full.dtype == z.dtype
    assert torch.equal(full, bp.full(z))
    rows = torch.tensor([2, 0]) if bp.z0.shape[0] == 3 else torch.tensor([4, 1, 2])
    assert torch.allclose(bp.f(z[rows], rows=rows), full[rows], rtol=1e-12, atol=1e-13)


def test_rowwise_tanh_rows_are_bitwise_independent_of_their_batch() -> None:
    bp = rowwise_tanh(B=6, D=10)
    z = _rand_like(bp.z0, 4)
    full = bp.f(z)
    for rows in ([3], [5, 0], [1, 2, 4]):
        r = torch.tensor(rows)
        assert torch.equal(bp.f(z[r], rows=r), full[r])


def test_problems_are_deterministic_and_seeded() -> None:
    z = _rand_like(torch.zeros(3, 12, dtype=F64), 5)
    assert torch.equal(tanh_mlp(B=3, D=12).f(z), tanh_mlp(B=3, D=12).f(z))
    assert not torch.equal(tanh_mlp(B=3, D=12, seed=1).f(z), tanh_mlp(B=3, D=12).f(z))
    before = torch.get_rng_state()
    a1, a2 = attention(B=2, L=4, C=8, heads=2), attention(B=2, L=4, C=8, heads=2)
    assert torch.equal(torch.get_rng_state(), before)  # building the block leaves the global RNG alone
    za = _rand_like(a1.z0, 6)
    assert torch.equal(a1.f(za), a2.f(za))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_lower_precision_problems_are_the_float64_ones_cast(dtype: torch.dtype) -> None:
    lo, hi = tanh_mlp(B=2, D=16, dtype=dtype), tanh_mlp(B=2, D=16)
    assert lo.z0.dtype == dtype
    z = _rand_like(hi.z0, 8)
    out = lo.f(z.to(dtype))
    assert out.dtype == dtype
    assert torch.allclose(out.double(), hi.f(z), rtol=0, atol=40 * torch.finfo(dtype).eps)
    assert linear(B=2, D=8, dtype=dtype).exact.dtype == dtype


def test_benchmark_table_names() -> None:
    assert list(BENCHMARKS) == ["P1", "P2", "P3", "P4"]
