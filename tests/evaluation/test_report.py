"""deqgen report on a tiny CPU demo run: report.md, plots and numbers that can be checked independently."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

pytest.importorskip("matplotlib")
pytest.importorskip("mlxtend")

from deqgen.cli import main
from deqgen.evaluation.convergence import convergence_curves, solver_gap
from deqgen.kv_cache import IterationKeyedCache
from deqgen.models.viar.model import build_model
from deqgen.models.viar.schedules import parse_schedule
from deqgen.models.viar.trunk import ImplicitInput
from deqgen.models.viar.vqvae import VQVAE_PRESETS, MultiScaleVQVAE
from deqgen.training.config import load_config
from tests.test_digits_demo import demo_argv

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("digits")
    assert main(demo_argv(out)) == 0
    return out


@pytest.fixture(scope="module")
def report(demo_run: Path) -> Path:
    assert main(["report", str(demo_run), "--quick"]) == 0
    return demo_run / "report"


def test_report_has_its_sections_plots_and_the_measured_numbers(report: Path) -> None:
    """The markdown carries what report.json measured (not only the paper's quoted constants)."""
    text = (report / "report.md").read_text()
    for heading in (
        "## 1. VIAR vs the same-width VAR",
        "## 2. Training step: memory and time",
        "## 3. Quality against throughput",
        "## 4. Convergence of the implicit block",
    ):
        assert heading in text
    data = json.loads((report / "report.json").read_text())
    rows = {r["label"]: r for r in data["sweep"]}
    viar = rows[f"VIAR {data['sampling']['schedule']}"]
    measured = [
        f"{data['parameters']['viar']:,}",
        f"{data['parameters']['var']:,}",
        f"{viar['class_accuracy']:.3f}",
        f"{viar['feature_fid']:.2f}",
        f"{rows['VAR']['feature_fid']:.2f}",
        f"{viar['images_per_second']:.1f}",
        f"{data['machine']['cpu_count']} CPU cores",
    ]
    for number in measured:
        assert number in text, number
    for png in ("training_memory.png", "quality_vs_throughput.png", "convergence.png"):
        assert (report / png).read_bytes()[:8] == PNG and f"({png})" in text
    assert (report / "heldout_digits.npz").stat().st_size > 0


def test_report_reads_the_runs_own_config(report: Path, demo_run: Path) -> None:
    """Sampler settings come from the run's config.yaml (the recipe's values, not the schema defaults)."""
    cfg = load_config(demo_run / "config.yaml", check_paths=False, world_size=1)
    data = json.loads((report / "report.json").read_text())
    s = cfg.sampling
    assert data["sampling"] == {
        "schedule": s.schedule,
        "cfg_scale": s.cfg_scale,
        "top_k": s.top_k,
        "top_p": s.top_p,
        "seed": s.seed,
    }
    assert s.schedule == "linear:4:2"  # the recipe's, which differs from the schema default
    assert f"VIAR {s.schedule}" in {r["label"] for r in data["sweep"]}


def test_kv_bytes_match_the_cache_layout(report: Path, demo_run: Path) -> None:
    """KV bytes per image from the layer count, tokens per scale and iterations, computed by hand."""
    data = json.loads((report / "report.json").read_text())
    cfg = json.loads((demo_run / "viar" / "config.json").read_text())["config"]
    var_cfg = json.loads((demo_run / "var" / "config.json").read_text())["config"]
    pn, C = cfg["patch_nums"], cfg["embed_dim"]
    L = sum(p * p for p in pn)
    per_token_layer = 2 * 2 * C * 4  # K and V, guided pair of rows, float32
    rows = {r["label"]: r for r in data["sweep"]}
    assert rows["VAR"]["kv_bytes_per_image"] == var_cfg["depth"] * L * per_token_layer
    sched = data["sampling"]["schedule"]
    ks = parse_schedule(sched).iterations(len(pn))
    explicit = (cfg["implicit"]["pre_depth"] + cfg["implicit"]["post_depth"]) * L
    assert rows[f"VIAR {sched} lean cache"]["kv_bytes_per_image"] == (explicit + L) * per_token_layer
    implicit = sum(k * p * p for k, p in zip(ks, pn))
    assert rows[f"VIAR {sched}"]["kv_bytes_per_image"] == (explicit + implicit) * per_token_layer
    assert rows["VIAR constant:4"]["iterations_per_scale"] == [4.0] * len(pn)
    assert rows["VAR"]["iterations_per_scale"] == [0.0] * len(pn)


def test_training_memory_is_flat_for_deqgen_and_grows_for_the_official_pattern(report: Path) -> None:
    data = json.loads((report / "report.json").read_text())
    by = {(m["impl"], m["k1"]): m["autograd_mb"] for m in data["memory"]}
    assert by[("deqgen", 4)] == pytest.approx(by[("deqgen", 0)], rel=0.02)
    assert by[("official", 0)] == pytest.approx(by[("deqgen", 0)], rel=0.02)  # same step when k1 = 0
    assert by[("official", 4)] > 1.5 * by[("deqgen", 4)]


def test_convergence_section_is_consistent(report: Path) -> None:
    data = json.loads((report / "report.json").read_text())
    for curves in data["convergence"].values():
        for c in curves:
            assert c["cosine"][-1] == pytest.approx(1.0, abs=1e-12)
            assert len(c["rel_residual"]) == data["settings"]["convergence_iterations"]
            assert c["solver_gap"] < 1e-5  # relative; the sampler stores the solver's residual in float32


def test_incomplete_run_exits_2_and_writes_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["report", str(tmp_path / "missing")]) == 2
    assert "deqgen demo recipes/mnist_cpu.yaml" in capsys.readouterr().err
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "config.yaml").write_text("task: generation\n")
    assert main(["report", str(tmp_path / "half")]) == 2
    assert "viar/model.safetensors" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["config.yaml", "half"]


def test_curves_match_a_manual_picard_loop_in_float64() -> None:
    """Scale 0 by hand: pre block, then z <- f(z) with the implicit map, relative residual and cosine in float64."""
    torch.manual_seed(0)
    model = build_model("viar_tiny", generator=torch.Generator().manual_seed(1)).double().eval()
    vae = MultiScaleVQVAE(VQVAE_PRESETS["vae_tiny"])
    vae.init_weights(torch.Generator().manual_seed(2))
    vae = vae.double().eval()
    labels = torch.tensor([0, 3, 7])
    K = 7
    curves = convergence_curves(model, vae, labels, iterations=K, cache="iteration", cfg_scale=0.0, seed=5)
    assert [c.tokens for c in curves] == [1, 4, 9, 16]
    for c in curves:
        assert c.rel_residual.shape == (K, 3) and c.cosine.shape == (K + 1, 3)
        assert torch.allclose(c.cosine[-1], torch.ones(3, dtype=torch.float64), atol=1e-14, rtol=0)
        assert solver_gap(c) < 1e-6  # the solver's own residual of the last evaluation (stored in float32)
    with torch.no_grad():
        cond = model.condition(labels)
        bc = model.block_condition(cond)
        u = model.embed(cond, None, 0)
        for blk in model.trunk.pre_blocks:
            u = blk(u, bc)
        x = ImplicitInput(u, bc, None, None, IterationKeyedCache(), 0)
        zs, rel = [u], []
        for k in range(K):
            fz = model.trunk.map(zs[-1], x, k)
            rel.append((fz - zs[-1]).flatten(1).norm(dim=1) / fz.flatten(1).norm(dim=1))
            zs.append(fz)
    assert torch.allclose(curves[0].rel_residual, torch.stack(rel), rtol=1e-12, atol=0)
    cos = torch.stack(
        [torch.nn.functional.cosine_similarity(z.flatten(1), zs[-1].flatten(1), dim=1) for z in zs]
    )
    assert torch.allclose(curves[0].cosine, cos, rtol=0, atol=1e-13)
    assert float(curves[0].rel_residual[0].min()) > 1e-6  # the map actually moves: the check is not vacuous
