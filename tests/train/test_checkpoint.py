import json

import pytest
import torch

from aoe.config import DataConfig, ModelConfig, RunConfig, TrainConfig
from aoe.model import Transformer
from aoe.train.checkpoint import (
    CheckpointError, find_latest_checkpoint, list_checkpoints, load_model, load_trainer_state, save_checkpoint,
    verify_checkpoint,
)


def _model_and_cfg(tie=True):
    cfg = RunConfig(model=ModelConfig(vocab_size=64, d_model=16, n_layers=2, n_heads=2, d_ffn=32, n_experts=4,
                                      top_k=2, d_low=4, max_seq_len=16, tie_embeddings=tie),
                    train=TrainConfig(seq_len=16), data=DataConfig(vocab_size=64))
    return Transformer(cfg.model), cfg


@pytest.mark.parametrize("tie", [True, False])
def test_round_trip_gives_identical_logits(tmp_path, tie):
    model, cfg = _model_and_cfg(tie)
    path = save_checkpoint(tmp_path, 7, model, cfg, {"step": 7, "note": torch.arange(3)})
    assert path.name == "step_00000007" and verify_checkpoint(path)["step"] == 7
    loaded, cfg2, tok = load_model(tmp_path)  # a run directory resolves to its newest checkpoint
    assert tok is None and cfg2.model == cfg.model
    idx = torch.randint(0, 64, (2, 10))
    assert torch.equal(model(idx).logits, loaded(idx).logits)
    if tie:
        assert loaded.lm_head.weight is loaded.embed_tokens.weight
    assert torch.equal(load_trainer_state(path)["note"], torch.arange(3))


def test_corrupt_and_truncated_checkpoints_are_refused_and_skipped(tmp_path):
    model, cfg = _model_and_cfg()
    good = save_checkpoint(tmp_path, 1, model, cfg, {"step": 1})
    bad = save_checkpoint(tmp_path, 2, model, cfg, {"step": 2})
    weights = bad / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])  # truncated
    with pytest.raises(CheckpointError, match="truncated"):
        verify_checkpoint(bad)
    with pytest.raises(CheckpointError, match="model.safetensors"):
        load_model(bad)
    with pytest.warns(UserWarning, match="skipping a bad checkpoint"):
        assert find_latest_checkpoint(tmp_path) == good
    weights.write_bytes(bytes([data[0] ^ 1]) + data[1:])  # same size, altered content
    with pytest.raises(CheckpointError, match="SHA-256"):
        verify_checkpoint(bad)
    (good / "checkpoint.json").unlink()
    with pytest.raises(CheckpointError, match="checkpoint.json is missing"):
        verify_checkpoint(good)


def test_nan_model_is_never_saved_and_good_state_kept(tmp_path):
    model, cfg = _model_and_cfg()
    good = save_checkpoint(tmp_path, 1, model, cfg, {"step": 1})
    with torch.no_grad():
        model.layers[0].ffn.w_in[0, 0, 0] = float("nan")
    with pytest.raises(CheckpointError, match="NaN"):
        save_checkpoint(tmp_path, 2, model, cfg, {"step": 2})
    assert list_checkpoints(tmp_path) == [good]
    assert not list((tmp_path / "checkpoints").glob(".tmp-*"))


def test_half_written_checkpoint_is_invisible_and_keep_prunes_old(tmp_path):
    model, cfg = _model_and_cfg()
    save_checkpoint(tmp_path, 1, model, cfg, {"step": 1})
    crashed = tmp_path / "checkpoints" / ".tmp-step_00000002-dead"
    crashed.mkdir()
    (crashed / "model.safetensors").write_bytes(b"partial")
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_00000001"]
    save_checkpoint(tmp_path, 3, model, cfg, {"step": 3}, keep=2)
    save_checkpoint(tmp_path, 5, model, cfg, {"step": 5}, keep=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_00000003", "step_00000005"]
    assert not crashed.exists()
    meta = json.loads((tmp_path / "checkpoints" / "step_00000005" / "checkpoint.json").read_text())
    assert set(meta["files"]) == {"model.safetensors", "config.yaml", "trainer_state.pt"}


def test_not_a_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match="neither a checkpoint"):
        load_model(tmp_path)
    (tmp_path / "checkpoints").mkdir()
    with pytest.raises(CheckpointError, match="no complete checkpoint"):
        load_model(tmp_path)
