"""FSDP2 gathers VIAR's implicit block once per solve, not once per iteration (2 gloo ranks on CPU).

One training step (forward + backward) of a tiny VIAR with a fixed S-JFB budget ``(k1, k2)`` runs under
FSDP2 on two processes; every all-gather FSDP2 issues is counted. With :func:`shard_fsdp2` the count is the
same for 2 and 8 iterations. With the default wrapping (every transformer block its own unit, the implicit
block included) it grows with the iterations, which is what this test is here to catch.
"""

from __future__ import annotations

import socket
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from deqgen.models.viar.config import ImplicitSpec, preset
from deqgen.models.viar.model import build_model
from deqgen.training.distributed import fsdp2_units, shard_fsdp2

BUDGETS = {2: (1, 1), 8: (5, 3)}  # total iterations -> (k1 no-grad, k2 recorded)
GATHER_NAMES = ("all_gather_into_tensor", "all_gather_single", "all_gather")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def _count_all_gathers() -> Iterator[list[str]]:
    """Record the name of every all-gather collective called through ``torch.distributed``."""
    calls: list[str] = []
    originals = {n: getattr(dist, n) for n in GATHER_NAMES if hasattr(dist, n)}

    def counting(name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            calls.append(name)
            return fn(*args, **kwargs)

        return wrapper

    for name, fn in originals.items():
        setattr(dist, name, counting(name, fn))
    try:
        yield calls
    finally:
        for name, fn in originals.items():
            setattr(dist, name, fn)


def _tiny_viar(k1: int, k2: int) -> torch.nn.Module:
    spec = ImplicitSpec(pre_depth=1, post_depth=1, train_no_grad=(k1, k1), train_with_grad=(k2, k2))
    return build_model(
        preset("viar_tiny", implicit=spec, cond_drop_prob=0.0), generator=torch.Generator().manual_seed(0)
    )


def _blocks(model: torch.nn.Module) -> list[torch.nn.Module]:
    return [m for m in model.modules() if type(m).__name__ == "AdaLNBlock"]


def _gathers_per_step(wrapping: str, k1: int, k2: int) -> int:
    """All-gathers of one forward + backward after a warm-up step (lazy init gathers nothing extra then)."""
    from torch.distributed.fsdp import fully_shard

    model = _tiny_viar(k1, k2)
    model.train()
    if wrapping == "per_solve":
        shard_fsdp2(model, _blocks(model))
    else:  # the engine's wrapping before issue 18: each block a unit, the implicit block included
        for unit in _blocks(model):
            fully_shard(unit)
        fully_shard(model)
    cfg = model.cfg
    g = torch.Generator().manual_seed(1 + dist.get_rank())
    labels = torch.randint(0, cfg.num_classes, (2,), generator=g)
    feats = torch.randn(2, cfg.seq_len - 1, cfg.z_channels, generator=g)
    counts = []
    for _ in range(2):
        with _count_all_gathers() as calls:
            logits, stats = model(
                labels, feats, generator=g, shared_generator=torch.Generator().manual_seed(0)
            )
            logits.float().square().mean().backward()
        assert (stats.no_grad_steps, stats.grad_steps) == (k1, k2)
        counts.append(len(calls))
    return counts[-1]


def _worker(rank: int, port: int, results: Any) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        for wrapping in ("per_solve", "default"):
            for total, (k1, k2) in BUDGETS.items():
                n = _gathers_per_step(wrapping, k1, k2)
                if rank == 0:
                    results[(wrapping, total)] = n
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def gather_counts() -> dict[tuple[str, int], int]:
    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(_worker, args=(_free_port(), results), nprocs=2, join=True)
        return dict(results)


def test_gathers_do_not_grow_with_iterations(gather_counts: dict[tuple[str, int], int]) -> None:
    assert gather_counts[("per_solve", 2)] == gather_counts[("per_solve", 8)] > 0


def test_default_wrapping_gathers_per_iteration(gather_counts: dict[tuple[str, int], int]) -> None:
    """The counter sees per-iteration gathers: default wrapping adds one per extra forward iteration and
    one per extra recorded step in backward (8 - 2 = 6 forward, 3 - 1 = 2 backward)."""
    assert gather_counts[("default", 8)] - gather_counts[("default", 2)] == 6 + 2


def test_per_solve_saves_the_iterations(gather_counts: dict[tuple[str, int], int]) -> None:
    """At 2 iterations the default wrapping gathers the block 2 + 1 times (forward + backward), per-solve
    1 + 1."""
    assert gather_counts[("default", 2)] - gather_counts[("per_solve", 2)] == 1


def test_units_skip_blocks_inside_the_implicit_layer() -> None:
    model = _tiny_viar(1, 1)
    implicit = model.trunk.implicit
    units = fsdp2_units(model, _blocks(model))
    assert units[0] is implicit
    assert all(not any(u is m for m in implicit.modules()) for u in units[1:])
    assert len(units) == len(_blocks(model))  # 2 explicit blocks + the implicit layer (instead of its block)
