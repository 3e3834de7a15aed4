"""An HF ``aoe`` directory whose config.json claims more than its weights hold is refused before
anything is allocated, by ``aoe eval`` / ``aoe generate`` as by ``load_any``; a huge context
length costs nothing until it is used."""

from __future__ import annotations

import json
import resource
import shutil

import pytest
import torch

from aoe.cli import main
from aoe.hf.export import export_to_hf
from aoe.io.models import load_any
from aoe.model import Transformer
from aoe.model.attention import RotaryEmbedding


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory, tiny_tokenizer):
    from aoe.hf import AoEConfig

    config = AoEConfig(vocab_size=tiny_tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, max_position_embeddings=64, ffn_type="aoe", intermediate_size=48,
                       num_experts=4, num_experts_per_tok=2, d_low=8)
    model = Transformer(config.to_model_config()).eval()
    return export_to_hf(model, tmp_path_factory.mktemp("bounds") / "hf", tiny_tokenizer)


def _edited(hf_dir, tmp_path, **fields):
    edited = tmp_path / "edited"
    shutil.copytree(hf_dir, edited)
    config = json.loads((edited / "config.json").read_text())
    config.update(fields)
    (edited / "config.json").write_text(json.dumps(config))
    return edited


@pytest.mark.parametrize("fields, named", [
    ({"hidden_size": 8192, "num_hidden_layers": 48}, "num_hidden_layers=48, but the weights hold 2 layer(s)"),
    ({"hidden_size": 8192, "intermediate_size": 8192}, "model.embed_tokens.weight has shape"),
    ({"hidden_size": 10**12}, "hidden_size=1000000000000 is larger than the"),
    ({"intermediate_size": 96}, "model.layers.0.ffn"),
    ({"num_key_value_heads": 4}, "model.layers.0.attn"),
])
@pytest.mark.parametrize("command", ["eval", "generate"])
def test_a_config_that_does_not_fit_the_weights_is_one_line_before_any_allocation(hf_dir, tmp_path, capsys,
                                                                                   fields, named, command):
    edited = _edited(hf_dir, tmp_path, **fields)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    args = ["eval", str(edited), "--skip-loss"] if command == "eval" else ["generate", str(edited), "--prompt", "x"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and named in err and "config.json" in err
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 200 * 1024  # KiB: nothing big was built


def test_a_billion_positions_cost_nothing_until_used(hf_dir, tmp_path, capsys):
    edited = _edited(hf_dir, tmp_path, max_position_embeddings=10**9)
    loaded = load_any(edited)
    tables = loaded.model.rotary._tables
    assert all(cos.shape[0] <= RotaryEmbedding.BLOCK for cos, _ in tables.values())
    assert main(["generate", str(edited), "--prompt", "hello", "--max-new-tokens", "5", "--greedy"]) == 0
    assert capsys.readouterr().out.startswith("hello")


def test_rotary_tables_grow_with_the_positions_used_and_keep_their_values():
    full = RotaryEmbedding(16, 5000, 10000.0)
    cos_all, sin_all = full(0, 5000, torch.device("cpu"))
    grown = RotaryEmbedding(16, 5000, 10000.0)
    assert grown(3, 4, torch.device("cpu"))[0].shape == (4, 8)
    assert grown._tables[torch.device("cpu")][0].shape[0] == 7
    cos, sin = grown(2000, 3000, torch.device("cpu"))
    assert torch.equal(cos, cos_all[2000:]) and torch.equal(sin, sin_all[2000:])
    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, 16, 2, dtype=torch.float64) / 16))
    angles = torch.outer(torch.arange(5000, dtype=torch.float64), inv_freq)
    assert torch.equal(cos_all, angles.cos().float()) and torch.equal(sin_all, angles.sin().float())
