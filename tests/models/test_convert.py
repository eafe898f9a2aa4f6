"""Official checkpoint conversion: key table, round trip, clear errors that load and write nothing."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from deqgen.models.viar.config import preset
from deqgen.models.viar.convert import (
    CheckpointError,
    convert_checkpoint,
    convert_transformer,
    infer_transformer_config,
    load_converted,
    read_official,
    to_official_transformer,
)
from deqgen.models.viar.model import build_model

# Generated from the official classes on the meta device (see the file's header line).
TSV = Path(__file__).resolve().parents[1] / "data" / "var_viar_state_dict_keys.tsv"


def _tsv(model: str) -> dict[str, tuple[int, ...]]:
    rows = {}
    for line in TSV.read_text().splitlines():
        if line.startswith("#") or not line.strip():
            continue
        m, key, shape = line.split("\t")
        if m == model:
            rows[key] = tuple(int(s) for s in shape.split("x"))
    return rows


@pytest.mark.parametrize(("name", "table"), [("var_d30", "var_d30"), ("viar_d30", "viar_d30")])
def test_official_layout_equals_the_key_table(name: str, table: str) -> None:
    with torch.device("meta"):
        m = build_model(name, init=False)
    got = {k: tuple(v.shape) for k, v in to_official_transformer(m).items()}
    assert got == _tsv(table)


def _tiny_official(table: str, name: str, seed: int = 0) -> dict[str, torch.Tensor]:
    """A tiny state dict in the official layout: the d30 key table's keys and shapes, scaled down."""
    cfg = preset(name)
    C, H, L, K = cfg.width, cfg.heads, cfg.seq_len, cfg.num_scales
    dims = {
        1920: C,
        3840: 2 * C,
        5760: 3 * C,
        7680: 4 * C,
        11520: 6 * C,
        30: H,
        680: L,
        10: K,
        1001: cfg.num_classes + 1,
        4096: cfg.vocab_size,
        32: cfg.z_channels,
        1: 1,
    }
    counts = (
        {"blocks": cfg.depth}
        if cfg.implicit is None
        else {"pre_blocks": cfg.implicit.pre_depth, "post_blocks": cfg.implicit.post_depth}
    )
    g = torch.Generator().manual_seed(seed)
    out: dict[str, torch.Tensor] = {}
    for key, shape in _tsv(table).items():
        m = re.match(r"^(blocks|pre_blocks|post_blocks)\.0\.(.*)$", key)
        if re.match(r"^(blocks|pre_blocks|post_blocks)\.[1-9]", key):
            continue
        keys = [f"{m.group(1)}.{i}.{m.group(2)}" for i in range(counts[m.group(1)])] if m else [key]
        for k in keys:
            sh = tuple(dims[s] for s in shape)
            if k.endswith("zero_k_bias"):
                out[k] = torch.zeros(sh)
            elif k == "lvl_1L":
                out[k] = torch.cat([torch.full((p * p,), i) for i, p in enumerate(cfg.patch_nums)])[None]
            elif k == "attn_bias_for_masking":
                lv = out["lvl_1L"][0]
                out[k] = torch.where(lv[:, None] >= lv[None], 0.0, float("-inf"))[None, None]
            else:
                out[k] = torch.randn(sh, generator=g)
    return out


@pytest.mark.parametrize(("table", "name"), [("var_d30", "var_tiny"), ("viar_d30", "viar_tiny")])
def test_round_trip_of_a_tiny_official_state_dict(table: str, name: str, tmp_path: Path) -> None:
    official = _tiny_official(table, name)
    cfg = infer_transformer_config(official, patch_nums=preset(name).patch_nums)
    assert (cfg.width, cfg.heads, cfg.implicit is None) == (64, 2, name == "var_tiny")
    path = tmp_path / "official.pth"
    torch.save(official, path)
    out = convert_checkpoint(path, tmp_path / "converted", patch_nums=cfg.patch_nums)
    model = load_converted(out)
    back = to_official_transformer(model)
    assert set(back) == set(official)
    for k in official:
        assert torch.equal(back[k], official[k]), k
    # the converted model computes what a model holding the same tensors computes
    direct = build_model(cfg, init=False)
    direct.load_state_dict(convert_transformer(official, cfg)[0])
    labels, feats = torch.tensor([0, 3]), torch.randn(2, cfg.seq_len - 1, cfg.z_channels)
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(labels, feats)[0], direct.eval()(labels, feats)[0])


def test_wrapped_and_ddp_prefixed_checkpoints_are_unwrapped(tmp_path: Path) -> None:
    sd = _tiny_official("var_d30", "var_tiny")
    path = tmp_path / "ckpt.pth"
    torch.save({"trainer": {"var_wo_ddp": {f"module.{k}": v for k, v in sd.items()}}, "epoch": 3}, path)
    assert set(read_official(path)) == set(sd)


@pytest.mark.parametrize("defect", ["shape", "missing", "unexpected"])
def test_bad_checkpoint_names_keys_and_writes_nothing(defect: str, tmp_path: Path) -> None:
    sd = _tiny_official("viar_d30", "viar_tiny")
    if defect == "shape":
        sd["implicit_block.ffn.fc1.weight"] = torch.zeros(3, 3)
        expect = r"implicit_block\.ffn\.fc1\.weight|trunk\.implicit\.f\.block\.ffn\.fc1\.weight: checkpoint \(3, 3\)"
    elif defect == "missing":
        del sd["post_blocks.0.attn.proj.bias"]
        expect = r"missing keys \(1\): \['trunk\.post_blocks\.0\.attn\.proj\.bias'\]"
    else:
        sd["extra_thing.weight"] = torch.zeros(2)
        expect = r"unexpected keys \(1\): \['extra_thing\.weight'\]"
    path = tmp_path / "bad.pth"
    torch.save(sd, path)
    with pytest.raises(CheckpointError, match=expect):
        convert_checkpoint(path, tmp_path / "out", patch_nums=preset("viar_tiny").patch_nums)
    assert not (tmp_path / "out").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["bad.pth"]


class _NotATensor:
    pass


def test_non_tensor_pickle_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "evil.pth"
    torch.save({"weight": torch.zeros(1), "obj": _NotATensor()}, path)
    with pytest.raises(
        CheckpointError, match=r"evil\.pth: cannot be read with torch\.load\(weights_only=True\)"
    ):
        convert_checkpoint(path, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_missing_file_and_unknown_layout(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="not found"):
        read_official(tmp_path / "nope.pth")
    path = tmp_path / "other.pth"
    torch.save({"fc.weight": torch.zeros(2, 2)}, path)
    with pytest.raises(CheckpointError, match="cannot tell the model kind"):
        convert_checkpoint(path, tmp_path / "out")


def test_a_truncated_converted_file_gives_a_clear_error(tmp_path: Path) -> None:
    sd_model = build_model("var_tiny")
    from deqgen.models.viar.convert import save_converted

    out = save_converted(tmp_path / "c", sd_model.state_dict(), "var", sd_model.cfg)
    f = out / "model.safetensors"
    f.write_bytes(f.read_bytes()[:100])
    with pytest.raises(CheckpointError, match=r"model\.safetensors: unreadable"):
        load_converted(out)


FIXTURE = Path(__file__).resolve().parents[1] / "data" / "var_vqvae_tiny.pt"


def test_official_tiny_vqvae_converts_and_reproduces_its_tokens(tmp_path: Path) -> None:
    fx = torch.load(FIXTURE, weights_only=True)
    torch.save(fx["state_dict"], tmp_path / "vae.pth")
    out = convert_checkpoint(tmp_path / "vae.pth", tmp_path / "vae", patch_nums=(1, 2, 3, 4))
    vae = load_converted(out).eval()
    cfg = vae.config
    assert (cfg.ch, cfg.vocab_size, cfg.z_channels, cfg.ch_mult, cfg.share_quant_resi) == (
        32,
        64,
        8,
        (1, 1, 2, 2, 4),
        4,
    )
    with torch.no_grad():
        got = vae.img_to_indices(fx["images"])
    for a, b in zip(got, fx["idx_Bl"]):
        assert torch.equal(a, b)


def test_vqvae_layout_with_official_counts() -> None:
    from deqgen.models.viar.convert import infer_vqvae_config
    from deqgen.models.viar.vqvae import VQVAE_PRESETS, MultiScaleVQVAE

    with torch.device("meta"):
        sd = MultiScaleVQVAE(VQVAE_PRESETS["vae_ch160v4096z32"]).state_dict()
    assert {k: tuple(v.shape) for k, v in sd.items()} == _tsv("vae_ch160v4096z32")
    assert infer_vqvae_config(sd) == VQVAE_PRESETS["vae_ch160v4096z32"]
