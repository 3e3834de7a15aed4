from __future__ import annotations


import pytest
import torch
import torch.nn.functional as F
from lm_eval.api.instance import Instance
from lm_eval.api.registry import get_model
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

import aoe.eval.harness as harness
from aoe.eval import AoEHarnessLM
from aoe.model.generate import generate


def req(kind: str, *args) -> Instance:
    return Instance(request_type=kind, doc={}, arguments=tuple(args), idx=0)


@torch.no_grad()
def direct_logprob(model, ctx: list[int], cont: list[int]) -> tuple[float, bool]:
    """One unbatched forward over ctx + cont[:-1]; the sum of the continuation's log-probs."""
    inp = torch.tensor([ctx + cont[:-1]])
    lp = F.log_softmax(model(inp).logits[0].float(), dim=-1)[len(ctx) - 1:]
    target = torch.tensor(cont)
    return float(lp[torch.arange(len(cont)), target].sum()), bool((lp.argmax(-1) == target).all())


def split_like_harness(tok, context: str, continuation: str) -> tuple[list[int], list[int]]:
    n = len(context) - len(context.rstrip())
    if n:
        context, continuation = context[:-n], context[-n:] + continuation
    whole, ctx = tok.encode(context + continuation), tok.encode(context)
    assert whole[:len(ctx)] == ctx
    return ctx, whole[len(ctx):]


PAIRS = [
    ("the cat sat on", " a mat"),
    ("experts route each token", " to themselves by norm."),
    ("red blue ", "green"),  # trailing space moves to the continuation
    ("yes", " no because the model answer"),
    ("paris rome berlin red blue green yes no because the cat sat on a mat while", " experts"),
    ("question", "?"),
]


def test_encode_pair_matches_harness_rule(model, tokenizer):
    lm = AoEHarnessLM(model, tokenizer)
    for context, cont in PAIRS:
        assert lm.encode_pair(context, cont) == split_like_harness(tokenizer, context, cont)
    ctx, cont = lm.encode_pair("red blue ", "green")
    assert tokenizer.decode(cont) == " green" and tokenizer.decode(ctx) == "red blue"
    # empty context: conditioned on EOS
    assert lm.encode_pair("", " the cat") == ([tokenizer.eos_id], tokenizer.encode(" the cat"))
    with pytest.raises(ValueError, match="empty continuation"):
        lm.encode_pair("the cat", "")


@pytest.mark.parametrize("batch_size", [1, 4])
def test_loglikelihood_matches_direct(model, tokenizer, batch_size):
    lm = AoEHarnessLM(model, tokenizer, batch_size=batch_size)
    got = lm.loglikelihood([req("loglikelihood", c, x) for c, x in PAIRS + [("", " the cat")]])
    assert len(got) == len(PAIRS) + 1
    for (context, cont), (ll, greedy) in zip(PAIRS, got):  # request order is kept
        want, want_greedy = direct_logprob(model, *split_like_harness(tokenizer, context, cont))
        assert ll == pytest.approx(want, abs=1e-4)
        assert greedy == want_greedy
    want, _ = direct_logprob(model, [tokenizer.eos_id], tokenizer.encode(" the cat"))
    assert got[-1][0] == pytest.approx(want, abs=1e-4)
    assert all(ll < 0 for ll, _ in got)


def test_is_greedy(model, tokenizer):
    lm = AoEHarnessLM(model, tokenizer)
    context = "the cat sat on a"
    ids = tokenizer.encode(context)
    # continue greedily for 3 tokens: that continuation is greedy by construction
    full = generate(model, ids, max_new_tokens=3, temperature=0).tolist()
    greedy_text = tokenizer.decode(full[len(ids):])
    # a constructed non-greedy continuation: the least likely next token
    logits = model(torch.tensor([ids])).logits[0, -1]
    worst = int(logits.argmin())
    res = lm._score_tokens([(ids, full[len(ids):]), (ids, [worst])])
    assert res[0][1] is True and res[1][1] is False
    assert res[0][0] > res[1][0]
    # through the text interface (when the greedy tokens re-tokenize the same way)
    if tokenizer.encode(context + greedy_text)[len(ids):] == full[len(ids):]:
        assert lm.loglikelihood([req("loglikelihood", context, greedy_text)])[0][1] is True


def test_loglikelihood_left_truncation(model, tokenizer):
    lm = AoEHarnessLM(model, tokenizer, max_length=16)
    context = " ".join(["the cat sat on a mat"] * 10)
    ctx, cont = split_like_harness(tokenizer, context, " while experts")
    assert len(ctx) + len(cont) > 17
    (ll, _), = lm.loglikelihood([req("loglikelihood", context, " while experts")])
    keep = (ctx + cont)[-17:]
    want, _ = direct_logprob(model, keep[:len(keep) - len(cont)], cont)
    assert ll == pytest.approx(want, abs=1e-4)


def direct_rolling(model, tokens: list[int], eos: int, L: int) -> float:
    """Straightforward reference: walk the text in chunks; each chunk of <= L tokens is
    predicted with the L tokens before its last one as input (the first with EOS prefix)."""
    seq = [eos] + tokens
    total, done = 0.0, 0
    while done < len(tokens):
        n = min(L, len(tokens) - done)
        end = done + n
        inp = seq[max(0, end - L):end]
        with torch.no_grad():
            lp = F.log_softmax(model(torch.tensor([inp])).logits[0].float(), dim=-1)
        for k in range(n):  # position of the k-th predicted token in inp
            pos = len(inp) - n + k
            total += float(lp[pos, tokens[done + k]])
        done = end
    return total


@pytest.mark.parametrize("L", [16, 64])
def test_rolling_windows_cover_each_token_once(model, tokenizer, L):
    lm = AoEHarnessLM(model, tokenizer, max_length=L)
    for n in (1, 5, L - 1, L, L + 1, 2 * L + 3, 5 * L):
        tokens = list(range(1, n + 1))
        windows = lm.rolling_windows(tokens)
        assert [t for _, pred in windows for t in pred] == tokens
        for ctx, pred in windows:
            assert 1 <= len(pred) <= L and len(ctx) >= 1
            assert len(ctx) + len(pred) - 1 <= L  # the model input fits
        # identical to lm_eval's own window helper, as its HF backend uses it
        ref = [make_disjoint_window(w) for w in get_rolling_token_windows(tokens, tokenizer.eos_id, L, 1)]
        assert [tuple(map(list, w)) for w in ref] == windows


def test_loglikelihood_rolling(model, tokenizer):
    L = 16
    lm = AoEHarnessLM(model, tokenizer, max_length=L, batch_size=3)
    short = "the cat sat."
    long = " ".join(["experts route each token to themselves by norm while the cat sat"] * 4)
    assert len(tokenizer.encode(short)) < L < 3 * L < len(tokenizer.encode(long))
    got = lm.loglikelihood_rolling([req("loglikelihood_rolling", short), req("loglikelihood_rolling", long)])
    tokens = tokenizer.encode(short)
    want_short, _ = direct_logprob(model, [tokenizer.eos_id], tokens)
    assert got[0] == pytest.approx(want_short, abs=1e-4)
    assert got[1] == pytest.approx(direct_rolling(model, tokenizer.encode(long), tokenizer.eos_id, L), abs=1e-3)
    # with the full context length a long text is one window only when it fits
    lm64 = AoEHarnessLM(model, tokenizer)
    t = tokenizer.encode(long)[:60]
    text = tokenizer.decode(t)
    if tokenizer.encode(text) == t:
        want, _ = direct_logprob(model, [tokenizer.eos_id], t)
        assert lm64.loglikelihood_rolling([req("loglikelihood_rolling", text)])[0] == pytest.approx(want, abs=1e-3)


def test_generate_until_matches_generate(model, tokenizer):
    lm = AoEHarnessLM(model, tokenizer, batch_size=2)
    prompts = ["the cat sat on", "experts route", "the cat sat on", "red blue green"]
    n = 12
    reqs = [req("generate_until", p, {"until": [], "max_gen_toks": n}) for p in prompts]
    out = lm.generate_until(reqs)
    for p, text in zip(prompts, out):
        ids = tokenizer.encode(p)
        full = generate(model, ids, max_new_tokens=n, temperature=0, eos_id=tokenizer.eos_id).tolist()
        new = full[len(ids):]
        if tokenizer.eos_id in new:
            new = new[:new.index(tokenizer.eos_id)]
        assert text == tokenizer.decode(new)
    assert out[0] == out[2]


def test_generate_until_stops_at_until(model, tokenizer):
    lm = AoEHarnessLM(model, tokenizer)
    prompt = "the cat sat on"
    free = lm.generate_until([req("generate_until", prompt, {"until": [], "max_gen_toks": 20})])[0]
    assert len(free) >= 4
    stop = free[2:4]  # a string that the free generation contains
    first = free.index(stop)
    got = lm.generate_until([
        req("generate_until", prompt, {"until": [stop], "max_gen_toks": 20}),
        req("generate_until", "experts", {"until": "\n\n", "max_gen_toks": 3, "do_sample": False}),
    ])
    assert got[0] == free[:first]
    assert stop not in got[0]
    ids = tokenizer.encode("experts")
    three = generate(model, ids, max_new_tokens=3, temperature=0).tolist()[len(ids):]
    assert got[1] == tokenizer.decode(three).split("\n\n")[0].split("<|endoftext|>")[0]


def test_stop_strings_are_checked_on_a_bounded_tail(model, tokenizer, monkeypatch):
    """Checking stop strings decodes only the last tokens that can complete one (not the whole
    text at every step, which is quadratic in the generated length); the result is the same."""
    lm = AoEHarnessLM(model, tokenizer)
    kw = {"until": ["zz"], "max_gen_toks": 40}
    expected = lm.generate_until([req("generate_until", "the cat", kw)])
    longest_stop = max(len(u.encode()) for u in lm._generation_settings(kw)["until"])  # "zz" and the EOS text
    lengths = []
    real = lm.tok_decode
    monkeypatch.setattr(lm, "tok_decode", lambda ids: lengths.append(len(list(ids))) or real(ids))
    assert lm.generate_until([req("generate_until", "the cat", dict(kw))]) == expected
    assert len(lengths) > 10 and max(lengths[:-1]) <= longest_stop + 1  # the last call decodes the finished text


def test_generate_sampling_is_seeded(model, tokenizer):
    lm = AoEHarnessLM(model, tokenizer)
    kw = {"until": [], "max_gen_toks": 8, "do_sample": True, "temperature": 1.0, "seed": 3}
    a = lm.generate_until([req("generate_until", "the cat", kw)])
    b = lm.generate_until([req("generate_until", "the cat", dict(kw))])
    assert a == b
    s = lm._generation_settings({"temperature": 0.7})
    assert s["temperature"] == 0.7 and s["max_gen_toks"] == lm.max_gen_toks
    assert lm._generation_settings({"temperature": 0.7, "do_sample": False})["temperature"] == 0.0
    assert tokenizer.decode([tokenizer.eos_id]) in lm._generation_settings({})["until"]


def test_registered_and_arg_string(model, tokenizer, monkeypatch, tmp_path):
    assert get_model("aoe") is AoEHarnessLM
    seen = {}

    def fake_load(path, device):
        seen["args"] = (str(path), device)
        return model, tokenizer

    monkeypatch.setattr(harness, "_load_checkpoint", fake_load)
    lm = AoEHarnessLM.create_from_arg_string(
        f"checkpoint={tmp_path}", {"batch_size": 4, "max_batch_size": None, "device": "cpu"})
    assert seen["args"] == (str(tmp_path), "cpu")
    assert lm.batch_size == 4 and lm.max_length == model.config.max_seq_len
    lm2 = AoEHarnessLM.from_checkpoint(tmp_path, batch_size="2", device="cpu")
    assert lm2.batch_size == 2
    with pytest.raises(ValueError, match="batch_size"):
        AoEHarnessLM(model, tokenizer, batch_size=0)
    with pytest.raises(ValueError, match="max_length"):
        AoEHarnessLM(model, tokenizer, max_length=65)


def test_generate_until_batches_mixed_lengths_as_one_at_a_time(model, tokenizer):
    """Prompts of different lengths share a batch (left-padded); greedy and seeded sampling give
    every request the text it gets alone."""
    prompts = ["the cat sat on", "experts", "red blue green yellow and", "the"]
    for kw in ({"until": [], "max_gen_toks": 8},
               {"until": [], "max_gen_toks": 8, "do_sample": True, "temperature": 1.0, "seed": 3}):
        reqs = [req("generate_until", p, dict(kw)) for p in prompts]
        batched = AoEHarnessLM(model, tokenizer, batch_size=4).generate_until(reqs)
        alone = [AoEHarnessLM(model, tokenizer, batch_size=1).generate_until([r])[0] for r in reqs]
        assert batched == alone, kw
