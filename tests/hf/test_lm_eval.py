"""lm-eval's ``hf`` model loads an exported directory by path (skipped without lm_eval)."""

import pytest
import torch

from aoe.config import ModelConfig
from aoe.hf.export import export_to_hf
from aoe.model.transformer import Transformer

lm_eval_hf = pytest.importorskip("lm_eval.models.huggingface", reason="lm_eval.models.huggingface cannot be imported (lm_eval or its dependency accelerate is missing)")


def test_hflm_loads_exported_dir_and_scores(tmp_path, tiny_tokenizer):
    from lm_eval.api.instance import Instance

    model = Transformer(ModelConfig(vocab_size=tiny_tokenizer.vocab_size, d_model=32, n_layers=2, n_heads=4,
                                    max_seq_len=64, d_ffn=48, n_experts=4, top_k=2, d_low=8)).eval()
    dst = export_to_hf(model, tmp_path / "hf", tiny_tokenizer)
    lm = lm_eval_hf.HFLM(pretrained=str(dst), device="cpu", batch_size=1, max_length=64)
    assert type(lm.model).__name__ == "AoEForCausalLM"
    ctx, cont = "hello world,", " the quick fox"
    req = Instance(request_type="loglikelihood", doc={}, arguments=(ctx, cont), idx=0)
    (ll, _greedy), = lm.loglikelihood([req])
    ids_ctx, ids_cont = tiny_tokenizer.encode(ctx), tiny_tokenizer.encode(cont)
    ids = torch.tensor([ids_ctx + ids_cont])
    logp = model(ids).logits.float().log_softmax(-1)[0, len(ids_ctx) - 1:-1]
    expected = logp.gather(-1, torch.tensor(ids_cont)[:, None]).sum().item()
    assert ll == pytest.approx(expected, abs=1e-4)
