"""Checkpoints written by version 0.1.0 (tests/fixtures/checkpoints-0.1.0, made by that version's
code from seed 0) still load and compute the logits that version computed."""

import json
import shutil
from pathlib import Path

import pytest
import torch

from aoe.io.models import load_model

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


def _aoe_layers(model):
    from aoe.nn import AoE
    return [m for m in model.modules() if isinstance(m, AoE)]


def test_version_0_1_0_aoe_keeps_its_unrenormalized_gate_although_new_aoe_renormalizes(tmp_path):
    """Its config records ``renormalize: null`` (the layer's default then: False for AoE); the
    default for new AoE layers is Algorithm 2's renormalized gate."""
    from aoe.config import ModelConfig
    from aoe.nn import AoE

    model, cfg, _ = load_model(shutil.copytree(FIXTURES / "aoe", tmp_path / "aoe"))
    assert cfg.model.renormalize is None
    assert [layer.renormalize for layer in _aoe_layers(model)] == [False] * len(_aoe_layers(model)) != []
    assert AoE(16, 4, 4, 2, d_ffn=32).renormalize is True
    assert ModelConfig().renormalize is True and ModelConfig(ffn="aoe").ffn_config(0).renormalize is True


def test_version_0_1_0_aoe_keeps_its_score_cache_although_new_aoe_may_recompute(tmp_path):
    """Its config says ``recompute_scores: false``: kept; new configs leave the choice to the layer."""
    from aoe.config import ModelConfig

    model, cfg, _ = load_model(shutil.copytree(FIXTURES / "aoe", tmp_path / "aoe"))
    assert cfg.model.recompute_scores is False
    assert [layer.recompute_scores for layer in _aoe_layers(model)] == [False] * len(_aoe_layers(model)) != []
    assert ModelConfig().recompute_scores is None


def test_saved_config_without_the_renormalize_key_reads_as_null(tmp_path):
    """A run config that never wrote the key computes what it was trained with (null, not today's True)."""
    from aoe.config.files import load_saved_config

    src = FIXTURES / "aoe" / "checkpoints" / "step_00000000" / "config.yaml"
    text = "".join(line for line in src.read_text().splitlines(keepends=True) if "renormalize" not in line)
    (tmp_path / "config.yaml").write_text(text)
    cfg = load_saved_config(tmp_path / "config.yaml")
    assert cfg.model.renormalize is None and cfg.model.ffn_config(1).renormalize is False


def test_committed_study_runs_keep_the_gate_they_were_trained_with():
    """Every run config under docs/results that says ``renormalize: null`` still builds AoE layers
    without renormalization, as it trained."""
    from aoe.config.files import load_saved_config

    root = Path(__file__).resolve().parents[2] / "docs" / "results"
    configs = [p for p in sorted(root.glob("*/*/config.yaml")) if "renormalize: null" in p.read_text()]
    if not configs:
        pytest.skip("no committed run configs in this checkout")
    for path in configs:
        m = load_saved_config(path).model
        if m.ffn == "aoe":
            assert m.ffn_config(len(m.dense_layers)).renormalize is False, path
        elif m.ffn == "moe":
            assert m.ffn_config(len(m.dense_layers)).renormalize is True, path
