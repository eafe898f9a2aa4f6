"""Nothing a user owns is deleted or mixed up, and bad input fails before anything is written.

Run directories (lock, overwrite, resume compatibility, the metrics log), checkpoint pruning and a full
disk, recipe errors, and every CLI command given arguments out of range, of the wrong type, or pointing at
the wrong kind of file.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from deqgen.cli import main
from deqgen.training import checkpoint as ckpt_module
from deqgen.training.checkpoint import CheckpointConfigMismatch, CheckpointManager, CheckpointWriteError
from deqgen.training.config import check_config_compatible, load_config
from deqgen.training.distributed import DistInfo
from deqgen.training.rundir import LOCK_FILE, RunDirBusy, RunDirError, RunLock, open_run_dir
from deqgen.training.schema import ConfigError, config_to_yaml

MNIST = Path(__file__).resolve().parents[1] / "recipes" / "mnist_cpu.yaml"


def _snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _open(cfg, *, overwrite: bool = False) -> None:  # type: ignore[no-untyped-def]
    with open_run_dir(cfg, DistInfo(), check_config_compatible, overwrite=overwrite):
        pass


def _cfg(out: Path, *extra: str):  # type: ignore[no-untyped-def]
    return load_config(
        MNIST, [f"logging.out_dir={json.dumps(str(out))}", *extra], check_paths=False, device="cpu"
    )


# ---- the run directory's lock ------------------------------------------------------------------------------

_HOLD = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from deqgen.training.rundir import RunLock
    lock = RunLock.acquire(Path(sys.argv[1]))
    print("locked", flush=True)
    time.sleep(120)
""")


def _holder(run_dir: Path) -> subprocess.Popen[str]:
    proc = subprocess.Popen([sys.executable, "-c", _HOLD, str(run_dir)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "locked"
    return proc


def _kill(proc: subprocess.Popen[str]) -> None:
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.stdout is not None
    proc.stdout.close()


def test_a_second_run_is_refused_naming_the_holder_and_kill_9_leaves_no_stale_lock(tmp_path: Path) -> None:
    out = tmp_path / "run"
    proc = _holder(out)
    try:
        with pytest.raises(RunDirBusy, match=rf"pid {proc.pid} on host .+, started "):
            RunLock.acquire(out)
        cfg = _cfg(out)
        before = _snapshot(out)
        with pytest.raises(RunDirBusy, match=str(proc.pid)):
            _open(cfg)
        assert _snapshot(out) == before  # nothing written by the refused run
    finally:
        _kill(proc)
    with RunLock.acquire(out):  # the OS dropped the dead process's lock
        pass
    assert (out / LOCK_FILE).is_file()


def test_cli_train_into_a_busy_directory_exits_2_naming_the_process(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "run"
    proc = _holder(out)
    try:
        rc = main(["train", str(MNIST), "--set", f"logging.out_dir={out}"])
        assert rc == 2 and f"pid {proc.pid}" in capsys.readouterr().err
        assert sorted(p.name for p in out.iterdir()) == [LOCK_FILE]
    finally:
        _kill(proc)


# ---- non-empty run directories, --overwrite, resume compatibility ------------------------------------------


def _previous_run(out: Path, cfg) -> dict[str, bytes]:  # type: ignore[no-untyped-def]
    (out / "tokenizer").mkdir(parents=True)
    (out / "tokenizer" / "model.safetensors").write_bytes(b"the old tokenizer")
    (out / "config.yaml").write_text(config_to_yaml(cfg))
    (out / "model_metrics.jsonl").write_text('{"step": 1, "loss": 4.0}\n')
    return _snapshot(out)


def test_resume_none_into_a_previous_run_is_refused_and_overwrite_clears_it(tmp_path: Path) -> None:
    out = tmp_path / "run"
    cfg = _cfg(out, "checkpoint.resume=none")
    before = _previous_run(out, cfg)
    with pytest.raises(RunDirError, match=r"already holds a run.*--resume auto.*--overwrite"):
        _open(cfg)
    assert _snapshot(out) == before
    with open_run_dir(cfg, DistInfo(), check_config_compatible, overwrite=True):
        assert sorted(p.name for p in out.iterdir()) == [LOCK_FILE]


def test_files_that_are_not_a_run_are_never_cleared(tmp_path: Path) -> None:
    out = tmp_path / "mine"
    out.mkdir()
    (out / "thesis.tex").write_text("years of work")
    for overwrite in (False, True):
        with pytest.raises(RunDirError, match=r"not a deqgen run \(thesis\.tex\)"):
            _open(_cfg(out), overwrite=overwrite)
    assert sorted(p.name for p in out.iterdir()) == ["thesis.tex"]


def test_cli_resume_none_into_a_finished_run_exits_2_and_changes_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "run"
    before = _previous_run(out, _cfg(out))
    assert main(["train", str(MNIST), "--set", f"logging.out_dir={out}", "--resume", "none"]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert _snapshot(out) == before


def test_a_resume_of_another_model_is_refused_before_config_or_tokenizer_change(tmp_path: Path) -> None:
    out = tmp_path / "run"
    before = _previous_run(out, _cfg(out, "tokenizer.ch=16"))
    with pytest.raises(CheckpointConfigMismatch, match=r"tokenizer\.ch: checkpoint 16, run 32"):
        _open(_cfg(out))
    assert _snapshot(out) == before


# ---- out_dir and recipe errors, before anything is written -------------------------------------------------


def test_out_dir_that_is_a_file_or_under_a_file_is_named(tmp_path: Path) -> None:
    f = tmp_path / "notes.txt"
    f.write_text("mine")
    with pytest.raises(RunDirError, match=r"logging\.out_dir=.*notes\.txt is an existing file"):
        _open(_cfg(f))
    with pytest.raises(RunDirError, match=r"its parent .*notes\.txt is a file"):
        _open(_cfg(f / "run"))
    assert f.read_text() == "mine"


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write anywhere")
def test_out_dir_without_write_permission_is_named(tmp_path: Path) -> None:
    locked = tmp_path / "ro"
    locked.mkdir(mode=0o555)
    with pytest.raises(RunDirError, match=r"logging\.out_dir=.* is not writable"):
        _open(_cfg(locked / "run"))


def test_warmup_epochs_not_below_epochs_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match=r"optim\.warmup_epochs: got 2\.0; must be below training\.epochs"):
        load_config(
            MNIST,
            [
                "training.max_steps=null",
                "training.epochs=2",
                "optim.warmup_steps=null",
                "optim.warmup_epochs=2",
            ],
        )


@pytest.mark.parametrize(
    "text, key",
    [
        ("model: {depth: 2}\noptim: {}\nmodel: {depth: 3}\n", "model"),
        ("optim:\n  lr_per_256: 1.0e-3\n  eps: 1.0e-8\n  lr_per_256: 2.0e-3\n", "lr_per_256"),
        ("model:\n  implicit:\n    pre_depth: 1\n    pre_depth: 2\n", "pre_depth"),
    ],
)
def test_duplicate_yaml_keys_at_any_depth_are_errors(tmp_path: Path, text: str, key: str) -> None:
    path = tmp_path / "dup.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=rf"duplicate key '{key}' \(first on line \d+\)"):
        load_config(path)


# ---- checkpoints: pruning and a full disk ------------------------------------------------------------------


def _save(mgr: CheckpointManager, *steps: int) -> None:
    for s in steps:
        mgr.save(s, {"w": torch.full((4,), float(s))}, {"epoch": s})


def _truncate(path: Path) -> None:
    weights = path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-5])


def test_fallback_resume_then_prune_keeps_the_good_checkpoint(tmp_path: Path) -> None:
    """The reported case: a damaged newest checkpoint, a fallback resume, keep_last=1."""
    mgr = CheckpointManager(tmp_path, keep_last=3)
    _save(mgr, 1, 2)
    _truncate(tmp_path / "ckpt_00000002")
    resumed = CheckpointManager(tmp_path, keep_last=1)
    loaded = resumed.load("auto")
    assert loaded is not None and loaded.step == 1
    assert (tmp_path / "ckpt_00000002.corrupt").is_dir()  # moved aside, not trusted
    _save(resumed, 3)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt_00000002.corrupt", "ckpt_00000003"]


def test_prune_never_counts_a_damaged_newer_checkpoint(tmp_path: Path) -> None:
    _save(CheckpointManager(tmp_path, keep_last=3), 1, 5)
    _truncate(tmp_path / "ckpt_00000005")
    mgr = CheckpointManager(tmp_path, keep_last=1)
    _save(mgr, 3)  # before: kept only the damaged ckpt 5 and deleted 1 and 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt_00000003", "ckpt_00000005.corrupt"]
    assert mgr.load("auto").step == 3  # type: ignore[union-attr]


def test_disk_full_says_so_keeps_the_previous_checkpoint_and_leaves_no_partial_save(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    mgr = CheckpointManager(tmp_path, keep_last=1)
    _save(mgr, 1)
    real = ckpt_module._torch_save

    def full_disk(obj: object, path: Path) -> None:
        if path.name == ckpt_module.STATE_FILE:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        real(obj, path)

    monkeypatch.setattr(ckpt_module, "_torch_save", full_disk)
    with pytest.raises(CheckpointWriteError, match=r"no space left on device.*ckpt_00000001 is kept"):
        _save(mgr, 2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt_00000001"]
    monkeypatch.setattr(ckpt_module, "_torch_save", real)
    assert mgr.load("auto").step == 1  # type: ignore[union-attr]


# ---- every CLI command: out of range, wrong type, wrong kind of file ---------------------------------------


@pytest.fixture(scope="module")
def dirs(tiny_viar_dirs: tuple[Path, Path]) -> tuple[Path, Path]:
    return tiny_viar_dirs


def _sample(dirs: tuple[Path, Path], out: Path, *extra: str) -> list[str]:
    return ["sample", str(dirs[0]), "--vqvae", str(dirs[1]), "--classes", "1", "--out", str(out), *extra]


def _edit(dirs: tuple[Path, Path], image: Path, out: Path, *extra: str) -> list[str]:
    return [
        "edit",
        str(dirs[0]),
        "--vqvae",
        str(dirs[1]),
        "--image",
        str(image),
        "--box",
        "0",
        "0",
        "8",
        "8",
        "--class",
        "1",
        "--out",
        str(out),
        *extra,
    ]


@pytest.mark.parametrize(
    "extra, message",
    [
        (("--per-class", "0"), "--per-class: must be >= 1"),
        (("--per-class", "-3"), "--per-class: must be >= 1"),
        (("--per-class", "two"), "--per-class: invalid"),
        (("--cfg-scale", "-1"), "--cfg-scale/--cfg: must be a finite number >= 0"),
        (("--cfg", "-0.5"), "--cfg-scale/--cfg: must be a finite number >= 0"),
        (("--cfg", "nan"), "--cfg-scale/--cfg: must be a finite number >= 0"),
        (("--top-p", "1.5"), "--top-p: must lie in [0, 1]"),
        (("--top-k", "-1"), "--top-k: must be >= 0"),
        (("--solver", "newton"), "--solver: invalid choice"),
        (("--seed", "x"), "--seed: invalid"),
    ],
)
def test_sample_arguments_out_of_range_or_of_the_wrong_type(
    dirs: tuple[Path, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    extra: tuple[str, ...],
    message: str,
) -> None:
    out = tmp_path / "g.png"
    assert main(_sample(dirs, out, *extra)) == 2
    assert message in capsys.readouterr().err and not out.exists()


def test_sample_refuses_the_null_class_and_swapped_folders(
    dirs: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from deqgen.models.viar.convert import load_converted

    n = load_converted(dirs[0]).num_classes
    out = tmp_path / "g.png"
    assert main(_sample(dirs, out, "--classes", str(n))) == 2
    assert f"--classes {n}: the model has classes 0..{n - 1} ({n} is the" in capsys.readouterr().err
    assert main(["sample", str(dirs[1]), "--vqvae", str(dirs[0]), "--classes", "1", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "holds a tokenizer and --vqvae" in err and "swap them" in err
    assert main(["sample", str(dirs[0]), "--vqvae", str(dirs[0]), "--classes", "1", "--out", str(out)]) == 2
    assert "not a tokenizer" in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.parametrize("kind", ["missing", "text", "directory", "file_as_model"])
def test_sample_wrong_kind_of_file(
    dirs: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str], kind: str
) -> None:
    out = tmp_path / "g.png"
    text = tmp_path / "notes.txt"
    text.write_text("not a model")
    args = {
        "missing": _sample((tmp_path / "nope", dirs[1]), out),
        "text": _sample((text, dirs[1]), out),
        "directory": _sample(dirs, tmp_path),  # --out is a folder
        "file_as_model": _sample((dirs[0] / "config.json", dirs[1]), out),
    }[kind]
    assert main(args) == 2
    assert "error:" in capsys.readouterr().err and not out.exists()


def test_edit_refuses_a_non_image_zero_samples_and_the_null_class(
    dirs: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from deqgen.images import save_grid
    from deqgen.models.viar.convert import load_converted

    out = tmp_path / "e.png"
    fake = tmp_path / "photo.png"
    fake.write_text("not really a png")
    assert main(_edit(dirs, fake, out)) == 2
    assert f"--image {fake} is not an image" in capsys.readouterr().err
    assert main(_edit(dirs, tmp_path, out)) == 2  # a folder
    assert "--image" in capsys.readouterr().err
    real = tmp_path / "in.png"
    save_grid(real, torch.rand(1, 3, 16, 16), nrow=1)
    for bad in ("0", "-2"):
        assert main(_edit(dirs, real, out, "--samples", bad)) == 2
        assert "--samples: must be >= 1" in capsys.readouterr().err
    n = load_converted(dirs[0]).num_classes
    args = _edit(dirs, real, out)
    args[args.index("--class") + 1] = str(n)
    assert main(args) == 2
    assert "null class" in capsys.readouterr().err
    assert main(_edit(dirs, real, out, "--cfg", "-1")) == 2
    assert "must be a finite number >= 0" in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.parametrize(
    "extra, message",
    [
        (("--per-class", "0"), "--per-class: must be >= 1"),
        (("--per-class", "1", "--batch-size", "0"), "--batch-size: must be >= 1"),
        (("--per-class", "1", "--cfg", "-2"), "must be a finite number >= 0"),
        (("--per-class", "1", "--classes", "99999"), "the model has classes"),
    ],
)
def test_eval_arguments_out_of_range(
    dirs: tuple[Path, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    extra: tuple[str, ...],
    message: str,
) -> None:
    out = tmp_path / "s.npz"
    assert main(["eval", str(dirs[0]), "--vqvae", str(dirs[1]), "--out", str(out), *extra]) == 2
    assert message in capsys.readouterr().err and not out.exists()


def test_convert_report_pretokenize_and_train_wrong_kinds(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    text = tmp_path / "notes.txt"
    text.write_text("not a checkpoint")
    for src in (tmp_path / "missing.pth", text, tmp_path):
        assert main(["convert", str(src), str(tmp_path / "out")]) == 2
        assert "error:" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
    assert main(["report", str(tmp_path), "--threads", "0"]) == 2
    assert "--threads: must be >= 1" in capsys.readouterr().err
    assert main(["pretokenize", str(MNIST), "--out", str(tmp_path / "tok"), "--batch-size", "0"]) == 2
    assert "--batch-size: must be >= 1" in capsys.readouterr().err
    for config in (tmp_path, text):  # a folder, a file that is not YAML
        assert main(["train", str(config)]) == 2
        assert "error:" in capsys.readouterr().err
    assert main(["train", str(MNIST), "--set", "training.max_steps=-1"]) == 2
    assert "training.max_steps" in capsys.readouterr().err
    assert main(["train", str(MNIST), "--set", "training.global_batch_size=many"]) == 2
    assert "training.global_batch_size" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


def test_convert_never_deletes_the_users_files_and_converts_into_dot(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Issue 17.1 through the command line: a destination holding other files is refused and left as it was;
    an empty folder given as ``.`` and a previous conversion are written."""
    src = str(Path(__file__).parent / "data" / "var_vqvae_tiny.pt")
    pyramid = ["--patch-nums", "1", "2", "3", "4"]
    mine = tmp_path / "my_models"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    assert main(["convert", src, str(mine), *pyramid]) == 2
    assert "notes.txt" in capsys.readouterr().err
    assert [p.name for p in mine.iterdir()] == ["notes.txt"] and (mine / "notes.txt").read_text() == "keep me"
    here = tmp_path / "here"
    here.mkdir()
    monkeypatch.chdir(here)
    assert main(["convert", src, ".", *pyramid]) == 0
    assert main(["convert", src, ".", *pyramid]) == 0  # over its own previous conversion
    assert sorted(p.name for p in here.iterdir()) == ["README.md", "config.json", "model.safetensors"]


# ---- tiny trainings: the metrics log, the batch/dataset check, a full disk ---------------------------------


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    pytest.importorskip("mlxtend")
    from deqgen.models.viar.convert import save_converted
    from deqgen.models.viar.vqvae import MultiScaleVQVAE
    from deqgen.training.tasks.generation.config import tokenizer_config

    cfg = load_config(MNIST, check_paths=False)
    vae = MultiScaleVQVAE(tokenizer_config(cfg.tokenizer))
    vae.init_weights(torch.Generator().manual_seed(0))
    return save_converted(tmp_path_factory.mktemp("tok") / "tokenizer", vae.state_dict(), "vqvae", vae.config)


def _tiny(out: Path, tokenizer: Path, *extra: str) -> list[str]:
    return [
        f"logging.out_dir={out}",
        f"tokenizer.checkpoint={tokenizer}",
        "tokenizer.train=null",
        "baseline=null",
        "model.embed_dim=16",
        "model.num_heads=2",
        "data.val_fraction=0.9",
        "training.global_batch_size=8",
        "training.micro_batch_size=8",
        "training.max_steps=1",
        "optim.warmup_steps=0",
        "logging.log_every_n_steps=1",
        "logging.progress_bar=false",
        "sampling.samples_per_class=1",
        *extra,
    ]


def test_a_restart_from_nothing_logs_each_step_once(tokenizer_dir: Path, tmp_path: Path) -> None:
    from deqgen.training.train import run

    out = tmp_path / "run"
    cfg = load_config(MNIST, _tiny(out, tokenizer_dir), device="cpu")
    out.mkdir()
    (out / "config.yaml").write_text(config_to_yaml(cfg))
    # a run killed before its first checkpoint: its rows, one of them cut short by the kill
    rows = '{"step": 1, "loss": 9.0}\n{"step": 2, "loss": 9.0}\n{"step": 3, "lo'
    (out / "model_metrics.jsonl").write_text(rows)
    run(cfg)
    rows = [json.loads(line) for line in (out / "model_metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1] and rows[0]["loss"] != 9.0


def test_a_global_batch_larger_than_the_data_names_both_batch_fields(
    tokenizer_dir: Path, tmp_path: Path
) -> None:
    from deqgen.training.train import run

    overrides = _tiny(
        tmp_path / "run",
        tokenizer_dir,
        "data.val_fraction=0.999",
        "training.global_batch_size=64",
        "training.micro_batch_size=32",
    )
    cfg = load_config(MNIST, overrides, device="cpu")
    with pytest.raises(ValueError, match=r"global_batch_size=64 \(training\.micro_batch_size=32") as e:
        run(cfg)
    assert "drop_last" not in str(e.value)
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_cli_train_with_a_full_disk_exits_non_zero_and_says_so(
    tokenizer_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def full_disk(obj: object, path: Path) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    monkeypatch.setattr(ckpt_module, "_torch_save", full_disk)
    out = tmp_path / "run"
    args = ["train", str(MNIST), *[a for o in _tiny(out, tokenizer_dir) for a in ("--set", o)]]
    t0 = time.perf_counter()
    assert main(args) == 1
    assert "no space left on device" in capsys.readouterr().err
    assert not list((out / "checkpoints" / "model").iterdir()), time.perf_counter() - t0
