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
    skip_bench = pytest.mark.skip(
        reason="benchmark: run with --benchmark-only (timing) or --benchmark-disable (smoke)"
    )
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


@pytest.fixture(scope="session")
def tiny_viar_dirs(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    """``(viar_dir, vqvae_dir)``: a seeded ``viar_tiny`` and ``vae_tiny`` saved as load_converted directories."""
    from deqgen.models.viar.convert import save_converted
    from deqgen.models.viar.model import build_model
    from deqgen.models.viar.vqvae import VQVAE_PRESETS, MultiScaleVQVAE

    root = tmp_path_factory.mktemp("ckpt")
    m = build_model("viar_tiny", generator=torch.Generator().manual_seed(0))
    vae = MultiScaleVQVAE(VQVAE_PRESETS["vae_tiny"])
    vae.init_weights(torch.Generator().manual_seed(0))
    return save_converted(root / "viar", m.state_dict(), "viar", m.cfg), save_converted(
        root / "vae", vae.state_dict(), "vqvae", vae.config
    )
