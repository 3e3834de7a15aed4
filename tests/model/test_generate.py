"""aoe.model.generate: KV-cache decoding equals full recomputation; sampling options; errors."""

import pytest
import torch

from aoe.model import generate
from aoe.model.generate import sample_next

from .helpers import FFNS, small_model


def _model(ffn, **kw):
    # a larger init makes the untrained model's predictions distinct, so greedy decoding is a
    # sharp test (with init_std 0.02 every token's logits are nearly equal)
    return small_model(ffn, init_std=0.3, n_kv_heads=2, **kw)


@pytest.mark.parametrize("ffn", FFNS)
def test_greedy_with_cache_equals_without(ffn):
    model = _model(ffn)
    prompt = [5, 17, 3, 60, 22]
    cached = generate(model, prompt, max_new_tokens=30, temperature=0)
    full = generate(model, prompt, max_new_tokens=30, temperature=0, use_cache=False)
    assert cached.shape == (35,) and cached.dtype == torch.long
    assert cached[:5].tolist() == prompt
    assert cached.tolist() == full.tolist()
    assert len(set(cached[5:].tolist())) > 3  # not a degenerate repetition


@pytest.mark.parametrize("ffn", ("dense", "aoe"))
def test_batched_prompts(ffn):
    model = _model(ffn)
    prompts = torch.randint(0, 64, (3, 6))
    cached = generate(model, prompts, max_new_tokens=12, temperature=0)
    full = generate(model, prompts, max_new_tokens=12, temperature=0, use_cache=False)
    assert cached.shape == (3, 18)
    assert torch.equal(cached, full)
    for row in range(3):  # rows do not interact
        assert torch.equal(generate(model, prompts[row], max_new_tokens=12, temperature=0), cached[row])


def test_sampling_is_reproducible_with_a_seed():
    model = _model("moe")
    a = generate(model, [1, 2, 3], max_new_tokens=20, seed=7)
    b = generate(model, [1, 2, 3], max_new_tokens=20, seed=7)
    c = generate(model, [1, 2, 3], max_new_tokens=20, seed=8)
    assert torch.equal(a, b) and not torch.equal(a, c)
    nc = generate(model, [1, 2, 3], max_new_tokens=20, seed=7, use_cache=False)
    assert torch.equal(a, nc)
    greedy = generate(model, [1, 2, 3], max_new_tokens=20, temperature=0)
    assert torch.equal(generate(model, [1, 2, 3], max_new_tokens=20, top_k=1, seed=3), greedy)
    assert torch.equal(generate(model, [1, 2, 3], max_new_tokens=20, top_p=1e-6, seed=3), greedy)


def test_sample_next_filters():
    logits = torch.tensor([[0.0, 3.0, 2.0, 1.0, -1.0]]).repeat(500, 1)
    g = torch.Generator().manual_seed(0)
    top2 = sample_next(logits, top_k=2, generator=g)
    assert set(top2.tolist()) == {1, 2}
    p = torch.softmax(logits[0], -1)  # p[1] = 0.64, p[2] = 0.24: the nucleus of 0.8 is {1, 2}
    assert p[1] < 0.8 < p[1] + p[2]
    nucleus = sample_next(logits, top_p=0.8, generator=g)
    assert set(nucleus.tolist()) == {1, 2}
    assert set(sample_next(logits, generator=g).tolist()) == {0, 1, 2, 3, 4}
    assert sample_next(logits[:1], temperature=0).tolist() == [1]


def test_eos_stops_and_pads():
    model = _model("dense")
    greedy = generate(model, [4, 9], max_new_tokens=10, temperature=0)
    eos = int(greedy[3])  # the second generated token
    stopped = generate(model, [4, 9], max_new_tokens=10, temperature=0, eos_id=eos)
    assert stopped.tolist() == greedy[:4].tolist() or stopped.tolist() == greedy[:3].tolist()
    assert stopped[-1].item() == eos


def test_mode_restored_and_zero_new_tokens():
    model = _model("aoe").train()
    out = generate(model, torch.tensor([1, 2, 3]), max_new_tokens=0)
    assert out.tolist() == [1, 2, 3]
    generate(model, [1, 2], max_new_tokens=2)
    assert model.training


def test_errors():
    model = _model("dense")  # max_seq_len 48
    with pytest.raises(ValueError, match="prompt of 49 tokens .* exceeds the model's max_seq_len=48"):
        generate(model, [1] * 49, max_new_tokens=0)
    with pytest.raises(ValueError, match="prompt of 40 tokens \\+ max_new_tokens=9 = 49 tokens exceeds the model's max_seq_len=48"):
        generate(model, [1] * 40, max_new_tokens=9)
    with pytest.raises(ValueError, match="empty"):
        generate(model, [], max_new_tokens=3)
    with pytest.raises(ValueError, match=r"\[0, 64\)"):
        generate(model, [1, 64], max_new_tokens=3)
    with pytest.raises(ValueError, match="temperature"):
        generate(model, [1], max_new_tokens=3, temperature=-1)
    with pytest.raises(ValueError, match="top_k"):
        generate(model, [1], max_new_tokens=3, top_k=0)
    with pytest.raises(ValueError, match="top_p"):
        generate(model, [1], max_new_tokens=3, top_p=1.5)
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate(model, [1], max_new_tokens=-1)
