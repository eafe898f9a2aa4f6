"""Peak memory of one VIAR / VAR training step with and without ``training.activation_checkpointing``.

Each point runs in a fresh process (CPU: peak RSS via :mod:`deqgen.evaluation.memory`; CUDA: peak allocated),
on the CPU recipe's models widened to ``--width`` with ``--batch`` images of 16 px (4 scales, 30 tokens)::

    OMP_NUM_THREADS=1 python benchmarks/activation_checkpointing_memory.py --width 256 --batch 64
"""

from __future__ import annotations

import argparse
import json
import logging
import subprocess
import sys
from pathlib import Path
from typing import Any, cast

import torch
import torch.nn.functional as F

logger = logging.getLogger(__name__)
MNIST = Path(__file__).resolve().parents[1] / "recipes" / "mnist_cpu.yaml"


def measure(role: str, checkpointed: bool, width: int, batch: int, device: str) -> dict[str, float]:
    """Peak memory (MiB) one training step adds over the model, its inputs and a warm-up step."""
    from deqgen.evaluation.memory import peak_memory_bytes, reset_peak_memory
    from deqgen.training.config import load_config
    from deqgen.training.distributed import DistInfo
    from deqgen.training.task import ModelRole
    from deqgen.training.tasks.generation import GenerationTask

    overrides = [f"{s}.embed_dim={width}" for s in ("model", "baseline")]
    overrides += [
        f"training.activation_checkpointing={str(checkpointed).lower()}",
        "logging.out_dir=/tmp/unused",
    ]
    cfg = load_config(MNIST, overrides, check_paths=False)
    task = GenerationTask(cfg, DistInfo(), Path("/tmp/unused"), cast(Any, None), cast(Any, None))
    model = task.build_model(ModelRole(role, role), torch.Generator().manual_seed(0)).to(device).train()
    c = model.cfg
    feats = torch.randn(batch, c.seq_len - c.patch_nums[0] ** 2, c.z_channels, device=device)
    labels = torch.randint(0, c.num_classes, (batch,), device=device)
    target = torch.randint(0, c.vocab_size, (batch, c.seq_len), device=device)

    def step() -> None:
        logits, _ = model(
            labels,
            feats,
            generator=torch.Generator(device).manual_seed(1),
            shared_generator=torch.Generator().manual_seed(2),
        )
        F.cross_entropy(logits.flatten(0, 1), target.flatten()).backward()
        model.zero_grad(set_to_none=False)

    step()  # gradients allocated, kernels warm
    base = reset_peak_memory(device)
    step()
    return {
        "step_MiB": (peak_memory_bytes(device) - base) / 2**20,
        "params": float(sum(p.numel() for p in model.parameters())),
    }


def main(argv: list[str] | None = None) -> int:
    """Print a markdown table (one fresh process per point)."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--width", type=int, default=256)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--child", nargs=2, metavar=("ROLE", "CKPT"), help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.child:
        print(json.dumps(measure(a.child[0], a.child[1] == "1", a.width, a.batch, a.device)))
        return 0
    print("| model | width | batch | device | step peak, off (MiB) | step peak, on (MiB) | saving |")
    print("|---|---|---|---|---|---|---|")
    for role, name in (("model", "VIAR"), ("baseline", "VAR")):
        peaks = []
        for ckpt in ("0", "1"):
            cmd = [
                sys.executable,
                __file__,
                "--width",
                str(a.width),
                "--batch",
                str(a.batch),
                "--device",
                a.device,
                "--child",
                role,
                ckpt,
            ]
            done = subprocess.run(cmd, check=True, capture_output=True, text=True)
            peaks.append(json.loads(done.stdout)["step_MiB"])
        print(
            f"| {name} | {a.width} | {a.batch} | {a.device} | {peaks[0]:.1f} | {peaks[1]:.1f} | "
            f"{1 - peaks[1] / peaks[0]:.0%} |"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
