"""One-command device check: everything issue 18 asks of a GPU, measured in one run (about 8 minutes).

    python benchmarks/device_check.py                       # one CUDA GPU: d30 models, batch 64, 256 px
    python benchmarks/device_check.py --dry-run             # CPU, tiny shapes, same code paths (< 1 min)
    python benchmarks/device_check.py --out runs/device_check

Sections (each one is recorded, a failing one does not stop the others):

1. ``pytest -m gpu``: the CUDA-marked tests.
2. Attention: xformers against SDPA on VAR's block-causal mask, agreement and speed; picks the kernel.
3. Sampling: VAR-d30 and VIAR-d30 (random weights, bf16, batch 64) img/s and peak memory for the
   schedules ``constant:10``, ``linear:10:5``, ``linear:6:1``.
4. Training: one optimizer step (bf16 autocast, AdamW) at the largest micro-batch that fits; VIAR's peak
   memory at ``k1 = 0`` and ``k1 = 10`` no-grad iterations, same micro-batch and ``k2``.
5. ``deqgen train`` smoke run: 20 steps on a generated image folder with bf16 and the chosen kernel.

Writes ``device_check.json`` and ``device_check.md`` (a table whose header states the goals and, on a GPU,
whether each was met). Exit code 1 when a section failed, else 0 (goals missed are reported, not fatal).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from deqgen.evaluation.memory import peak_memory_bytes, reset_peak_memory
from deqgen.gradients import SJFB
from deqgen.models.viar.model import NextScaleTransformer, build_model
from deqgen.models.viar.sampling import generate
from deqgen.models.viar.vqvae import VQVAE_PRESETS, MultiScaleVQVAE
from deqgen.nn.attention import attention, probe_backend

REPO = Path(__file__).resolve().parents[1]
GIB = 2**30

#: The issue's goals for one H100 (what the table's header states and the GPU run judges).
GOALS = {
    "viar_img_per_s": ("VIAR-d30 samples >= 170 img/s at linear:10:5 (batch 64, bf16)", 170.0),
    "viar_peak_gb": ("... within 8 GB peak memory", 8.0),
    "viar_over_var": ("... and >= 2.5x VAR-d30's img/s at the same batch", 2.5),
    "train_peak_equal": ("training peak memory equal at k1 = 0 and k1 = 10 (within 1 %)", 0.01),
}


@dataclass(frozen=True)
class Plan:
    """The shapes of one run: the GPU plan or the CPU dry run."""

    dry_run: bool
    device: str
    var: str
    viar: str
    vae: str
    batch: int
    schedules: tuple[str, ...]
    timed_batches: int
    train_batches: tuple[int, ...]
    k1s: tuple[int, int]
    k2: int
    attn_shape: tuple[int, int, int]  # (batch, heads, head_dim); L comes from the model's patch_nums
    smoke_model: str
    smoke_vae: str
    smoke_steps: int
    smoke_batch: int
    smoke_image_size: int
    pytest_targets: tuple[str, ...]


def plan_for(dry_run: bool) -> Plan:
    """The GPU plan (d30, batch 64) or the CPU dry run (tiny presets, batch 4)."""
    if dry_run:
        return Plan(
            True,
            "cpu",
            "var_tiny",
            "viar_tiny",
            "vae_tiny",
            4,
            ("constant:10", "linear:10:5", "linear:6:1"),
            1,
            (8, 4),
            (0, 10),
            2,
            (2, 2, 32),
            "viar_tiny",
            "vae_tiny",
            3,
            4,
            64,
            ("tests/test_attention.py",),
        )
    return Plan(
        False,
        "cuda",
        "var_d30",
        "viar_d30",
        "vae_ch160v4096z32",
        64,
        ("constant:10", "linear:10:5", "linear:6:1"),
        3,
        (64, 48, 32, 24, 16, 12, 8, 4, 2, 1),
        (0, 10),
        12,
        (8, 30, 64),
        "viar_d16",
        "vae_ch160v4096z32",
        20,
        16,
        256,
        ("tests",),
    )


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _timed(fn: Callable[[], Any], device: str, repeats: int) -> float:
    """Seconds per call of ``fn`` after one warm-up call."""
    fn()
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(repeats):
        fn()
    _sync(device)
    return (time.perf_counter() - t0) / repeats


def _free(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.empty_cache()


# ---- 1. the CUDA-marked tests ------------------------------------------------------------------------------
def gpu_tests(plan: Plan, _: str) -> dict[str, Any]:
    """``pytest -m gpu`` over the plan's targets (the dry run: one file, where the marked tests skip)."""
    cmd = [
        sys.executable,
        "-m",
        "pytest",
        "-q",
        "-m",
        "gpu",
        "--benchmark-disable",
        "-p",
        "no:cacheprovider",
        *plan.pytest_targets,
    ]
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300, check=False)
    tail = r.stdout.strip().splitlines()[-1] if r.stdout.strip() else r.stderr[-300:]
    if r.returncode not in (0, 5):  # 5: no tests collected
        raise RuntimeError(f"pytest -m gpu exited {r.returncode}: {tail}\n{r.stdout[-3000:]}")
    return {"returncode": r.returncode, "summary": tail}


# ---- 2. attention kernels ----------------------------------------------------------------------------------
def attention_check(plan: Plan, _: str) -> dict[str, Any]:
    """xformers vs SDPA on the block-causal mask: max abs difference and ms per call; picks the kernel."""
    model_cfg = build_model(plan.viar, init=False).cfg if not plan.dry_run else build_model(plan.viar).cfg
    b, h, d = plan.attn_shape
    L, dtype = model_cfg.seq_len, torch.bfloat16
    g = torch.Generator(plan.device).manual_seed(0)
    q, k, v = (torch.randn(b, h, L, d, generator=g, device=plan.device, dtype=dtype) for _ in range(3))
    mask = _block_causal(model_cfg.patch_nums, plan.device, dtype)
    out: dict[str, Any] = {"shape": [b, h, L, d], "dtype": "bf16"}
    sdpa = attention(q, k, v, mask=mask, backend="sdpa")
    out["sdpa_ms"] = 1e3 * _timed(lambda: attention(q, k, v, mask=mask, backend="sdpa"), plan.device, 10)
    reason = probe_backend("xformers", device=plan.device, dtype=dtype, head_dim=d, mask_kind="float")
    out["xformers"] = reason or "available"
    if reason is None:
        xf = attention(q, k, v, mask=mask, backend="xformers")
        out["max_abs_diff"] = float((xf.float() - sdpa.float()).abs().max())
        out["xformers_ms"] = 1e3 * _timed(
            lambda: attention(q, k, v, mask=mask, backend="xformers"), plan.device, 10
        )
        faster = out["xformers_ms"] < out["sdpa_ms"]
        out["chosen"] = "xformers" if faster and out["max_abs_diff"] < 3e-2 else "sdpa"
    else:
        out["chosen"] = "sdpa"
    return out


def _block_causal(patch_nums: tuple[int, ...], device: str, dtype: torch.dtype) -> torch.Tensor:
    """VAR's additive mask ``(L, L)``: a token sees every token of its own and coarser scales."""
    level = torch.cat([torch.full((p * p,), i) for i, p in enumerate(patch_nums)]).to(device)
    allowed = level[:, None] >= level[None, :]
    return torch.zeros(allowed.shape, device=device, dtype=dtype).masked_fill(~allowed, float("-inf"))


# ---- 3. sampling -------------------------------------------------------------------------------------------
def _model(plan: Plan, name: str, kernel: str) -> NextScaleTransformer:
    """Random weights, built directly on the device (a d30 model does not go through host memory)."""
    with torch.device(plan.device):
        return build_model(name, attention_backend=kernel)


def _vae(plan: Plan, name: str) -> MultiScaleVQVAE:
    with torch.device(plan.device):
        vae = MultiScaleVQVAE(VQVAE_PRESETS[name])
        vae.init_weights()
    return vae.eval()


def sampling(plan: Plan, kernel: str) -> dict[str, Any]:
    """img/s and peak memory of VAR and VIAR (bf16 weights) at the plan's batch for each schedule."""
    vae = _vae(plan, plan.vae).to(torch.bfloat16)
    rows: list[dict[str, Any]] = []
    for name, schedules in ((plan.var, ("-",)), (plan.viar, plan.schedules)):
        model = _model(plan, name, kernel).eval().to(torch.bfloat16)
        labels = torch.randint(0, model.num_classes, (plan.batch,), device=plan.device)
        for schedule in schedules:
            rows.append(_sample_row(plan, model, vae, labels, name, schedule))
        del model
        _free(plan.device)
    return {"batch": plan.batch, "rows": rows}


def _sample_row(
    plan: Plan,
    model: NextScaleTransformer,
    vae: MultiScaleVQVAE,
    labels: torch.Tensor,
    name: str,
    schedule: str,
) -> dict[str, Any]:
    kw = {"schedule": None if schedule == "-" else schedule, "top_k": 900, "top_p": 0.96, "seed": 0}

    def run() -> None:
        with torch.no_grad():
            generate(model, vae, labels, **kw)

    run()  # warm-up: kernels resolved, allocator primed
    reset_peak_memory(plan.device)
    seconds = _timed(run, plan.device, plan.timed_batches)
    return {
        "model": name,
        "schedule": schedule,
        "img_per_s": plan.batch / seconds,
        "peak_gb": peak_memory_bytes(plan.device) / GIB,
    }


# ---- 4. one training step ----------------------------------------------------------------------------------
def training(plan: Plan, kernel: str) -> dict[str, Any]:
    """Largest micro-batch that fits one step, for VAR and for VIAR at the larger ``k1``; VIAR's peak at both
    ``k1`` values on that micro-batch (``k2`` fixed)."""
    low, high = plan.k1s
    var_batch, var_peak = _largest_batch(plan, lambda: _model(plan, plan.var, kernel), None)

    def viar() -> NextScaleTransformer:
        return _model(plan, plan.viar, kernel)

    viar_batch, peak_high = _largest_batch(plan, viar, (high, plan.k2))
    peak_low = _train_step(plan, viar(), viar_batch, (low, plan.k2))
    return {
        "var": {"micro_batch": var_batch, "peak_gb": var_peak / GIB},
        "viar": {
            "micro_batch": viar_batch,
            "k2": plan.k2,
            f"peak_gb_k1_{low}": peak_low / GIB,
            f"peak_gb_k1_{high}": peak_high / GIB,
        },
    }


def _largest_batch(
    plan: Plan, build: Callable[[], NextScaleTransformer], counts: tuple[int, int] | None
) -> tuple[int, int]:
    """The first micro-batch of ``plan.train_batches`` whose step fits, and its peak bytes."""
    for batch in plan.train_batches:
        try:
            return batch, _train_step(plan, build(), batch, counts)
        except torch.OutOfMemoryError:
            _free(plan.device)
    raise RuntimeError(f"no micro-batch of {plan.train_batches} fits on {plan.device}")


def _train_step(plan: Plan, model: NextScaleTransformer, batch: int, counts: tuple[int, int] | None) -> int:
    """One AdamW step under bf16 autocast on random tokens; the peak bytes of the step."""
    if counts is not None:  # S-JFB with fixed counts: k1 no-grad then k2 recorded iterations
        model.trunk.implicit.gradient = SJFB(no_grad=(counts[0], counts[0]), with_grad=(counts[1], counts[1]))
    model.train()
    cfg = model.cfg
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=plan.device.startswith("cuda") or None)
    idx = torch.randint(0, cfg.vocab_size, (batch, cfg.seq_len), device=plan.device)
    labels = torch.randint(0, cfg.num_classes, (batch,), device=plan.device)
    feats = torch.randn(batch, cfg.seq_len - model.first_l, cfg.z_channels, device=plan.device)
    try:
        reset_peak_memory(plan.device)
        rank, shared = torch.Generator(plan.device).manual_seed(0), torch.Generator().manual_seed(0)
        with torch.autocast(torch.device(plan.device).type, dtype=torch.bfloat16):
            logits, _ = model(labels, feats, generator=rank, shared_generator=shared)
        F.cross_entropy(logits.flatten(0, 1).float(), idx.flatten()).backward()
        opt.step()
        _sync(plan.device)
        return peak_memory_bytes(plan.device)
    finally:
        del model, opt
        _free(plan.device)


# ---- 5. deqgen train smoke run -----------------------------------------------------------------------------
def smoke_train(plan: Plan, kernel: str) -> dict[str, Any]:
    """``deqgen train`` for ``plan.smoke_steps`` steps on a generated image folder (bf16, chosen kernel)."""
    with tempfile.TemporaryDirectory(prefix="device_check_") as tmp:
        recipe = _smoke_recipe(plan, kernel, Path(tmp))
        t0 = time.perf_counter()
        r = subprocess.run(
            [sys.executable, "-m", "deqgen", "train", str(recipe)],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=600,
            check=False,
        )
        seconds = time.perf_counter() - t0
        if r.returncode != 0:
            raise RuntimeError(f"deqgen train exited {r.returncode}:\n{r.stderr[-3000:]}")
        rows = [
            json.loads(x) for x in (Path(tmp) / "run" / "model_metrics.jsonl").read_text().splitlines() if x
        ]
    return {
        "steps": rows[-1]["step"],
        "seconds": seconds,
        "first_loss": rows[0]["loss"],
        "last_loss": rows[-1]["loss"],
        "peak_mem_gb": rows[-1].get("peak_mem_gb"),
    }


def _smoke_recipe(plan: Plan, kernel: str, tmp: Path) -> Path:
    from deqgen.images import save_grid
    from deqgen.models.viar.convert import save_converted

    g = torch.Generator().manual_seed(0)
    side = plan.smoke_image_size
    for c in range(2):
        for i in range(2 * plan.smoke_batch):
            img = torch.rand(1, 3, side, side, generator=g)
            img[:, c] = 1.0  # class c has channel c saturated
            save_grid(tmp / "data" / "train" / f"class{c}" / f"{i}.png", img, nrow=1, pad=0)
    vae = MultiScaleVQVAE(VQVAE_PRESETS[plan.smoke_vae])
    vae.init_weights(g)
    tok = save_converted(tmp / "vae", vae.state_dict(), "vqvae", vae.config)
    recipe = tmp / "smoke.yaml"
    recipe.write_text(f"""
model: {{preset: {plan.smoke_model}, num_classes: 2}}
tokenizer: {{preset: {plan.smoke_vae}, checkpoint: {tok}}}
baseline: null
data: {{kind: imagenet_folder, root: {tmp / "data"}, image_size: {side}, resize_shorter_side: {side},
       num_workers: 0}}
attention: {{backend: {kernel}}}
precision: {{dtype: bf16}}
optim: {{warmup_steps: 1}}
training: {{global_batch_size: {plan.smoke_batch}, micro_batch_size: {plan.smoke_batch},
           max_steps: {plan.smoke_steps}}}
logging: {{out_dir: {tmp / "run"}, log_every_n_steps: 1, progress_bar: false}}
sampling: {{samples_per_class: 1, top_k: 0, top_p: 0.0}}
""")
    return recipe


# ---- report ------------------------------------------------------------------------------------------------
def judge(results: dict[str, Any], plan: Plan) -> dict[str, str]:
    """Each goal: ``pass`` / ``FAIL`` with the measured value, or why it was not judged."""
    if plan.dry_run:
        return {k: "not judged (dry run on CPU)" for k in GOALS}
    verdicts = {k: "not measured (section failed)" for k in GOALS}
    sections = results["sections"]
    rows = sections.get("sampling", {}).get("rows", [])
    viar = next((r for r in rows if r["model"] == plan.viar and r["schedule"] == "linear:10:5"), None)
    var = next((r for r in rows if r["model"] == plan.var), None)
    if viar is not None:
        verdicts["viar_img_per_s"] = _verdict(
            viar["img_per_s"] >= GOALS["viar_img_per_s"][1], viar["img_per_s"]
        )
        verdicts["viar_peak_gb"] = _verdict(viar["peak_gb"] <= GOALS["viar_peak_gb"][1], viar["peak_gb"])
        if var is not None:
            ratio = viar["img_per_s"] / var["img_per_s"]
            verdicts["viar_over_var"] = _verdict(ratio >= GOALS["viar_over_var"][1], ratio)
    train = sections.get("training", {}).get("viar")
    if train is not None:
        low, high = (train[f"peak_gb_k1_{k}"] for k in plan.k1s)
        rel = abs(high - low) / max(low, 1e-9)
        verdicts["train_peak_equal"] = _verdict(rel <= GOALS["train_peak_equal"][1], rel)
    return verdicts


def _verdict(ok: bool, value: float) -> str:
    return f"{'pass' if ok else 'FAIL'} ({value:.3g})"


def markdown(results: dict[str, Any], plan: Plan) -> str:
    """The table: goals and verdicts first, then one line per measurement."""
    verdicts = results["goals"]
    lines = [
        f"# Device check ({'dry run, CPU' if plan.dry_run else results['device']})",
        "",
        "| goal | verdict |",
        "|---|---|",
    ]
    lines += [f"| {GOALS[k][0]} | {verdicts[k]} |" for k in GOALS]
    lines += ["", "| section | measurement | value |", "|---|---|---|"]
    for section, value in results["sections"].items():
        shown = {k: v for k, v in value.items() if k != "traceback"}
        lines += [f"| {section} | {key} | {val} |" for key, val in _flatten(shown)]
    return "\n".join(lines) + "\n"


def _flatten(value: Any, prefix: str = "") -> Iterator[tuple[str, str]]:
    if isinstance(value, dict):
        for k, v in value.items():
            yield from _flatten(
                v, f"{prefix}{k}." if not isinstance(v, (int, float, str)) else f"{prefix}{k}"
            )
    elif isinstance(value, list) and all(isinstance(row, dict) for row in value):
        for row in value:
            label = " ".join(str(row[k]) for k in ("model", "schedule") if k in row)
            rest = {k: v for k, v in row.items() if k not in ("model", "schedule")}
            yield from _flatten(rest, f"{prefix}{label}: ")
    elif isinstance(value, list):
        yield prefix.rstrip(". "), " x ".join(str(v) for v in value)
    else:
        yield prefix.rstrip(". "), f"{value:.4g}" if isinstance(value, float) else str(value)


SECTIONS: dict[str, Callable[[Plan, str], dict[str, Any]]] = {
    "gpu_tests": gpu_tests,
    "attention": attention_check,
    "sampling": sampling,
    "training": training,
    "smoke_train": smoke_train,
}


def run(plan: Plan, only: list[str] | None = None) -> dict[str, Any]:
    """Every section in order (the attention section picks the kernel the later ones use)."""
    sections: dict[str, Any] = {}
    kernel = "sdpa"
    for name, fn in SECTIONS.items():
        if only and name not in only:
            continue
        t0 = time.perf_counter()
        try:
            sections[name] = fn(plan, kernel)
        except Exception as err:  # noqa: BLE001  (record it: one broken section must not hide the others)
            sections[name] = {
                "error": f"{type(err).__name__}: {err}",
                "traceback": traceback.format_exc()[-2000:],
            }
        sections[name]["seconds"] = round(time.perf_counter() - t0, 2)
        print(f"{name}: {sections[name]['seconds']} s", file=sys.stderr)
        kernel = sections.get("attention", {}).get("chosen", kernel)
    results = {
        "dry_run": plan.dry_run,
        "device": _device_name(plan),
        "torch": torch.__version__,
        "kernel": kernel,
        "sections": sections,
    }
    results["goals"] = judge(results, plan)
    return results


def _device_name(plan: Plan) -> str:
    return torch.cuda.get_device_name() if plan.device.startswith("cuda") else "cpu"


def main(argv: list[str] | None = None) -> int:
    """Run the check; returns 1 when a section failed (goals missed do not change the exit code)."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dry-run", action="store_true", help="CPU, tiny shapes: the same code paths in < 1 min")
    ap.add_argument(
        "--out", type=Path, default=Path("runs/device_check"), help="folder for the JSON and table"
    )
    ap.add_argument("--only", nargs="+", choices=list(SECTIONS), help="run only these sections")
    args = ap.parse_args(argv)
    if not args.dry_run and not torch.cuda.is_available():
        print("error: no CUDA device here; run with --dry-run for the CPU check", file=sys.stderr)
        return 2
    plan = plan_for(args.dry_run)
    results = run(plan, args.only)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "device_check.json").write_text(json.dumps({"plan": asdict(plan), **results}, indent=2))
    table = markdown(results, plan)
    (args.out / "device_check.md").write_text(table)
    print(table)
    failed = [name for name, s in results["sections"].items() if "error" in s]
    for name in failed:
        print(f"section {name} failed: {results['sections'][name]['error']}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
