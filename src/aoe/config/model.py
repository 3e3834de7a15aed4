"""The ``model:`` section of a run's configuration: ``ModelConfig`` (see ``aoe.config``); its
FFN fields map onto the layers' own options (``aoe.nn.options``). Every field has a default and a
docstring (the ``#:`` comment above it)."""

from __future__ import annotations

import typing
from dataclasses import dataclass, field

from aoe.config.applicability import refuse_idle_options
from aoe.config.schema import ConfigError, _Section
from aoe.nn.aoe import match_d_wide
from aoe.nn.configs import AoEFFNConfig, DenseFFNConfig, MoEFFNConfig
from aoe.nn.factorized import GATE_INITS  # the layers' own options: their lists, in one place each
from aoe.nn.fused_scores import FUSED_NORMS, SCORES_BACKENDS
from aoe.nn.grouped_mm import BACKENDS as GROUPED_MM_BACKENDS
from aoe.nn.selection import NORMS as SCORE_NORMS
from aoe.nn.options import CONFIG_KEYS, EC_INFERENCE, OptionError, SparseOptions
from aoe.nn.options import NAMES as SPARSE_OPTIONS
from aoe.nn.selection import SELECTIONS

FFN_KINDS = ("dense", "moe", "aoe")
QK_NORMS = ("none", "head", "full")
#: What ``model.renormalize: null`` computes: the layers' defaults before AoE's became the paper's
#: (Algorithm 2 renormalizes). Every run config saved before then records null, and keeps its outputs.
LEGACY_RENORMALIZE = {"moe": True, "aoe": False}


@dataclass
class ModelConfig(_Section):
    """The decoder-only transformer: pre-norm blocks of attention and a feed-forward layer that is
    dense (SwiGLU), a router MoE, or AoE. Defaults: the tiny CPU demo model."""

    SECTION: typing.ClassVar[str] = "model"

    #: Vocabulary size of the embedding and output layer. None = taken from the tokenizer by the
    #: trainer (a model cannot be built while it is None).
    vocab_size: int | None = None
    #: Width of the residual stream.
    d_model: int = 128
    #: Number of transformer blocks.
    n_layers: int = 4
    #: Query heads; must divide d_model, and head_dim = d_model / n_heads must be even (RoPE).
    n_heads: int = 4
    #: Key/value heads (grouped-query attention); must divide n_heads. None = n_heads (plain MHA).
    n_kv_heads: int | None = None
    #: Longest sequence (prompt + generated tokens) the model accepts.
    max_seq_len: int = 256
    #: Base of the rotary position embedding frequencies.
    rope_theta: float = 10000.0
    #: Epsilon of every RMSNorm.
    norm_eps: float = 1e-5
    #: RMSNorm of the queries and keys inside attention, before RoPE: "none"; "head" (each head's
    #: q and k over head_dim, one weight [head_dim] shared by the heads: Qwen3); "full" (the whole
    #: q projection [n_heads * head_dim] and k projection [n_kv_heads * head_dim]: OLMoE).
    qk_norm: str = "none"
    #: Biases on the attention's q, k and v projections (Qwen2 / Qwen2-MoE); o_proj has none.
    attn_qkv_bias: bool = False
    #: Share the output layer's weight with the token embedding.
    tie_embeddings: bool = True
    #: Std of the normal init of every matrix; output projections (attention o_proj and FFN
    #: w_out) use init_std / sqrt(2 * n_layers).
    init_std: float = 0.02
    #: Feed-forward layer of every block: "dense" (SwiGLU), "moe" (router) or "aoe" (router-free).
    ffn: str = "aoe"
    #: Expert width of MoE (and the width AoE's d_wide is parameter-matched to).
    d_ffn: int = 256
    #: Number of experts E of a sparse layer.
    n_experts: int = 8
    #: Experts chosen per token k (1 <= top_k <= n_experts).
    top_k: int = 2
    #: AoE: rank of the factorized gate projection (w_down [d_model, d_low], w_up [d_low, d_wide]).
    d_low: int = 32
    #: AoE: expert width. None = parameter-matched to an MoE expert of width d_ffn
    #: (``aoe.nn.match_d_wide``).
    d_wide: int | None = None
    #: Divide the chosen experts' softmax values by their sum (true: the paper's Algorithm 2 for
    #: AoE, Mixtral for MoE; false: the authors' megablocks code for AoE). None = what a config
    #: saved before the default was true computed (``LEGACY_RENORMALIZE``: MoE true, AoE false).
    renormalize: bool | None = True
    #: AoE: the norm that scores an expert's low-rank activation: "l2" (paper), "l1" or "linf".
    norm: str = "l2"
    #: Weight of the load-balancing loss E * sum_i f_i P_i per sparse layer (0 = off; paper: 0.01).
    aux_loss_coef: float = 0.0
    #: MoE only: weight of the router z-loss (0 = off). Refused with ffn="aoe" (AoE has no logits).
    z_loss_coef: float = 0.0
    #: Weight of Ent_conf as a loss: the mean over tokens of the selection softmax's entropy, per
    #: sparse layer (0 = off). The paper trains Top-P (selection=top_p, top_p 0.6) with 1e-4, so that
    #: a model cannot lower its loss by spreading probability over many experts. Any rule.
    entropy_loss_coef: float = 0.0
    #: MoE only: weight of the ERC loss coupling router and experts (aoe.nn.erc; 0 = off; the paper:
    #: 1.0 with aux_loss_coef 0.01), in training only, summed over the sparse layers like L_aux.
    #: Needs the linear router (no moe_router_hidden) and is refused with expert parallelism.
    erc_loss_coef: float = 0.0
    #: MoE only: the ERC loss's margin alpha (1.0, the paper's default; 0.5 its best at 256 experts).
    erc_alpha: float = 1.0
    #: Aux-loss-free balancing: step size of the per-expert selection bias (0 = off; not in the paper).
    bias_update_rate: float = 0.0
    #: AoE only: recompute x @ w_down in backward instead of keeping the [tokens, E, d_low] cache.
    #: None = the layer's choice: recompute where the cache is larger than the chosen experts'
    #: hidden rows (n_experts * d_low > top_k * d_wide). Saved configs that say false keep the cache.
    recompute_scores: bool | None = None
    #: AoE only: "auto" (the fused Triton kernel on CUDA where it fits), "triton" or "torch" (aoe.nn.fused_scores).
    scores_backend: str = "auto"
    #: Recompute the expert gate pre-activation in backward instead of keeping it. None = layer
    #: default: AoE true (a cheap [S, d_low] x [d_low, d_wide] matmul), MoE false (a full matmul).
    recompute_gate: bool | None = None
    #: Blocks of rows the expert backward runs over (bounds its temporaries); None = automatic.
    backward_chunks: int | None = None
    #: MoE ablation "MoE + factorized W_g": factorize each expert's gate projection at this rank
    #: (w_down [E, d_model, r] @ w_up [E, r, d_ffn]) while the router still selects. None = off.
    moe_gate_rank: int | None = None
    #: MoE ablation "MoE + large router": hidden width of a two-layer router
    #: (SiLU(x @ router_in [d_model, H]) @ router [H, E]). None = the linear router.
    moe_router_hidden: int | None = None
    #: Width of every dense SwiGLU FFN (a dense model, or the layers in dense_layers).
    #: None = d_ffn. For a dense baseline with MoE's active FFN parameters use top_k * d_ffn.
    dense_d_ffn: int | None = None
    #: Dense ablation "dense + factorized W_g": factorize the gate projection of every dense SwiGLU
    #: FFN at this rank (w_down [d_model, r] @ w_up [r, dense_d_ffn]), as AoE factorizes an
    #: expert's; no selection involved. None = off.
    dense_gate_rank: int | None = None
    #: How every factorized gate (AoE's, and the moe_gate_rank / dense_gate_rank ablations') starts:
    #: "balanced" (the default for new models: w_up ~ N(0, 1/rank), so w_down @ w_up has an unfactorized
    #: gate's scale) or "normal" (the authors': every factor ~ N(0, init_std); the default before,
    #: and what a saved run config without this key was trained with). See aoe.nn.factorized.
    gate_init: str = "balanced"
    #: Indices of the blocks that keep a dense FFN in a sparse model (e.g. [0]: first layer dense).
    dense_layers: list[int] = field(default_factory=list)
    #: Grouped-matmul backend of the expert engine: "auto", "torch" or "loop" (see aoe.nn.grouped_mm).
    grouped_mm: str = "auto"
    #: How a sparse layer chooses experts (aoe.nn.selection): "top_k" (each token its top_k best);
    #: "top_p" (each token experts in order until their probabilities sum to top_p, between min_k
    #: and max_k of them); "expert_choice" (in each sequence each expert takes its
    #: ceil(capacity_factor * tokens * top_k / n_experts) best tokens; see ec_inference).
    selection: str = "top_k"
    #: top_p's threshold of cumulative probability, in (0, 1]. None = top_k / n_experts (never more
    #: than top_k experts; top_k of them when the probabilities are uniform).
    top_p: float | None = None
    #: top_p: the least experts a token takes.
    min_k: int = 1
    #: top_p: the most experts a token takes (None = n_experts).
    max_k: int | None = None
    #: expert_choice: tokens per expert relative to top-k's average (1 = top-k's compute).
    capacity_factor: float = 1.0
    #: expert_choice outside training (evaluation, generation): "top_k" routes each token by itself
    #: (causal); "expert_choice" keeps expert choice, whose routing sees later tokens of a sequence.
    ec_inference: str = "top_k"
    #: Shared experts of every sparse layer: always-active SwiGLU experts each token uses besides
    #: its top_k chosen ones, their output added (Qwen2-MoE: 1; DeepSeek-MoE: 1-2). 0 = none.
    n_shared_experts: int = 0
    #: Width of one shared expert. None = the expert width (MoE: d_ffn; AoE: d_wide).
    d_shared: int | None = None
    #: Scale the shared experts' output by sigmoid(x @ gate), gate [d_model, 1] (Qwen2-MoE).
    shared_expert_gate: bool = False

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def kv_heads(self) -> int:
        """n_kv_heads resolved (n_heads when None)."""
        return self.n_heads if self.n_kv_heads is None else self.n_kv_heads

    @property
    def ffn_width_dense(self) -> int:
        """dense_d_ffn resolved (d_ffn when None)."""
        return self.d_ffn if self.dense_d_ffn is None else self.dense_d_ffn

    @property
    def resolved_d_wide(self) -> int:
        """AoE expert width: d_wide, or the parameter-matched width for d_ffn and d_low."""
        if self.d_wide is not None:
            return self.d_wide
        return match_d_wide(self.d_model, self.d_ffn, self.d_low)

    def ffn_kind(self, layer: int) -> str:
        """The FFN kind of block ``layer``: "dense" for the indices in dense_layers, else ffn."""
        return "dense" if layer in self.dense_layers else self.ffn

    def sparse_options(self, kind: str | None = None) -> dict:
        """The values of the sparse layers' shared options (``aoe.nn.options.SparseOptions``) for an
        FFN of ``kind`` (default ``ffn``), keyed by option name: each read from the ``model.*`` key
        of its name (``CONFIG_KEYS``: the one spelled otherwise), renormalize resolved."""
        kind = kind or self.ffn
        values = {name: getattr(self, CONFIG_KEYS.get(name, name)) for name in SPARSE_OPTIONS}
        if self.renormalize is None:
            values["renormalize"] = LEGACY_RENORMALIZE.get(kind, True)
        return values

    def ffn_config(self, layer: int) -> DenseFFNConfig | MoEFFNConfig | AoEFFNConfig:
        """The layer config (``aoe.nn.configs``: ``DenseFFNConfig`` | ``MoEFFNConfig`` |
        ``AoEFFNConfig``) of block ``layer``'s FFN. The flat fields above map onto the layer's
        arguments here and only here (the shared ones by name, ``sparse_options``); a None that
        means "the layer's default" is left out, so the default comes from the layer."""
        kind = self.ffn_kind(layer)
        if kind == "dense":
            return DenseFFNConfig(self.d_model, self.ffn_width_dense, gate_rank=self.dense_gate_rank,
                                  gate_init=self.gate_init)
        own = {} if self.recompute_gate is None else {"recompute_gate": self.recompute_gate}
        options = self.sparse_options(kind)
        if kind == "moe":
            return MoEFFNConfig(self.d_model, self.d_ffn, self.n_experts, self.top_k, z_loss_coef=self.z_loss_coef,
                                gate_rank=self.moe_gate_rank, router_hidden=self.moe_router_hidden,
                                erc_loss_coef=self.erc_loss_coef, erc_alpha=self.erc_alpha, **own, **options)
        return AoEFFNConfig(self.d_model, self.d_low, self.n_experts, self.top_k, self.resolved_d_wide, norm=self.norm,
                            recompute_scores=self.recompute_scores, scores_backend=self.scores_backend, **own, **options)

    def _check(self) -> None:
        self._positive("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "max_seq_len",
                       "d_ffn", "n_experts", "top_k", "d_low", "d_wide", "dense_d_ffn", "backward_chunks",
                       "moe_gate_rank", "moe_router_hidden", "dense_gate_rank", "d_shared")
        self._positive("rope_theta", "norm_eps", "init_std")
        self._non_negative("aux_loss_coef", "z_loss_coef", "bias_update_rate", "n_shared_experts")
        self._finite("rope_theta", "norm_eps", "init_std", "aux_loss_coef", "z_loss_coef", "bias_update_rate")
        if self.d_model % self.n_heads:
            raise ConfigError(f"model.n_heads={self.n_heads} does not divide model.d_model={self.d_model}")
        if self.head_dim % 2:
            raise ConfigError(
                f"model.d_model={self.d_model} / model.n_heads={self.n_heads} = head_dim {self.head_dim} "
                "must be even (rotary embeddings rotate pairs)"
            )
        if self.n_kv_heads is not None and self.n_heads % self.n_kv_heads:
            raise ConfigError(f"model.n_kv_heads={self.n_kv_heads} does not divide model.n_heads={self.n_heads}")
        self._choice("ffn", FFN_KINDS)
        self._choice("norm", SCORE_NORMS)
        self._choice("qk_norm", QK_NORMS)
        self._choice("grouped_mm", GROUPED_MM_BACKENDS)
        self._choice("scores_backend", SCORES_BACKENDS)
        if self.scores_backend == "triton" and self.norm not in FUSED_NORMS:
            self._fail("scores_backend", f"fuses norm in {list(FUSED_NORMS)} only, not {self.norm!r}: use 'auto' or 'torch'")
        self._choice("gate_init", GATE_INITS)
        if self.top_k > self.n_experts:
            raise ConfigError(f"model.top_k={self.top_k} exceeds model.n_experts={self.n_experts}")
        for name in ("moe_gate_rank", "moe_router_hidden"):
            if getattr(self, name) is not None and self.ffn != "moe":
                self._fail(name, f'applies to ffn="moe" only (ffn={self.ffn!r}); set it to null')
        if self.dense_gate_rank is not None and self.ffn != "dense" and not self.dense_layers:
            self._fail("dense_gate_rank", f'applies to dense FFNs only (ffn={self.ffn!r}, no dense_layers); set it to null')
        self._check_shared()
        self._check_sparse_options()
        self._check_erc()
        if self.ffn == "aoe" and self.z_loss_coef > 0:
            self._fail("z_loss_coef", 'applies to ffn="moe" only (AoE has no router logits); set it to 0')
        seen = set()
        for i in self.dense_layers:
            if not 0 <= i < self.n_layers:
                raise ConfigError(f"model.dense_layers contains {i}, not a layer index in [0, model.n_layers={self.n_layers})")
            if i in seen:
                raise ConfigError(f"model.dense_layers contains {i} twice")
            seen.add(i)
        if self.ffn == "aoe" and self.d_wide is None:
            try:
                self.resolved_d_wide
            except ValueError as e:
                raise ConfigError(f"model.d_low={self.d_low}: {e}; lower model.d_low or set model.d_wide") from None
        refuse_idle_options(self)


    def _check_sparse_options(self) -> None:
        """The shared options' own rules, as the layers check them (``SparseOptions.check``),
        reported under their ``model.*`` keys."""
        self._choice("selection", SELECTIONS)
        self._choice("ec_inference", EC_INFERENCE)
        self._positive("min_k", "max_k", "capacity_factor")
        self._finite("capacity_factor")
        try:
            SparseOptions(**self.sparse_options()).check(self.n_experts, key=self._option_key)
        except OptionError as e:
            self._fail(CONFIG_KEYS.get(e.name, e.name), e.why)

    def _option_key(self, name: str) -> str:
        return self._key(CONFIG_KEYS.get(name, name))

    def _check_erc(self) -> None:
        self._non_negative("entropy_loss_coef", "erc_loss_coef")
        self._positive("erc_alpha")
        self._finite("entropy_loss_coef", "erc_loss_coef", "erc_alpha")
        if self.erc_loss_coef > 0 and self.ffn != "moe":
            self._fail("erc_loss_coef", f'applies to ffn="moe" only (ffn={self.ffn!r}: no router to couple); set it to 0')
        if self.erc_loss_coef > 0 and self.moe_router_hidden is not None:
            self._fail("erc_loss_coef", "needs the linear router (model.moe_router_hidden is set); set one of them off")

    def _check_shared(self) -> None:
        if self.n_shared_experts == 0:
            for name, off in (("d_shared", "null"), ("shared_expert_gate", "false")):
                if getattr(self, name) not in (None, False):
                    self._fail(name, f"applies with model.n_shared_experts >= 1 only (it is 0); set it to {off}")
        elif self.ffn == "dense":
            self._fail("n_shared_experts", 'applies to sparse FFNs (ffn="moe" or "aoe") only; set it to 0')
