import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from transformers import (AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, MixtralConfig, MixtralForCausalLM,
                          OlmoeConfig, OlmoeForCausalLM, Qwen2MoeConfig, Qwen2MoeForCausalLM, Qwen3MoeConfig,
                          Qwen3MoeForCausalLM)

from aoe.hf import AoEForCausalLM
from aoe.hf.convert import SUPPORTED_SOURCES, ConversionError, convert_to_aoe, factorize_gate

KW = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
          num_key_value_heads=2, max_position_embeddings=64)


def rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def save(model, path):
    model.save_pretrained(path)
    return path


@pytest.fixture
def llama_dir(tmp_path):
    return lambda tie=False, **kw: save(LlamaForCausalLM(LlamaConfig(**{**KW, **kw}, tie_word_embeddings=tie)).eval(),
                                        tmp_path / f"llama-{tie}")


@pytest.mark.parametrize("tie", [False, True])
@pytest.mark.parametrize("E,k,upcycle", [(1, 1, "copy"), (1, 1, "slice"), (4, 2, "copy")])
def test_llama_upcycle_same_logits(tmp_path, llama_dir, tie, E, k, upcycle):
    src = llama_dir(tie)
    report = convert_to_aoe(src, tmp_path / "out", num_experts=E, top_k=k, upcycle=upcycle, verbose=False)
    assert len(report.layer_errors) == 2 and report.max_error < 1e-12
    ref = LlamaForCausalLM.from_pretrained(src).eval()
    aoe = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert isinstance(aoe, AoEForCausalLM)
    assert aoe.config.num_experts == E and aoe.config.d_wide == (48 // E if upcycle == "slice" else 48)
    x = torch.randint(0, 64, (2, 16))
    assert rel(aoe(x).logits, ref(x).logits) <= 1e-5


def test_llama_slice_experts_sum_to_ffn(tmp_path, llama_dir):
    src = llama_dir()
    convert_to_aoe(src, tmp_path / "out", num_experts=4, top_k=2, upcycle="slice", verbose=False)
    s, d = load_file(str(src / "model.safetensors")), load_file(str(tmp_path / "out" / "model.safetensors"))
    x = torch.randn(5, 32)
    p = "model.layers.1.mlp."
    ffn = (F.silu(x @ s[p + "gate_proj.weight"].T) * (x @ s[p + "up_proj.weight"].T)) @ s[p + "down_proj.weight"].T
    q = "model.layers.1.ffn."
    total = sum((F.silu(x @ d[q + "w_down"][e] @ d[q + "w_up"][e]) * (x @ d[q + "w_in"][e])) @ d[q + "w_out"][e]
                for e in range(4))
    assert rel(total, ffn) < 1e-5


def mixtral_dir(path, E=4, k=2):
    return save(MixtralForCausalLM(MixtralConfig(**KW, num_local_experts=E, num_experts_per_tok=k)).eval(), path)


def test_mixtral_single_expert_same_logits(tmp_path):
    src = mixtral_dir(tmp_path / "mix", E=1, k=1)
    convert_to_aoe(src, tmp_path / "out", verbose=False)
    ref = MixtralForCausalLM.from_pretrained(src).eval()
    aoe = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    x = torch.randint(0, 64, (2, 16))
    assert rel(aoe(x).logits, ref(x).logits) <= 1e-5


def _converted_expert(state_dst, layer, e, x):
    """Expert e of a converted AoE layer on x: (SiLU((x @ w_down) @ w_up) * (x @ w_in)) @ w_out."""
    q = f"model.layers.{layer}.ffn."
    gate = x @ state_dst[q + "w_down"][e] @ state_dst[q + "w_up"][e]
    return (F.silu(gate) * (x @ state_dst[q + "w_in"][e])) @ state_dst[q + "w_out"][e]


def _expert_outputs(state_src, state_dst, layer, E, x, fused=False):
    src_out, dst_out = [], []
    for e in range(E):
        if fused:
            gu = state_src[f"model.layers.{layer}.mlp.experts.gate_up_proj"][e]
            g, u = gu.chunk(2, dim=0)
            w2 = state_src[f"model.layers.{layer}.mlp.experts.down_proj"][e]
        else:
            p = f"model.layers.{layer}.block_sparse_moe.experts.{e}."
            g, u, w2 = state_src[p + "w1.weight"], state_src[p + "w3.weight"], state_src[p + "w2.weight"]
        src_out.append((F.silu(x @ g.T) * (x @ u.T)) @ w2.T)
        dst_out.append(_converted_expert(state_dst, layer, e, x))
    return torch.stack(src_out), torch.stack(dst_out)


@pytest.mark.parametrize("fused", [False, True])
def test_mixtral_experts_reconstructed_at_full_rank(tmp_path, fused):
    src = mixtral_dir(tmp_path / "mix")
    if fused:  # rewrite the checkpoint in transformers 5's fused in-memory expert layout
        s = load_file(str(src / "model.safetensors"))
        for i in range(2):
            p = f"model.layers.{i}.block_sparse_moe."
            gate_up = torch.stack([torch.cat([s.pop(f"{p}experts.{e}.w1.weight"), s.pop(f"{p}experts.{e}.w3.weight")])
                                   for e in range(4)])
            down = torch.stack([s.pop(f"{p}experts.{e}.w2.weight") for e in range(4)])
            s[f"model.layers.{i}.mlp.experts.gate_up_proj"] = gate_up
            s[f"model.layers.{i}.mlp.experts.down_proj"] = down
            s[f"model.layers.{i}.mlp.gate.weight"] = s.pop(f"{p}gate.weight")
        save_file(s, str(src / "model.safetensors"), metadata={"format": "pt"})
    report = convert_to_aoe(src, tmp_path / "out", verbose=False)
    assert report.max_error < 1e-12
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert (cfg["num_experts"], cfg["num_experts_per_tok"], cfg["d_low"], cfg["d_wide"]) == (4, 2, 32, 48)
    assert cfg["norm_topk_prob"] is True
    s, d = load_file(str(src / "model.safetensors")), load_file(str(tmp_path / "out" / "model.safetensors"))
    assert not any("gate.weight" in k or "router" in k for k in d)
    x = torch.randn(7, 32)
    for layer in range(2):
        a, b = _expert_outputs(s, d, layer, 4, x, fused)
        assert rel(b, a) < 1e-5
    aoe = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert torch.isfinite(aoe(torch.randint(0, 64, (1, 8))).logits).all()


def test_reconstruction_error_decreases_with_rank(tmp_path):
    src = mixtral_dir(tmp_path / "mix")
    errs = [convert_to_aoe(src, tmp_path / f"out{r}", d_low=r, verbose=False).max_error for r in (2, 8, 16, 32)]
    assert all(a > b for a, b in zip(errs, errs[1:]))
    assert errs[0] > 0.1 and errs[-1] < 1e-12
    d = load_file(str(tmp_path / "out8" / "model.safetensors"))
    assert d["model.layers.0.ffn.w_down"].shape == (4, 32, 8) and d["model.layers.0.ffn.w_up"].shape == (4, 8, 48)


def test_factorize_gate_balanced_and_exact():
    w = torch.randn(3, 10, 6)
    down, up, err = factorize_gate(w, 6)
    assert err < 1e-12 and torch.allclose(down @ up, w.double())
    torch.testing.assert_close(down.norm(dim=1), up.norm(dim=2))  # sqrt(S) on both sides
    with pytest.raises(ValueError, match="d_low"):
        factorize_gate(w, 7)


@pytest.mark.parametrize("name,cls,cfg_cls,extra,match", [
    ("qwen2-moe-head-dim", Qwen2MoeForCausalLM, Qwen2MoeConfig,
     dict(num_experts=4, moe_intermediate_size=24, shared_expert_intermediate_size=48, head_dim=16), "head_dim=16"),
    ("qwen3-head-dim", Qwen3MoeForCausalLM, Qwen3MoeConfig,
     dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=24, head_dim=16), "head_dim=16"),
    ("qwen3-bias", Qwen3MoeForCausalLM, Qwen3MoeConfig,
     dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=24, attention_bias=True), "attention_bias"),
    ("qwen3-all-dense", Qwen3MoeForCausalLM, Qwen3MoeConfig,
     dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=24, mlp_only_layers=[0, 1]), "every layer is dense"),
    ("olmoe-clip", OlmoeForCausalLM, OlmoeConfig,
     dict(num_experts=4, num_experts_per_tok=2, eos_token_id=1, pad_token_id=1, clip_qkv=8.0), "clip_qkv"),
])
def test_unsupported_sources_refused(tmp_path, name, cls, cfg_cls, extra, match):
    src = save(cls(cfg_cls(**KW, **extra)), tmp_path / name)
    with pytest.raises(ValueError, match=match):
        convert_to_aoe(src, tmp_path / "out", verbose=False)
    assert not (tmp_path / "out").exists()


def test_inconsistent_options_refused(tmp_path, llama_dir):
    src = llama_dir()
    out = tmp_path / "out"
    with pytest.raises(ValueError, match="d_low"):
        convert_to_aoe(src, out, d_low=33, verbose=False)
    with pytest.raises(ValueError, match="top_k"):
        convert_to_aoe(src, out, num_experts=2, top_k=3, verbose=False)
    with pytest.raises(ValueError, match="divisible"):
        convert_to_aoe(src, out, num_experts=5, upcycle="slice", verbose=False)
    with pytest.raises(ValueError, match="d_low"):  # slices of 48 / 4 = 12 < hidden 32
        convert_to_aoe(src, out, num_experts=4, upcycle="slice", d_low=13, verbose=False)
    with pytest.raises(ValueError, match="upcycle"):
        convert_to_aoe(src, out, upcycle="nope", verbose=False)
    with pytest.raises(ValueError, match="num_experts"):
        convert_to_aoe(mixtral_dir(tmp_path / "mix"), out, num_experts=8, verbose=False)
    with pytest.raises(ValueError, match="config.json"):
        convert_to_aoe(tmp_path, out, verbose=False)
    with pytest.raises(ValueError, match="RoPE"):
        convert_to_aoe(save(LlamaForCausalLM(LlamaConfig(**KW, rope_parameters={"rope_type": "linear", "factor": 2.0,
                                                                              "rope_theta": 1e4})), tmp_path / "lin"),
                       out, verbose=False)
    with pytest.raises(ValueError, match="bias"):
        convert_to_aoe(save(LlamaForCausalLM(LlamaConfig(**KW, attention_bias=True)), tmp_path / "b"), out, verbose=False)
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # no temp dirs left


def test_destination_not_overwritten_unless_asked(tmp_path, llama_dir):
    src = llama_dir()
    out = tmp_path / "out"
    out.mkdir()
    (out / "x").write_text("keep")
    with pytest.raises(ValueError, match="not empty"):
        convert_to_aoe(src, out, verbose=False)
    assert (out / "x").read_text() == "keep"
    convert_to_aoe(src, out, overwrite=True, verbose=False)
    assert (out / "model.safetensors").exists() and not (out / "x").exists()


def test_the_source_is_never_the_destination(tmp_path, llama_dir):
    src = llama_dir()
    before = {p.name: p.read_bytes() for p in src.iterdir()}
    for dst in (src, src.parent):
        with pytest.raises(ValueError, match="is or contains the source"):
            convert_to_aoe(src, dst, overwrite=True, verbose=False)
    assert {p.name: p.read_bytes() for p in src.iterdir()} == before


def test_cli_commands(tmp_path, llama_dir, capsys):
    import argparse

    from aoe.cli.hf_options import add_convert_parser, add_export_parser

    parser = argparse.ArgumentParser(prog="aoe")
    sub = parser.add_subparsers()
    add_convert_parser(sub)
    add_export_parser(sub)
    src = llama_dir()
    args = parser.parse_args(["convert", str(src), str(tmp_path / "out"), "--num-experts", "2", "--top-k", "1",
                              "--d-low", "16"])
    assert args.func(args) == 0
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert (cfg["num_experts"], cfg["num_experts_per_tok"], cfg["d_low"]) == (2, 1, 16)
    assert "relative reconstruction error" in capsys.readouterr().out
    args = parser.parse_args(["convert", str(src), str(tmp_path / "out")])
    assert args.func(args) == 1 and "not empty" in capsys.readouterr().err
    args = parser.parse_args(["export", str(tmp_path / "out"), "--to-native"])
    assert args.func(args) == 0 and "native" in capsys.readouterr().out


def test_sharded_output_loads(tmp_path, llama_dir):
    src = llama_dir()
    convert_to_aoe(src, tmp_path / "out", num_experts=2, top_k=1, max_shard_bytes=20_000, verbose=False)
    out = tmp_path / "out"
    shards = sorted(p.name for p in out.glob("*.safetensors"))
    assert len(shards) > 2 and (out / "model.safetensors.index.json").exists()
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == set(shards)
    ref = LlamaForCausalLM.from_pretrained(src).eval()
    aoe = AutoModelForCausalLM.from_pretrained(out).eval()
    x = torch.randint(0, 64, (1, 12))
    assert rel(aoe(x).logits, ref(x).logits) <= 1e-5
    from aoe.hf.export import load_hf_as_native

    assert rel(load_hf_as_native(out)(x).logits, ref(x).logits) <= 1e-5


def test_failure_midway_leaves_no_destination(tmp_path, llama_dir):
    src = llama_dir()
    s = load_file(str(src / "model.safetensors"))
    s["model.layers.0.self_attn.q_norm.weight"] = torch.ones(8)  # something the conversion cannot carry
    save_file(s, str(src / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError, match="does not understand"):
        convert_to_aoe(src, tmp_path / "out", verbose=False)
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


# ---------------------------------------------------------------------------------------------
# Qwen3-MoE (per-head q/k norm, dense mlp_only layers) and OLMoE (q/k norm over the projection)
# ---------------------------------------------------------------------------------------------
def _randomize_norms(model):
    """Every RMSNorm weight (q/k norms included) away from the init's ones, so that a norm copied
    to the wrong place or not applied shows in the logits."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
    return model


def qwen3_dir(path, E=4, k=2, **kw):
    cfg = Qwen3MoeConfig(**{**KW, "num_experts": E, "num_experts_per_tok": k, "moe_intermediate_size": 24,
                            "head_dim": 8, **kw})
    return save(_randomize_norms(Qwen3MoeForCausalLM(cfg)).eval(), path)


def olmoe_dir(path, E=4, k=2, **kw):
    cfg = OlmoeConfig(**{**KW, "num_experts": E, "num_experts_per_tok": k, "eos_token_id": 1, "pad_token_id": 1, **kw})
    return save(_randomize_norms(OlmoeForCausalLM(cfg)).eval(), path)


MOE_QK = {"qwen3_moe": (qwen3_dir, Qwen3MoeForCausalLM, "head", 24), "olmoe": (olmoe_dir, OlmoeForCausalLM, "full", 48)}


@pytest.mark.parametrize("source,extra,dense", [
    ("qwen3_moe", {}, []),
    ("qwen3_moe", {"mlp_only_layers": [0]}, [0]),
    ("qwen3_moe", {"decoder_sparse_step": 2}, [0]),  # sparse iff (layer + 1) % 2 == 0
    ("olmoe", {}, []),
])
def test_qk_norm_sources_single_expert_same_logits(tmp_path, source, extra, dense):
    make, cls, qk_norm, F_expert = MOE_QK[source]
    src = make(tmp_path / "src", E=1, k=1, **extra)
    report = convert_to_aoe(src, tmp_path / "out", verbose=False)
    assert len(report.layer_errors) == 2 and report.max_error < 1e-12
    ref = cls.from_pretrained(src).eval()
    aoe = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert isinstance(aoe, AoEForCausalLM)
    assert aoe.config.qk_norm == qk_norm and aoe.config.dense_layers == dense
    assert aoe.config.d_wide == F_expert and aoe.config.rms_norm_eps == ref.config.rms_norm_eps
    if dense:
        assert aoe.config.dense_intermediate_size == 48
    x = torch.randint(0, 64, (2, 16))
    assert rel(aoe(x).logits, ref(x).logits) <= 1e-5
    # the incremental (cached) path agrees too: the keys are normalized before they are cached
    out = aoe(x[:, :9], use_cache=True)
    step = aoe(x[:, 9:], past_key_values=out.past_key_values, use_cache=True)
    assert rel(torch.cat([out.logits, step.logits], 1), ref(x).logits) <= 1e-5


def _fuse_experts(src, layers, E):
    """Rewrite a checkpoint's per-expert gate/up/down weights in transformers 5's fused layout."""
    s = load_file(str(src / "model.safetensors"))
    for i in layers:
        p = f"model.layers.{i}.mlp.experts."
        s[p + "gate_up_proj"] = torch.stack([torch.cat([s.pop(f"{p}{e}.gate_proj.weight"), s.pop(f"{p}{e}.up_proj.weight")])
                                             for e in range(E)])
        s[p + "down_proj"] = torch.stack([s.pop(f"{p}{e}.down_proj.weight") for e in range(E)])
    save_file(s, str(src / "model.safetensors"), metadata={"format": "pt"})


def _qk_expert_outputs(state_src, state_dst, layer, E, x):
    src_out, dst_out = [], []
    for e in range(E):
        p = f"model.layers.{layer}.mlp.experts."
        if p + "gate_up_proj" in state_src:
            g, u = state_src[p + "gate_up_proj"][e].chunk(2, dim=0)
            w2 = state_src[p + "down_proj"][e]
        else:
            g, u, w2 = (state_src[f"{p}{e}.{n}_proj.weight"] for n in ("gate", "up", "down"))
        src_out.append((F.silu(x @ g.T) * (x @ u.T)) @ w2.T)
        dst_out.append(_converted_expert(state_dst, layer, e, x))
    return torch.stack(src_out), torch.stack(dst_out)


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("norm_topk", [False, True])
@pytest.mark.parametrize("source", ["qwen3_moe", "olmoe"])
def test_qk_norm_sources_experts_reconstructed_at_full_rank(tmp_path, source, norm_topk, fused):
    make, _, qk_norm, F_expert = MOE_QK[source]
    extra = {"mlp_only_layers": [1]} if source == "qwen3_moe" else {}
    sparse = [0] if source == "qwen3_moe" else [0, 1]
    src = make(tmp_path / "src", norm_topk_prob=norm_topk, **extra)
    if fused:
        _fuse_experts(src, sparse, 4)
    report = convert_to_aoe(src, tmp_path / "out", verbose=False)
    assert report.max_error < 1e-12 and report.source_type == source
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert (cfg["num_experts"], cfg["num_experts_per_tok"], cfg["d_low"], cfg["d_wide"]) == (4, 2, min(32, F_expert), F_expert)
    assert cfg["norm_topk_prob"] is norm_topk and cfg["qk_norm"] == qk_norm
    s, d = load_file(str(src / "model.safetensors")), load_file(str(tmp_path / "out" / "model.safetensors"))
    assert not any("gate.weight" in k or "router" in k for k in d)
    for i in range(2):  # q/k norms (and the other norms) copied exactly
        for a in ("q", "k"):
            assert torch.equal(d[f"model.layers.{i}.attn.{a}_norm.weight"], s[f"model.layers.{i}.self_attn.{a}_norm.weight"])
        assert torch.equal(d[f"model.layers.{i}.attn_norm.weight"], s[f"model.layers.{i}.input_layernorm.weight"])
    x = torch.randn(7, 32)
    for layer in sparse:
        a, b = _qk_expert_outputs(s, d, layer, 4, x)
        assert rel(b, a) < 1e-5
    if source == "qwen3_moe":  # the mlp_only layer is the source's dense MLP, as is
        p = "model.layers.1.mlp."
        assert torch.equal(d["model.layers.1.ffn.w_gate"], s[p + "gate_proj.weight"].T)
        assert torch.equal(d["model.layers.1.ffn.w_in"], s[p + "up_proj.weight"].T)
        assert torch.equal(d["model.layers.1.ffn.w_out"], s[p + "down_proj.weight"].T)
        assert report.layer_errors[1] == 0.0
    aoe = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert torch.isfinite(aoe(torch.randint(0, 64, (1, 8))).logits).all()


@pytest.mark.parametrize("source,ranks", [("qwen3_moe", (2, 8, 16, 24)), ("olmoe", (2, 8, 16, 32))])
def test_qk_norm_sources_reconstruction_error_decreases_with_rank(tmp_path, source, ranks):
    make, _, _, F_expert = MOE_QK[source]
    src = make(tmp_path / "src")
    errs = [convert_to_aoe(src, tmp_path / f"out{r}", d_low=r, verbose=False).max_error for r in ranks]
    assert all(a > b for a, b in zip(errs, errs[1:]))
    assert errs[0] > 0.1 and errs[-1] < 1e-12
    d = load_file(str(tmp_path / "out8" / "model.safetensors"))
    assert d["model.layers.0.ffn.w_down"].shape == (4, 32, 8) and d["model.layers.0.ffn.w_up"].shape == (4, 8, F_expert)
    with pytest.raises(ValueError, match="d_low"):
        convert_to_aoe(src, tmp_path / "bad", d_low=min(32, F_expert) + 1, verbose=False)
    with pytest.raises(ValueError, match="num_experts"):
        convert_to_aoe(src, tmp_path / "bad", num_experts=8, verbose=False)
    assert not (tmp_path / "bad").exists()


# ---------------------------------------------------------------------------------------------
# Sources that cannot be used: a ConversionError naming the file or tensor, nothing written
# ---------------------------------------------------------------------------------------------
def _edit_config(src, **fields):
    cfg = json.loads((src / "config.json").read_text())
    cfg.update(fields)
    (src / "config.json").write_text(json.dumps(cfg))
    return src


@pytest.mark.parametrize("source,field,value,tensor", [
    ("llama", "intermediate_size", 96, "layer 0's gate projection"),
    ("llama", "vocab_size", 128, "model.embed_tokens.weight has shape [64, 32]"),
    ("mixtral", "intermediate_size", 24, "layer 0's gate projection (native layout) has shape [4, 32, 48]"),
    ("mixtral", "num_key_value_heads", 4, "model.layers.0.self_attn.k_proj.weight has shape [16, 32]"),
    ("mixtral", "hidden_size", 16, "model.embed_tokens.weight has shape [64, 32]"),
])
def test_config_json_that_does_not_describe_the_weights_is_refused(tmp_path, llama_dir, source, field, value, tensor):
    src = llama_dir() if source == "llama" else mixtral_dir(tmp_path / "mix")
    _edit_config(src, **{field: value})
    from aoe.hf.convert import ConversionError

    with pytest.raises(ConversionError) as e:
        convert_to_aoe(src, tmp_path / "out", verbose=False)
    assert tensor in str(e.value) and f"{field}={value}" in str(e.value) and "config.json" in str(e.value)
    assert not (tmp_path / "out").exists()


def test_more_experts_than_config_json_counts_is_refused(tmp_path):
    src = _edit_config(mixtral_dir(tmp_path / "mix", E=4), num_local_experts=2, num_experts_per_tok=1)
    with pytest.raises(ValueError, match="layer 0 holds 4 experts, but config.json has num_local_experts=2"):
        convert_to_aoe(src, tmp_path / "out", verbose=False)


@pytest.mark.parametrize("content, message", [
    (b'{"model_type": "llama", ', r"config.json' is not valid JSON \(line 1, column 25"),
    (b'{"model_type": "llama\xff"}', r"config.json' is not UTF-8 text"),
    (b'["llama"]', r"config.json' must hold a JSON object"),
    (b'{"model_type": "llama", "hidden_size": "wide"}', r"config.json' is not a valid llama config"),
])
def test_a_config_json_that_cannot_be_read_is_named(tmp_path, llama_dir, content, message):
    src = llama_dir()
    (src / "config.json").write_bytes(content)
    with pytest.raises(ValueError, match=message):
        convert_to_aoe(src, tmp_path / "out", verbose=False)


def test_a_damaged_safetensors_file_is_named(tmp_path, llama_dir):
    src = llama_dir()
    data = (src / "model.safetensors").read_bytes()
    (src / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"model.safetensors' as safetensors .*damaged"):
        convert_to_aoe(src, tmp_path / "out", verbose=False)


def _run(argv):
    import argparse

    from aoe.cli.hf_options import add_convert_parser, add_export_parser

    parser = argparse.ArgumentParser(prog="aoe")
    sub = parser.add_subparsers()
    add_convert_parser(sub)
    add_export_parser(sub)
    args = parser.parse_args(argv)
    return args.func(args)


def test_cli_convert_of_a_mismatched_source_is_a_one_line_error(tmp_path, llama_dir, capsys):
    src = _edit_config(llama_dir(), intermediate_size=96)
    capsys.readouterr()
    assert _run(["convert", str(src), str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("aoe convert: error:") and "intermediate_size=96" in err and "\n" not in err


def test_a_library_bug_in_convert_keeps_its_traceback(tmp_path, llama_dir, monkeypatch):
    import aoe.hf.convert

    def bug(*args, **kwargs):
        raise ValueError("a bug")

    monkeypatch.setattr(aoe.hf.convert, "factorize_gate", bug)
    with pytest.raises(ValueError, match="a bug"):
        _run(["convert", str(llama_dir()), str(tmp_path / "out")])


@pytest.mark.parametrize("content, message", [
    (None, "is not a Hugging Face directory (no config.json)"),
    (b'{"model_type": "llama"}', "has model_type='llama', not 'aoe'"),
    (b'[1]', "config.json' must hold a JSON object"),
    (b'{"model_type": "aoe\xff"}', "config.json' is not UTF-8 text"),
    ("hidden", "config.json' describes a model the native one cannot be: model.d_model='wide'"),
])
def test_export_to_native_names_a_source_it_cannot_read(tmp_path, llama_dir, capsys, content, message):
    src = tmp_path / "hf"
    convert_to_aoe(llama_dir(), src, verbose=False)
    if content is None:
        (src / "config.json").unlink()
    elif content == "hidden":
        _edit_config(src, hidden_size="wide")
    else:
        (src / "config.json").write_bytes(content)
    capsys.readouterr()
    assert _run(["export", "--to-native", str(src)]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("aoe export: error:") and message in err and "\n" not in err


def test_a_fused_layout_without_its_down_projection_is_named(tmp_path):
    make = MOE_QK["olmoe"][0]
    src = make(tmp_path / "src")
    _fuse_experts(src, [0, 1], 4)
    s = load_file(str(src / "model.safetensors"))
    del s["model.layers.1.mlp.experts.down_proj"]
    save_file(s, str(src / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ConversionError, match="layer 1: .*gate_up_proj has no .*down_proj"):
        convert_to_aoe(src, tmp_path / "out", verbose=False)
    assert not (tmp_path / "out").exists()


def test_the_table_lists_what_is_supported():
    from aoe.hf.sources import ARCHS, REFUSED

    assert SUPPORTED_SOURCES == tuple(ARCHS) == ("mixtral", "qwen3_moe", "olmoe", "llama", "mistral", "qwen2_moe",
                                                 "qwen2")
    assert [a.model_type for a in ARCHS.values() if a.sparse] == ["mixtral", "qwen3_moe", "olmoe", "qwen2_moe"]
    assert all(a.experts_field for a in ARCHS.values() if a.sparse) and "qwen2_moe" not in REFUSED
    assert set(REFUSED) == {"deepseek_v2", "deepseek_v3"} and not set(REFUSED) & set(ARCHS)


# ---------------------------------------------------------------------------------------------
# Qwen2-MoE (a shared expert with a sigmoid gate, q/k/v biases) and Qwen2; ffn="moe" (router kept)
# ---------------------------------------------------------------------------------------------
QWEN2_KW = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=64)


def _randomize(model, std=0.5):
    """Norms away from one, and the parts HF starts at zero or near it (biases, routers, the shared
    expert's gate) random, so that any of them copied to the wrong place shows in the logits; the
    routers' scale keeps their top-k far from ties."""
    _randomize_norms(model)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".bias") or name.endswith("mlp.gate.weight") or "shared_expert_gate" in name:
                p.normal_(0.0, std)
    return model


def qwen2_moe_dir(path, E=4, k=2, **kw):
    cfg = Qwen2MoeConfig(**{**QWEN2_KW, "num_experts": E, "num_experts_per_tok": k, "moe_intermediate_size": 48,
                            "shared_expert_intermediate_size": 96, "mlp_only_layers": [0], **kw})
    return save(_randomize(Qwen2MoeForCausalLM(cfg)).eval(), path)


def _same_function(src, dst, ref_cls, vocab=256):
    """Logits within fp32 precision, also through the KV cache, and the same greedy tokens."""
    ref = ref_cls.from_pretrained(src).eval()
    out = AutoModelForCausalLM.from_pretrained(dst).eval()
    torch.manual_seed(0)
    x = torch.randint(0, vocab, (2, 16))
    with torch.no_grad():
        a, b = out(x).logits, ref(x).logits
        assert (a - b).abs().max().item() <= 1e-5 and rel(a, b) <= 1e-5
        first = out(x[:, :9], use_cache=True)
        step = out(x[:, 9:], past_key_values=first.past_key_values, use_cache=True)
        assert (torch.cat([first.logits, step.logits], 1) - b).abs().max().item() <= 1e-5
        greedy = dict(max_new_tokens=8, do_sample=False, pad_token_id=0)
        assert torch.equal(out.generate(x[:1, :6], **greedy), ref.generate(x[:1, :6], **greedy))
    return out


@pytest.mark.parametrize("norm_topk", [False, True])
def test_qwen2_moe_to_moe_same_logits(tmp_path, norm_topk):
    src = qwen2_moe_dir(tmp_path / "src", norm_topk_prob=norm_topk)
    report = convert_to_aoe(src, tmp_path / "out", ffn="moe", verbose=False)
    assert report.source_type == "qwen2_moe" and report.layer_errors == [0.0, 0.0]
    out = _same_function(src, tmp_path / "out", Qwen2MoeForCausalLM)
    from aoe.hf.export import load_hf_as_native

    x = torch.randint(0, 256, (1, 12))
    with torch.no_grad():  # the native model read back from the directory is the same model
        assert torch.equal(load_hf_as_native(tmp_path / "out")(x).logits, out(x).logits)
    c = out.config
    assert (c.ffn_type, c.num_experts, c.num_experts_per_tok, c.intermediate_size, c.norm_topk_prob) == (
        "moe", 4, 2, 48, norm_topk)
    assert (c.num_shared_experts, c.shared_expert_intermediate_size, c.shared_expert_gate, c.qkv_bias) == (1, 96, True, True)
    assert c.dense_layers == [0] and c.dense_intermediate_size == 128
    s, d = load_file(str(src / "model.safetensors")), load_file(str(tmp_path / "out" / "model.safetensors"))
    p, q = "model.layers.1.mlp.", "model.layers.1.ffn."
    assert torch.equal(d[q + "router"], s[p + "gate.weight"].T)
    assert torch.equal(d[q + "shared.w_gate"], s[p + "shared_expert.gate_proj.weight"].T)
    assert torch.equal(d[q + "shared.w_out"], s[p + "shared_expert.down_proj.weight"].T)
    assert torch.equal(d[q + "shared.gate"], s[p + "shared_expert_gate.weight"].T)
    assert not any("shared" in k for k in d if k.startswith("model.layers.0."))  # the dense layer has none
    for a in "qkv":
        assert torch.equal(d[f"model.layers.0.attn.{a}_proj.bias"], s[f"model.layers.0.self_attn.{a}_proj.bias"])
    assert "model.layers.0.attn.o_proj.bias" not in d


@pytest.mark.parametrize("extra", [{}, {"decoder_sparse_step": 2, "mlp_only_layers": []}, {"qkv_bias": False}])
def test_qwen2_moe_single_expert_to_aoe_same_logits(tmp_path, extra):
    src = qwen2_moe_dir(tmp_path / "src", E=1, k=1, **extra)
    report = convert_to_aoe(src, tmp_path / "out", verbose=False)  # full rank: d_low = min(64, 48)
    assert report.max_error < 1e-12
    out = _same_function(src, tmp_path / "out", Qwen2MoeForCausalLM)
    assert out.config.ffn_type == "aoe" and out.config.d_low == 48 and out.config.dense_layers == [0]
    assert out.config.qkv_bias is extra.get("qkv_bias", True)


def test_qwen2_moe_to_aoe_keeps_the_shared_expert_and_reconstructs_the_experts(tmp_path):
    src = qwen2_moe_dir(tmp_path / "src")
    report = convert_to_aoe(src, tmp_path / "out", verbose=False)
    assert report.layer_errors[0] == 0.0 and report.max_error < 1e-12
    s, d = load_file(str(src / "model.safetensors")), load_file(str(tmp_path / "out" / "model.safetensors"))
    assert not any(k.endswith("ffn.router") or "gate.weight" in k for k in d)
    x = torch.randn(7, 64)
    a, b = _qk_expert_outputs(s, d, 1, 4, x)
    assert rel(b, a) < 1e-5
    # the AoE layer's shared part is the source's gated shared expert, as is
    aoe = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    p = "model.layers.1.mlp."
    g, u, w2, gate = (s[p + n] for n in ("shared_expert.gate_proj.weight", "shared_expert.up_proj.weight",
                                           "shared_expert.down_proj.weight", "shared_expert_gate.weight"))
    expected = torch.sigmoid(x @ gate.T) * ((F.silu(x @ g.T) * (x @ u.T)) @ w2.T)
    with torch.no_grad():
        assert rel(aoe.model.layers[1].ffn.shared(x), expected) < 1e-6
    assert torch.isfinite(aoe(torch.randint(0, 256, (1, 8))).logits).all()


def test_cli_converts_qwen2_moe(tmp_path, capsys):
    src = qwen2_moe_dir(tmp_path / "src", E=2, k=1)
    assert _run(["convert", str(src), str(tmp_path / "out"), "--d-low", "16"]) == 0
    printed = capsys.readouterr().out
    assert "converted qwen2_moe -> aoe" in printed and "shared expert of width 96" in printed and "q/k/v biases" in printed
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert (cfg["d_low"], cfg["num_shared_experts"], cfg["shared_expert_gate"], cfg["qkv_bias"]) == (16, 1, True, True)


@pytest.mark.parametrize("source", ["mixtral", "qwen3_moe", "olmoe"])
def test_moe_sources_to_moe_same_logits(tmp_path, source):
    if source == "mixtral":
        src = save(_randomize(MixtralForCausalLM(MixtralConfig(**KW, num_local_experts=4, num_experts_per_tok=2))).eval(),
                   tmp_path / "src")
        cls = MixtralForCausalLM
    else:
        make, cls = MOE_QK[source][:2]
        src = make(tmp_path / "src", norm_topk_prob=True)
        _randomize(cls.from_pretrained(src)).save_pretrained(src)
    convert_to_aoe(src, tmp_path / "out", ffn="moe", verbose=False)
    out = _same_function(src, tmp_path / "out", cls, vocab=64)
    assert out.config.ffn_type == "moe" and out.config.num_shared_experts == 0 and out.config.qkv_bias is False


def test_qwen2_dense_upcycled_same_logits(tmp_path):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    src = save(_randomize(Qwen2ForCausalLM(Qwen2Config(**QWEN2_KW))).eval(), tmp_path / "src")
    report = convert_to_aoe(src, tmp_path / "out", num_experts=4, top_k=2, verbose=False)
    assert report.source_type == "qwen2" and report.max_error < 1e-12
    out = _same_function(src, tmp_path / "out", Qwen2ForCausalLM)
    assert out.config.qkv_bias is True and out.config.num_experts == 4


def test_what_ffn_moe_cannot_do_is_refused(tmp_path, llama_dir):
    src = qwen2_moe_dir(tmp_path / "src", E=2, k=1)
    with pytest.raises(ConversionError, match="ffn='moe' keeps the source's router, and a llama source"):
        convert_to_aoe(llama_dir(), tmp_path / "out", ffn="moe", verbose=False)
    with pytest.raises(ConversionError, match="d_low=8: ffn='moe' keeps every gate projection whole"):
        convert_to_aoe(src, tmp_path / "out", ffn="moe", d_low=8, verbose=False)
    with pytest.raises(ConversionError, match="ffn='dense' must be 'aoe'"):
        convert_to_aoe(src, tmp_path / "out", ffn="dense", verbose=False)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("model_type,match", [("deepseek_v2", "DeepSeek-V2 has multi-head latent attention"),
                                               ("deepseek_v3", "DeepSeek-V3 has multi-head latent attention")])
def test_deepseek_refused_with_its_reason(tmp_path, model_type, match):
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "config.json").write_text(json.dumps({"model_type": model_type}))
    with pytest.raises(ConversionError, match=match):
        convert_to_aoe(tmp_path / "src", tmp_path / "out", verbose=False)


@pytest.mark.parametrize("extra_key", [
    "model.layers.1.mlp.shared_expert.extra_proj.weight",   # a Qwen2-MoE tensor no table maps
    "model.layers.1.mlp.experts_bias",                      # beside the experts, not one of them
])
def test_an_unmapped_tensor_of_a_sparse_block_is_refused(tmp_path, extra_key):
    src = qwen2_moe_dir(tmp_path / "src", E=2, k=1)
    s = load_file(str(src / "model.safetensors"))
    s[extra_key] = torch.ones(4)
    save_file(s, str(src / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ConversionError, match=f"does not understand: \\['{extra_key}'\\]"):
        convert_to_aoe(src, tmp_path / "out", verbose=False)


def test_a_shared_expert_in_a_source_without_one_is_refused(tmp_path):
    """A Mixtral-typed checkpoint with a shared expert (DeepSeek style) is not silently cut down."""
    src = mixtral_dir(tmp_path / "mix")
    s = load_file(str(src / "model.safetensors"))
    s["model.layers.0.block_sparse_moe.shared_experts.gate_proj.weight"] = torch.ones(48, 32)
    save_file(s, str(src / "model.safetensors"), metadata={"format": "pt"})
    for ffn in ("aoe", "moe"):
        with pytest.raises(ConversionError, match="shared_experts.gate_proj.weight"):
            convert_to_aoe(src, tmp_path / "out", ffn=ffn, verbose=False)


def test_a_shared_expert_of_another_width_is_named(tmp_path):
    src = _edit_config(qwen2_moe_dir(tmp_path / "src", E=2, k=1), shared_expert_intermediate_size=80)
    with pytest.raises(ConversionError, match=r"shared_expert.gate_proj.weight has shape \[96, 64\], but config.json "
                                              r"\(hidden_size=64, shared_expert_intermediate_size=80\) implies \[80, 64\]"):
        convert_to_aoe(src, tmp_path / "out", verbose=False)


def test_cli_convert_ffn_moe_keeps_the_router(tmp_path, capsys):
    src = qwen2_moe_dir(tmp_path / "src")
    assert _run(["convert", str(src), str(tmp_path / "out"), "--ffn", "moe"]) == 0
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert cfg["ffn_type"] == "moe" and cfg["num_shared_experts"] == 1
    _same_function(src, tmp_path / "out", Qwen2MoeForCausalLM)
    capsys.readouterr()
    assert _run(["convert", str(src), str(tmp_path / "out2"), "--ffn", "moe", "--d-low", "8"]) == 1
    assert "d_low" in capsys.readouterr().err


@pytest.mark.parametrize("fields, named", [
    ({"hidden_size": 10**12}, "hidden_size=1000000000000 is larger than the"),
    ({"intermediate_size": 10**12}, "intermediate_size=1000000000000 is larger than the"),
    ({"num_hidden_layers": 48}, "num_hidden_layers=48, but the weights hold 2 layer(s)"),
])
def test_a_source_config_far_larger_than_its_weights_is_refused_before_building_anything(tmp_path, fields, named):
    src = _edit_config(mixtral_dir(tmp_path / "mix"), **fields)
    from aoe.hf.convert import ConversionError

    with pytest.raises(ConversionError) as e:
        convert_to_aoe(src, tmp_path / "out", verbose=False)
    assert named in str(e.value) and "config.json" in str(e.value) and "\n" not in str(e.value)
    assert not (tmp_path / "out").exists()
