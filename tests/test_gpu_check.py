"""benchmarks/gpu_check.sh with DRY=1: every step of the one-shot GPU check runs on the CPU at tiny
sizes, each leaves its file, and the summary has every step's exit code and numbers."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
STEPS = ["env", "tests", "scores", "train-aoe", "train-moe", "layers-e8", "layers-e64", "layers-e256"]


@pytest.mark.slow
def test_dry_run_runs_every_step(tmp_path):
    pytest.importorskip("triton")
    env = {**os.environ, "DRY": "1", "PY": sys.executable, "BUDGET_S": "170"}
    run = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), str(tmp_path)], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=200)
    assert run.returncode == 0, run.stderr
    summary = (tmp_path / "summary.md").read_text()
    rows = {line.split("|")[1].strip(): line.split("|")[2].strip() for line in summary.splitlines()
            if line.startswith("| ") and line.count("|") == 4}
    assert {step: rows.get(step) for step in STEPS} == {step: "0" for step in STEPS}, summary
    for name in ("env.json", "tests.log", "scores.json", "train.log", "layers.json", "bench.log"):
        assert (tmp_path / name).stat().st_size > 0, name
    paths = {r["path"] for r in json.loads((tmp_path / "scores.json").read_text())}
    assert paths == {"torch-cache", "torch-recompute", "triton-fused"}
    assert sorted(json.loads((tmp_path / "layers.json").read_text())) == ["layers-e256", "layers-e64", "layers-e8"]
    assert "| aoe | 3 |" in summary and "| moe | 3 |" in summary and "not available" not in summary
