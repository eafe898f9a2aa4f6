"""``benchmarks/device_check.py``: the dry run (CPU, tiny shapes) passes and writes its JSON and table.

The full dry run is a subprocess (about 50 s, ``slow``; CI runs it); the in-process test runs the model
sections (attention, sampling, training) in about 10 s and checks what the GPU run will judge.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "device_check.py"


def _load() -> ModuleType:
    spec = importlib.util.spec_from_file_location("device_check", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_dry_run_passes_and_writes_json_and_table(tmp_path: Path) -> None:
    r = subprocess.run(
        [sys.executable, str(SCRIPT), "--dry-run", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    results = json.loads((tmp_path / "device_check.json").read_text())
    assert set(results["sections"]) == {"gpu_tests", "attention", "sampling", "training", "smoke_train"}
    assert not [s for s in results["sections"].values() if "error" in s]
    assert results["sections"]["smoke_train"]["steps"] == results["plan"]["smoke_steps"]
    table = (tmp_path / "device_check.md").read_text()
    assert "170 img/s" in table and "not judged (dry run on CPU)" in table


def test_model_sections_in_process() -> None:
    dc = _load()
    plan = dc.plan_for(dry_run=True)
    results = dc.run(plan, ["attention", "sampling", "training"])
    sections = results["sections"]
    assert not [s for s in sections.values() if "error" in s], sections
    assert sections["attention"]["chosen"] == "sdpa"  # xformers never runs on a CPU
    rows = sections["sampling"]["rows"]
    assert [(r["model"], r["schedule"]) for r in rows] == [
        ("var_tiny", "-"),
        *[("viar_tiny", s) for s in ("constant:10", "linear:10:5", "linear:6:1")],
    ]
    assert all(r["img_per_s"] > 0 and r["peak_gb"] > 0 for r in rows)
    viar = sections["training"]["viar"]
    assert (
        viar["micro_batch"] == plan.train_batches[0]
        and viar["peak_gb_k1_0"] > 0
        and viar["peak_gb_k1_10"] > 0
    )


def test_goals_are_judged_from_the_measurements() -> None:
    """The GPU verdicts, fed with made-up measurements on both sides of each goal."""
    dc = _load()
    plan = dc.plan_for(dry_run=False)

    def results(viar_ips: float, var_ips: float, peak: float, k1_0: float, k1_10: float) -> dict:
        return {
            "sections": {
                "sampling": {
                    "rows": [
                        {"model": "var_d30", "schedule": "-", "img_per_s": var_ips, "peak_gb": 9.0},
                        {
                            "model": "viar_d30",
                            "schedule": "linear:10:5",
                            "img_per_s": viar_ips,
                            "peak_gb": peak,
                        },
                    ]
                },
                "training": {"viar": {"peak_gb_k1_0": k1_0, "peak_gb_k1_10": k1_10}},
            }
        }

    good = dc.judge(results(180.0, 60.0, 7.5, 40.0, 40.1), plan)
    assert all(v.startswith("pass") for v in good.values()), good
    bad = dc.judge(results(160.0, 80.0, 8.5, 40.0, 44.0), plan)
    assert all(v.startswith("FAIL") for v in bad.values()), bad
    assert dc.judge({"sections": {}}, plan)["viar_img_per_s"] == "not measured (section failed)"
    assert set(dc.judge({"sections": {}}, dc.plan_for(dry_run=True)).values()) == {
        "not judged (dry run on CPU)"
    }
