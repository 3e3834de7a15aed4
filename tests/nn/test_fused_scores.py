"""AoE's fused scoring (``aoe.nn.fused_scores``): the Triton kernels against the fp64 reference,
outputs and gradients; the layer with the kernel forced against its PyTorch path and the per-token
reference, for every selection rule; torch.compile keeps the op whole; the options' errors; and
the PyTorch path's no-fp32-copy rule.

Without a CUDA device the kernels run under Triton's interpreter (``TRITON_INTERPRET=1``, set by
tests/conftest.py before anything imports triton), in fp32 and fp16 (the interpreter computes bf16 wrongly). Each
launch costs a fraction of a second there, so the shapes are tiny but cover the masks: T and D not
multiples of the tile, d_low split into two column chunks of which the second is partial, and a
d_low below the smallest tile.
"""

import math
import os

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from aoe import AoE
from aoe.nn.fused_scores import check_scores_backend, expert_norms, expert_norms_reference, use_fused
from aoe.nn.reference import reference_forward
from aoe.nn.selection import activation_norms

from .helpers import grads_of, rel_err

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
try:
    import triton  # noqa: F401
except ImportError:
    triton = None
needs_triton = pytest.mark.skipif(  # tests/conftest.py sets TRITON_INTERPRET=1 on a machine without CUDA
    triton is None or (DEVICE == "cpu" and os.environ.get("TRITON_INTERPRET") != "1"),
    reason="needs triton, and a CUDA device or TRITON_INTERPRET=1 set before triton is imported")
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if DEVICE == "cuda" else [])
# (norms, gradients) tolerances against fp64 on the same rounded inputs
TOL = {torch.float32: (1e-5, 1e-5), torch.float16: (1e-4, 3e-3), torch.bfloat16: (1e-3, 2e-2)}


@pytest.fixture
def poisoned(monkeypatch):
    """Every kernel output starts as NaN, so an element the kernel does not write fails the check."""
    from aoe.nn import score_kernels

    monkeypatch.setattr(score_kernels, "new_buffer",
                        lambda shape, device, dtype: torch.full(shape, math.nan, device=device, dtype=dtype))


def _inputs(T, D, E, L, dtype):
    x_TD = torch.randn(T, D, device=DEVICE).to(dtype)
    w_EDL = (torch.randn(E, D, L, device=DEVICE) / D**0.5).to(dtype)
    return x_TD, w_EDL


def _fused_DX(w_EDL):
    E, D, L = w_EDL.shape
    return w_EDL.transpose(0, 1).reshape(D, E * L)


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("norm", ["l2", "l1"])
@pytest.mark.parametrize("shape", [(37, 48, 3, 80), (20, 16, 5, 12)])  # (T, D, E, L)
def test_kernel_norms_and_gradients_match_fp64(poisoned, shape, norm, dtype):
    T, D, E, L = shape
    x_TD, w_EDL = _inputs(T, D, E, L, dtype)
    x, w = x_TD.clone().requires_grad_(), w_EDL.clone().requires_grad_()
    x64, w64 = x_TD.double().requires_grad_(), w_EDL.double().requires_grad_()
    norms_TE = expert_norms(x, _fused_DX(w), L, norm)
    ref_TE = expert_norms_reference(x64, w64, norm)
    assert norms_TE.dtype == torch.float32 and norms_TE.shape == (T, E)
    grad_TE = torch.randn(T, E, device=DEVICE, dtype=torch.float64)
    norms_TE.backward(grad_TE.float())
    ref_TE.backward(grad_TE)
    tol_norm, tol_grad = TOL[dtype]
    assert rel_err(norms_TE, ref_TE) <= tol_norm
    assert x.grad.dtype == dtype and w.grad.dtype == dtype
    assert rel_err(x.grad, x64.grad) <= tol_grad
    assert rel_err(w.grad, w64.grad) <= tol_grad


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_kernel_linf_norms_match_fp64(poisoned, dtype):
    x_TD, w_EDL = _inputs(37, 48, 3, 80, dtype)
    with torch.no_grad():
        norms_TE = expert_norms(x_TD, _fused_DX(w_EDL), 80, "linf")
    assert rel_err(norms_TE, expert_norms_reference(x_TD, w_EDL, "linf")) <= TOL[dtype][0]


@needs_triton
def test_backward_in_token_blocks_is_the_same(monkeypatch):
    """The backward's dc transient is bounded by running it over blocks of tokens."""
    from aoe.nn import fused_scores

    x_TD, w_EDL = _inputs(37, 48, 3, 16, torch.float32)
    grads = []
    for block_bytes in (fused_scores.BACKWARD_BLOCK_BYTES, 16 * 48 * 4):  # one block; 16-token blocks
        monkeypatch.setattr(fused_scores, "BACKWARD_BLOCK_BYTES", block_bytes)
        x, w = x_TD.clone().requires_grad_(), w_EDL.clone().requires_grad_()
        expert_norms(x, _fused_DX(w), 16).sum().backward()
        grads.append((x.grad, w.grad))
    for one, blocked in zip(*grads):
        assert rel_err(blocked, one) <= 1e-6


def _layer_pair(selection, **kw):
    """An fp64 AoE layer (the reference's) and fp32 copies with the kernel forced and with the
    PyTorch path."""
    opts = dict(d_wide=24, selection=selection, grouped_mm="loop", **kw)
    if selection == "top_p":
        opts.update(top_p=0.5, max_k=4)
    ref = AoE(16, 20, 6, 2, **opts).double()
    fused = AoE(16, 20, 6, 2, scores_backend="triton", **opts).to(DEVICE)
    plain = AoE(16, 20, 6, 2, scores_backend="torch", **opts).to(DEVICE)
    for layer in (fused, plain):
        layer.load_state_dict({k: v.float() for k, v in ref.state_dict().items()})
    return ref, fused, plain


@needs_triton
@pytest.mark.parametrize("selection", ["top_k", "top_p", "expert_choice"])
def test_layer_with_kernel_matches_torch_path_and_reference(selection):
    ref, fused, plain = _layer_pair(selection, renormalize=selection == "top_k")
    x64 = torch.randn(2, 9, 16, dtype=torch.float64, requires_grad=True)
    x = x64.detach().float().to(DEVICE).requires_grad_()
    out, out_plain, out_ref = fused(x), plain(x), reference_forward(ref, x64)[0]
    assert fused.last_routing.expert_indices.tolist() == plain.last_routing.expert_indices.tolist()
    grad = torch.randn_like(out_ref)
    g_fused = grads_of(fused, x, out, grad.float().to(DEVICE))
    g_plain = grads_of(plain, x, out_plain, grad.float().to(DEVICE))
    g_ref = grads_of(ref, x64, out_ref, grad)
    assert rel_err(out.cpu(), out_ref) <= 1e-5 and rel_err(out, out_plain) <= 1e-5
    for name in g_ref:
        assert rel_err(g_fused[name].cpu(), g_ref[name]) <= 1e-5, name
        assert rel_err(g_fused[name], g_plain[name]) <= 1e-5, name


@needs_triton
def test_layer_with_kernel_matches_torch_path_fp16():
    _, fused, plain = _layer_pair("top_k", norm="l1")
    fused, plain = fused.half(), plain.half()
    x = torch.randn(30, 16, device=DEVICE, dtype=torch.float16, requires_grad=True)
    out, out_plain = fused(x), plain(x)
    assert fused.last_routing.expert_indices.tolist() == plain.last_routing.expert_indices.tolist()
    grad = torch.randn_like(out)
    g_fused, g_plain = grads_of(fused, x, out, grad), grads_of(plain, x, out_plain, grad)
    assert rel_err(out, out_plain) <= 3e-3
    for name in g_fused:
        assert rel_err(g_fused[name], g_plain[name]) <= 5e-3, name


@needs_triton
def test_compile_keeps_the_op_whole_forward_and_backward():
    """fullgraph=True fails on any graph break; aot_eager traces the backward op too."""
    x_TD, w_EDL = _inputs(20, 16, 3, 16, torch.float32)

    def loss(x, w):
        return (expert_norms(x, _fused_DX(w), 16) * torch.arange(3.0, device=x.device)).sum()

    compiled = torch.compile(loss, backend="aot_eager", fullgraph=True)
    x, w = x_TD.clone().requires_grad_(), w_EDL.clone().requires_grad_()
    xc, wc = x_TD.clone().requires_grad_(), w_EDL.clone().requires_grad_()
    loss(x, w).backward()
    compiled(xc, wc).backward()
    assert rel_err(xc.grad, x.grad) <= 1e-6 and rel_err(wc.grad, w.grad) <= 1e-6


def test_bad_options_say_what_to_do():
    with pytest.raises(ValueError, match="scores_backend='fast' is not a backend"):
        AoE(16, 4, 4, 2, d_wide=8, scores_backend="fast")
    with pytest.raises(ValueError, match="not norm='linf'.*scores_backend='torch'"):
        check_scores_backend("triton", "linf")
    with pytest.raises(ValueError, match="cannot score a torch.float64 input"):
        use_fused("triton", torch.zeros(2, 4, dtype=torch.float64), "l2")


def test_model_config_carries_and_checks_the_option():
    from aoe.config import ConfigError, ModelConfig

    assert ModelConfig(vocab_size=100, scores_backend="torch").ffn_config(0).build().scores_backend == "torch"
    for bad, message in ((dict(scores_backend="fast"), "not one of"), (dict(scores_backend="triton", norm="linf"), "linf")):
        with pytest.raises(ConfigError, match=f"model.scores_backend=.*{message}"):
            ModelConfig(vocab_size=100, **bad).validate()


def test_auto_uses_the_torch_path_on_the_cpu_and_for_linf():
    x = torch.zeros(2, 4)
    assert not use_fused("auto", x, "l2")
    assert not use_fused("auto", x.to(DEVICE), "linf")
    assert not use_fused("torch", x.to(DEVICE), "l2")
    layer = AoE(16, 4, 4, 2, d_wide=8)
    assert layer.scores_backend == "auto" and layer.expert_scores(torch.randn(3, 16), torch.float32)[1] is not None


class _Sizes(TorchDispatchMode):
    """Records (dtype, numel, storage) of every tensor an op returns (views and in-place ops
    return a storage already seen)."""

    def __init__(self):
        super().__init__()
        self.outputs = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.outputs.append((t.dtype, t.numel(), t.untyped_storage().data_ptr()))
        return out


@pytest.mark.parametrize("norm", ["l2", "l1", "linf"])
@pytest.mark.parametrize("recompute", [False, True])
def test_torch_path_makes_no_fp32_copy_of_the_cache(norm, recompute):
    """bf16 cache [T, E, L]: the forward makes no [T, E, L] tensor at all, the backward one bf16
    buffer (besides linf's bool masks of the maxima), never an fp32 one."""
    T, D, E, L = 8, 16, 4, 8
    x_TD = torch.randn(T, D, dtype=torch.bfloat16, requires_grad=True)
    w_DX = torch.randn(D, E * L, dtype=torch.bfloat16, requires_grad=True)
    act_TEL = (x_TD @ w_DX).view(T, E, L)
    forward, backward = _Sizes(), _Sizes()
    with forward:
        norms_TE = activation_norms(act_TEL, norm, recompute_from=(x_TD, w_DX) if recompute else None)
    with backward:
        torch.autograd.grad(norms_TE, act_TEL, torch.randn(T, E))
    big_forward = {(d, p) for d, n, p in forward.outputs if n == T * E * L}
    big_backward = {(d, p) for d, n, p in backward.outputs if n == T * E * L}
    assert norms_TE.dtype == torch.float32 and big_forward == set()
    assert [d for d, _ in big_backward if d != torch.bool] == [torch.bfloat16]  # the result (a recomputed act: in place)
