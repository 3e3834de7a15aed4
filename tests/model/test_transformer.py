"""aoe.model.Transformer: shapes, loss, causality, GQA, tying, init, parameter and FLOP counts."""

import math

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from aoe.config import ConfigError
from aoe.model import KVCache, ModelOutput, Transformer
from aoe.nn import AoE, DenseFFN, MoE

from .helpers import FFNS, small_config, small_model


@pytest.mark.parametrize("ffn", FFNS)
def test_forward_shapes_loss_and_backward(ffn):
    model = small_model(ffn, aux_loss_coef=0.0 if ffn == "dense" else 0.01)
    idx, targets = torch.randint(0, 64, (2, 3, 20))
    out = model(idx, targets=targets)
    assert isinstance(out, ModelOutput)
    assert out.logits.shape == (3, 20, 64) and out.logits.dtype == torch.float32
    assert out.loss.shape == () and torch.isfinite(out.loss)
    assert abs(out.loss.item() - math.log(64)) < 0.2  # near-uniform predictions at init
    assert out.aux_loss.shape == ()
    if ffn == "dense":
        assert out.aux_loss.item() == 0
    else:  # E * sum f_i P_i is about 1 per layer, times the coefficient, summed over 2 layers
        assert 0.01 < out.aux_loss.item() < 0.1
    (out.loss + out.aux_loss).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    assert model(idx).loss is None


def test_ignore_index_and_target_shape():
    model = small_model("dense")
    idx = torch.randint(0, 64, (2, 8))
    targets = idx.clone()
    targets[:, 4:] = -100
    full = model(idx, targets=idx)
    part = model(idx, targets=targets)
    ref = torch.nn.functional.cross_entropy(full.logits[:, :4].reshape(-1, 64), idx[:, :4].reshape(-1))
    torch.testing.assert_close(part.loss, ref)
    with pytest.raises(ValueError, match="targets shape"):
        model(idx, targets=idx[:, :4])


@pytest.mark.parametrize("ffn", FFNS)
def test_causal(ffn):
    model = small_model(ffn).eval()
    idx = torch.randint(0, 64, (2, 16))
    changed = idx.clone()
    changed[:, 10:] = (changed[:, 10:] + 7) % 64
    a, b = model(idx).logits, model(changed).logits
    torch.testing.assert_close(a[:, :10], b[:, :10])
    assert not torch.allclose(a[:, 10:], b[:, 10:])


def test_grouped_query_attention_equals_mha_with_repeated_kv():
    gqa = small_model("dense", n_kv_heads=2, init_std=0.2).eval()
    assert gqa.layers[0].attn.k_proj.weight.shape == (2 * 8, 32)
    mha = small_model("dense", init_std=0.2).eval()
    state = gqa.state_dict()
    for i in range(2):
        for name in ("k_proj", "v_proj"):
            w = state[f"layers.{i}.attn.{name}.weight"].view(2, 8, 32)  # [G, Dh, D]
            state[f"layers.{i}.attn.{name}.weight"] = w.repeat_interleave(2, dim=0).reshape(32, 32)
    mha.load_state_dict(state)
    idx = torch.randint(0, 64, (2, 12))
    torch.testing.assert_close(gqa(idx).logits, mha(idx).logits)
    with pytest.raises(ConfigError, match="n_kv_heads=3"):
        small_config(n_kv_heads=3)


def test_tied_and_untied_embeddings():
    tied = small_model("dense")
    assert tied.lm_head.weight is tied.embed_tokens.weight
    assert tied.lm_head.weight.data_ptr() == tied.embed_tokens.weight.data_ptr()
    untied = small_model("dense", tie_embeddings=False)
    assert untied.lm_head.weight.data_ptr() != untied.embed_tokens.weight.data_ptr()
    assert untied.num_params() - tied.num_params() == 64 * 32
    # a state dict round trip keeps the tie and the outputs
    copy = small_model("dense")
    copy.load_state_dict(tied.state_dict())
    assert copy.lm_head.weight is copy.embed_tokens.weight
    idx = torch.randint(0, 64, (1, 8))
    torch.testing.assert_close(copy(idx).logits, tied(idx).logits)


def _hand_counts(cfg):
    """Per-layer attention, FFN (total, active) parameters and forward FFN FLOPs, by hand."""
    D, V, F, E, k, L = cfg.d_model, cfg.vocab_size, cfg.d_ffn, cfg.n_experts, cfg.top_k, cfg.d_low
    Dh = D // cfg.n_heads
    attn = D * cfg.n_heads * Dh + 2 * D * cfg.kv_heads * Dh + cfg.n_heads * Dh * D
    if cfg.ffn == "dense":
        ffn_total = ffn_active = 3 * D * cfg.ffn_width_dense
        ffn_flops = 2 * 3 * D * cfg.ffn_width_dense
    elif cfg.ffn == "moe":
        ffn_total = D * E + E * 3 * D * F
        ffn_active = D * E + k * 3 * D * F
        ffn_flops = 2 * D * E + k * 2 * 3 * D * F
    else:
        W = cfg.resolved_d_wide
        ffn_total = E * (D * L + L * W + 2 * D * W)
        ffn_active = E * D * L + k * (L * W + 2 * D * W)
        ffn_flops = 2 * E * D * L + k * 2 * (L * W + 2 * D * W)
    norms = 2 * D
    if cfg.qk_norm == "head":  # one [Dh] weight for q, one for k
        norms += 2 * Dh
    elif cfg.qk_norm == "full":  # [H * Dh] for q, [G * Dh] for k
        norms += cfg.n_heads * Dh + cfg.kv_heads * Dh
    return attn, ffn_total, ffn_active, ffn_flops, norms, V * D


@pytest.mark.parametrize("ffn", FFNS)
@pytest.mark.parametrize("tie", [True, False])
def test_num_params_against_hand_count(ffn, tie):
    cfg = small_config(ffn, n_kv_heads=2, tie_embeddings=tie, dense_d_ffn=40)
    model = Transformer(cfg)
    attn, ffn_total, ffn_active, _, norms, vocab = _hand_counts(cfg)
    n_vocab = vocab * (1 if tie else 2)
    blocks_total = cfg.n_layers * (attn + ffn_total + norms) + cfg.d_model
    blocks_active = cfg.n_layers * (attn + ffn_active + norms) + cfg.d_model
    assert model.num_params() == sum(p.numel() for p in model.parameters()) == blocks_total + n_vocab
    assert model.num_params(include_embedding=False) == blocks_total
    assert model.num_params(active=True) == blocks_active + n_vocab
    assert model.num_params(active=True, include_embedding=False) == blocks_active
    if ffn == "dense":
        assert model.num_params(active=True) == model.num_params()
    else:
        assert model.num_params(active=True) < model.num_params()


def test_aoe_active_params_count_every_w_down():
    model = small_model("aoe", n_experts=8, top_k=1)
    layer = model.layers[0].ffn
    D, L, W = 32, 8, layer.d_wide
    per_layer_inactive = 7 * (L * W + 2 * D * W)  # w_down of all 8 experts stays active
    assert model.num_params() - model.num_params(active=True) == 2 * per_layer_inactive


@pytest.mark.parametrize("ffn", FFNS)
def test_flops_per_token_against_hand_count(ffn):
    cfg = small_config(ffn, n_kv_heads=2)
    model = Transformer(cfg)
    attn, _, _, ffn_flops, _, vocab = _hand_counts(cfg)
    T, Dh = 40, cfg.head_dim
    scores = 2 * 2 * cfg.n_heads * Dh * T
    forward = cfg.n_layers * (2 * attn + scores + ffn_flops) + 2 * vocab
    assert model.flops_per_token(T, backward=False) == forward
    assert model.flops_per_token(T) == 3 * forward
    causal = forward - cfg.n_layers * (scores - 2 * cfg.n_heads * Dh * (T + 1))
    assert model.flops_per_token(T, backward=False, causal=True) == causal
    # without attention scores, forward matmuls = 2 x (active matrices outside the embedding + lm_head)
    no_scores = model.flops_per_token(T, backward=False) - cfg.n_layers * scores
    norm_params = cfg.n_layers * 2 * cfg.d_model + cfg.d_model
    assert no_scores == 2 * (model.num_params(active=True, include_embedding=False) - norm_params + vocab)
    assert model.flops_per_token() == model.flops_per_token(cfg.max_seq_len)


@pytest.mark.parametrize("ffn", FFNS)
def test_flops_per_token_against_flop_counter(ffn):
    """FlopCounterMode counts the real matmuls (the loop expert backend issues one mm per expert;
    the math attention backend issues bmm)."""
    cfg = small_config(ffn, n_kv_heads=2, grouped_mm="loop")
    model = Transformer(cfg)
    B, T = 2, 24
    idx = torch.randint(0, 64, (B, T))
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model(idx)
    assert counter.get_total_flops() == B * T * model.flops_per_token(T, backward=False)


def test_training_flops_are_three_forwards_for_dense():
    model = small_model("dense", n_kv_heads=2)
    B, T = 2, 24
    idx = torch.randint(0, 64, (B, T))
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model(idx, targets=idx).loss.backward()
    assert counter.get_total_flops() == B * T * model.flops_per_token(T)


def test_ffn_layers_follow_the_config():
    model = small_model("aoe", n_layers=3, dense_layers=[0], dense_d_ffn=40, d_wide=24)
    kinds = [type(b.ffn) for b in model.layers]
    assert kinds == [DenseFFN, AoE, AoE]
    assert model.layers[0].ffn.d_ffn == 40 and model.layers[1].ffn.d_wide == 24
    assert model.layers[1].ffn.renormalize is True  # Algorithm 2
    moe = small_model("moe", aux_loss_coef=0.01, z_loss_coef=0.001)
    assert all(isinstance(b.ffn, MoE) and b.ffn.renormalize for b in moe.layers)
    assert moe.layers[0].ffn.z_loss_coef == 0.001
    assert small_model("moe", renormalize=False).layers[0].ffn.renormalize is False
    assert small_model("aoe", renormalize=True, norm="linf").layers[0].ffn.norm == "linf"
    assert small_model("dense", dense_d_ffn=80).layers[1].ffn.d_ffn == 80


def test_init_std():
    cfg = small_config("moe", d_model=128, n_heads=4, n_layers=8, d_ffn=128, vocab_size=512, init_std=0.02)
    model = Transformer(cfg)
    out_std = 0.02 / math.sqrt(2 * 8)

    def close(t, target):  # the sample std of n normal draws is off by about 1/sqrt(2n)
        return abs(t.detach().float().std().item() / target - 1) < 5 / math.sqrt(2 * t.numel())

    assert close(model.embed_tokens.weight, 0.02)
    for block in model.layers:
        for w in (block.attn.q_proj.weight, block.attn.k_proj.weight, block.ffn.w_gate, block.ffn.w_in, block.ffn.router):
            assert close(w, 0.02)
        assert close(block.attn.o_proj.weight, out_std)
        assert close(block.ffn.w_out, out_std)
        assert torch.equal(block.attn_norm.weight, torch.ones(128))
    assert torch.equal(model.norm.weight, torch.ones(128))
    aoe = Transformer(small_config("aoe", d_model=128, n_layers=8, d_ffn=128, d_low=32, vocab_size=512))
    assert close(aoe.layers[3].ffn.w_down, 0.02) and close(aoe.layers[3].ffn.w_out, out_std)


def test_input_errors():
    model = small_model("dense")
    with pytest.raises(ValueError, match="token id 64 is out of range for vocab_size=64"):
        model(torch.tensor([[1, 2, 64]]))
    with pytest.raises(ValueError, match="token id -1 is out of range"):
        model(torch.tensor([[-1, 2]]))
    with pytest.raises(ValueError, match="integer token ids"):
        model(torch.zeros(1, 4))
    with pytest.raises(ValueError, match=r"\[batch, seq\]"):
        model(torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="input of 49 tokens.*max_seq_len=48"):
        model(torch.zeros(1, 49, dtype=torch.long))
    with pytest.raises(ValueError, match="start_pos=40.*max_seq_len=48"):
        model(torch.zeros(1, 9, dtype=torch.long), start_pos=40)
    cache = KVCache.for_model(model, batch_size=1, max_len=8)
    with pytest.raises(ValueError, match="kv_cache holds batch 1"):
        model(torch.zeros(2, 4, dtype=torch.long), kv_cache=cache)
    with pytest.raises(ValueError, match="kv_cache max_len=8"):
        model(torch.zeros(1, 9, dtype=torch.long), kv_cache=cache)
    with pytest.raises(ConfigError, match="model.vocab_size=None"):
        Transformer(small_config(vocab_size=None))


@pytest.mark.parametrize("ffn", FFNS)
def test_kv_cache_prefill_in_chunks_matches_full_forward(ffn):
    model = small_model(ffn, n_kv_heads=2, init_std=0.1).eval()
    idx = torch.randint(0, 64, (2, 20))
    full = model(idx).logits
    cache = KVCache.for_model(model, batch_size=2)
    parts = []
    for start, end in ((0, 7), (7, 8), (8, 15), (15, 20)):  # several tokens at an offset: the mask path
        parts.append(model(idx[:, start:end], kv_cache=cache, start_pos=start).logits)
        assert cache.length == end
    torch.testing.assert_close(torch.cat(parts, dim=1), full, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("ffn", FFNS)
def test_bfloat16_weights_forward(ffn):
    model = small_model(ffn).to(torch.bfloat16)
    assert model.rotary(0, 4, torch.device("cpu"))[0].dtype == torch.float32  # tables stay fp32
    idx = torch.randint(0, 64, (2, 8))
    out = model(idx, targets=idx)
    assert out.logits.dtype == torch.bfloat16 and out.loss.dtype == torch.float32
    assert torch.isfinite(out.loss)


def test_state_dict_has_no_rotary_tables():
    keys = small_model("aoe").state_dict().keys()
    assert not any("rotary" in k for k in keys)
    assert "layers.0.attn.q_proj.weight" in keys and "layers.1.ffn.w_down" in keys


@pytest.mark.parametrize("ffn,extra", [
    ("dense", {}), ("moe", {}), ("aoe", {}),
    ("moe", {"moe_gate_rank": 8}), ("moe", {"moe_router_hidden": 24}), ("dense", {"dense_gate_rank": 8}),
])
def test_ffn_flops_match_the_matmuls_actually_run(ffn, extra):
    from torch.utils.flop_counter import FlopCounterMode

    from aoe.config import ModelConfig
    from aoe.model import Transformer, build_ffn, ffn_forward_flops

    cfg = ModelConfig(vocab_size=64, d_model=32, n_layers=1, n_heads=2, d_ffn=48, n_experts=4, top_k=2, d_low=8,
                      ffn=ffn, grouped_mm="loop", **extra)
    layer = build_ffn(cfg, 0)
    x = torch.randn(50, 32)
    with FlopCounterMode(display=False) as counter:
        layer(x)
    assert counter.get_total_flops() == 50 * ffn_forward_flops(layer)
    model = Transformer(cfg)
    counted = sum(p.numel() for p in model.parameters())
    assert model.num_params() == counted


@pytest.mark.parametrize("qk_norm,extra", [("head", 2 * 8), ("full", 32 + 2 * 8)])
@pytest.mark.parametrize("ffn", ["dense", "aoe"])
def test_num_params_with_qk_norm_against_hand_count(ffn, qk_norm, extra):
    cfg = small_config(ffn, n_kv_heads=2, tie_embeddings=False, qk_norm=qk_norm)  # D 32, H 4, G 2, Dh 8
    model = Transformer(cfg)
    attn, ffn_total, ffn_active, _, norms, vocab = _hand_counts(cfg)
    assert norms == 2 * 32 + extra
    blocks_total = cfg.n_layers * (attn + ffn_total + norms) + cfg.d_model
    blocks_active = cfg.n_layers * (attn + ffn_active + norms) + cfg.d_model
    assert model.num_params() == sum(p.numel() for p in model.parameters()) == blocks_total + 2 * vocab
    assert model.num_params(include_embedding=False) == blocks_total
    assert model.num_params(active=True, include_embedding=False) == blocks_active
    plain = Transformer(small_config(ffn, n_kv_heads=2, tie_embeddings=False))
    assert model.num_params() - plain.num_params() == cfg.n_layers * extra
    # FLOPs do not count norms: the same as without qk-norm
    assert model.flops_per_token(16) == plain.flops_per_token(16)


def test_qk_norm_parameters_init_and_names():
    plain = small_model("aoe")
    assert plain.layers[0].attn.q_norm is None and not any("q_norm" in k or "k_norm" in k for k in plain.state_dict())
    for qk_norm, q_shape, k_shape in (("head", (8,), (8,)), ("full", (32,), (16,))):
        model = small_model("aoe", n_kv_heads=2, qk_norm=qk_norm)
        sd = model.state_dict()
        assert sd["layers.1.attn.q_norm.weight"].shape == q_shape and sd["layers.1.attn.k_norm.weight"].shape == k_shape
        with torch.no_grad():
            for block in model.layers:
                block.attn.q_norm.weight.fill_(3.0)
                block.attn.k_norm.weight.fill_(3.0)
        model.reset_parameters()
        assert all(torch.equal(sd[k], torch.ones_like(sd[k])) for k in sd if k.endswith(("q_norm.weight", "k_norm.weight")))
        assert model.layers[0].attn.q_norm.eps == model.config.norm_eps
    with pytest.raises(ConfigError, match="model.qk_norm='per_head' is not one of"):
        small_config(qk_norm="per_head")


@pytest.mark.parametrize("qk_norm", ["head", "full"])
def test_qk_norm_matches_reference_attention(qk_norm):
    """The q/k RMSNorm is applied where Qwen3 ("head": after the head split) and OLMoE ("full":
    before it) apply it: before RoPE, over the last dimension, with norm_eps."""
    from aoe.model.attention import apply_rotary

    torch.manual_seed(0)
    model = small_model("dense", n_kv_heads=2, qk_norm=qk_norm, norm_eps=1e-6, init_std=0.2)
    attn = model.layers[0].attn
    with torch.no_grad():
        attn.q_norm.weight.uniform_(0.5, 1.5)
        attn.k_norm.weight.uniform_(0.5, 1.5)
    x = torch.randn(2, 6, 32)
    cos, sin = model.rotary(0, 6, x.device)

    def rms(t, w):
        return t * torch.rsqrt(t.pow(2).mean(-1, keepdim=True) + 1e-6) * w

    q, k, v = x @ attn.q_proj.weight.T, x @ attn.k_proj.weight.T, x @ attn.v_proj.weight.T
    if qk_norm == "full":
        q, k = rms(q, attn.q_norm.weight), rms(k, attn.k_norm.weight)
    q, k, v = q.view(2, 6, 4, 8), k.view(2, 6, 2, 8), v.view(2, 6, 2, 8)
    if qk_norm == "head":
        q, k = rms(q, attn.q_norm.weight), rms(k, attn.k_norm.weight)
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
    k, v = k.repeat_interleave(2, dim=1), v.repeat_interleave(2, dim=1)
    scores = (q @ k.transpose(-1, -2)) / math.sqrt(8) + torch.full((6, 6), float("-inf")).triu(1)
    y = (scores.softmax(-1) @ v).transpose(1, 2).reshape(2, 6, 32) @ attn.o_proj.weight.T
    torch.testing.assert_close(attn(x, cos, sin), y, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("qk_norm", ["head", "full"])
def test_kv_cache_with_qk_norm_matches_full_forward(qk_norm):
    model = small_model("aoe", n_kv_heads=2, init_std=0.1, qk_norm=qk_norm).eval()
    with torch.no_grad():
        for block in model.layers:
            block.attn.q_norm.weight.uniform_(0.5, 1.5)
            block.attn.k_norm.weight.uniform_(0.5, 1.5)
    idx = torch.randint(0, 64, (2, 12))
    full = model(idx).logits
    cache = KVCache.for_model(model, batch_size=2)
    parts = [model(idx[:, a:b], kv_cache=cache, start_pos=a).logits for a, b in ((0, 5), (5, 6), (6, 12))]
    torch.testing.assert_close(torch.cat(parts, dim=1), full, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("ffn", ["moe", "aoe"])
def test_active_parameters_and_flops_are_capped_at_every_expert(ffn):
    from aoe.config import ModelConfig

    base = dict(vocab_size=64, d_model=16, n_layers=2, n_heads=2, d_ffn=32, n_experts=4, d_low=4, max_seq_len=16, ffn=ffn)
    every = Transformer(ModelConfig(**base, top_k=4))
    for cf in (4.0, 1e30):  # capacity_factor * top_k past n_experts: every expert, no more
        capped = Transformer(ModelConfig(**base, top_k=2, selection="expert_choice", capacity_factor=cf))
        assert capped.num_params(active=True) == every.num_params(active=True) == every.num_params()
        assert capped.flops_per_token(16) == every.flops_per_token(16)
    half = Transformer(ModelConfig(**base, top_k=2, selection="expert_choice", capacity_factor=1.0))
    top2 = Transformer(ModelConfig(**base, top_k=2))
    assert half.num_params(active=True) == top2.num_params(active=True) < every.num_params()
    assert half.flops_per_token(16) == top2.flops_per_token(16)
