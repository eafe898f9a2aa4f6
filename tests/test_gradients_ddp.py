"""Two gloo processes under DDP give the same parameter gradients as one process with the global batch."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel as DDP

from deqgen import Anderson, Picard
from deqgen.gradients import SJFB, ImplicitDiff
from deqgen.layer import ImplicitLayer
from tests.test_gradients import Cell

GLOBAL_B, D = 4, 5


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(5)
    return torch.randn(GLOBAL_B, D, generator=g, dtype=torch.float64), torch.randn(GLOBAL_B, D, generator=g, dtype=torch.float64)


def _method(name: str):
    if name == "implicit":
        return ImplicitDiff(Anderson(tol=1e-13, max_iter=200)), Anderson(tol=1e-14, stop_mode="abs", max_iter=200)
    return SJFB(no_grad=(2, 6), with_grad=(1, 4)), Picard(tol=None, max_iter=1)


def _grads(layer: torch.nn.Module, x: torch.Tensor, w: torch.Tensor) -> dict[str, torch.Tensor]:
    z, _ = layer(x, torch.zeros_like(x), torch.Generator().manual_seed(3))  # same k1, k2 on every rank
    (z * w).sum().backward()
    return {n.removeprefix("module."): p.grad.clone() for n, p in layer.named_parameters()}


def _worker(rank: int, world: int, port: int, name: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        method, solver = _method(name)
        model = DDP(ImplicitLayer(Cell(), method, solver))  # no find_unused_parameters
        x, w = _data()
        per = GLOBAL_B // world
        grads = _grads(model, x[rank * per : (rank + 1) * per], w[rank * per : (rank + 1) * per])
        if rank == 0:
            torch.save(grads, out)
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("name", ["implicit", "sjfb"])
def test_two_process_ddp_matches_single_process(name: str, tmp_path: Path) -> None:
    out = str(tmp_path / "grads.pt")
    mp.spawn(_worker, args=(2, _free_port(), name, out), nprocs=2, join=True)
    ddp = torch.load(out, weights_only=True)
    method, solver = _method(name)
    x, w = _data()
    single = _grads(ImplicitLayer(Cell(), method, solver), x, w)
    for n, g in single.items():  # DDP averages the two ranks' gradients of their local sums
        assert torch.allclose(2 * ddp[n], g, rtol=0, atol=1e-10), n
