"""``deqgen sample/edit/eval`` on any device: ``--device``, ``--dtype``, ``--batch-size`` and ``--compile``.

Images keep per-sample seeds, so batch size 1 and 4 write the same grid on one device.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

pytest.importorskip("PIL")

from deqgen.cli import main
from deqgen.evaluation import sample_files
from deqgen.images import save_grid
from deqgen.models.viar.model import NextScaleTransformer


@contextmanager
def _onednn_off() -> Iterator[None]:
    """Plain ATen convolutions (oneDNN's ``flags()`` helper warns about TF32 on CPU builds)."""
    before = torch.backends.mkldnn.enabled
    torch.backends.mkldnn.enabled = False
    try:
        yield
    finally:
        torch.backends.mkldnn.enabled = before


def _sample(dirs: tuple[Path, Path], out: Path, *extra: str) -> int:
    return main(
        [
            "sample",
            str(dirs[0]),
            "--vqvae",
            str(dirs[1]),
            "--classes",
            "1",
            "2",
            "--per-class",
            "2",
            "--schedule",
            "linear:4:2",
            "--top-k",
            "5",
            "--seed",
            "3",
            "--out",
            str(out),
            *extra,
        ]
    )


def _pixels(path: Path) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as img:
        return np.asarray(img.convert("RGB"))


def test_batch_size_does_not_change_the_images(tiny_viar_dirs: tuple[Path, Path], tmp_path: Path) -> None:
    """Bitwise with oneDNN off: the tokens are batch-invariant and the rest is deterministic maths."""
    one, four = tmp_path / "one.png", tmp_path / "four.png"
    with _onednn_off():
        assert _sample(tiny_viar_dirs, one, "--batch-size", "1", "--device", "cpu") == 0
        assert _sample(tiny_viar_dirs, four, "--batch-size", "4", "--device", "cpu") == 0
    assert np.array_equal(_pixels(one), _pixels(four))
    other_seed = tmp_path / "other.png"
    assert _sample(tiny_viar_dirs, other_seed, "--batch-size", "4", "--seed", "4") == 0
    assert not np.array_equal(_pixels(one), _pixels(other_seed))  # the grids do depend on the seed


def test_batch_size_with_onednn_convolutions(tiny_viar_dirs: tuple[Path, Path], tmp_path: Path) -> None:
    """oneDNN picks the tokenizer's convolution kernels by batch size (1e-5 apart in float32): the same tokens
    then decode to pixels at most one level apart."""
    one, four = tmp_path / "one.png", tmp_path / "four.png"
    assert _sample(tiny_viar_dirs, one, "--batch-size", "1") == 0
    assert _sample(tiny_viar_dirs, four, "--batch-size", "4") == 0
    diff = np.abs(_pixels(one).astype(int) - _pixels(four).astype(int))
    assert diff.max() <= 1 and (diff > 0).mean() < 0.01


def test_edit_batch_size_does_not_change_the_images(
    tiny_viar_dirs: tuple[Path, Path], tmp_path: Path
) -> None:
    src = tmp_path / "in.png"
    save_grid(src, torch.rand(1, 3, 60, 60, generator=torch.Generator().manual_seed(0)), nrow=1)
    outs = []
    for bs in ("1", "3"):
        out = tmp_path / f"edit{bs}.png"
        with _onednn_off():  # bitwise (see the test above)
            rc = main(
                [
                    "edit",
                    str(tiny_viar_dirs[0]),
                    "--vqvae",
                    str(tiny_viar_dirs[1]),
                    "--image",
                    str(src),
                    "--box",
                    "16",
                    "16",
                    "48",
                    "48",
                    "--class",
                    "3",
                    "--samples",
                    "3",
                    "--out",
                    str(out),
                    "--batch-size",
                    bs,
                ]
            )
        assert rc == 0
        outs.append(_pixels(out))
    assert np.array_equal(*outs)


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_low_precision_autocast_runs_on_cpu(
    tiny_viar_dirs: tuple[Path, Path], tmp_path: Path, dtype: str
) -> None:
    out = tmp_path / f"{dtype}.png"
    assert _sample(tiny_viar_dirs, out, "--dtype", dtype, "--device", "cpu") == 0
    assert out.read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize(
    ("device", "message"), [("cuda:0", "CUDA is not available"), ("tpu9", "is not a device")]
)
def test_bad_device_exits_2_and_writes_nothing(
    tiny_viar_dirs: tuple[Path, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    device: str,
    message: str,
) -> None:
    if device.startswith("cuda") and torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    out = tmp_path / "grid.png"
    assert _sample(tiny_viar_dirs, out, "--device", device) == 2
    err = capsys.readouterr().err
    assert "--device" in err and message in err
    assert not out.exists()


def test_compile_flag_prepares_attention_then_compiles_the_scale_forward(
    tiny_viar_dirs: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[Any] = []
    prepare = NextScaleTransformer.prepare_attention

    def spy_prepare(self: NextScaleTransformer, device: torch.device, dtype: torch.dtype) -> None:
        calls.append(("prepare", torch.device(device).type, dtype))
        prepare(self, device, dtype)

    def spy_compile(fn: Any, *args: Any, **kwargs: Any) -> Any:
        calls.append(("compile", getattr(fn, "__name__", None)))
        return fn  # eager: this test checks the wiring, not compile speed

    monkeypatch.setattr(NextScaleTransformer, "prepare_attention", spy_prepare)
    monkeypatch.setattr(torch, "compile", spy_compile)
    assert _sample(tiny_viar_dirs, tmp_path / "c.png", "--compile", "--dtype", "bf16", "--device", "cpu") == 0
    assert calls == [("prepare", "cpu", torch.bfloat16), ("compile", "forward_scale")]


def test_without_compile_flag_nothing_is_compiled(
    tiny_viar_dirs: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("torch.compile called without --compile")

    monkeypatch.setattr(torch, "compile", refuse)
    assert _sample(tiny_viar_dirs, tmp_path / "e.png") == 0


def test_score_samples_passes_cuda_to_the_inception_extractor(monkeypatch: pytest.MonkeyPatch) -> None:
    from deqgen.evaluation import fidelity

    seen: dict[str, Any] = {}

    def fake(*args: Any, **kwargs: Any) -> dict[str, float]:
        seen.update(kwargs)
        return {"inception_score_mean": 1.0}

    monkeypatch.setattr(fidelity, "compute_fidelity_metrics", fake)
    for cuda in (True, False):
        sample_files.score_samples("s.npz", inception_weights="w.pth", cuda=cuda)
        assert seen["cuda"] is cuda


def test_eval_on_cpu_with_bf16(tiny_viar_dirs: tuple[Path, Path], tmp_path: Path) -> None:
    out = tmp_path / "samples.npz"
    rc = main(
        [
            "eval",
            str(tiny_viar_dirs[0]),
            "--vqvae",
            str(tiny_viar_dirs[1]),
            "--per-class",
            "2",
            "--classes",
            "1",
            "2",
            "--batch-size",
            "2",
            "--schedule",
            "constant:2",
            "--out",
            str(out),
            "--device",
            "cpu",
            "--dtype",
            "bf16",
        ]
    )
    assert rc == 0
    with np.load(out) as f:
        assert f["arr_0"].shape[0] == 4 and f["arr_0"].dtype == np.uint8
