"""Checkpoints written by version 0.1.0 (tests/fixtures/checkpoints-0.1.0, made by that version's
code from seed 0) still load and compute the logits that version computed."""

import json
import shutil
from pathlib import Path

import pytest
import torch

from aoe.io.checkpoint import load_model

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "checkpoints-0.1.0"
EXPECTED = json.loads((FIXTURES / "expected.json").read_text())


@pytest.mark.parametrize("name", sorted(EXPECTED["models"]))
def test_version_0_1_0_checkpoint_gives_the_same_outputs(name, tmp_path):
    entry = EXPECTED["models"][name]
    run = shutil.copytree(FIXTURES / name, tmp_path / name)  # loading must not need to write, but never risk the fixture
    model, cfg, _ = load_model(run)
    with torch.no_grad():
        out = model(torch.tensor(EXPECTED["input_ids"]))
    torch.testing.assert_close(out.logits, torch.tensor(entry["logits"]), rtol=1e-5, atol=1e-6)
    assert float(out.aux_loss) == pytest.approx(entry["aux_loss"], rel=1e-5, abs=1e-7)


@pytest.mark.parametrize("name", sorted(EXPECTED["models"]))
def test_version_0_1_0_configs_read_as_trained_with_the_authors_gate_init(name):
    """Those runs predate ``gate_init``: they were trained with the authors' init ("normal"), and
    their saved config reads so although new models default to "balanced"."""
    from aoe.config import ModelConfig
    from aoe.io.checkpoint import find_latest_checkpoint, load_run_config

    ckpt = find_latest_checkpoint(FIXTURES / name)
    assert "gate_init" not in (ckpt / "config.yaml").read_text()
    assert ModelConfig().gate_init == "balanced"
    assert load_run_config(ckpt).model.gate_init == "normal"
