import importlib

import pytest
import torch
from transformers import AutoModelForCausalLM
from transformers.modeling_outputs import MoeCausalLMOutputWithPast

import aoe.hf
from aoe.hf import AoEForCausalLM
from aoe.model.transformer import Transformer


@pytest.mark.parametrize("ffn", ["aoe", "moe", "dense"])
@pytest.mark.parametrize("tie", [True, False])
def test_save_load_round_trip_identical_logits(tiny_config, tmp_path, ffn, tie):
    cfg = tiny_config(ffn_type=ffn, tie_word_embeddings=tie, dense_layers=[1] if ffn != "dense" else [])
    model = AoEForCausalLM(cfg).eval()
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert isinstance(loaded, AoEForCausalLM)
    x = torch.randint(0, cfg.vocab_size, (2, 11))
    assert torch.equal(model(x).logits, loaded(x).logits)
    sd_a, sd_b = model.state_dict(), loaded.state_dict()
    assert sd_a.keys() == sd_b.keys()
    assert all(torch.equal(sd_a[k], sd_b[k]) for k in sd_a)
    assert (loaded.model.lm_head.weight is loaded.model.embed_tokens.weight) == tie
    for m in loaded.modules():  # non-persistent buffers rebuilt as zeros, rotary tables real
        if hasattr(m, "load_since_update"):
            assert not m.load_since_update.is_meta and m.load_since_update.abs().sum() == 0
    assert not loaded.model.rotary._tables[torch.device("cpu")][0].is_meta


@pytest.mark.parametrize("ffn,qk_norm", [("aoe", "head"), ("moe", "full")])
def test_save_load_round_trip_with_qk_norm(tiny_config, tmp_path, ffn, qk_norm):
    cfg = tiny_config(ffn_type=ffn, qk_norm=qk_norm, dense_layers=[0])
    model = AoEForCausalLM(cfg).eval()
    with torch.no_grad():  # not the init's ones: the loaded weights must be these
        for name, p in model.named_parameters():
            if name.endswith(("q_norm.weight", "k_norm.weight")):
                p.uniform_(0.5, 1.5)
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert loaded.config.qk_norm == qk_norm and loaded.model.config.qk_norm == qk_norm
    sd_a, sd_b = model.state_dict(), loaded.state_dict()
    assert sd_a.keys() == sd_b.keys() and "model.layers.1.attn.k_norm.weight" in sd_a
    assert all(torch.equal(sd_a[k], sd_b[k]) for k in sd_a)
    x = torch.randint(0, cfg.vocab_size, (2, 11))
    assert torch.equal(model(x).logits, loaded(x).logits)
    fresh = AoEForCausalLM(cfg)  # the HF init sets the q/k norm weights to ones
    assert all(torch.equal(p, torch.ones_like(p)) for n, p in fresh.named_parameters() if n.endswith("_norm.weight"))


def test_wraps_native_transformer_and_init(tiny_config):
    model = AoEForCausalLM(tiny_config())
    assert isinstance(model.model, Transformer)
    assert model.get_input_embeddings() is model.model.embed_tokens
    std = model.model.layers[0].ffn.w_in.std().item()
    assert 0.01 < std < 0.03
    out_std = model.model.layers[0].attn.o_proj.weight.std().item()
    assert out_std < 0.015  # depth-scaled: 0.02 / sqrt(2 * 2) = 0.01


def test_forward_output_loss_matches_native(tiny_config):
    model = AoEForCausalLM(tiny_config(router_aux_loss_coef=0.0)).eval()
    x = torch.randint(0, 64, (2, 9))
    out = model(x, labels=x, use_cache=False)
    assert isinstance(out, MoeCausalLMOutputWithPast)
    pad = torch.full((2, 1), -100)
    native = model.model(x, targets=torch.cat([x[:, 1:], pad], 1))
    torch.testing.assert_close(out.loss, native.loss)
    assert torch.equal(out.logits, native.logits)
    torch.testing.assert_close(out.loss, torch.nn.functional.cross_entropy(out.logits[:, :-1].reshape(-1, 64), x[:, 1:].reshape(-1)))
    assert out.past_key_values is None
    labels = x.clone()
    labels[:, :4] = -100
    torch.testing.assert_close(model(x, labels=labels).loss, model.model(x, targets=torch.cat([labels[:, 1:], pad], 1)).loss)


def test_aux_loss_added_to_loss(tiny_config):
    model = AoEForCausalLM(tiny_config(router_aux_loss_coef=0.01)).train()
    x = torch.randint(0, 64, (2, 9))
    out = model(x, labels=x, use_cache=False)
    assert out.aux_loss > 0
    native = model.model(x, targets=torch.cat([x[:, 1:], torch.full((2, 1), -100)], 1))
    torch.testing.assert_close(out.loss, native.loss + out.aux_loss)


def test_incremental_cache_matches_full_forward(tiny_config):
    model = AoEForCausalLM(tiny_config()).eval()
    x = torch.randint(0, 64, (2, 12))
    full = model(x, use_cache=False).logits
    out = model(x[:, :7], use_cache=True)
    cache = out.past_key_values
    step = model(x[:, 7:9], past_key_values=cache, use_cache=True)
    last = model(x[:, 9:], past_key_values=step.past_key_values, use_cache=True)
    torch.testing.assert_close(torch.cat([out.logits, step.logits, last.logits], 1), full, rtol=1e-5, atol=1e-5)
    assert last.past_key_values.get_seq_length() == 12


@pytest.mark.parametrize("ffn", ["aoe", "moe"])
def test_generate_cache_equals_no_cache(tiny_config, ffn):
    model = AoEForCausalLM(tiny_config(ffn_type=ffn)).eval()
    x = torch.randint(0, 64, (2, 5))
    a = model.generate(x, max_new_tokens=10, do_sample=False, use_cache=True)
    b = model.generate(x, max_new_tokens=10, do_sample=False, use_cache=False)
    assert a.shape == (2, 15)
    assert torch.equal(a, b)
    # the same greedy continuation as the native decoding loop without a cache
    seq = x
    for _ in range(10):
        seq = torch.cat([seq, model.model(seq).logits[:, -1:].argmax(-1)], 1)
    assert torch.equal(a, seq)


def test_padding_accepted_and_unsupported_inputs_refused(tiny_config):
    """Padding is supported (tests/hf/test_padding.py checks it is exact); malformed masks,
    foreign position ids and inputs_embeds are refused."""
    model = AoEForCausalLM(tiny_config()).eval()
    x = torch.randint(0, 64, (2, 5))
    mask = torch.ones_like(x)
    model(x, attention_mask=mask)  # all ones: fine
    mask[0, 0] = 0
    assert torch.isfinite(model(x, attention_mask=mask).logits).all()
    with pytest.raises(ValueError, match="attention_mask"):
        model(x, attention_mask=mask[:, None, None, :])  # 4-D masks are another convention
    with pytest.raises(ValueError, match="0 .pad. and 1"):
        model(x, attention_mask=mask * 2)
    with pytest.raises(ValueError, match="position_ids"):
        model(x, position_ids=torch.arange(1, 6)[None].expand(2, 5))
    model(x, position_ids=torch.arange(5)[None].expand(2, 5))
    with pytest.raises(ValueError, match="inputs_embeds"):
        model(inputs_embeds=torch.zeros(1, 2, 32))


def test_registration_is_idempotent():
    aoe.hf.register()
    importlib.reload(importlib.import_module("aoe.hf"))
    from transformers import AutoConfig

    assert AutoConfig.for_model("aoe", vocab_size=10).model_type == "aoe"


def test_beam_search_cache_equals_no_cache(tiny_config):
    model = AoEForCausalLM(tiny_config()).eval()
    x = torch.randint(0, 64, (1, 5))
    a = model.generate(x, max_new_tokens=6, num_beams=3, do_sample=False, use_cache=True)
    b = model.generate(x, max_new_tokens=6, num_beams=3, do_sample=False, use_cache=False)
    assert torch.equal(a, b)
