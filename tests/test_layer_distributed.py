"""Two gloo processes under DDP train an implicit layer inside a small model exactly like one process with the
global batch: same parameter gradients at every step (<= 1e-9), same weights after the steps.

DDP runs with ``find_unused_parameters=False`` over several steps whose S-JFB draws differ from step to step:
a parameter that missed a gradient in any step would make DDP fail at the next one ("Expected to have
finished reduction in the prior iteration"). ImplicitDiff is exercised with the layer called twice per step,
the second call fed by the first (weight-tied reuse, where torchdeq's backward hook hangs).
"""

from __future__ import annotations

import socket
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel as DDP

from deqgen import Anderson, Picard
from deqgen.gradients import SJFB, BackwardStatsRecorder, ImplicitDiff
from deqgen.layer import ImplicitLayer
from tests.test_gradients import Cell

F64 = torch.float64
GLOBAL_B, D, STEPS, WORLD = 4, 5, 3, 2
CASES = ("sjfb", "implicit_twice")


class _Model(nn.Module):
    """encoder -> implicit layer (once or twice) -> head; every parameter is used in every step."""

    def __init__(self, case: str) -> None:
        super().__init__()
        torch.manual_seed(
            0
        )  # the same initial weights in every process (DDP would broadcast rank 0's anyway)
        if case == "sjfb":
            layer = ImplicitLayer(
                Cell(), SJFB(no_grad=(0, 4), with_grad=(1, 3)), Picard(tol=None, max_iter=1)
            )
        else:
            self.recorder = BackwardStatsRecorder()
            method = ImplicitDiff(Anderson(tol=1e-12, max_iter=100), recorder=self.recorder, throw=True)
            layer = ImplicitLayer(Cell(), method, Anderson(tol=1e-13, stop_mode="abs", max_iter=100))
        self.twice = case == "implicit_twice"
        self.encoder, self.layer, self.head = nn.Linear(D, D, dtype=F64), layer, nn.Linear(D, 1, dtype=F64)

    def forward(self, inp: Tensor, generator: torch.Generator) -> Tensor:
        x = self.encoder(inp)  # (B, D)
        z, _ = self.layer(x, torch.zeros_like(x), generator)  # (B, D)
        if self.twice:
            z, _ = self.layer(x + 0.5 * z, torch.zeros_like(x), generator)
        return self.head(z).squeeze(-1)  # (B,)


def _data() -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(5)
    return torch.randn(STEPS, GLOBAL_B, D, generator=g, dtype=F64), torch.randn(
        STEPS, GLOBAL_B, generator=g, dtype=F64
    )


def _train(model: nn.Module, params: nn.Module, rows: slice) -> dict[str, list[dict[str, Tensor]]]:
    """STEPS SGD steps on the mean squared error of ``rows`` of each batch; per-step grads, final weights."""
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    generator = torch.Generator().manual_seed(123)  # S-JFB's stream: the same seed on every rank
    inp, target = _data()
    grads = []
    for step in range(STEPS):
        opt.zero_grad()
        loss = (model(inp[step, rows], generator) - target[step, rows]).square().mean()
        loss.backward()
        grads.append({n: p.grad.clone() for n, p in params.named_parameters()})
        opt.step()
    return {"grads": grads, "weights": [{n: p.detach().clone() for n, p in params.named_parameters()}]}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, port: int, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    try:
        torch.set_num_threads(1)
        per = GLOBAL_B // WORLD
        results = {}
        for case in CASES:
            model = _Model(case)
            results[case] = _train(
                DDP(model, find_unused_parameters=False), model, slice(rank * per, (rank + 1) * per)
            )
        torch.save(results, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _max_diff(a: dict[str, Tensor], b: dict[str, Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[n] - b[n]).abs().max()) for n in a)


def test_two_process_ddp_matches_one_process_with_the_global_batch(tmp_path: Path) -> None:
    mp.spawn(_worker, args=(_free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]
    n_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for case in CASES:
            model = _Model(case)
            single = _train(model, model, slice(0, GLOBAL_B))
            for step in range(STEPS):
                for rank in ranks:  # DDP averages the ranks' gradients of their local means = the global mean
                    assert _max_diff(rank[case]["grads"][step], single["grads"][step]) <= 1e-9, (case, step)
                assert all(float(g.abs().sum()) > 0 for g in single["grads"][step].values()), (case, step)
            for rank in ranks:
                assert _max_diff(rank[case]["weights"][0], single["weights"][0]) <= 1e-9, case
            if case == "implicit_twice":  # two backward solves per step, each converged
                assert len(model.recorder.solutions) == 2 * STEPS and model.recorder.all_converged
    finally:
        torch.set_num_threads(n_threads)
