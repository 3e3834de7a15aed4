"""The Hugging Face door with padding: batched forward, loss and ``generate`` equal each sequence alone,
and lm-eval's ``hf`` model scores the same with batch size 4 as with 1."""

import pytest
import torch

from aoe.hf import AoEForCausalLM

SEQS = ([5, 9, 11, 3, 7], [4, 8], [12, 2, 6, 10, 13, 14, 1], [9])


def _model(tiny_config, ffn):
    torch.manual_seed(0)
    return AoEForCausalLM(tiny_config(ffn_type=ffn)).double().eval()


def _left_padded(seqs, pad_id=0):
    T = max(len(s) for s in seqs)
    ids = torch.tensor([[pad_id] * (T - len(s)) + list(s) for s in seqs])
    mask = torch.tensor([[0] * (T - len(s)) + [1] * len(s) for s in seqs])
    return ids, mask


@pytest.mark.parametrize("ffn", ["dense", "moe", "aoe"])
def test_padded_forward_and_loss_equal_alone(tiny_config, ffn):
    model = _model(tiny_config, ffn)
    ids, mask = _left_padded(SEQS)
    out = model(input_ids=ids, attention_mask=mask, labels=ids)
    losses, n = [], 0
    for b, s in enumerate(SEQS):
        alone = model(input_ids=torch.tensor([s]), labels=torch.tensor([s]))
        torch.testing.assert_close(out.logits[b, -len(s):], alone.logits[0], rtol=0, atol=1e-10)
        if len(s) > 1:
            losses.append(alone.loss * (len(s) - 1))
            n += len(s) - 1
    torch.testing.assert_close(out.loss.double(), (sum(losses) / n).double(), rtol=0, atol=1e-6)


@pytest.mark.parametrize("ffn", ["moe", "aoe"])
def test_generate_with_left_padding_equals_alone(tiny_config, ffn):
    model = _model(tiny_config, ffn)
    ids, mask = _left_padded(SEQS)
    batch = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=5, do_sample=False, pad_token_id=0)
    for b, s in enumerate(SEQS):
        alone = model.generate(input_ids=torch.tensor([s]), max_new_tokens=5, do_sample=False, pad_token_id=0)
        assert batch[b, ids.shape[1]:].tolist() == alone[0, len(s):].tolist()


def test_position_ids_must_follow_the_mask(tiny_config):
    model = _model(tiny_config, "dense")
    ids, mask = _left_padded(SEQS[:2])
    good = (mask.cumsum(-1) - 1).clamp_min(0)
    model(input_ids=ids, attention_mask=mask, position_ids=good)
    with pytest.raises(ValueError, match="position_ids"):
        model(input_ids=ids, attention_mask=mask, position_ids=torch.arange(ids.shape[1]).expand_as(ids))



def test_generate_with_an_all_padding_row_names_that_row_not_position_ids(tiny_config):
    model = _model(tiny_config, "dense")
    ids, mask = torch.tensor([[1, 2, 3], [4, 5, 6]]), torch.tensor([[1, 1, 1], [0, 0, 0]])
    with pytest.raises(ValueError, match=r"attention_mask row 1 has no real token in its prompt \(all 0s\)"):
        model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=3, do_sample=False, pad_token_id=0)


lm_eval_hf = pytest.importorskip("lm_eval.models.huggingface", reason="lm_eval.models.huggingface cannot be imported")


def test_hflm_batch_size_does_not_change_scores(tmp_path, tiny_tokenizer):
    from lm_eval.api.instance import Instance

    from aoe.config import ModelConfig
    from aoe.hf.export import export_to_hf
    from aoe.model.transformer import Transformer

    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=tiny_tokenizer.vocab_size, d_model=32, n_layers=2, n_heads=4,
                                    max_seq_len=64, d_ffn=48, n_experts=4, top_k=2, d_low=8)).eval()
    dst = export_to_hf(model, tmp_path / "hf", tiny_tokenizer)
    pairs = [("hello world,", " the quick fox"), ("the", " lazy dog."), ("hello there. hello", " world"),
             ("the quick brown fox jumps", " over")]
    contexts = ["hello", "the quick brown", "hello world, hello there.", "fox"]

    def run(batch_size):
        lm = lm_eval_hf.HFLM(pretrained=str(dst), device="cpu", batch_size=batch_size, max_length=64)
        ll = lm.loglikelihood([Instance("loglikelihood", {}, p, i) for i, p in enumerate(pairs)])
        gen = lm.generate_until([Instance("generate_until", {}, (c, {"until": ["\n"], "max_gen_toks": 6, "do_sample": False}), i)
                                 for i, c in enumerate(contexts)])
        return ll, gen

    (ll1, gen1), (ll4, gen4) = run(1), run(4)
    assert gen4 == gen1
    for (a, greedy_a), (b, greedy_b) in zip(ll1, ll4):
        assert a == pytest.approx(b, abs=1e-4) and greedy_a == greedy_b
