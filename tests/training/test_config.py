"""Recipe schema: the two shipped YAMLs validate, overrides, round trips, and bad configs fail loudly through
``load_config`` and through the CLI (exit 2, message on stderr, nothing written)."""

from __future__ import annotations

import dataclasses
import sys
import types
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from deqgen.cli import main
from deqgen.gradients import JFB, SJFB
from deqgen.models.viar.config import PRESETS
from deqgen.training.config import load_config, load_config_text
from deqgen.training.lr_schedule import peak_lr
from deqgen.training.schema import (
    ConfigError,
    TrainConfig,
    config_reference_markdown,
    config_to_yaml,
    parse_override,
)
from deqgen.training.tasks.generation.builders import build_gradient, build_solvers
from deqgen.training.tasks.generation.config import (
    GenerationConfig,
    tokenizer_config,
    transformer_config,
)

RECIPES = Path(__file__).resolve().parents[2] / "recipes"
MNIST = RECIPES / "mnist_cpu.yaml"
IMAGENET = RECIPES / "viar_imagenet.yaml"


# ---- the shipped recipes ------------------------------------------------------------------------------------------


def test_imagenet_recipe_is_viar_d30() -> None:
    cfg = load_config(IMAGENET, check_paths=False, world_size=8)
    m = transformer_config(cfg.model)
    assert m == PRESETS["viar_d30"]
    assert (m.depth, m.width, m.heads, m.implicit.pre_depth, m.implicit.post_depth) == (30, 1920, 30, 5, 5)  # type: ignore[union-attr]
    assert peak_lr(cfg.optim.lr_per_256, cfg.training.global_batch_size) == pytest.approx(1.6e-4)
    assert cfg.grad_accum_steps(8) == 1 and cfg.grad_accum_steps(1) == 8
    assert cfg.warmup_steps(2503) == 27_533 and cfg.total_steps(2503) == 1_376_650
    assert cfg.optim.betas == (0.9, 0.95) and cfg.optim.clip_grad_norm == 2.0
    assert (cfg.optim.weight_decay, cfg.optim.weight_decay_end, cfg.optim.end_ratio) == (0.05, 0.08, 0.01)
    assert cfg.optim.warmup_start_ratio * peak_lr(
        cfg.optim.lr_per_256, cfg.training.global_batch_size
    ) == pytest.approx(8e-7)
    assert build_gradient(cfg) == SJFB(no_grad=(0, 10), with_grad=(1, 12))
    assert (cfg.precision.dtype, cfg.distributed.strategy, cfg.attention.backend) == ("bf16", "ddp", "auto")
    assert "scale_mul" in cfg.optim.no_weight_decay and cfg.model.cond_drop_prob == 0.1


def test_imagenet_tokenizer_is_the_official_vqvae() -> None:
    vqvae = pytest.importorskip("deqgen.models.viar.vqvae")
    cfg = load_config(IMAGENET, check_paths=False)
    assert tokenizer_config(cfg.tokenizer) == vqvae.VQVAE_PRESETS["vae_ch160v4096z32"]


def test_imagenet_recipe_checks_its_placeholder_paths() -> None:
    with pytest.raises(ConfigError) as e:
        load_config(IMAGENET)
    assert "data.root" in str(e.value) and "tokenizer.checkpoint" in str(e.value)
    assert str(IMAGENET) in str(e.value)
    load_config(IMAGENET, check_paths={"checkpoint"})  # resume: auto needs no path


def test_mnist_recipe_builds_viar_and_same_width_var() -> None:
    cfg = load_config(MNIST)
    viar, var = transformer_config(cfg.model), transformer_config(cfg.baseline)
    assert viar.implicit is not None and (viar.implicit.pre_depth, viar.implicit.post_depth) == (1, 1)
    assert var is not None and var.implicit is None
    assert (viar.width, viar.heads, viar.num_classes) == (var.width, var.heads, 10)
    assert build_gradient(cfg) == SJFB(no_grad=(0, 4), with_grad=(1, 4))
    assert build_gradient(cfg, cfg.baseline) is None
    assert build_solvers(cfg) == (None, None)
    assert cfg.precision.dtype == "fp32" and cfg.distributed.backend == "gloo"
    assert cfg.grad_accum_steps(1) == 2 and cfg.grad_accum_steps(2) == 1


def test_mnist_tokenizer_builds() -> None:
    pytest.importorskip("deqgen.models.viar.vqvae")
    tok = tokenizer_config(load_config(MNIST).tokenizer)
    assert (tok.in_channels, tok.patch_nums[-1], tok.vocab_size) == (1, 4, 64)


def _field_defaults(section: type) -> dict[str, object]:
    return {name: f.default for name, f in section.model_fields.items()}  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    "section_name, library",
    [
        ("ModelSection", "TransformerConfig"),
        ("ImplicitSection", "ImplicitSpec"),
        ("TokenizerSection", "VQVAEConfig"),
    ],
)
def test_schema_defaults_equal_the_library_defaults_by_value(section_name: str, library: str) -> None:
    """Every field of the library dataclass is in the schema with the same default value (list or tuple alike)."""
    from deqgen.models.viar import config as viar_config
    from deqgen.models.viar import vqvae
    from deqgen.training.tasks.generation import config as schema

    cls = getattr(viar_config, library, None) or getattr(vqvae, library)
    section = getattr(schema, section_name)
    defaults = _field_defaults(section)
    for f in dataclasses.fields(cls):
        if f.name == "implicit":
            assert defaults["implicit"] is None and cls().implicit is None
            continue
        assert f.name in defaults, f"{section_name} lacks {library}.{f.name}"
        want = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        got = defaults[f.name]
        assert (list(got) if isinstance(got, tuple) else got) == (
            list(want) if isinstance(want, tuple) else want
        ), f"{section_name}.{f.name} defaults to {got!r}, {library} to {want!r}"
    # and a section built from defaults builds the library's default object
    if section_name == "TokenizerSection":
        assert tokenizer_config(section()) == vqvae.VQVAEConfig()
    if section_name == "ModelSection":
        assert transformer_config(section()) == viar_config.TransformerConfig()


def test_nested_sections_reject_unknown_keys() -> None:
    for key in ("model.implicit.pre_dpeth=1", "tokenizer.chmult=[1]", "model.widht=3"):
        with pytest.raises(ConfigError, match="unknown key"):
            load_config(MNIST, [key])
    with pytest.raises(ConfigError, match=r"model\.implicit\.pre_dpeth: unknown key"):
        load_config_text(MNIST.read_text().replace("pre_depth: 1", "pre_dpeth: 1"), check_paths=False)


# ---- overrides, presets, round trip ---------------------------------------------------------------------------------


def test_override_values_are_yaml() -> None:
    assert parse_override("optim.lr_per_256=1e-4") == (("optim", "lr_per_256"), 1e-4)
    assert parse_override("model.patch_nums=[1, 2]") == (("model", "patch_nums"), [1, 2])
    assert parse_override("a.b=null") == (("a", "b"), None)
    assert parse_override("a=true") == (("a",), True)
    assert parse_override("a.b=linear:4:2") == (("a", "b"), "linear:4:2")


def test_overrides_apply_in_order() -> None:
    cfg = load_config(
        MNIST,
        [
            "optim.lr_per_256=1e-4",
            "optim.clip_grad_norm=null",
            "training.max_steps=7",
            "training.max_steps=9",
            "optim.warmup_steps=3",
            "logging.tensorboard=true",
            "solver.eval.name=anderson",
            "solver.eval.options.m=3",
        ],
    )
    assert cfg.optim.lr_per_256 == 1e-4 and cfg.optim.clip_grad_norm is None
    assert cfg.training.max_steps == 9 and cfg.logging.tensorboard is True
    train, ev = build_solvers(cfg)
    assert train is None and type(ev).__name__ == "Anderson" and ev.m == 3  # type: ignore[union-attr]


def test_implicit_null_makes_var_and_other_gradients_build() -> None:
    assert transformer_config(load_config(MNIST, ["model.implicit=null"]).model).implicit is None
    cfg = load_config(MNIST, ["gradient.method=jfb", "gradient.options.k=2"])
    assert build_gradient(cfg) == JFB(k=2)


def test_preset_fills_only_missing_fields() -> None:
    cfg = load_config(IMAGENET, ["model.depth=16"], check_paths=False)
    m = transformer_config(cfg.model)
    assert (m.depth, m.width, m.heads, m.implicit.pre_depth) == (16, 1024, 16, 5)  # type: ignore[union-attr]
    assert m.drop_path_rate == pytest.approx(0.1 * 16 / 24)
    m = transformer_config(load_config(IMAGENET, ["model.implicit.pre_depth=3"], check_paths=False).model)
    assert (m.implicit.pre_depth, m.implicit.post_depth) == (3, 5)  # type: ignore[union-attr]
    assert (
        transformer_config(load_config(IMAGENET, ["model.preset=var_d30"], check_paths=False).model)
        == PRESETS["var_d30"]
    )


@pytest.mark.parametrize("path", [MNIST, IMAGENET])
def test_yaml_round_trip(path: Path) -> None:
    cfg = load_config(path, check_paths=False)
    text = config_to_yaml(cfg)
    again = load_config_text(text, check_paths=False)
    assert again == cfg and config_to_yaml(again) == text


def test_config_is_frozen() -> None:
    cfg = load_config(MNIST)
    with pytest.raises(ValidationError):
        cfg.optim.lr_per_256 = 1.0  # type: ignore[misc]


def test_world_size_checks_divisibility() -> None:
    load_config(IMAGENET, check_paths=False, world_size=4)
    with pytest.raises(ConfigError, match=r"training\.global_batch_size.*64 \* 3 = 192"):
        load_config(IMAGENET, check_paths=False, world_size=3)


def test_reference_markdown_lists_every_field() -> None:
    md = config_reference_markdown(GenerationConfig)
    for path in (
        "optim.lr_per_256",
        "model.implicit.pre_depth",
        "tokenizer.train.steps",
        "checkpoint.resume",
        "precision.dtype",
        "sampling.schedule",
    ):
        assert f"| `{path}` |" in md
    rows = md.strip().splitlines()
    assert all(r.replace("\\|", "").count("|") == 5 for r in rows)
    assert "`'fp32' \\| 'bf16' \\| 'fp16'`" in md


# ---- bad configs -------------------------------------------------------------------------------------------------

# (name, overrides, YAML edits (section -> replacement mapping) or None, substrings the message must contain)
BAD: list[tuple[str, list[str], dict[str, Any] | None, list[str]]] = [
    (
        "unknown top-level key",
        [],
        {"modle": {"depth": 3}},
        ["modle: unknown key", "valid keys here: task,", " model,"],
    ),
    ("unknown nested key", [], {"optim": {"lr": 1e-3}}, ["optim.lr: unknown key", "lr_per_256"]),
    ("wrong type", ["training.max_steps=many"], None, ["training.max_steps", "'many'", "expected int"]),
    ("negative lr", ["optim.lr_per_256=-1e-4"], None, ["optim.lr_per_256", "-0.0001", "greater than 0"]),
    (
        "schedule longer than the pyramid",
        ["sampling.schedule=list:4,4,3,3,2"],
        None,
        ["sampling.schedule", "5 counts", "4 scales"],
    ),
    (
        "S-JFB lo > hi",
        ["model.implicit.train_with_grad=[4,2]"],
        None,
        ["model.implicit", "train_with_grad=(4, 2)", "lo <= hi"],
    ),
    (
        "bad precision literal",
        ["precision.dtype=fp64"],
        None,
        ["precision.dtype", "'fp64'", "'fp32', 'bf16' or 'fp16'"],
    ),
    (
        "batch not divisible",
        ["training.global_batch_size=48"],
        None,
        ["training.global_batch_size", "48", "multiple of 32"],
    ),
    (
        "vocab mismatch",
        ["tokenizer.vocab_size=128"],
        None,
        ["model.vocab_size", "tokenizer.vocab_size = 128"],
    ),
    ("unknown model preset", ["model.preset=viar_d99"], None, ["model.preset", "'viar_d99'", "viar_d30"]),
    (
        "bad override syntax",
        ["optim.lr_per_256"],
        None,
        ["bad override 'optim.lr_per_256'", "dotted.key=value"],
    ),
    (
        "override of an unknown key",
        ["optim.learning_rate=1"],
        None,
        ["'optim.learning_rate'", "valid keys at optim:", "lr_per_256"],
    ),
    (
        "latent side mismatch",
        ["data.image_size=32"],
        None,
        ["data.image_size", "tokenizer.patch_nums[-1] = 4"],
    ),
    (
        "fp16 on CPU",
        ["precision.dtype=fp16"],
        None,
        ["precision.dtype", "fp16 is not supported on device 'cpu'"],
    ),
    ("epochs and max_steps", ["training.epochs=3"], None, ["training.epochs", "exactly one"]),
    (
        "unknown gradient option",
        ["gradient.method=jfb", "gradient.options.kk=1"],
        None,
        ["gradient.options", "'kk'", "valid options"],
    ),
    ("digits with 1000 classes", ["model.num_classes=1000"], None, ["model.num_classes", "10 classes"]),
]


def _write_variant(tmp_path: Path, edits: dict[str, Any] | None) -> Path:
    if edits is None:
        return MNIST
    import yaml

    data = yaml.safe_load(MNIST.read_text())
    data.update(edits)
    if "optim" in edits:
        data["optim"] = {**yaml.safe_load(MNIST.read_text())["optim"], **edits["optim"]}
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.mark.parametrize(("name", "overrides", "edits", "expected"), BAD, ids=[b[0] for b in BAD])
def test_bad_config_fails_loudly(
    name: str, overrides: list[str], edits: dict[str, Any] | None, expected: list[str], tmp_path: Path
) -> None:
    path = _write_variant(tmp_path, edits)
    with pytest.raises(ConfigError) as e:
        load_config(path, overrides, device="cpu")
    message = str(e.value)
    for part in expected:
        assert part in message, f"{part!r} not in:\n{message}"
    if not name.startswith(("bad override", "override of")):
        assert str(path) in message  # the file is named


@pytest.mark.parametrize(("name", "overrides", "edits", "expected"), BAD, ids=[b[0] for b in BAD])
def test_bad_config_cli_exits_2_and_writes_nothing(
    name: str,
    overrides: list[str],
    edits: dict[str, Any] | None,
    expected: list[str],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    path = _write_variant(tmp_path, edits)
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    argv = ["train", "--config", str(path), "--set", f"logging.out_dir={work / 'run'}"]
    for o in overrides:
        argv += ["--set", o]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and expected[0] in err
    assert list(work.iterdir()) == []


def test_missing_and_malformed_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read the config file"):
        load_config(tmp_path / "absent.yaml")
    bad = tmp_path / "broken.yaml"
    bad.write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match=r"broken\.yaml: not valid YAML"):
        load_config(bad)
    bad.write_text("- a list\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(bad)


def test_unknown_tokenizer_preset_lists_presets() -> None:
    pytest.importorskip("deqgen.models.viar.vqvae")
    with pytest.raises(ConfigError, match=r"tokenizer\.preset.*vae_ch160v4096z32"):
        load_config(MNIST, ["tokenizer.preset=vae_huge"])


# ---- CLI dispatch ------------------------------------------------------------------------------------------------


def test_cli_dispatches_a_valid_config(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    seen: dict[str, Any] = {}

    def fake_main(cfg: TrainConfig, *, overwrite: bool = False) -> int:
        seen.update(cfg=cfg, overwrite=overwrite)
        return 0

    monkeypatch.setitem(sys.modules, "deqgen.training.train", types.SimpleNamespace(main=fake_main))
    rc = main(
        [
            "train",
            str(MNIST),
            "--set",
            "training.max_steps=5",
            "--set",
            "optim.warmup_steps=1",
            "--resume",
            "none",
            "--set",
            f"logging.out_dir={tmp_path / 'run'}",
        ]
    )
    assert rc == 0
    assert seen["cfg"].training.max_steps == 5 and seen["cfg"].checkpoint.resume == "none"
    assert seen["overwrite"] is False


def test_cli_usage_errors(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--help"]) == 0
    assert main(["train"]) == 2
    assert "needs a recipe" in capsys.readouterr().err
    assert main(["train", str(MNIST), "--bogus"]) == 2
    assert "unrecognized arguments" in capsys.readouterr().err
    assert main(["train", str(MNIST), "--config", str(IMAGENET)]) == 2
    assert main(["frobnicate"]) == 2


def test_cli_resume_path_is_checked(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    seen: dict[str, Any] = {}
    fake = types.SimpleNamespace(main=lambda c, **kw: seen.update(c=c))
    monkeypatch.setitem(sys.modules, "deqgen.training.train", fake)
    assert main(["train", str(MNIST), "--resume", str(tmp_path / "missing: dir")]) == 2
    assert "checkpoint.resume" in capsys.readouterr().err
    ckpt = tmp_path / "ckpt: 1"
    ckpt.mkdir()
    assert main(["train", str(MNIST), "--resume", str(ckpt)]) == 0
    assert seen["c"].checkpoint.resume == str(ckpt)


def test_imagenet_recipe_builds_viar_d30_with_the_official_parameter_count() -> None:
    import torch

    from deqgen.models.viar.model import build_model
    from deqgen.training.tasks.generation.config import transformer_config

    cfg = load_config(IMAGENET, check_paths=False)
    with torch.device("meta"):
        model = build_model(transformer_config(cfg.model), init=False)
    assert sum(p.numel() for p in model.parameters()) == 770_884_426
