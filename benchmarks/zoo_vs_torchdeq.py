"""The zoo side by side with torchdeq: the MDEQ classifier and the DEQ INR trained with deqgen and with
torchdeq's ``get_deq``, each with a 1-step gradient and with implicit differentiation. Prints markdown tables.

Fair by construction:

- **Same cell, same initialisation.** Each model is built once by deqgen's builder; the torchdeq run gets a
  deep copy (identical state dict) and solves the *same* cell module through ``get_deq`` (its core wraps a
  function that calls the cell). Stem/features, injection and head are the same modules in both.
- **Same data order.** One permutation per epoch from one seeded generator, shared by every run.
- **Same solver family and tolerance.** Anderson with ``m=5``, relative stop test, the same ``tol`` and
  ``max_iter`` in training and eval; each library keeps its own ridge (torchdeq ``lam=1e-4`` absolute,
  deqgen ``1e-10`` relative). Backward (implicit): Anderson, relative, the same tol and budget in both.
  torchdeq has no separate eval tolerance, so its ``f_tol`` is switched for the eval phase.
- **Same per-solve work.** Both runs solve inside ``normalized_once(cell)`` (each weight-normalised weight
  computed once per solve) after ``new_solve(cell)`` (a fresh dropout mask per solve).
- **Interleaved timing.** Every epoch trains all four runs in turn, so load on the shared machine hits them
  alike; the table gives the median time per epoch and its ratio to the torchdeq run with the same gradient.

Measured the same way for both libraries:

- *NFE (eval)*: for deqgen the mean / max of each sample's own NFE (``stats.nfe``); torchdeq has no NFE, so
  the number of cell calls per eval batch (every sample takes all of them: the batch stops together).
- *f-rows / sample*: rows passed through the cell (a forward hook on the cell) divided by the samples, in
  eval, and per training sample (all calls, gradient steps and recomputation included).
- *converged*: re-measured on the returned state, ``||f(z) - z|| / ||f(z)|| <= tol`` per sample.
- *peak memory*: bytes autograd saves for backward in one training step
  (:class:`deqgen.evaluation.memory.SavedTensorBytes`), and the rise of the process's peak RSS over a
  training epoch (:func:`~deqgen.evaluation.memory.reset_peak_memory`; noisy on CPU).

Usage (a few minutes on 2 CPU cores; ``--full`` for the recipe-sized data)::

    OMP_NUM_THREADS=1 python benchmarks/zoo_vs_torchdeq.py
    OMP_NUM_THREADS=1 python benchmarks/zoo_vs_torchdeq.py --model mdeq --epochs 4 --full
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from deqgen import JFB, Anderson, ImplicitDiff
from deqgen.evaluation.memory import SavedTensorBytes, peak_memory_bytes, reset_peak_memory
from deqgen.models.inr import PRESETS as INR_PRESETS
from deqgen.models.inr import build_inr, pixel_grid
from deqgen.models.mdeq import PRESETS as MDEQ_PRESETS
from deqgen.models.mdeq import build_classifier
from deqgen.models.mdeq.model import zero_state
from deqgen.nn.dropout import new_solve
from deqgen.nn.normalization import normalized_once


@dataclass(frozen=True)
class SolveSpec:
    """Anderson settings shared by both libraries."""

    train_tol: float
    train_max_iter: int
    eval_tol: float
    eval_max_iter: int
    back_tol: float = 1e-4
    back_max_iter: int = 30
    m: int = 5


@dataclass
class Counter:
    """Counts cell calls and rows while ``on``."""

    on: bool = False
    calls: int = 0
    rows: int = 0

    def hook(self, module: nn.Module, args: tuple[Any, ...], out: Any) -> None:
        if self.on:
            z = args[0]
            self.calls += 1
            self.rows += (z[0] if isinstance(z, (tuple, list)) else z).shape[0]

    def reset(self) -> None:
        self.calls = self.rows = 0


@dataclass
class Run:
    """One (library, gradient) training run and what it measured."""

    lib: str
    grad: str
    model: nn.Module
    forward: Callable[[Tensor, Tensor | None], tuple[Tensor, Any, Any]]  # (input, z0) -> (output, z*, info)
    cell: nn.Module
    opt: torch.optim.Optimizer
    counter: Counter = field(default_factory=Counter)
    epoch_s: list[float] = field(default_factory=list)
    train_rows: int = 0
    train_samples: int = 0
    rss_peak: int = 0
    saved_peak: int = 0
    eval: dict[str, float] = field(default_factory=dict)


def _torchdeq(spec: SolveSpec, implicit: bool) -> nn.Module:
    from torchdeq import get_deq

    kw: dict[str, Any] = {
        "f_solver": "anderson",
        "f_max_iter": spec.train_max_iter,
        "f_tol": spec.train_tol,
        "f_stop_mode": "rel",
        "eval_f_max_iter": spec.eval_max_iter,
    }
    if implicit:
        kw.update(
            ift=True,
            b_solver="anderson",
            b_max_iter=spec.back_max_iter,
            b_tol=spec.back_tol,
            b_stop_mode="rel",
        )
    else:
        kw.update(grad=1)
    return get_deq(**kw)


def _deqgen_parts(spec: SolveSpec, implicit: bool) -> dict[str, Any]:
    back = Anderson(m=spec.m, tol=spec.back_tol, max_iter=spec.back_max_iter)
    return {
        "gradient": ImplicitDiff(solver=back) if implicit else JFB(),
        "train_solver": Anderson(m=spec.m, tol=spec.train_tol, max_iter=spec.train_max_iter),
        "eval_solver": Anderson(m=spec.m, tol=spec.eval_tol, max_iter=spec.eval_max_iter),
    }


def _td_solve(deq: nn.Module, cell: nn.Module, fn: Callable[..., Any], z0: Any, spec: SolveSpec) -> Any:
    """torchdeq's solve of ``fn`` from ``z0`` with the same per-solve dropout/normalisation as deqgen."""
    deq.train(cell.training)
    deq.f_tol = spec.train_tol if cell.training else spec.eval_tol
    new_solve(cell)
    with normalized_once(cell):
        z_out, _ = deq(fn, z0, solver_kwargs={"m": spec.m})
    return z_out[-1]


def mdeq_runs(spec: SolveSpec, lr: float, seed: int) -> list[Run]:
    """Four classifier runs from one initialisation: deqgen / torchdeq x JFB / implicit."""
    runs = []
    base = {
        g: build_classifier(
            MDEQ_PRESETS["digits"],
            separable=True,
            generator=torch.Generator().manual_seed(seed),
            **_deqgen_parts(spec, g == "implicit"),
        )
        for g in ("1-step", "implicit")
    }
    init = base["1-step"].state_dict()
    for grad, dg in base.items():
        dg.load_state_dict(init)
        td = copy.deepcopy(dg)
        deq = _torchdeq(spec, grad == "implicit")

        def dg_fwd(x: Tensor, z0: Tensor | None, m: nn.Module = dg) -> tuple[Tensor, Any, Any]:
            logits, info = m(x)
            return logits, info.forward.z if info.forward is not None else None, info

        def td_fwd(
            x: Tensor, z0: Tensor | None, m: nn.Module = td, deq: nn.Module = deq
        ) -> tuple[Tensor, Any, Any]:
            s = m.stem(x)
            z = _td_solve(
                deq, m.cell, lambda *zs: list(m.cell(tuple(zs), s)), list(zero_state(m.config, s)), spec
            )
            return m.head(tuple(z)), z, None

        for lib, model, fwd in (("deqgen", dg, dg_fwd), ("torchdeq", td, td_fwd)):
            runs.append(Run(lib, grad, model, fwd, model.cell, torch.optim.Adam(model.parameters(), lr=lr)))
    return runs


def inr_runs(spec: SolveSpec, lr: float, seed: int, activation: str) -> list[Run]:
    """Four INR runs from one initialisation: deqgen / torchdeq x JFB / implicit."""
    runs = []
    base = {
        g: build_inr(
            replace(INR_PRESETS["image"], activation=activation),
            generator=torch.Generator().manual_seed(seed),
            **_deqgen_parts(spec, g == "implicit"),
        )
        for g in ("1-step", "implicit")
    }
    init = base["1-step"].state_dict()
    for grad, dg in base.items():
        dg.load_state_dict(init)
        td = copy.deepcopy(dg)
        deq = _torchdeq(spec, grad == "implicit")

        def dg_fwd(p: Tensor, z0: Tensor | None, m: nn.Module = dg) -> tuple[Tensor, Any, Any]:
            rgb, info = m(p, z0)
            return rgb, info.forward.z if info.forward is not None else None, info

        def td_fwd(
            p: Tensor, z0: Tensor | None, m: nn.Module = td, deq: nn.Module = deq
        ) -> tuple[Tensor, Any, Any]:
            u = m.inject(m.features(p))
            start = torch.zeros_like(u) if z0 is None else z0
            z = _td_solve(deq, m.layer.f, lambda z: m.layer.f(z, u), start, spec)
            return m.readout(z), z.detach(), None

        for lib, model, fwd in (("deqgen", dg, dg_fwd), ("torchdeq", td, td_fwd)):
            runs.append(
                Run(lib, grad, model, fwd, model.layer.f, torch.optim.Adam(model.parameters(), lr=lr))
            )
    return runs


def _batches(n: int, batch: int, gen: torch.Generator) -> Iterator[Tensor]:
    perm = torch.randperm(n, generator=gen)
    for s in range(0, n, batch):
        yield perm[s : s + batch]


def train_epoch(run: Run, order: list[Tensor], step: Callable[[Run, Tensor], Tensor]) -> None:
    """One epoch over the index batches ``order``; time, f-rows and the peak RSS rise recorded."""
    run.model.train()
    base = reset_peak_memory("cpu")
    run.counter.on = True
    t0 = time.perf_counter()
    for idx in order:
        loss = step(run, idx)
        run.opt.zero_grad(set_to_none=True)
        loss.backward()
        run.opt.step()
        run.train_samples += len(idx)
    run.epoch_s.append(time.perf_counter() - t0)
    run.counter.on = False
    run.train_rows += run.counter.rows
    run.counter.reset()
    run.rss_peak = max(run.rss_peak, peak_memory_bytes("cpu") - base)


def saved_bytes(run: Run, idx: Tensor, step: Callable[[Run, Tensor], Tensor]) -> int:
    """Peak bytes autograd holds for one training step (parameters excluded)."""
    run.model.train()
    counter = SavedTensorBytes({p.untyped_storage().data_ptr() for p in run.model.parameters()})
    with torch.autograd.graph.saved_tensors_hooks(counter.pack, counter.unpack):
        loss = step(run, idx)
    loss.backward()
    run.opt.zero_grad(set_to_none=True)
    return counter.peak


def _residual(cell_call: Callable[[Any], Any], z: Any) -> Tensor:
    """Per-sample ``||f(z) - z|| / ||f(z)||`` over all state entries."""
    zs = list(z) if isinstance(z, (tuple, list)) else [z]
    fz = cell_call(z)
    fzs = list(fz) if isinstance(fz, (tuple, list)) else [fz]
    diff = sum((a - b).flatten(1).pow(2).sum(1) for a, b in zip(fzs, zs))
    norm = sum(a.flatten(1).pow(2).sum(1) for a in fzs)
    return (diff / norm.clamp_min(1e-30)).sqrt()


@torch.no_grad()
def eval_mdeq(run: Run, images: Tensor, labels: Tensor, spec: SolveSpec, batch: int = 250) -> None:
    """Held-out accuracy, NFE, f-rows / sample, converged fraction."""
    run.model.eval()
    correct, nfe, nfe_max, res = 0, [], 0, []
    for s in range(0, len(images), batch):
        x, y = images[s : s + batch], labels[s : s + batch]
        run.counter.reset()
        run.counter.on = True
        logits, z, info = run.forward(x, None)
        run.counter.on = False
        correct += int((logits.argmax(-1) == y).sum())
        nfe.append(_nfe(info, run, len(x)))
        nfe_max = max(nfe_max, int(nfe[-1].max()))
        stem = run.model.stem(x)
        with normalized_once(run.cell):
            res.append(_residual(lambda zz, s=stem: run.cell(tuple(zz), s), z))
        run.eval["rows"] = run.eval.get("rows", 0.0) + run.counter.rows
    _finish_eval(
        run, correct / len(images), "acc", torch.cat(nfe), nfe_max, torch.cat(res), spec, len(images)
    )


def _nfe(info: Any, run: Run, n: int) -> Tensor:
    """Each sample's forward NFE: deqgen's ``stats.nfe``; for torchdeq the batch's cell calls."""
    return info.forward.stats.nfe.float() if info is not None else torch.full((n,), float(run.counter.calls))


def _finish_eval(
    run: Run, quality: float, key: str, nfe: Tensor, nfe_max: int, res: Tensor, spec: SolveSpec, n: int
) -> None:
    run.eval.update(
        {
            key: quality,
            "nfe": float(nfe.mean()),
            "nfe_max": float(nfe_max),
            "rows_per_sample": run.eval.pop("rows", 0.0) / n,
            "converged": float((res <= spec.eval_tol * 1.001).float().mean()),
            "res_max": float(res.max()),
        }
    )


@torch.no_grad()
def eval_inr(run: Run, coords: Tensor, rgb: Tensor, spec: SolveSpec) -> None:
    """Full-image PSNR (cold solves, one batch), NFE, f-rows / pixel, converged fraction."""
    run.model.eval()
    run.counter.reset()
    run.counter.on = True
    pred, z, info = run.forward(coords, None)
    run.counter.on = False
    nfe = _nfe(info, run, len(coords))
    run.eval["rows"] = float(run.counter.rows)
    mse = (pred.clamp(0, 1) - rgb).pow(2).mean()
    u = run.model.inject(run.model.features(coords))
    with normalized_once(run.cell):
        res = _residual(lambda zz: run.cell(zz, u), z)
    _finish_eval(run, -10 * float(torch.log10(mse)), "psnr", nfe, int(nfe.max()), res, spec, len(coords))


def train_all(
    runs: list[Run], n: int, batch: int, epochs: int, seed: int, step: Callable[[Run, Tensor], Tensor]
) -> None:
    """Interleaved training: every epoch, every run in turn on the same batches."""
    gen = torch.Generator().manual_seed(seed)
    for run in runs:
        run.cell.register_forward_hook(run.counter.hook)
    for epoch in range(epochs):
        order = list(_batches(n, batch, gen))
        for run in runs if epoch % 2 == 0 else runs[::-1]:
            train_epoch(run, order, step)
    probe = next(iter(_batches(n, batch, torch.Generator().manual_seed(seed))))
    for run in runs:
        run.saved_peak = saved_bytes(run, probe, step)


def table(runs: list[Run], key: str, label: str) -> str:
    """The markdown table of ``runs``."""
    ref = {r.grad: statistics.median(r.epoch_s) for r in runs if r.lib == "torchdeq"}
    header = (
        f"| library | gradient | {label} | s / epoch (median) | x torchdeq | NFE eval mean / max | "
        "f-rows / sample eval | f-rows / sample train | converged eval (max res) | autograd saved MiB | "
        "peak RSS rise MiB |"
    )
    lines = [header, "|" + "---|" * 11]
    for r in runs:
        t = statistics.median(r.epoch_s)
        e = r.eval
        q = f"{e[key]:.3f}" if key == "acc" else f"{e[key]:.2f} dB"
        lines.append(
            f"| {r.lib} | {r.grad} | {q} | {t:.2f} | {t / ref[r.grad]:.2f} | "
            f"{e['nfe']:.1f} / {e['nfe_max']:.0f} | {e['rows_per_sample']:.1f} | "
            f"{r.train_rows / max(1, r.train_samples):.1f} | {e['converged']:.3f} ({e['res_max']:.1e}) | "
            f"{r.saved_peak / 2**20:.1f} | {r.rss_peak / 2**20:.0f} |"
        )
    return "\n".join(lines)


def bench_mdeq(args: argparse.Namespace) -> str:
    """Train and evaluate the four classifier runs; the table."""
    from deqgen.data.digits import load_digits, split

    data = load_digits("mnist5k", side=28)
    train, held = split(data, (0.8, 0.2), torch.Generator().manual_seed(0))
    if not args.full:  # random subsets: the digits are stored sorted by class
        pick = torch.Generator().manual_seed(1)
        train = train.subset(torch.randperm(len(train), generator=pick)[: args.train_size])
        held = held.subset(torch.randperm(len(held), generator=pick)[: args.held_size])
    n_train, n_held = len(train), len(held)
    images, labels = train.images, train.labels
    spec = SolveSpec(
        train_tol=1e-3, train_max_iter=20, eval_tol=args.mdeq_eval_tol, eval_max_iter=args.mdeq_eval_iter
    )
    runs = mdeq_runs(spec, lr=5e-3, seed=args.seed)

    def step(run: Run, idx: Tensor) -> Tensor:
        logits, _, _ = run.forward(images[idx], None)
        return F.cross_entropy(logits, labels[idx])

    train_all(runs, n_train, args.batch, args.epochs, args.seed, step)
    for run in runs:
        eval_mdeq(run, held.images, held.labels, spec)
    head = (
        f"MDEQ digits: {n_train} train / {n_held} held-out, {args.epochs} epochs, batch {args.batch}, "
        f"Adam 5e-3; Anderson m=5 rel, train tol {spec.train_tol} / {spec.train_max_iter} it, "
        f"eval tol {spec.eval_tol} / {spec.eval_max_iter} it; "
        f"implicit backward Anderson tol {spec.back_tol} / {spec.back_max_iter} it"
    )
    return head + "\n\n" + table(runs, "acc", "held-out acc")


def _china(height: int, width: int) -> Tensor:
    """sklearn's china.jpg area-downscaled to ``(3, height, width)`` in ``[0, 1]``, as the ``inr`` task
    loads it."""
    from sklearn.datasets import load_sample_image

    image = torch.from_numpy(load_sample_image("china.jpg").astype("float32") / 255.0).permute(2, 0, 1)
    return F.interpolate(image[None], size=(height, width), mode="area")[0].clamp(0, 1)


def bench_inr(args: argparse.Namespace) -> str:
    """Train and evaluate the four INR runs (warm starts for both libraries); the table."""
    h, w = (64, 96) if args.full else (args.inr_side, args.inr_side * 3 // 2)
    image = _china(h, w)
    coords, rgb = pixel_grid(h, w), image.permute(1, 2, 0).reshape(-1, 3)
    spec = SolveSpec(train_tol=1e-4, train_max_iter=30, eval_tol=1e-4, eval_max_iter=60)
    runs = inr_runs(spec, lr=2e-3, seed=args.seed, activation=args.inr_activation)
    cache: dict[int, Tensor] = {}

    def step(run: Run, idx: Tensor) -> Tensor:
        z0 = cache[id(run)][idx] if id(run) in cache else None
        pred, z, _ = run.forward(coords[idx], z0)
        cache.setdefault(id(run), torch.zeros(len(coords), z.shape[-1]))[idx] = z.detach()
        return (pred - rgb[idx]).pow(2).mean()

    train_all(runs, len(coords), 1024, args.inr_epochs, args.seed, step)
    for run in runs:
        eval_inr(run, coords, rgb, spec)
    head = (
        f"DEQ INR ({args.inr_activation} cell) china.jpg {h}x{w}: {args.inr_epochs} epochs, batch 1024, "
        "Adam 2e-3, warm starts (both); "
        f"Anderson m=5 rel, tol {spec.train_tol} / {spec.train_max_iter} it "
        f"(eval {spec.eval_max_iter} it, cold, one batch); "
        f"implicit backward Anderson tol {spec.back_tol} / {spec.back_max_iter} it"
    )
    return head + "\n\n" + table(runs, "psnr", "PSNR")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", choices=("mdeq", "inr", "both"), default="both")
    p.add_argument("--epochs", type=int, default=2, help="classifier epochs")
    p.add_argument("--train-size", type=int, default=3000, help="classifier training digits (without --full)")
    p.add_argument("--batch", type=int, default=32, help="classifier batch size")
    p.add_argument("--held-size", type=int, default=500, help="held-out digits (without --full)")
    p.add_argument("--mdeq-eval-tol", type=float, default=1e-4)
    p.add_argument("--mdeq-eval-iter", type=int, default=100)
    p.add_argument("--inr-epochs", type=int, default=20)
    p.add_argument("--inr-activation", choices=("tanh", "relu"), default="relu", help="the INR cell's")
    p.add_argument("--inr-side", type=int, default=64, help="image height (width = 1.5x) without --full")
    p.add_argument("--full", action="store_true", help="the recipes' data sizes")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    print(
        f"torch {torch.__version__}, threads {torch.get_num_threads()}, load average at start "
        f"{os.getloadavg()[0]:.1f}\n"
    )
    for name, bench in (("mdeq", bench_mdeq), ("inr", bench_inr)):
        if args.model in (name, "both"):
            t0 = time.perf_counter()
            print(bench(args))
            print(f"\n({time.perf_counter() - t0:.0f} s, load average {os.getloadavg()[0]:.1f})\n")


if __name__ == "__main__":
    main()
