"""torch.compile of the layers: one graph for forward and backward (no graph break), the same
outputs and gradients as eager. Tiny shapes: compile time is what these tests pay for."""

import warnings

import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend

from aoe import AoE, MoE
from aoe.nn.grouped_mm import grouped_mm

from .helpers import grads_of, rel_err

CASES = [("aoe", torch.float32), ("moe", torch.float32), ("aoe", torch.bfloat16), ("moe", torch.bfloat16)]


def build(kind, dtype, **kw):
    layer = MoE(16, 32, 4, 2, backward_chunks=2, **kw) if kind == "moe" else AoE(16, 4, 4, 2, d_wide=32, **kw)
    return layer.to(dtype)


def compiled_against_eager(layer, backend, fullgraph=True):
    torch._dynamo.reset()
    counter = CompileCounterWithBackend(backend)
    compiled = torch.compile(layer, backend=counter, fullgraph=fullgraph)
    x = torch.randn(2, 8, layer.d_model, dtype=next(layer.parameters()).dtype)
    xc, xe = x.clone().requires_grad_(), x.clone().requires_grad_()
    out_c, out_e = compiled(xc), layer(xe)
    g = torch.randn_like(out_e)
    return counter, (out_c, out_e), (grads_of(layer, xc, out_c, g), grads_of(layer, xe, out_e, g))


@pytest.mark.parametrize("kind, dtype", CASES)
@pytest.mark.parametrize("recompute", [False, True])
def test_top_k_layers_compile_to_one_graph(kind, dtype, recompute):
    """fullgraph=True refuses any break in the forward or in the autograd.Functions' backward
    (AOTAutograd traces both); the counter sees exactly one compiled frame."""
    kw = dict(recompute_gate=recompute) if kind == "moe" else dict(recompute_scores=recompute)
    counter, (out_c, out_e), (gc, ge) = compiled_against_eager(build(kind, dtype, **kw), "aot_eager")
    assert counter.frame_count == 1
    assert rel_err(out_c, out_e) == 0  # the same ops in the same order
    for name in gc:
        assert rel_err(gc[name], ge[name]) == 0, name


def test_a_graph_break_is_counted():
    """The counter is not blind: a layer with a dynamic rule (top-p's row count is a host value)
    is several frames, and still right."""
    counter, (out_c, out_e), _ = compiled_against_eager(build("moe", torch.float32, selection="top_p"), "aot_eager",
                                                        fullgraph=False)
    assert counter.frame_count > 1
    assert rel_err(out_c, out_e) == 0


@pytest.mark.slow
@pytest.mark.parametrize("kind, dtype", [("aoe", torch.float32), ("aoe", torch.bfloat16), ("moe", torch.bfloat16)])
def test_layers_run_under_inductor(kind, dtype):
    counter, (out_c, out_e), (gc, ge) = compiled_against_eager(build(kind, dtype), "inductor")
    assert counter.frame_count == 1
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert rel_err(out_c, out_e) <= tol
    for name in gc:
        assert rel_err(gc[name], ge[name]) <= tol, name


def test_misaligned_operands_warn_once_and_run_the_loop():
    if not hasattr(torch, "_grouped_mm"):
        pytest.skip("no torch._grouped_mm")
    x, w = torch.randn(12, 6), torch.randn(3, 6, 10)  # fp32 rows of 6 x 4 = 24 bytes: not 16-byte aligned
    offsets = torch.tensor([4, 4, 12], dtype=torch.int32)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        first = grouped_mm(x, w, offsets, "torch")
        second = grouped_mm(x, w, offsets, "torch")
    messages = [str(c.message) for c in caught if "not 16-byte aligned" in str(c.message)]
    assert len(messages) == 1, messages
    assert rel_err(first, grouped_mm(x, w, offsets, "loop")) == 0 and rel_err(second, first) == 0


@pytest.mark.parametrize("ffn", ["aoe", "moe"])
def test_language_model_compiles_to_one_graph(ffn):
    """What ``train.compile=true`` compiles: the whole model's loss, forward and backward."""
    from aoe.config.sections import ModelConfig
    from aoe.model.transformer import Transformer

    cfg = ModelConfig(vocab_size=64, d_model=16, n_layers=2, n_heads=2, max_seq_len=16, ffn=ffn, d_ffn=32,
                      n_experts=4, top_k=2, d_low=4, d_wide=32)
    torch.manual_seed(0)
    model = Transformer(cfg)
    model.check_inputs = False  # as the trainer does under compile
    idx = torch.randint(0, 64, (2, 8))
    torch._dynamo.reset()
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(model, backend=counter, fullgraph=True)
    loss_c, loss_e = compiled(idx, targets=idx).loss, model(idx, targets=idx).loss
    grads_c = torch.autograd.grad(loss_c, list(model.parameters()))
    grads_e = torch.autograd.grad(loss_e, list(model.parameters()))
    assert counter.frame_count == 1
    assert rel_err(loss_c, loss_e) <= 1e-6
    assert max(rel_err(a, b) for a, b in zip(grads_c, grads_e)) <= 1e-5
