"""``deqgen --version``, help text with shown defaults on sample/edit/convert, ``convert --slim``, and the
null class refused by ``sample --classes``."""

from __future__ import annotations

import argparse
import sys
import types
from pathlib import Path

import pytest
import torch

import deqgen
from deqgen.cli import build_parser, main
from deqgen.models.viar.config import preset
from deqgen.models.viar.convert import load_converted, to_official_transformer
from deqgen.models.viar.model import build_model


def _subparser(name: str) -> argparse.ArgumentParser:
    ap = build_parser()
    (sub,) = [a for a in ap._actions if isinstance(a, argparse._SubParsersAction)]
    return sub.choices[name]


def test_version_prints_the_package_version(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"deqgen {deqgen.__version__}"


@pytest.mark.parametrize("cmd", ["sample", "edit", "convert"])
def test_every_flag_has_help_and_its_default_is_shown(cmd: str) -> None:
    p = _subparser(cmd)
    assert p.formatter_class is argparse.ArgumentDefaultsHelpFormatter
    text = p.format_help()
    for action in p._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        assert action.help, f"deqgen {cmd} {action.option_strings or action.dest} has no help text"
        if action.option_strings and not action.required:
            assert f"(default: {action.default})" in " ".join(text.split()), (cmd, action.dest)


def test_sample_refuses_the_null_class(
    tiny_viar_dirs: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    num_classes = load_converted(tiny_viar_dirs[0]).num_classes
    out = tmp_path / "grid.png"
    rc = main(
        [
            "sample",
            str(tiny_viar_dirs[0]),
            "--vqvae",
            str(tiny_viar_dirs[1]),
            "--classes",
            str(num_classes),
            "--out",
            str(out),
        ]
    )
    assert rc == 2 and not out.exists()
    assert f"--classes {num_classes}" in capsys.readouterr().err


def test_convert_slim_reads_an_official_training_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """An ``ar-ckpt`` with a pickled ``utils.arg_util.Args`` (the official code is not importable when it is
    read): refused without ``--slim``, converted with it, and equal to the model that was saved."""
    pkg, mod = types.ModuleType("utils"), types.ModuleType("utils.arg_util")
    mod.Args = type("Args", (), {"__module__": "utils.arg_util", "__qualname__": "Args"})  # type: ignore[attr-defined]
    pkg.arg_util = mod  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "utils", pkg)
    monkeypatch.setitem(sys.modules, "utils.arg_util", mod)
    m = build_model("var_tiny", generator=torch.Generator().manual_seed(2))
    src = tmp_path / "ar-ckpt-last.pth"
    args = mod.Args()  # type: ignore[attr-defined]
    args.depth = 16
    torch.save({"trainer": {"var_wo_ddp": to_official_transformer(m)}, "args": args}, src)
    monkeypatch.delitem(sys.modules, "utils.arg_util")
    monkeypatch.delitem(sys.modules, "utils")

    pn = [str(p) for p in preset("var_tiny").patch_nums]
    assert main(["convert", str(src), str(tmp_path / "plain"), "--patch-nums", *pn]) == 2
    assert "--slim" in capsys.readouterr().err and not (tmp_path / "plain").exists()
    assert main(["convert", "--slim", str(src), str(tmp_path / "out"), "--patch-nums", *pn]) == 0
    got = load_converted(tmp_path / "out").state_dict()
    assert set(got) == set(m.state_dict())
    assert all(torch.equal(got[k], v) for k, v in m.state_dict().items())
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "ar-ckpt-last.pth",
        "out",
    ]  # no slim file left behind


def test_eval_names_the_cli_flag_for_missing_inception_weights(
    tiny_viar_dirs: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "s.npz"
    rc = main(
        [
            "eval",
            str(tiny_viar_dirs[0]),
            "--vqvae",
            str(tiny_viar_dirs[1]),
            "--per-class",
            "1",
            "--out",
            str(out),
            "--inception-weights",
            str(tmp_path / "missing.pth"),
        ]
    )
    err = capsys.readouterr().err
    assert rc == 2 and not out.exists()
    assert (
        "--inception-weights /path/to/weights-inception" in err
        and "feature_extractor_weights_path" not in err
    )


def test_eval_out_help_names_the_shard_folder_the_code_uses() -> None:
    from deqgen.evaluation.sample_files import shard_dir_for

    help_text = " ".join(_subparser("eval").format_help().split())
    assert (
        shard_dir_for("samples.npz").name == "samples_shards" and "samples.npz: samples_shards/" in help_text
    )
