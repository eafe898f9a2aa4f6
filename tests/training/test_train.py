"""``deqgen train`` end to end on real digits at a tiny size: the loss goes down, 2-rank DDP equals 1 process
with the same global batch, a run killed with SIGKILL resumes to the same loss sequence, and a damaged newest
checkpoint is skipped (or refused when named explicitly)."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

pytest.importorskip("mlxtend")

from deqgen.models.viar.convert import save_converted  # noqa: E402
from deqgen.models.viar.vqvae import MultiScaleVQVAE  # noqa: E402
from deqgen.training.config import load_config  # noqa: E402
from deqgen.training.tasks.generation.config import tokenizer_config  # noqa: E402
from deqgen.training.train import run  # noqa: E402

MNIST = Path(__file__).resolve().parents[2] / "recipes" / "mnist_cpu.yaml"


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A barely trained tokenizer of the CPU recipe's shape (token quality is irrelevant here)."""
    from deqgen.data.digits import load_digits
    from deqgen.training.tasks.generation.tokens import train_tokenizer

    cfg = load_config(MNIST, check_paths=False)
    vae = MultiScaleVQVAE(tokenizer_config(cfg.tokenizer))
    g = torch.Generator().manual_seed(0)
    vae.init_weights(g)
    train_tokenizer(
        vae, load_digits("mnist5k", side=16).images[:256], steps=2, lr=2e-3, batch_size=32, generator=g
    )
    return save_converted(tmp_path_factory.mktemp("tok") / "tokenizer", vae.state_dict(), "vqvae", vae.config)


def _tiny(out: Path, tokenizer: Path, *extra: str) -> list[str]:
    """Overrides: a 32-wide VIAR on half of the digits, global batch 16 in micro-batches of 8, no baseline."""
    return [
        f"logging.out_dir={out}",
        f"tokenizer.checkpoint={tokenizer}",
        "tokenizer.train=null",
        "baseline=null",
        "model.embed_dim=32",
        "model.num_heads=2",
        "data.val_fraction=0.5",
        "training.global_batch_size=16",
        "training.micro_batch_size=8",
        "optim.warmup_steps=2",
        "logging.log_every_n_steps=1",
        "logging.progress_bar=false",
        "sampling.samples_per_class=1",
        *extra,
    ]


def _cli(args: list[str], *, torchrun: int = 0) -> list[str]:
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={torchrun}"]
    return [
        *(launcher if torchrun else [sys.executable]),
        "-m",
        "deqgen",
        "train",
        str(MNIST),
        *[a for o in args for a in ("--set", o)],
    ]


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}


def _losses(out: Path, role: str = "model") -> list[tuple[int, float]]:
    rows = [json.loads(line) for line in (out / f"{role}_metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"]) for r in rows]


def _weights(export: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(export / "model.safetensors"))


def test_tiny_run_lowers_the_loss_and_writes_everything(tokenizer_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    cfg = load_config(
        MNIST,
        _tiny(
            out,
            tokenizer_dir,
            "training.max_steps=24",
            "optim.lr_per_256=4e-2",
            "checkpoint.every_n_steps=12",
            "evaluation.every_n_steps=12",
        ),
        device="cpu",
    )
    (result,) = run(cfg)
    losses = [loss for _, loss in _losses(out)]
    assert len(losses) == 24 and result.steps == 24 and result.role.name == "viar"
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.2, losses  # from ~ln(64) = 4.16
    for name in (
        "grid.png",
        "loss.png",
        "metrics.json",
        "config.yaml",
        "viar/model.safetensors",
        "checkpoints/model/ckpt_00000012/MANIFEST.json",
        "checkpoints/model/ckpt_00000024/MANIFEST.json",
        "samples/model_step00000012.png",
        "samples/model_step00000024.png",
        "model_metrics.jsonl",
    ):
        assert (out / name).stat().st_size > 0, name
    summary = json.loads((out / "metrics.json").read_text())
    assert summary["viar"]["parameters"] == result.parameters and summary["viar"]["kv_cache_bytes"] > 0
    rows = [json.loads(line) for line in (out / "model_metrics.jsonl").read_text().splitlines()]
    assert all(0 <= r["k1"] <= 4 and 1 <= r["k2"] <= 4 for r in rows)  # S-JFB ranges of mnist_cpu.yaml
    assert len({(r["k1"], r["k2"]) for r in rows}) > 1  # drawn, not fixed


def test_two_ranks_equal_one_process_with_the_same_global_batch(tokenizer_dir: Path, tmp_path: Path) -> None:
    """DDP and FSDP2 over 2 gloo ranks (1 micro-batch each) vs 1 process (2 accumulated micro-batches)."""
    # label dropout and drop-path come from per-rank streams, so they are off; S-JFB's k1, k2 stay random
    # (drawn once per optimizer step from the shared stream)
    common = (
        "training.max_steps=2",
        "optim.warmup_steps=1",
        "model.cond_drop_prob=0",
        "model.drop_path_rate=0",
        "checkpoint.every_n_steps=null",
    )
    one = tmp_path / "one"
    r1 = subprocess.run(
        _cli(_tiny(one, tokenizer_dir, *common)), env=_env(), capture_output=True, text=True, timeout=300
    )
    assert r1.returncode == 0, r1.stderr[-3000:]
    w1, l1 = _weights(one / "viar"), _losses(one)
    assert [s for s, _ in l1] == [1, 2]
    for strategy in ("ddp", "fsdp2"):
        two = tmp_path / strategy
        r2 = subprocess.run(
            _cli(_tiny(two, tokenizer_dir, *common, f"distributed.strategy={strategy}"), torchrun=2),
            env=_env(),
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert r2.returncode == 0, r2.stderr[-3000:]
        w2, l2 = _weights(two / "viar"), _losses(two)
        assert w1.keys() == w2.keys()
        worst = max(float((w1[k] - w2[k]).abs().max()) for k in w1)
        assert worst <= 1e-6, (strategy, worst)
        assert all(abs(a[1] - b[1]) <= 1e-6 for a, b in zip(l1, l2, strict=True)), (strategy, l1, l2)


@pytest.fixture(scope="module")
def uninterrupted(tokenizer_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("full") / "run"
    r = subprocess.run(
        _cli(_resume_args(out, tokenizer_dir)), env=_env(), capture_output=True, text=True, timeout=300
    )
    assert r.returncode == 0, r.stderr[-3000:]
    return out


def _resume_args(out: Path, tokenizer: Path) -> list[str]:
    return _tiny(
        out, tokenizer, "training.max_steps=40", "checkpoint.every_n_steps=4", "checkpoint.keep_last=3"
    )


def test_kill_9_then_resume_gives_the_uninterrupted_loss_sequence(
    tokenizer_dir: Path, uninterrupted: Path, tmp_path: Path
) -> None:
    out = tmp_path / "run"
    proc = subprocess.Popen(
        _cli(_resume_args(out, tokenizer_dir)),
        env=_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    marker = out / "checkpoints" / "model" / "ckpt_00000008" / "MANIFEST.json"
    deadline = time.monotonic() + 240
    while not marker.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(timeout=30) == -signal.SIGKILL, "the run ended before it could be killed"
    killed_at = max(s for s, _ in _losses(out))
    assert 8 <= killed_at < 40
    r = subprocess.run(
        _cli([*_resume_args(out, tokenizer_dir), "checkpoint.resume=auto"]),
        env=_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resuming from" in r.stderr
    assert _losses(out) == _losses(uninterrupted)  # every step 1..40, bitwise
    full, resumed = _weights(uninterrupted / "viar"), _weights(out / "viar")
    assert all(torch.equal(full[k], resumed[k]) for k in full)


def test_damaged_newest_checkpoint_falls_back_or_is_refused(
    tokenizer_dir: Path, uninterrupted: Path, tmp_path: Path
) -> None:
    import shutil

    out = tmp_path / "run"
    shutil.copytree(uninterrupted, out)
    newest = out / "checkpoints" / "model" / "ckpt_00000040"
    weights = newest / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])  # a truncated write
    shutil.rmtree(out / "viar")

    # named explicitly: a clear error naming the file, exit 2, nothing written
    before = sorted(p.relative_to(out) for p in out.rglob("*"))
    r = subprocess.run(
        _cli([*_resume_args(out, tokenizer_dir), f"checkpoint.resume={newest}"]),
        env=_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 2 and "model.safetensors" in r.stderr and "truncated" in r.stderr, r.stderr[-2000:]
    assert sorted(p.relative_to(out) for p in out.rglob("*")) == before

    # auto: skip the damaged one, resume from step 36, end with the uninterrupted run's weights
    r = subprocess.run(
        _cli([*_resume_args(out, tokenizer_dir), "checkpoint.resume=auto"]),
        env=_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert "skipping damaged checkpoint" in r.stderr and "ckpt_00000036" in r.stderr
    full, resumed = _weights(uninterrupted / "viar"), _weights(out / "viar")
    assert all(torch.equal(full[k], resumed[k]) for k in full)


def test_warmup_longer_than_the_run_is_refused(tokenizer_dir: Path, tmp_path: Path) -> None:
    from deqgen.training.schema import ConfigError

    with pytest.raises(ConfigError, match=r"optim\.warmup_steps"):
        load_config(
            MNIST, _tiny(tmp_path / "run", tokenizer_dir, "training.max_steps=2", "optim.warmup_steps=5")
        )
    # given in epochs, it is compared with training.epochs when the recipe is read, before anything is written
    with pytest.raises(ConfigError, match=r"optim\.warmup_epochs"):
        load_config(
            MNIST,
            _tiny(
                tmp_path / "run",
                tokenizer_dir,
                "training.max_steps=null",
                "training.epochs=1",
                "optim.warmup_steps=null",
                "optim.warmup_epochs=2",
            ),
            device="cpu",
        )
    assert not (tmp_path / "run").exists()


def test_bf16_autocast_trains_viar_and_var(tokenizer_dir: Path, tmp_path: Path) -> None:
    """The ImageNet recipe's precision (bf16 autocast) on CPU: the L2-normalised attention keeps q, k, v in
    one dtype, and both models take finite steps."""
    out = tmp_path / "run"
    cfg = load_config(
        MNIST,
        [
            *_tiny(
                out, tokenizer_dir, "training.max_steps=2", "optim.warmup_steps=1", "precision.dtype=bf16"
            ),
            "baseline=null",
        ],
        device="cpu",
    )
    (result,) = run(cfg)
    losses = [loss for _, loss in _losses(out)]
    assert result.steps == 2 and len(losses) == 2 and all(math.isfinite(v) for v in losses)
