"""Shared pytest setup: markers, GPU skipping, deterministic seeds."""

from __future__ import annotations

import pytest
import torch


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    has_cuda = torch.cuda.is_available()
    skip_gpu = pytest.mark.skip(reason="needs CUDA (no GPU on this machine)")
    # Benchmarks are skipped in the default run; --benchmark-only times them, --benchmark-disable runs each
    # once as a smoke test (what CI does).
    run_benchmarks = config.getoption("benchmark_only", False) or config.getoption("benchmark_disable", False)
    skip_bench = pytest.mark.skip(reason="benchmark: run with --benchmark-only (timing) or --benchmark-disable (smoke)")
    for item in items:
        if "benchmark" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.benchmark)
            if not run_benchmarks:
                item.add_marker(skip_bench)
        if "gpu" in item.keywords and not has_cuda:
            item.add_marker(skip_gpu)


# One thread for the whole suite: on a loaded 2-core machine multi-threaded kernels on tiny tensors (Anderson's
# batched m x m Cholesky) cost milliseconds per call in thread start-up instead of microseconds.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)
