"""Padded batches: every real token gives what it gives alone (logits, continuations, routing, losses).

References are the sequences run one at a time, unpadded, in fp64."""

import pytest
import torch

from aoe.model.generate import generate
from aoe.nn.balance import load_balancing_loss
from aoe.nn.sparse import sparse_layers

from .helpers import FFNS, small_model

LENGTHS = (5, 9, 1, 7)


def _model(ffn, **kw):
    torch.manual_seed(0)
    return small_model(ffn, **kw).double().eval()


def _sequences(vocab=64):
    g = torch.Generator().manual_seed(1)
    return [torch.randint(1, vocab, (n,), generator=g).tolist() for n in LENGTHS]


def _padded(seqs, side, pad_id=0):
    T = max(len(s) for s in seqs)
    ids, mask = [], []
    for s in seqs:
        fill = [pad_id] * (T - len(s))
        ids.append(fill + s if side == "left" else s + fill)
        mask.append([0] * len(fill) + [1] * len(s) if side == "left" else [1] * len(s) + [0] * len(fill))
    return torch.tensor(ids), torch.tensor(mask)


def _real_rows(mask_row):
    return mask_row.nonzero().squeeze(1)


@pytest.mark.parametrize("ffn", FFNS)
@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("variant", [dict(), dict(tie_embeddings=False), dict(qk_norm="head"), dict(qk_norm="full")])
def test_padded_logits_equal_each_sequence_alone(ffn, side, variant):
    model = _model(ffn, **variant)
    seqs = _sequences()
    ids, mask = _padded(seqs, side, pad_id=3)
    logits = model(ids, attention_mask=mask).logits
    assert torch.isfinite(logits).all()
    for b, s in enumerate(seqs):
        alone = model(torch.tensor([s])).logits[0]
        torch.testing.assert_close(logits[b, _real_rows(mask[b])], alone, rtol=0, atol=1e-10)


def test_pads_in_between_and_pad_ids_do_not_matter():
    model = _model("aoe")
    s = _sequences()[1]
    ids = torch.tensor([s[:4] + [7, 8] + s[4:]])
    mask = torch.tensor([[1] * 4 + [0, 0] + [1] * (len(s) - 4)])
    logits = model(ids, attention_mask=mask).logits[0, _real_rows(mask[0])]
    torch.testing.assert_close(logits, model(torch.tensor([s])).logits[0], rtol=0, atol=1e-10)


@pytest.mark.parametrize("ffn", FFNS)
def test_padded_loss_counts_real_targets_only(ffn):
    model = _model(ffn)
    seqs = _sequences()
    ids, mask = _padded(seqs, "right")
    targets = torch.roll(ids, -1, dims=1)  # pad targets included on purpose: the mask must drop them
    loss = model(ids, targets=targets, attention_mask=mask).loss
    per_token = []
    for b, s in enumerate(seqs):
        logp = model(torch.tensor([s])).logits[0].log_softmax(-1)
        per_token.append(-logp.gather(-1, targets[b, : len(s), None]).squeeze(1))
    torch.testing.assert_close(loss.double(), torch.cat(per_token).mean(), rtol=0, atol=1e-6)  # the loss is fp32


@pytest.mark.parametrize("ffn", ["moe", "aoe"])
def test_padded_routing_and_aux_loss_cover_real_tokens_only(ffn):
    model = _model(ffn, aux_loss_coef=0.01)
    seqs = _sequences()
    ids, mask = _padded(seqs, "left")
    aux = model(ids, attention_mask=mask).aux_loss
    padded_routing = [layer.last_routing for layer in sparse_layers(model)]
    alone = []
    for s in seqs:
        model(torch.tensor([s]))
        alone.append([layer.last_routing for layer in sparse_layers(model)])
    expected_aux = 0.0
    for i, info in enumerate(padded_routing):
        counts = sum(a[i].tokens_per_expert for a in alone)
        probs = torch.cat([a[i].probs for a in alone])
        assert torch.equal(info.tokens_per_expert, counts)
        assert info.probs.shape[0] == sum(LENGTHS)
        expected_aux = expected_aux + 0.01 * load_balancing_loss(probs, counts)
    torch.testing.assert_close(aux, torch.as_tensor(expected_aux, dtype=aux.dtype), rtol=0, atol=1e-10)


@pytest.mark.parametrize("ffn", FFNS)
@pytest.mark.parametrize("use_cache", [True, False])
def test_batched_greedy_and_sampled_continuations_equal_alone(ffn, use_cache):
    model = _model(ffn)
    seqs = _sequences()
    for kw in (dict(temperature=0), dict(temperature=1.0, top_k=20, seed=5)):
        batch = generate(model, seqs, 6, use_cache=use_cache, **kw)
        for b, s in enumerate(seqs):
            alone_kw = dict(kw, seed=kw["seed"] + b) if "seed" in kw else kw
            alone = generate(model, s, 6, use_cache=use_cache, **alone_kw).tolist()
            assert batch[b] == alone, (b, kw)


def test_right_padded_tensor_prompt_continues_from_last_real_token():
    model = _model("moe")
    seqs = _sequences()
    ids, mask = _padded(seqs, "right")
    out = generate(model, ids, 4, temperature=0, attention_mask=mask)
    assert out.shape == (len(seqs), ids.shape[1] + 4)
    for b, s in enumerate(seqs):
        assert out[b, ids.shape[1]:].tolist() == generate(model, s, 4, temperature=0).tolist()[len(s):]


def test_bad_masks_are_refused():
    model = _model("dense")
    ids = torch.tensor([[1, 2, 3]])
    with pytest.raises(ValueError, match="expected"):
        model(ids, attention_mask=torch.ones(1, 4))
    with pytest.raises(ValueError, match="0s and 1s"):
        model(ids, attention_mask=torch.ones(1, 3))  # float
    with pytest.raises(ValueError, match="only 0"):
        model(ids, attention_mask=torch.tensor([[1, 2, 1]]))
    with pytest.raises(ValueError, match="every token"):
        generate(model, ids, 2, attention_mask=torch.tensor([[0, 0, 0]]))
    with pytest.raises(ValueError, match="empty"):
        generate(model, [[1, 2], []], 2)


@pytest.mark.parametrize("ffn", FFNS)
def test_padded_training_gradients_equal_the_sum_over_sequences(ffn):
    model = _model(ffn, aux_loss_coef=0.0).train()
    seqs = _sequences()
    ids, mask = _padded(seqs, "left")
    targets = torch.roll(ids, -1, dims=1).masked_fill(torch.roll(mask, -1, dims=1) == 0, -100)
    targets[:, -1] = -100  # the last token has no next one
    targets = targets.masked_fill(mask == 0, -100)
    n_real = int((targets != -100).sum())
    (model(ids, targets=targets, attention_mask=mask).loss * n_real).backward()
    padded = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    for s in seqs:
        if len(s) > 1:
            x = torch.tensor([s])
            (model(x[:, :-1], targets=x[:, 1:]).loss * (len(s) - 1)).backward()
    for name, p in model.named_parameters():
        torch.testing.assert_close(padded[name], p.grad, rtol=0, atol=1e-5, msg=name)
