"""deqgen.nn dropout and normalisation inside an ImplicitLayer: one mask per solve, one normalised weight per
forward, and gradients that reach the raw weights (checked against the same maths written out by hand)."""

from __future__ import annotations

import copy
from collections.abc import Iterator

import pytest
import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from deqgen import JFB, SJFB, Anderson, ImplicitDiff, ImplicitLayer, Picard
from deqgen.nn import (
    VariationalDropout,
    apply_norm,
    dropout_mask,
    normalized_once,
    spectral_norm,
    weight_norm,
)

F64 = torch.float64
B, D = 4, 6


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


class DropCell(nn.Module):
    """f(z, x) = tanh(0.5 * lin(drop(z)) + x); records the mask seen at every call."""

    def __init__(self, p: float = 0.5) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.lin = nn.Linear(D, D).double()
        self.drop = VariationalDropout(p)
        self.masks: list[Tensor] = []

    def forward(self, z: Tensor, x: Tensor, k: int) -> Tensor:
        out = torch.tanh(0.5 * self.lin(self.drop(z)) + x)
        self.masks.append(self.drop.mask)
        return out


def test_dropout_mask_is_drawn_once_per_solve_and_shared_by_every_step() -> None:
    cell = DropCell()
    layer = ImplicitLayer(cell, JFB(k=3), Picard(tol=1e-10, max_iter=200))
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(B, D, dtype=F64)
    z, info = layer(x, torch.zeros(B, D, dtype=F64), gen)
    first = cell.masks
    assert len(first) == info.no_grad_steps + 3 and all(m is first[0] for m in first)
    assert bool(info.forward.stats.converged.all())  # one map: the iteration converges
    assert set(first[0].unique().tolist()) <= {0.0, 2.0} and first[0].shape == (B, D)
    z.sum().backward()  # the recorded steps share the mask, gradients flow
    cell.masks = []
    x3 = torch.randn(3, D, dtype=F64)  # a smaller last batch: a new mask of the new size
    layer(x3, torch.zeros(3, D, dtype=F64), gen)
    assert cell.masks[0].shape == (3, D) and all(m is cell.masks[0] for m in cell.masks)
    layer.eval()
    cell.masks = []
    layer(x, torch.zeros(B, D, dtype=F64))
    assert all(m is None for m in cell.masks)  # eval: identity, no mask


def test_dropout_gradient_equals_the_fixed_mask_map() -> None:
    cell = DropCell()
    x = torch.randn(B, D, dtype=F64)
    layer = ImplicitLayer(cell, JFB(k=1), Picard(tol=1e-12, max_iter=300))
    z, info = layer(x, torch.zeros(B, D, dtype=F64), torch.Generator().manual_seed(1))
    z.pow(2).sum().backward()
    mask = cell.masks[0]
    ref = copy.deepcopy(cell.lin)
    ref.zero_grad()
    z_star = info.forward.z  # JFB's recorded step starts at the solver's answer
    (torch.tanh(0.5 * ref(z_star * mask) + x)).pow(2).sum().backward()  # JFB by hand with the same mask
    torch.testing.assert_close(cell.lin.weight.grad, ref.weight.grad, rtol=1e-12, atol=1e-14)


def test_dropout_mask_follows_the_input_device_and_dtype_and_the_generator() -> None:
    like = torch.empty(5, 3, device="meta", dtype=torch.float16)
    m = dropout_mask((5, 1), 0.3, like, None)
    assert m.device.type == "meta" and m.dtype == torch.float16 and m.shape == (5, 1)
    a = dropout_mask((4, 4), 0.5, torch.zeros(1), torch.Generator().manual_seed(3))
    b = dropout_mask((4, 4), 0.5, torch.zeros(1), torch.Generator().manual_seed(3))
    assert torch.equal(a, b)
    with pytest.raises(ValueError, match="p=1.0"):
        VariationalDropout(1.0)
    drop = VariationalDropout(0.5, shared_dims=(2, 3))
    drop.new_solve()
    assert drop(torch.ones(2, 3, 4, 4)).shape == (2, 3, 4, 4) and drop.mask.shape == (2, 3, 1, 1)
    with pytest.raises(ValueError, match="changed within one solve"):
        drop(torch.ones(1, 3, 4, 4))


class NormCell(nn.Module):
    def __init__(self, kind: str) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.lin = nn.Linear(D, D).double()
        with torch.no_grad():
            self.lin.weight.mul_(0.5)
        (weight_norm if kind == "weight" else spectral_norm)(self.lin)

    def forward(self, z: Tensor, x: Tensor, k: int) -> Tensor:
        return torch.tanh(0.5 * self.lin(z) + x)


def _count_parametrization_calls(lin: nn.Module) -> list[int]:
    calls = [0]
    lin.parametrizations.weight[0].register_forward_hook(lambda *a: calls.__setitem__(0, calls[0] + 1))
    return calls


@pytest.mark.parametrize(
    "method",
    [JFB(k=2), ImplicitDiff(), SJFB(no_grad=(3, 5), with_grad=(1, 3))],
    ids=["jfb", "implicit", "sjfb"],
)
def test_weight_norm_is_computed_once_per_forward_and_grads_reach_the_raw_weights(method) -> None:
    cell = NormCell("weight")
    calls = _count_parametrization_calls(cell.lin)
    x = torch.randn(B, D, dtype=F64)
    layer = ImplicitLayer(cell, method, Anderson(tol=1e-12, max_iter=100))
    z, info = layer(x, torch.zeros(B, D, dtype=F64), torch.Generator().manual_seed(0))
    assert calls[0] == 1 and info.no_grad_steps > 1
    z.pow(2).sum().backward()
    g, v = cell.lin.parametrizations.weight.original0, cell.lin.parametrizations.weight.original1
    assert g.grad is not None and v.grad is not None

    # the reference: the same layer, W = g v / ||v|| written by hand from leaf copies of g and v
    g_ref, v_ref = g.detach().clone().requires_grad_(), v.detach().clone().requires_grad_()
    bias = cell.lin.bias.detach()

    def ref_cell(zz: Tensor, xx: Tensor, k: int) -> Tensor:
        W = g_ref * v_ref / v_ref.norm(dim=1, keepdim=True)
        return torch.tanh(0.5 * (zz @ W.T + bias) + xx)

    ref = ImplicitLayer(ref_cell, method, Anderson(tol=1e-12, max_iter=100))
    z_ref, _ = ref(x, torch.zeros(B, D, dtype=F64), torch.Generator().manual_seed(0))
    z_ref.pow(2).sum().backward()
    torch.testing.assert_close(g.grad, g_ref.grad, rtol=1e-10, atol=1e-13)
    torch.testing.assert_close(v.grad, v_ref.grad, rtol=1e-10, atol=1e-13)
    layer.eval()
    layer(x, torch.zeros(B, D, dtype=F64))
    assert calls[0] == 2  # eval: once per forward too


def test_cached_parametrisation_filled_under_no_grad_cuts_the_gradient() -> None:
    # The trap normalized_once avoids: the cache is filled by the first read, here inside no_grad.
    cell = NormCell("weight")
    x = torch.randn(B, D, dtype=F64)
    with parametrize.cached():
        with torch.no_grad():
            z = cell(torch.zeros(B, D, dtype=F64), x, 0)
        cell(z, x, 1).sum().backward()
    assert cell.lin.parametrizations.weight.original1.grad is None  # silently cut
    with normalized_once(cell):
        with torch.no_grad():
            z = cell(torch.zeros(B, D, dtype=F64), x, 0)
        cell(z, x, 1).sum().backward()
    assert cell.lin.parametrizations.weight.original1.grad is not None


def test_spectral_norm_runs_one_power_iteration_per_forward() -> None:
    cell = NormCell("spectral")
    calls = _count_parametrization_calls(cell.lin)
    u0 = cell.lin.parametrizations.weight[0]._u.clone()
    layer = ImplicitLayer(cell, JFB(), Anderson(tol=1e-10))
    z, _ = layer(torch.randn(B, D, dtype=F64), torch.zeros(B, D, dtype=F64))
    z.sum().backward()
    assert calls[0] == 1 and not torch.equal(u0, cell.lin.parametrizations.weight[0]._u)
    assert cell.lin.parametrizations.weight.original.grad is not None
    sigma = torch.linalg.matrix_norm(cell.lin.parametrizations.weight.original.detach(), 2)
    assert torch.linalg.matrix_norm(cell.lin.weight.detach(), 2) == pytest.approx(1.0, rel=0.05)
    assert sigma > 0


def test_apply_norm_picks_linear_and_conv_layers() -> None:
    model = nn.Sequential(nn.Linear(3, 3), nn.Conv2d(2, 2, 3), nn.GroupNorm(1, 2), nn.Linear(3, 3))
    assert apply_norm(model, "weight", include=lambda name, m: name != "3") == ["0", "1"]
    assert apply_norm(model, "spectral") == ["3"]
    with pytest.raises(ValueError, match="kind="):
        apply_norm(model, "batch")  # type: ignore[arg-type]
