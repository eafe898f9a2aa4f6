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


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)
