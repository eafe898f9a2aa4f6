"""The ImageNet-folder pipeline (Pillow, no torchvision) and a 2-step ``deqgen train`` on a folder of RGB images
tokenized on the fly by a frozen VQVAE."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

pytest.importorskip("PIL")

from deqgen.data.image_folder import ImageFolder
from deqgen.images import save_grid


def _folder(root: Path, classes: int = 2, per_class: int = 4, size: tuple[int, int] = (80, 72)) -> Path:
    g = torch.Generator().manual_seed(0)
    for c in range(classes):
        for i in range(per_class):
            img = torch.rand(1, 3, size[1], size[0], generator=g)
            img[:, c % 3] = 1.0  # class c has channel c saturated
            save_grid(root / "train" / f"class{c}" / f"{i}.png", img, nrow=1, pad=0)
    (root / "train" / "class0" / "notes.txt").write_text("not an image")
    return root


def test_pipeline_resizes_crops_and_scales(tmp_path: Path) -> None:
    root = _folder(tmp_path)
    ds = ImageFolder(root / "train", image_size=64, resize_shorter_side=68, seed=3)
    assert ds.classes == ["class0", "class1"] and len(ds) == 8 and list(ds.labels) == [0] * 4 + [1] * 4
    x, label = ds[5]
    assert x.shape == (3, 64, 64) and x.dtype == torch.float32 and label == 1
    assert -1.0 <= float(x.min()) and float(x.max()) <= 1.0
    assert float(x[1].mean()) > 0.9  # the saturated green channel survives resize and crop
    assert torch.equal(ds[5][0], x)  # the crop depends on (seed, epoch, index) only
    ds.set_epoch(1)
    assert not torch.equal(ds[5][0], x)
    val = ImageFolder(root / "train", image_size=64, resize_shorter_side=68, random_crop=False)
    assert torch.equal(val[5][0], val[5][0])


def test_missing_or_empty_folder_is_named(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ImageFolder(tmp_path / "nope")
    (tmp_path / "empty" / "a").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="no class sub-folders with images"):
        ImageFolder(tmp_path / "empty")


def test_train_on_an_image_folder_with_a_frozen_tokenizer(tmp_path: Path) -> None:
    from deqgen.models.viar.convert import save_converted
    from deqgen.models.viar.vqvae import VQVAE_PRESETS, MultiScaleVQVAE
    from deqgen.training.config import load_config_text
    from deqgen.training.train import run

    root = _folder(tmp_path / "data")
    vae = MultiScaleVQVAE(VQVAE_PRESETS["vae_tiny"])
    vae.init_weights(torch.Generator().manual_seed(0))
    tok = save_converted(tmp_path / "vae", vae.state_dict(), "vqvae", vae.config)
    text = f"""
model: {{preset: viar_tiny, num_classes: 2}}
tokenizer: {{preset: vae_tiny, checkpoint: {tok}}}
data: {{kind: imagenet_folder, root: {root}, image_size: 64, resize_shorter_side: 72, num_workers: 0}}
optim: {{warmup_steps: 1}}
training: {{global_batch_size: 4, micro_batch_size: 2, max_steps: 2}}
logging: {{out_dir: {tmp_path / "run"}, log_every_n_steps: 1, progress_bar: false}}
sampling: {{samples_per_class: 1, top_k: 0, top_p: 0.0}}
"""
    (result,) = run(load_config_text(text, device="cpu"))
    assert result.steps == 2 and (tmp_path / "run" / "viar" / "model.safetensors").is_file()
    assert (tmp_path / "run" / "grid.png").read_bytes()[:4] == b"\x89PNG"


class _Interrupted(Exception):
    pass


class _Breaks(torch.utils.data.Dataset):  # type: ignore[type-arg]
    """The wrapped dataset, raising at index ``at`` (an interrupted pre-tokenization)."""

    def __init__(self, inner: torch.utils.data.Dataset, at: int) -> None:  # type: ignore[type-arg]
        self.inner, self.at = inner, at

    def __len__(self) -> int:
        return len(self.inner)  # type: ignore[arg-type]

    def __getitem__(self, i: int):  # type: ignore[no-untyped-def]
        if i == self.at:
            raise _Interrupted
        return self.inner[i]


def test_pretokenized_folder_resumes_and_trains(tmp_path: Path) -> None:
    from deqgen.models.viar.convert import save_converted
    from deqgen.models.viar.vqvae import VQVAE_PRESETS, MultiScaleVQVAE
    from deqgen.training.tasks.generation.tokens import PretokenizedDataset, tokenize, write_pretokenized

    root = _folder(tmp_path / "data", per_class=6)
    vae = MultiScaleVQVAE(VQVAE_PRESETS["vae_tiny"])
    vae.init_weights(torch.Generator().manual_seed(0))
    ds = ImageFolder(root / "train", image_size=64, resize_shorter_side=72, random_crop=False)
    out = tmp_path / "tokens"
    with pytest.raises(_Interrupted):
        write_pretokenized(out, vae, _Breaks(ds, 9), batch_size=2, flush_every=1)
    assert not out.exists() and (tmp_path / "tokens.partial").is_dir()
    rows: list[int] = []
    write_pretokenized(out, vae, ds, batch_size=2, flush_every=1, progress=rows.append)
    assert rows[0] == 10 and rows[-1] == 12  # continued after the 4 flushed batches (8 rows) ... of 12
    expected = tokenize(vae, torch.stack([ds[i][0] for i in range(len(ds))]))
    got = PretokenizedDataset(out, vae)
    assert len(got) == 12 and torch.equal(torch.stack([got[i][0] for i in range(12)]), expected)
    assert [int(got[i][1]) for i in range(12)] == list(ds.labels)
    with pytest.raises(FileExistsError):
        write_pretokenized(out, vae, ds)
    other = MultiScaleVQVAE(VQVAE_PRESETS["vae_tiny"])
    other.init_weights(torch.Generator().manual_seed(1))
    with pytest.raises(ValueError, match="another tokenizer"):
        PretokenizedDataset(out, other)

    from deqgen.training.config import load_config_text
    from deqgen.training.train import run

    tok = save_converted(tmp_path / "vae", vae.state_dict(), "vqvae", vae.config)
    text = f"""
model: {{preset: viar_tiny, num_classes: 2}}
tokenizer: {{preset: vae_tiny, checkpoint: {tok}}}
data: {{kind: imagenet_folder, root: {root}, image_size: 64, resize_shorter_side: 72, pretokenized: {out}}}
optim: {{warmup_steps: 1}}
training: {{global_batch_size: 4, micro_batch_size: 2, max_steps: 2}}
logging: {{out_dir: {tmp_path / "run"}, log_every_n_steps: 1, progress_bar: false}}
sampling: {{samples_per_class: 1, top_k: 0, top_p: 0.0}}
"""
    (result,) = run(load_config_text(text, device="cpu"))
    assert result.steps == 2


def test_pretokenize_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from deqgen.cli import main
    from deqgen.models.viar.convert import save_converted
    from deqgen.models.viar.vqvae import VQVAE_PRESETS, MultiScaleVQVAE
    from deqgen.training.tasks.generation.tokens import PretokenizedDataset

    root = _folder(tmp_path / "data")
    vae = MultiScaleVQVAE(VQVAE_PRESETS["vae_tiny"])
    vae.init_weights(torch.Generator().manual_seed(0))
    tok = save_converted(tmp_path / "vae", vae.state_dict(), "vqvae", vae.config)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"""
model: {{preset: viar_tiny, num_classes: 2}}
tokenizer: {{preset: vae_tiny, checkpoint: {tok}}}
data: {{kind: imagenet_folder, root: {root}, image_size: 64, resize_shorter_side: 72}}
optim: {{warmup_steps: 1}}
training: {{global_batch_size: 4, micro_batch_size: 2, max_steps: 2}}
""")
    out = tmp_path / "tokens"
    assert main(["pretokenize", str(recipe), "--out", str(out), "--batch-size", "3"]) == 0
    assert len(PretokenizedDataset(out, vae)) == 8
    assert main(["pretokenize", str(recipe), "--out", str(out)]) == 2  # exists: refused, nothing touched
    assert "exists" in capsys.readouterr().err
    assert (
        main(["pretokenize", str(recipe), "--out", str(tmp_path / "t2"), "--set", "data.image_size=60"]) == 2
    )
    assert not (tmp_path / "t2").exists()
