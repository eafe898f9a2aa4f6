"""Process-group setup shared by training and sampling: ``DistInfo``, seeds, a resumable batch sampler.

Distributed facts travel as a frozen :class:`DistInfo` value; nothing here keeps module state. Launch with
torchrun (it sets ``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT``)::

    torchrun --standalone --nproc_per_node=2 -m deqgen train recipes/mnist_cpu.yaml

Without those variables :func:`init_distributed` returns a single-process ``DistInfo`` and creates no group.
"""

from __future__ import annotations

import datetime
import logging
import os
import random
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import Sampler

from deqgen.layer import ImplicitLayer

__all__ = [
    "DistInfo",
    "DistributedBatchSampler",
    "all_reduce_mean",
    "barrier",
    "fsdp2_units",
    "init_distributed",
    "seed_everything",
    "seed_for_rank",
    "shard_fsdp2",
    "shared_seed",
    "teardown",
]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits in the job.

    Attributes:
        rank: global rank, ``0 <= rank < world_size``.
        local_rank: rank on this node (selects the GPU).
        world_size: number of processes.
        device: this process's device (``cuda:<local_rank>`` with CUDA, else ``cpu``).
    """

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    def __post_init__(self) -> None:
        if self.world_size < 1 or not 0 <= self.rank < self.world_size:
            raise ValueError(
                f"DistInfo got rank={self.rank}, world_size={self.world_size}; need 0 <= rank < world"
            )

    @property
    def is_main(self) -> bool:
        """True on rank 0, the rank that writes logs and checkpoints."""
        return self.rank == 0

    @property
    def is_distributed(self) -> bool:
        """True when a process group spans more than one process."""
        return self.world_size > 1


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    try:
        return default if value is None else int(value)
    except ValueError:
        raise ValueError(
            f"environment variable {name}={value!r} is not an integer (set by torchrun)"
        ) from None


def init_distributed(backend: str = "auto", *, timeout_minutes: float = 30.0) -> DistInfo:
    """Join the torchrun job described by the environment, or describe a single process.

    Args:
        backend: ``"auto"`` (nccl with CUDA, gloo otherwise), ``"nccl"`` or ``"gloo"``.
        timeout_minutes: collective timeout (official 30).

    Returns:
        This process's :class:`DistInfo`. With ``RANK``/``WORLD_SIZE`` set (torchrun, even one process) the
        default process group is initialised; without them none is.

    Raises:
        ValueError: an unknown backend, or nccl without CUDA.
    """
    if backend not in ("auto", "nccl", "gloo"):
        raise ValueError(f"init_distributed got backend={backend!r}; use 'auto', 'nccl' or 'gloo'")
    cuda = torch.cuda.is_available()
    if backend == "nccl" and not cuda:
        raise ValueError("backend 'nccl' needs CUDA, which is not available here; use 'gloo' or 'auto'")
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return DistInfo(device=torch.device("cuda", 0) if cuda else torch.device("cpu"))
    rank, world = _env_int("RANK", 0), _env_int("WORLD_SIZE", 1)
    local_rank = _env_int("LOCAL_RANK", 0)
    chosen = ("nccl" if cuda else "gloo") if backend == "auto" else backend
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(chosen, timeout=datetime.timedelta(minutes=timeout_minutes))
    logger.info("rank %d/%d (local %d) on %s, backend %s", rank, world, local_rank, device, chosen)
    return DistInfo(rank=rank, local_rank=local_rank, world_size=world, device=device)


def teardown() -> None:
    """Destroy the default process group if one exists (safe to call always)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    """Wait for every rank; a no-op without a process group."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def _strictly_inside(module: nn.Module, parent: nn.Module) -> bool:
    """True when ``module`` is a submodule of ``parent`` (not ``parent`` itself)."""
    return module is not parent and any(module is m for m in parent.modules())


def fsdp2_units(model: nn.Module, units: Sequence[nn.Module]) -> list[nn.Module]:
    """FSDP2 units of ``model`` in wrapping order: the outermost implicit layers, then ``units`` outside them.

    An :class:`~deqgen.layer.ImplicitLayer` calls its map ``f`` at every iteration of a solve. Were a block
    inside ``f`` its own FSDP2 unit, its weights would be all-gathered at each call (and again for each
    recorded step in backward), up to ~20 times per step for VIAR. Made one unit instead, the layer gathers
    its weights once in its forward, keeps them through the whole solve, reshards after it, and gathers
    once more in backward. So the ``units`` a task names that lie inside an implicit layer are dropped.

    Args:
        model: the model to shard.
        units: the submodules the task shards one by one (e.g. every transformer block).

    Returns:
        The modules to pass to ``fully_shard`` in order, before the root.
    """
    implicit = [m for m in model.modules() if isinstance(m, ImplicitLayer)]
    outermost = [m for m in implicit if not any(_strictly_inside(m, p) for p in implicit)]
    kept = [u for u in units if not any(u is p or _strictly_inside(u, p) for p in outermost)]
    return outermost + kept  # inner before outer: a task's unit may contain an implicit layer


def shard_fsdp2(model: nn.Module, units: Sequence[nn.Module], mesh: Any | None = None) -> nn.Module:
    """Wrap ``model`` with FSDP2 (``fully_shard``): each of :func:`fsdp2_units`, then the root.

    Every implicit layer is one unit, so its weights are gathered once per solve, not once per iteration
    (see :func:`fsdp2_units`). Sampling must then go through the layer's forward or an exported model:
    calling its map directly bypasses the gather.

    Args:
        model: the model, already on its device.
        units: the submodules the task shards one by one.
        mesh: a ``DeviceMesh`` (default: FSDP2's, over the default process group).

    Returns:
        ``model``, now an ``FSDPModule`` whose parameters are sharded DTensors.
    """
    from torch.distributed.fsdp import fully_shard

    for unit in fsdp2_units(model, units):
        fully_shard(unit, mesh=mesh)
    return fully_shard(model, mesh=mesh)  # type: ignore[no-any-return]


def seed_for_rank(seed: int, rank: int) -> int:
    """A 63-bit seed for ``rank``'s private streams (data order noise, dropout), distinct per rank and run seed.

    Derived with numpy's ``SeedSequence`` so nearby seeds and ranks give unrelated streams.
    """
    return int(np.random.SeedSequence([seed, 1, rank]).generate_state(1, dtype=np.uint64)[0] >> 1)


def shared_seed(seed: int) -> int:
    """The seed of the stream every rank shares (S-JFB's ``k1, k2``: all ranks draw the same counts)."""
    return int(np.random.SeedSequence([seed, 0]).generate_state(1, dtype=np.uint64)[0] >> 1)


def seed_everything(seed: int) -> None:
    """Seed torch (CPU and CUDA), numpy's legacy global and Python's ``random`` from one integer.

    Recipes call this once per process with :func:`seed_for_rank`; library code takes generators instead.
    """
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)


def all_reduce_mean(metrics: Mapping[str, float], info: DistInfo) -> dict[str, float]:
    """Average scalar metrics over ranks (every rank must call it with the same keys in the same order)."""
    values = {k: float(v) for k, v in metrics.items()}
    if not info.is_distributed or not (dist.is_available() and dist.is_initialized()):
        return values
    t = torch.tensor(list(values.values()), dtype=torch.float64, device=info.device)
    dist.all_reduce(t)
    return dict(zip(values, (t / info.world_size).tolist()))


class DistributedBatchSampler(Sampler[list[int]]):
    """Per-rank micro-batches of one epoch-seeded global permutation, resumable mid-epoch.

    Each epoch draws one permutation of ``range(num_samples)`` from ``(seed, epoch)`` (the same on every
    rank). The permutation is cut into rounds of ``batch_size * world_size`` indices; in each round rank
    ``r`` takes the ``r``-th contiguous chunk of ``batch_size``. The last incomplete round is dropped
    (``drop_last=True``) or filled by wrapping around to the start of the permutation, as the official
    sampler pads to the global batch. The order does not depend on any global RNG.

    Resume: ``set_epoch(e)`` then ``set_start_batch(n)`` skips this rank's first ``n`` micro-batches of
    epoch ``e`` (the position stored in a checkpoint); the skip applies to the next iteration only.

    Args:
        num_samples: dataset length.
        batch_size: micro-batch size per rank.
        rank, world_size: this rank and the number of ranks.
        seed: the run seed.
        shuffle: permute (True) or keep dataset order.
        drop_last: drop the last incomplete round instead of wrapping around.
    """

    def __init__(
        self,
        num_samples: int,
        batch_size: int,
        *,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        shuffle: bool = True,
        drop_last: bool = True,
    ) -> None:
        if num_samples < 1 or batch_size < 1:
            raise ValueError(f"need num_samples >= 1 and batch_size >= 1, got {num_samples}, {batch_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
        per_round = batch_size * world_size
        if drop_last and num_samples < per_round:
            raise ValueError(
                f"{num_samples} samples cannot fill one round of {batch_size} x {world_size} ranks with "
                "drop_last=True; lower the batch size or use drop_last=False"
            )
        self.num_samples, self.batch_size = num_samples, batch_size
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.shuffle, self.drop_last = shuffle, drop_last
        self.epoch = 0
        self._start_batch = 0

    def __len__(self) -> int:
        """Micro-batches per epoch on each rank (before any resume skip)."""
        per_round = self.batch_size * self.world_size
        return self.num_samples // per_round if self.drop_last else -(-self.num_samples // per_round)

    def set_epoch(self, epoch: int) -> None:
        """Select the permutation of ``epoch``."""
        self.epoch = epoch

    def set_start_batch(self, n: int) -> None:
        """Skip this rank's first ``n`` micro-batches in the next iteration (mid-epoch resume)."""
        if not 0 <= n <= len(self):
            raise ValueError(f"set_start_batch got {n}; an epoch has {len(self)} micro-batches per rank")
        self._start_batch = n

    def _order(self) -> torch.Tensor:
        if not self.shuffle:
            return torch.arange(self.num_samples)
        epoch_seed = (
            np.random.SeedSequence([self.seed, 2, self.epoch]).generate_state(1, dtype=np.uint64)[0] >> 1
        )
        g = torch.Generator().manual_seed(int(epoch_seed))
        return torch.randperm(self.num_samples, generator=g)

    def __iter__(self) -> Iterator[list[int]]:
        order = self._order()
        per_round = self.batch_size * self.world_size
        total = len(self) * per_round
        if total > self.num_samples:  # wrap around to fill the last round
            order = torch.cat([order] * (-(-total // self.num_samples)))
        start, self._start_batch = self._start_batch, 0
        for b in range(start, len(self)):
            lo = b * per_round + self.rank * self.batch_size
            yield order[lo : lo + self.batch_size].tolist()
