"""What ``torch.compile`` does to ``viar_tiny`` on this machine: one training step and one sampled batch,
eager against compiled, measured side by side in one process (median of interleaved rounds).

    python benchmarks/compile_bench.py            # CPU, batch 16; prints a markdown table

The compiled training step is ``training.compile: true`` (``prepare_attention`` then ``Module.compile``); the
compiled sampler is ``deqgen sample --compile`` (``prepare_attention`` then ``torch.compile`` of
``forward_scale``). The first compiled call's time (tracing + code generation) is reported apart.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from collections.abc import Callable

import torch

from deqgen.models.viar.model import build_model
from deqgen.models.viar.sampling import generate
from deqgen.models.viar.vqvae import VQVAE_PRESETS, MultiScaleVQVAE


def _train_step(model: torch.nn.Module, opt: torch.optim.Optimizer, labels, feats, targets) -> None:  # type: ignore[no-untyped-def]
    logits = model(labels, feats, generator=torch.Generator().manual_seed(0))[0]
    loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten())
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()


def _timed(fn: Callable[[], None]) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=7)
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    eager = build_model("viar_tiny", generator=torch.Generator().manual_seed(0))
    compiled = copy.deepcopy(eager)
    compiled.prepare_attention("cpu", torch.float32)
    compiled.compile()
    B, cfg = args.batch, eager.cfg
    labels = torch.arange(B) % eager.num_classes
    feats = torch.randn(B, cfg.seq_len - cfg.patch_nums[0] ** 2, cfg.z_channels)
    targets = torch.randint(0, cfg.vocab_size, (B, cfg.seq_len))
    opts = {m: torch.optim.AdamW(m.parameters(), lr=1e-4) for m in (eager, compiled)}
    first = _timed(lambda: _train_step(compiled, opts[compiled], labels, feats, targets))
    _train_step(eager, opts[eager], labels, feats, targets)
    train = {"eager": [], "compiled": []}
    for _ in range(args.rounds):
        train["eager"].append(_timed(lambda: _train_step(eager, opts[eager], labels, feats, targets)))
        train["compiled"].append(
            _timed(lambda: _train_step(compiled, opts[compiled], labels, feats, targets))
        )

    vae = MultiScaleVQVAE(VQVAE_PRESETS["vae_tiny"]).eval()
    vae.init_weights(torch.Generator().manual_seed(0))
    s_eager = build_model("viar_tiny", generator=torch.Generator().manual_seed(0)).eval()
    s_comp = copy.deepcopy(s_eager)
    s_comp.prepare_attention("cpu", torch.float32)
    s_comp.forward_scale = torch.compile(s_comp.forward_scale)

    def sample(m: torch.nn.Module) -> None:
        with torch.no_grad():
            generate(m, vae, labels, cfg_scale=1.5, top_k=20, top_p=0.9, seed=0)

    first_s = _timed(lambda: sample(s_comp))
    sample(s_eager)
    samp = {"eager": [], "compiled": []}
    for _ in range(args.rounds):
        samp["eager"].append(_timed(lambda: sample(s_eager)))
        samp["compiled"].append(_timed(lambda: sample(s_comp)))

    med = {k: {m: statistics.median(v[m]) * 1e3 for m in v} for k, v in (("train", train), ("sample", samp))}
    print(
        f"viar_tiny, batch {B}, {torch.get_num_threads()} threads, median of {args.rounds} interleaved rounds"
    )
    print("| | eager ms | compiled ms | compiled / eager | first compiled call (s) |")
    print("|---|---:|---:|---:|---:|")
    for k, f in (("train step", first), ("sampled batch", first_s)):
        m = med["train" if k == "train step" else "sample"]
        print(
            f"| {k} | {m['eager']:.1f} | {m['compiled']:.1f} | {m['compiled'] / m['eager']:.2f} | {f:.1f} |"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
