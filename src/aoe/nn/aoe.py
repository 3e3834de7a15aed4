"""Autonomy-of-Experts: router-free experts that choose themselves (Lv et al., ICML 2025).

Per token x:
1. every expert's low-rank activation in ONE matmul over the fused [D, E*L] view of w_down:
   ``c_e = x @ w_down[e]`` (kept as the cache);
2. scores ``s_e = ||c_e||`` in fp32 (L2 by default; "l1" and "linf" as options);
3. ``p = softmax(s)`` over ALL E experts; top-k; gate weights = the chosen p divided by their sum
   (the paper's Algorithm 2, line 8: a softmax over the k chosen norms); ``renormalize=False``
   keeps the chosen p as they are (the authors' megablocks code);
4. each chosen expert finishes from its cached activation, never recomputing ``x @ w_down``:
   ``y = sum_chosen w_e * (SiLU(c_e @ w_up[e]) * (x @ w_in[e])) @ w_out[e]``.

Parameters (input dimension first): w_down [E, D, L], w_up [E, L, W], w_in [E, D, W],
w_out [E, W, D]; no router. L = d_low, W = d_wide.
"""

from __future__ import annotations

import functools
import warnings

import torch
from torch import nn

from aoe.nn.factorized import init_factorized_gate
from aoe.nn.fused_scores import check_scores_backend, chosen_activations, expert_norms, use_fused
from aoe.nn.selection import activation_norms, check_norm
from aoe.nn.checks import check_positive
from aoe.nn.options import with_sparse_options
from aoe.nn.sparse import SparseFFN


def aoe_expert_params(d_model: int, d_low: int, d_wide: int) -> int:
    """Parameters of one AoE expert: w_down + w_up + w_in + w_out."""
    return d_model * d_low + d_low * d_wide + 2 * d_model * d_wide


def match_d_wide(d_model: int, d_ffn: int, d_low: int, multiple: int = 16, min_multiple: int = 1) -> int:
    """The paper's parameter-matching rule: the d_wide that gives an AoE expert the parameters of
    a SwiGLU expert of width d_ffn.

    Exact solution of ``d_model*d_low + d_low*d_wide + 2*d_model*d_wide = 3*d_model*d_ffn``:
    ``d_wide = (3*d_model*d_ffn - d_low*d_model) / (d_low + 2*d_model)``, rounded to the nearest
    multiple of ``multiple`` (16 by default, for aligned kernels). If that rounding would put the
    expert's parameters more than 1% away from the target, the multiple is halved until it does not
    (down to ``min_multiple``), so with the default 1 the result is always within 1% where an
    integer solution is.

    Which width and why: torch._grouped_mm needs 16-byte aligned rows, a multiple of 8 in bf16. A
    width that the 1% rule leaves below a multiple of 8 (only at small shapes: ``match_d_wide(64,
    128, 16)`` is 164, where 160 and 168 are 2.1% and 2.6% off) is returned as the rule gives it,
    with a warning naming the aligned widths beside it and their parameter gap, because a saved
    config without ``d_wide`` recomputes its width here and must keep getting the same one. Such a
    layer runs the per-expert loop where the kernel would be used. ``min_multiple=8`` keeps the
    fast path instead, at the parameter gap (the result is then a multiple of 8 however far off).
    """
    for name, v in (("d_model", d_model), ("d_ffn", d_ffn), ("d_low", d_low), ("multiple", multiple),
                    ("min_multiple", min_multiple)):
        check_positive(name, v)
    target = 3 * d_model * d_ffn
    exact = (target - d_low * d_model) / (d_low + 2 * d_model)
    if exact < 1:
        raise ValueError(f"d_low={d_low} is too large to match d_ffn={d_ffn} at d_model={d_model} (d_wide would be {exact:.2f})")
    m = max(multiple, min_multiple)
    while True:
        d_wide = max(m, int(round(exact / m)) * m)
        off = aoe_expert_params(d_model, d_low, d_wide) / target - 1
        if m <= min_multiple or m == 1 or abs(off) <= 0.01:
            break
        m //= 2
    if d_wide % 8:
        _warn_unaligned_width(d_model, d_low, d_wide, exact, target)
    return d_wide


@functools.lru_cache(maxsize=None)  # once per width: every layer of a model shares it
def _warn_unaligned_width(d_model: int, d_low: int, d_wide: int, exact: float, target: int) -> None:
    lower, upper = max(8, int(exact // 8) * 8), int(exact // 8) * 8 + 8
    gaps = ", ".join(f"{w} ({aoe_expert_params(d_model, d_low, w) / target - 1:+.1%} parameters)" for w in (lower, upper))
    warnings.warn(f"match_d_wide: d_wide={d_wide} matches the parameters within 1% but is not a multiple of 8, so bf16 "
                  f"rows are not 16-byte aligned and torch._grouped_mm falls back to the per-expert loop; the "
                  f"nearest aligned widths are {gaps} (set d_wide, or min_multiple=8)", stacklevel=3)


class AoE(SparseFFN):
    """Autonomy-of-Experts layer on the dropless expert engine.

    Args:
        d_model: model width D.
        d_low: rank L of the factorized gate projection (w_down [D, L], w_up [L, W]).
        n_experts: E; top_k: experts per token.
        d_wide: expert width W; or give ``d_ffn`` (exactly one of the two) to get the
            parameter-matched ``W = match_d_wide(d_model, d_ffn, d_low)``.
        norm: "l2" (default), "l1" or "linf": the norm that scores each expert's activation.
        recompute_scores: do not keep the [T, E, L] activation cache for backward; recompute
            ``x @ w_down`` there instead (training memory for one extra small matmul). None
            (default): recompute where the cache is the larger activation, E * L > k * W (many
            small experts: E = 64, k = 8, L = 64, W = 152 recomputes; the paper's E = 8, k = 2,
            L = 256, W = 3840 keeps the cache). Outputs and gradients are the same either way.
        scores_backend: "auto" | "triton" | "torch": how the scores are computed. "triton": one
            fused kernel that never writes the [T, E, L] activations (``aoe.nn.fused_scores``; the
            chosen rows are then computed by one grouped matmul); "torch": the plain matmul and its
            cache (the reference); "auto" (default): triton on CUDA when it imports and the norm is
            l2 or l1, else torch.
        recompute_gate: recompute the chosen experts' ``c @ w_up`` in backward instead of keeping
            it (default True: an [S, L] x [L, W] matmul, cheap because L is small).
        **options: the options both sparse layers take (``aoe.nn.options.SparseOptions``: renormalize,
            default True as the paper's Algorithm 2, False the authors' megablocks code, whose
            weights sum to less than 1; aux_loss_coef; bias_update_rate; entropy_loss_coef;
            grouped_mm; backward_chunks; init_std, w_up's std set by gate_init: "balanced", the
            default, w_up ~ N(0, 1/d_low) so that w_down @ w_up starts with an unfactorized gate's
            scale, or "normal", the authors', every factor ~ N(0, init_std), see
            ``aoe.nn.factorized``; the selection rule and its knobs; the shared experts, of width
            d_wide unless d_shared is given).
    """

    CHOSEN_EXPERT_PARAMS = ("w_up", "w_in", "w_out")  # w_down: every expert scores every token

    @with_sparse_options
    def __init__(
        self,
        d_model: int,
        d_low: int,
        n_experts: int,
        top_k: int,
        *,
        d_wide: int | None = None,
        d_ffn: int | None = None,
        norm: str = "l2",
        recompute_scores: bool | None = None,
        scores_backend: str = "auto",
        recompute_gate: bool = True,
        **options,
    ):
        super().__init__(d_model, n_experts, top_k, **options)
        self.d_low = check_positive("d_low", d_low)
        if (d_wide is None) == (d_ffn is None):
            raise ValueError(f"give exactly one of d_wide={d_wide!r} and d_ffn={d_ffn!r}")
        self.d_wide = check_positive("d_wide", d_wide) if d_wide is not None else match_d_wide(d_model, d_ffn, d_low)
        self.norm = check_norm(norm)
        if recompute_scores is None:
            recompute_scores = n_experts * d_low > top_k * self.d_wide
        self.recompute_scores = bool(recompute_scores)
        self.scores_backend = check_scores_backend(scores_backend, self.norm)
        self.recompute_gate = bool(recompute_gate)
        self.w_down = nn.Parameter(torch.empty(n_experts, d_model, d_low))
        self.w_up = nn.Parameter(torch.empty(n_experts, d_low, self.d_wide))
        self.w_in = nn.Parameter(torch.empty(n_experts, d_model, self.d_wide))
        self.w_out = nn.Parameter(torch.empty(n_experts, self.d_wide, d_model))
        self.init_shared(self.d_wide)
        self.reset_parameters(self.init_std)

    def reset_parameters(self, std: float = 0.02, out_std: float | None = None) -> None:
        init_factorized_gate(self.w_down, self.w_up, std, self.gate_init)
        nn.init.normal_(self.w_in, std=std)
        nn.init.normal_(self.w_out, std=std if out_std is None else out_std)
        if self.shared is not None:
            self.shared.reset_parameters(std, out_std)

    def expert_scores(self, x_TD, dtype):
        """The scores [T, E] and the activation cache [T, E, L] (None from the fused kernel)."""
        n_tokens, E, L = x_TD.shape[0], self.n_experts, self.d_low
        w_down_DX = self.w_down.to(dtype).transpose(0, 1).reshape(self.d_model, E * L)  # X = E*L, expert-major
        if use_fused(self.scores_backend, x_TD, self.norm):
            return expert_norms(x_TD, w_down_DX, L, self.norm), None
        act_TEL = (x_TD @ w_down_DX).view(n_tokens, E, L)
        recompute_from = (x_TD, w_down_DX) if self.recompute_scores else None
        return activation_norms(act_TEL, self.norm, recompute_from=recompute_from), act_TEL

    def chosen_inputs(self, x_TD, act_TEL, dispatch, dtype):
        """[S, L]: the chosen experts' low-rank activations (``chosen_activations``)."""
        return self.chosen_activations(x_TD, act_TEL, dispatch, dtype)

    def gate_input(self, x_SD, act_SL, offsets_E, dtype):
        """The gate reads the cached activation c_e through ``w_up``."""
        return act_SL, self.w_up.to(dtype)

    def chosen_activations(self, x_TD, act_TEL, dispatch, dtype):
        """[S, L]: each sorted row's ``x @ w_down[e]``, read from the cache, or computed (fused path)."""
        if act_TEL is None:
            return chosen_activations(x_TD, self.w_down.to(dtype), dispatch, self.grouped_mm)
        E, L = self.n_experts, self.d_low
        return act_TEL.reshape(-1, L).index_select(0, dispatch.token_S * E + dispatch.expert_S)

    def forward_flops(self) -> int:
        """Matmul FLOPs (2 x multiply-adds) per token of the forward pass: every expert's low-rank
        activation 2*E*D*L, plus per chosen expert 2*(L*W + 2*D*W), plus the shared experts'
        (``aoe.nn.shared``). A dynamic rule counts k as ``experts_per_token_count()`` does
        (top-p: its bound; expert choice: its mean)."""
        D, L, W = self.d_model, self.d_low, self.d_wide
        chosen = round(self.experts_per_token_count() * 2 * (L * W + 2 * D * W))
        return 2 * self.n_experts * D * L + chosen + self.shared_flops()

    def extra_repr(self) -> str:
        init = "" if self.gate_init == "balanced" else f", gate_init={self.gate_init!r}"
        return f"{super().extra_repr()}, d_low={self.d_low}, d_wide={self.d_wide}, norm={self.norm!r}{init}"
