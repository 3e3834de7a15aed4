"""The decoder-only language model: pre-norm blocks of attention and a dense, MoE or AoE FFN.

    idx [B, T] -> embed_tokens -> n_layers x Block -> norm -> lm_head -> logits [B, T, V]
    Block: x = x + attn(attn_norm(x));  x = x + ffn(ffn_norm(x))

Parameter names (for checkpoints and export): ``embed_tokens.weight``,
``layers.{i}.attn_norm.weight``, ``layers.{i}.attn.{q,k,v,o}_proj.weight``,
``layers.{i}.attn.{q,k}_norm.weight`` (only with ``qk_norm`` "head" or "full"),
``layers.{i}.ffn_norm.weight``, ``layers.{i}.ffn.*`` (see ``aoe.nn``), ``norm.weight``,
``lm_head.weight`` (the same tensor as ``embed_tokens.weight`` when tied).
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from aoe.config import ConfigError, ModelConfig
from aoe.model.attention import Attention, KVCache, RotaryEmbedding
from aoe.model.norm import RMSNorm
from aoe.model.padding import Padding, check_attention_mask, padding

@dataclass
class ModelOutput:
    """What ``Transformer.forward`` returns.

    logits: [B, T, vocab_size], in the compute dtype.
    loss: mean next-token cross entropy in fp32 over targets != -100 (None without targets).
    aux_loss: scalar fp32, the sum over sparse layers of their auxiliary losses (load balancing,
        z-loss), already weighted by their coefficients; 0 for a dense model. The trainer adds it.
    """

    logits: torch.Tensor
    loss: torch.Tensor | None
    aux_loss: torch.Tensor


def build_ffn(cfg: ModelConfig, layer: int) -> nn.Module:
    """The FFN of block ``layer``: ``cfg.ffn_config(layer).build()`` (``DenseFFN`` for ffn="dense" or
    a layer in dense_layers, else ``MoE`` / ``AoE`` with the config's options)."""
    return cfg.ffn_config(layer).build()


def ffn_forward_flops(ffn: nn.Module) -> int:
    """Forward matmul FLOPs (2 x multiply-adds) per token of one FFN layer (its ``forward_flops()``:
    ``DenseFFN``, ``MoE`` and ``AoE`` document their formulas), at most those of every expert
    (``_ffn_params``)."""
    count = getattr(ffn, "forward_flops", None)
    if count is None:
        raise TypeError(f"no FLOP count for {type(ffn).__name__}")
    return min(count(), 2 * _ffn_params(ffn))


def _ffn_params(ffn: nn.Module) -> int:
    """Every parameter of an FFN layer: the most one token can use. Each weight takes part in at
    most one multiply-add per token, so 2x this is the layer's FLOPs with every expert chosen,
    the cap of a count (expert choice's capacity_factor * top_k) that passes n_experts."""
    return sum(p.numel() for p in ffn.parameters())


class Block(nn.Module):
    """One pre-norm transformer block."""

    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.attn = Attention(cfg.d_model, cfg.n_heads, cfg.kv_heads, qk_norm=cfg.qk_norm, norm_eps=cfg.norm_eps,
                              qkv_bias=cfg.attn_qkv_bias)
        self.ffn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.ffn = build_ffn(cfg, layer_idx)

    def forward(self, x, cos, sin, kv_cache: KVCache | None = None, start_pos: int = 0,
                pad: Padding | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns the block's output and its FFN's auxiliary loss (a scalar; 0 for a dense FFN).
        With ``pad`` (a padded batch) the attention skips pad keys and the FFN routes real tokens only."""
        allowed, real = (None, None) if pad is None else (pad.allowed_B1TS, pad.real_BT)
        x = x + self.attn(self.attn_norm(x), cos, sin, kv_cache, self.layer_idx, start_pos, allowed)
        h, aux_loss = self.ffn.forward_with_aux(self.ffn_norm(x), token_mask=real)
        return x + h, aux_loss


class Transformer(nn.Module):
    """Decoder-only language model built from a ``ModelConfig``.

    Every block's FFN is ``cfg.ffn`` ("dense" SwiGLU, "moe" router MoE, "aoe" Autonomy-of-Experts),
    except the indices in ``cfg.dense_layers``, which stay dense. ``cfg.vocab_size`` must be set.

    Initialization (``reset_parameters``): every matrix (embedding, q/k/v projections, FFN and
    expert weights, MoE router, AoE w_down/w_up, untied lm_head) ~ N(0, init_std); the output
    projections that write into the residual stream (attention ``o_proj`` and FFN / expert
    ``w_out``) ~ N(0, init_std / sqrt(2 * n_layers)) (GPT-2's depth scaling); RMSNorm weights 1
    (the q/k norms included).

    ``forward(idx, targets=None, kv_cache=None, start_pos=0, attention_mask=None) -> ModelOutput``:
    see ``forward`` (``attention_mask``: padded batches, ``aoe.model.padding``).
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        if not isinstance(cfg, ModelConfig):
            raise TypeError(f"Transformer takes a ModelConfig, got {type(cfg).__name__}")
        cfg = copy.deepcopy(cfg)
        cfg.validate()
        if cfg.vocab_size is None:
            raise ConfigError("model.vocab_size=None: set it (or let the trainer take it from the tokenizer) before building the model")
        self.config = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.rotary = RotaryEmbedding(cfg.head_dim, cfg.max_seq_len, cfg.rope_theta)
        self.check_inputs = True  # token-id range check (one host sync per forward); off under torch.compile
        self.reset_parameters()

    # -- init ------------------------------------------------------------------------------------
    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Re-initialize every parameter as the class docstring says."""
        std = self.config.init_std
        out_std = std / math.sqrt(2 * self.config.n_layers)
        nn.init.normal_(self.embed_tokens.weight, std=std)
        if not self.config.tie_embeddings:
            nn.init.normal_(self.lm_head.weight, std=std)
        for block in self.layers:
            for proj in (block.attn.q_proj, block.attn.k_proj, block.attn.v_proj):
                nn.init.normal_(proj.weight, std=std)
                if proj.bias is not None:  # attn_qkv_bias
                    nn.init.zeros_(proj.bias)
            nn.init.normal_(block.attn.o_proj.weight, std=out_std)
            block.ffn.reset_parameters(std=std, out_std=out_std)
            nn.init.ones_(block.attn_norm.weight)
            nn.init.ones_(block.ffn_norm.weight)
            for qk in (block.attn.q_norm, block.attn.k_norm):
                if qk is not None:
                    nn.init.ones_(qk.weight)
        nn.init.ones_(self.norm.weight)

    # -- forward ---------------------------------------------------------------------------------
    def forward(
        self,
        idx: torch.Tensor,
        targets: torch.Tensor | None = None,
        kv_cache: KVCache | None = None,
        start_pos: int = 0,
        attention_mask: torch.Tensor | None = None,
    ) -> ModelOutput:
        """Logits of every position, and the loss when targets are given.

        Args:
            idx: token ids [B, T], integers in [0, vocab_size).
            targets: [B, T] next-token ids; -100 marks a position that does not count.
            kv_cache: a ``KVCache`` for incremental decoding: positions start_pos .. start_pos+T-1
                are written into it and the tokens attend to every cached position before them.
            start_pos: position of idx[:, 0] (rotary angles; where the cache is written).
            attention_mask: padding (``aoe.model.padding``): [B, start_pos + T] of 1 (real) and 0
                (pad) over every cached position and the T new tokens ([B, T] without a cache).
                Real tokens then see only real tokens, take the positions they have in their
                own sequence, and give the logits they would give alone; pads are routed to no
                expert, count in no routing statistic or auxiliary loss, and their targets are
                ignored. With a KV cache, pass the same mask extended by the new tokens each step.

        Raises:
            ValueError: ids out of range, a non-integer or non-2-D idx, start_pos + T above
                max_seq_len, or a cache of another batch size or too short.
        """
        self._check_input(idx, targets, kv_cache, start_pos)
        B, T = idx.shape
        pad = None
        if attention_mask is not None:
            pad = padding(check_attention_mask(attention_mask.to(idx.device), B, start_pos, T), start_pos, T)
            cos, sin = self.rotary.at(pad.positions_BT, start_pos + T)  # a position is below start_pos + T
        else:
            cos, sin = self.rotary(start_pos, T, idx.device)
        x = self.embed_tokens(idx)
        aux_losses = []
        for block in self.layers:
            x, aux_loss = block(x, cos, sin, kv_cache, start_pos, pad)
            aux_losses.append(aux_loss.float())
        logits = self.lm_head(self.norm(x))
        loss = None
        if targets is not None:
            if pad is not None:
                targets = targets.masked_fill(~pad.real_BT, -100)
            loss = F.cross_entropy(logits.float().reshape(B * T, -1), targets.reshape(B * T), ignore_index=-100)
        aux_loss = torch.stack(aux_losses).sum().to(logits.device)
        return ModelOutput(logits=logits, loss=loss, aux_loss=aux_loss)

    def _check_input(self, idx, targets, kv_cache, start_pos) -> None:
        if not isinstance(idx, torch.Tensor) or idx.dim() != 2:
            shape = tuple(idx.shape) if isinstance(idx, torch.Tensor) else type(idx).__name__
            raise ValueError(f"idx must be a [batch, seq] tensor of token ids, got {shape}")
        if idx.dtype.is_floating_point or idx.dtype.is_complex or idx.dtype == torch.bool:
            raise ValueError(f"idx must hold integer token ids, got dtype {idx.dtype}")
        B, T = idx.shape
        max_len = self.config.max_seq_len
        if T == 0 or B == 0:
            raise ValueError(f"idx is empty: shape {tuple(idx.shape)}")
        if not isinstance(start_pos, int) or start_pos < 0:
            raise ValueError(f"start_pos={start_pos!r} must be a non-negative integer")
        if start_pos + T > max_len:
            raise ValueError(
                f"input of {T} tokens at start_pos={start_pos} reaches position {start_pos + T}, "
                f"beyond the model's max_seq_len={max_len}"
            )
        if targets is not None and tuple(targets.shape) != (B, T):
            raise ValueError(f"targets shape {tuple(targets.shape)} does not match idx shape {(B, T)}")
        if kv_cache is not None:
            if kv_cache.batch_size != B:
                raise ValueError(f"kv_cache holds batch {kv_cache.batch_size}, idx has batch {B}")
            if start_pos + T > kv_cache.max_len:
                raise ValueError(f"input reaches position {start_pos + T}, beyond kv_cache max_len={kv_cache.max_len}")
        if self.check_inputs and not torch.compiler.is_compiling():
            lo, hi = (int(v) for v in torch.aminmax(idx.detach()))
            if lo < 0 or hi >= self.config.vocab_size:
                bad = lo if lo < 0 else hi
                raise ValueError(f"token id {bad} is out of range for vocab_size={self.config.vocab_size} (ids must be in [0, {self.config.vocab_size}))")

    # -- accounting ------------------------------------------------------------------------------
    def num_params(self, active: bool = False, include_embedding: bool = True) -> int:
        """Number of parameters (a tied embedding counted once).

        active=True: the parameters one token uses (each FFN's ``num_active_params()``). In a
        sparse layer only top_k of the n_experts experts' expert weights count (MoE w_gate/w_in/w_out;
        AoE w_up/w_in/w_out); the MoE router and AoE's w_down of ALL experts count in full (every
        AoE expert computes its low-rank activation for every token). include_embedding=False
        leaves out the token embedding and an untied lm_head (the vocabulary tables).
        """
        vocab_tables = {id(self.embed_tokens.weight), id(self.lm_head.weight)}
        ffns = {id(block.ffn) for block in self.layers}
        seen: set[int] = set()
        total = 0
        for module in self.modules():
            # an FFN's submodules (shared experts) are counted with it, by its num_active_params
            params = [p for p in module.parameters(recurse=id(module) in ffns) if id(p) not in seen]
            seen.update(id(p) for p in params)
            if active and id(module) in ffns:  # the layer knows what one token uses
                total += min(module.num_active_params(), _ffn_params(module))  # no more experts than exist
                continue
            total += sum(p.numel() for p in params if include_embedding or id(p) not in vocab_tables)
        return total

    def flops_per_token(self, seq_len: int | None = None, *, backward: bool = True, causal: bool = False) -> int:
        """Matmul FLOPs (2 x multiply-adds) per token of a training step (forward + backward =
        3 x forward) at sequence length seq_len (default max_seq_len); forward only with
        backward=False.

        Counted exactly: q/k/v/o projections, every FFN's matmuls (``ffn_forward_flops``: AoE's
        low-rank activation of all experts included) and the lm_head (2*D*V; the embedding lookup
        is free). Attention scores and values: 2 * 2 * H * Dh * seq_len per token and layer, i.e.
        every query against all seq_len keys (the PaLM / nanoGPT "12 * L * D * T" convention,
        and what a dense attention kernel computes); causal=True counts only the keys a query
        sees, (seq_len + 1) / 2 on average. Not counted: norms, softmax, activations, rotary,
        gate weighting, and recomputation in backward (these are model FLOPs, as in MFU).
        Without attention scores this is 6 x (the active matrix parameters outside the embedding, plus the lm_head).
        """
        cfg = self.config
        T = cfg.max_seq_len if seq_len is None else seq_len
        if not isinstance(T, int) or T < 1:
            raise ValueError(f"seq_len={seq_len!r} must be a positive integer")
        H, G, Dh, D = cfg.n_heads, cfg.kv_heads, cfg.head_dim, cfg.d_model
        proj = 2 * D * (H * Dh) + 2 * 2 * D * (G * Dh) + 2 * (H * Dh) * D
        scores = 2 * H * Dh * (T + 1) if causal else 2 * 2 * H * Dh * T
        forward = sum(proj + scores + ffn_forward_flops(block.ffn) for block in self.layers)
        forward += 2 * D * cfg.vocab_size
        return 3 * forward if backward else forward

    def step_flops(self) -> int:
        """Training matmul FLOPs per step that do not grow with the tokens: the FFNs' ``step_flops()``
        (MoE's ERC loss; 0 for every other layer)."""
        return sum(getattr(block.ffn, "step_flops", lambda: 0)() for block in self.layers)

    def extra_repr(self) -> str:
        c = self.config
        return f"ffn={c.ffn!r}, vocab_size={c.vocab_size}, d_model={c.d_model}, n_layers={c.n_layers}"
