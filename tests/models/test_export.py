"""Converted directories: config round trips, destinations that never lose user files, permissions, the
model card, from_pretrained, and slim loading of official training checkpoints that pickle their args."""

from __future__ import annotations

import json
import os
import pickle
import stat
import sys
import types
from pathlib import Path

import pytest
import torch

from deqgen.models.viar.config import PRESETS, ImplicitSpec, TransformerConfig, preset
from deqgen.models.viar.convert import (
    CheckpointError,
    convert_checkpoint,
    from_pretrained,
    load_converted,
    read_official,
    slim_checkpoint,
    to_official_transformer,
)
from deqgen.models.viar.export import config_from_dict, is_conversion, save_converted
from deqgen.models.viar.model import build_model
from deqgen.models.viar.vqvae import VQVAE_PRESETS, VQVAEConfig

TINY_PN = preset("var_tiny").patch_nums

# ---------------------------------------------------------------------------------------- config round trip


def test_configs_built_from_lists_equal_those_built_from_tuples() -> None:
    lists: dict = {"train_no_grad": [0, 10], "train_with_grad": [1, 12]}
    assert ImplicitSpec(**lists) == ImplicitSpec()
    pn: dict = {"patch_nums": [1, 2, 3]}
    assert TransformerConfig(**pn) == TransformerConfig(patch_nums=(1, 2, 3))
    vq: dict = {"ch_mult": [1, 2], "patch_nums": [1, 2]}
    assert VQVAEConfig(**vq) == VQVAEConfig(ch_mult=(1, 2), patch_nums=(1, 2))
    spec = {"pre_depth": 1, "post_depth": 1, "train_no_grad": [0, 2]}
    assert TransformerConfig(depth=4, implicit=spec) == TransformerConfig(  # type: ignore[arg-type]
        depth=4, implicit=ImplicitSpec(pre_depth=1, post_depth=1, train_no_grad=(0, 2))
    )


@pytest.mark.parametrize("name", [*PRESETS, *VQVAE_PRESETS])
def test_every_preset_saves_and_loads_back_equal(name: str, tmp_path: Path) -> None:
    """save_converted writes config.json (JSON turns tuples into lists); read back, the config is equal."""
    if name in PRESETS:
        cfg, kind = PRESETS[name], "var" if PRESETS[name].implicit is None else "viar"
    else:
        cfg, kind = VQVAE_PRESETS[name], "vqvae"
    out = save_converted(tmp_path / name, {}, kind, cfg)  # the config alone; weights are tested below
    meta = json.loads((out / "config.json").read_text())
    back = config_from_dict(meta["kind"], meta["config"])
    assert back == cfg and hash(back) == hash(cfg)


def test_a_tiny_model_round_trips_with_its_config(tmp_path: Path) -> None:
    m = build_model("viar_tiny", generator=torch.Generator().manual_seed(0))
    out = save_converted(tmp_path / "m", m.state_dict(), "viar", m.cfg)
    back = load_converted(out)
    assert back.cfg == m.cfg
    for k, v in m.state_dict().items():
        assert torch.equal(back.state_dict()[k], v), k


# ---------------------------------------------------------------------------------------- destinations


def _official_file(tmp_path: Path) -> Path:
    m = build_model("var_tiny", generator=torch.Generator().manual_seed(1))
    path = tmp_path / "src" / "good.pth"
    path.parent.mkdir()
    torch.save(to_official_transformer(m), path)
    return path


def test_a_directory_with_other_files_is_refused_and_left_alone(tmp_path: Path) -> None:
    src = _official_file(tmp_path)
    dst = tmp_path / "my_models"
    dst.mkdir()
    (dst / "notes.txt").write_text("mine")
    (dst / "other_model").mkdir()
    msg = r"already holds other files \(notes\.txt, other_model\).*never"
    with pytest.raises(CheckpointError, match=msg):
        convert_checkpoint(src, dst, patch_nums=TINY_PN)
    assert sorted(p.name for p in dst.iterdir()) == ["notes.txt", "other_model"]
    assert (dst / "notes.txt").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["my_models", "src"]  # no temp left behind


def test_new_empty_and_previous_conversion_destinations(tmp_path: Path) -> None:
    src = _official_file(tmp_path)
    new = convert_checkpoint(src, tmp_path / "new" / "var", patch_nums=TINY_PN)
    assert is_conversion(new)
    empty = tmp_path / "empty"
    empty.mkdir()
    convert_checkpoint(src, empty, patch_nums=TINY_PN)
    assert sorted(p.name for p in empty.iterdir()) == ["README.md", "config.json", "model.safetensors"]
    again = convert_checkpoint(src, new, patch_nums=TINY_PN)  # over a previous conversion
    assert is_conversion(again) and load_converted(again).cfg == load_converted(empty).cfg
    (tmp_path / "a_file").write_text("x")
    with pytest.raises(CheckpointError, match="is a file"):
        convert_checkpoint(src, tmp_path / "a_file", patch_nums=TINY_PN)


def test_dot_as_destination(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    src = _official_file(tmp_path)
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    convert_checkpoint(src, ".", patch_nums=TINY_PN)  # an empty current directory is fine
    assert is_conversion(work) and Path.cwd() == work
    convert_checkpoint(src, ".", patch_nums=TINY_PN)  # and so is a previous conversion there
    monkeypatch.chdir(src.parent)
    with pytest.raises(CheckpointError, match=r"already holds other files \(good\.pth\)"):
        convert_checkpoint(src, ".", patch_nums=TINY_PN)  # the directory holding the source is refused
    assert [p.name for p in src.parent.iterdir()] == ["good.pth"]


def test_a_non_tensor_entry_is_named(tmp_path: Path) -> None:
    path = tmp_path / "odd.pth"
    torch.save({"head.weight": torch.zeros(2), "step": 5, "note": "x"}, path)
    with pytest.raises(CheckpointError, match=r"not tensors: step \(int\), note \(str\)"):
        convert_checkpoint(path, tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.skipif(os.name != "posix", reason="POSIX permission bits")
def test_converted_files_get_the_umask_permissions(tmp_path: Path) -> None:
    src = _official_file(tmp_path)
    old = os.umask(0o022)
    try:
        out = convert_checkpoint(src, tmp_path / "out", patch_nums=TINY_PN)
    finally:
        os.umask(old)
    assert stat.S_IMODE(out.stat().st_mode) == 0o755
    assert {p.name: stat.S_IMODE(p.stat().st_mode) for p in out.iterdir()} == {
        "README.md": 0o644,
        "config.json": 0o644,
        "model.safetensors": 0o644,
    }


# ---------------------------------------------------------------------------------- card and from_pretrained


def test_model_card_and_from_pretrained(tmp_path: Path) -> None:
    src = _official_file(tmp_path)
    out = convert_checkpoint(src, tmp_path / "var_tiny", patch_nums=TINY_PN)
    card = (out / "README.md").read_text()
    m = load_converted(out)
    n = sum(p.numel() for p in m.parameters())
    assert f"| parameters | {n:,} |" in card and "| source | good.pth |" in card and "| licence |" in card
    assert '"embed_dim": 64' in card
    model = from_pretrained(out / "config.json")
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    labels, feats = torch.tensor([1]), torch.randn(1, m.cfg.seq_len - 1, m.cfg.z_channels)
    with torch.no_grad():
        assert torch.equal(model(labels, feats)[0], m.eval()(labels, feats)[0])
    with pytest.raises(CheckpointError, match="not a converted model directory.*deqgen convert"):
        from_pretrained(tmp_path / "src")


# -------------------------------------------------------------------------------------------- slim loading


def _pickle_with_args(tmp_path: Path, args_obj_factory) -> Path:  # type: ignore[no-untyped-def]
    """An official-style ar-ckpt: the model under trainer/var_wo_ddp plus a pickled args object whose class
    lives in a module (``utils.arg_util``) that exists only while saving, as on the official machine."""
    m = build_model("var_tiny", generator=torch.Generator().manual_seed(2))
    path = tmp_path / "ar-ckpt-last.pth"
    ckpt = {"trainer": {"var_wo_ddp": to_official_transformer(m)}, "epoch": 3, "args": args_obj_factory()}
    torch.save(ckpt, path)
    return path


class _FakeArgs:
    def __init__(self) -> None:
        self.depth, self.tblr, self.data_path = 16, 1e-4, "/data/imagenet"


@pytest.fixture
def official_args_module(monkeypatch: pytest.MonkeyPatch):  # type: ignore[no-untyped-def]
    pkg, mod = types.ModuleType("utils"), types.ModuleType("utils.arg_util")
    pkg.arg_util = mod  # type: ignore[attr-defined]
    cls = type("Args", (_FakeArgs,), {"__module__": "utils.arg_util", "__qualname__": "Args"})
    mod.Args = cls  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "utils", pkg)
    monkeypatch.setitem(sys.modules, "utils.arg_util", mod)
    return cls


@pytest.mark.parametrize("which", ["official_args", "namespace"])
def test_slim_loading_accepts_the_pickled_args_object(  # type: ignore[no-untyped-def]
    which: str, tmp_path: Path, official_args_module, monkeypatch: pytest.MonkeyPatch
) -> None:
    import argparse

    factory = official_args_module if which == "official_args" else (lambda: argparse.Namespace(depth=16))
    path = _pickle_with_args(tmp_path, factory)
    monkeypatch.delitem(sys.modules, "utils.arg_util")  # the official code is not importable here
    monkeypatch.delitem(sys.modules, "utils")
    which_cls = "utils.arg_util.Args" if which == "official_args" else "argparse.Namespace"
    msg = rf"pickles the object {which_cls}, which is not allowed.*allow_args=True \(`deqgen convert --slim`"
    with pytest.raises(CheckpointError, match=msg):
        read_official(path)
    sd = read_official(path, allow_args=True)
    slim = slim_checkpoint(path, tmp_path / "slim.pth")
    assert set(read_official(slim)) == set(sd)  # the slim file needs no allow-list
    out = convert_checkpoint(slim, tmp_path / "out", patch_nums=TINY_PN)
    assert is_conversion(out)
    direct = convert_checkpoint(path, tmp_path / "direct", patch_nums=TINY_PN, allow_args=True, licence="MIT")
    assert "| licence | MIT |" in (direct / "README.md").read_text()
    assert load_converted(direct).cfg == load_converted(out).cfg


class _Payload:
    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (os.system, (f"touch {_Payload.marker}",))

    marker = ""


def test_slim_loading_refuses_a_code_payload(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    _Payload.marker = str(marker)
    path = tmp_path / "ar-ckpt-evil.pth"
    with open(path, "wb") as fh:  # a legacy pickle, to show the refusal does not depend on the zip format
        pickle.dump({"trainer": {"var_wo_ddp": {"w": torch.zeros(1)}}, "args": _Payload()}, fh)
    for allow in (False, True):
        with pytest.raises(CheckpointError, match="cannot be read with torch.load"):
            read_official(path, allow_args=allow)
    torch.save({"trainer": {"var_wo_ddp": {"w": torch.zeros(1)}}, "args": _Payload()}, tmp_path / "zip.pth")
    with pytest.raises(CheckpointError, match="cannot be read with torch.load"):
        read_official(tmp_path / "zip.pth", allow_args=True)
    assert not marker.exists()
