"""``AoEForCausalLM``: the project's ``Transformer`` behind the Hugging Face ``PreTrainedModel`` API.

The HF model holds exactly one native model, ``self.model = Transformer(config.to_model_config())``;
its state-dict keys are the native ones prefixed by ``model.`` (``model.embed_tokens.weight``,
``model.layers.{i}.attn.q_proj.weight``, ``model.layers.{i}.ffn.w_down``, ...,
``model.lm_head.weight``), so ``save_pretrained`` / ``from_pretrained`` (safetensors) round-trip
the weights exactly. With ``tie_word_embeddings`` the lm_head is the embedding (only the embedding
is written; ``_tied_weights_keys`` re-ties it on load).

Generation: the KV cache is a standard ``transformers`` ``Cache`` (a ``DynamicCache`` by
default, which ``generate`` creates); the native attention writes into it through a small adapter
with the native ``KVCache`` interface, so beam search and cache reordering work as for any HF
model. Positions are always ``past_length + arange(T)``.

Padding: a 2-D ``attention_mask`` (1 = real token, 0 = pad; left, right or in between) over the
cached and the new positions, as ``generate`` and the tokenizers' ``padding=True`` give it. Each
real token then sees only its sequence's real tokens, at the position it has in its own sequence,
and gets the logits it would get alone; pads are routed to no expert and count in no routing
statistic, auxiliary loss or loss (see ``aoe.model.padding``).

Not supported (a clear ``ValueError``): ``position_ids`` other than those the mask implies,
4-D attention masks, ``inputs_embeds``, ``output_attentions`` / ``output_hidden_states``.

``labels`` follow the HF convention (the labels are the input ids; the shift happens inside;
-100 is ignored). ``loss`` = mean next-token cross entropy + ``aux_loss`` (the native, already
weighted sum of the sparse layers' auxiliary losses: 0 when their coefficients are 0), so
fine-tuning through HF optimizes the native trainer's objective.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers import initialization as hf_init
from transformers.cache_utils import Cache, DynamicCache
from transformers.modeling_outputs import MoeCausalLMOutputWithPast

from aoe.hf.configuration import AoEConfig
from aoe.model.attention import Attention, RotaryEmbedding
from aoe.model.padding import check_attention_mask, positions
from aoe.model.transformer import RMSNorm, Transformer
from aoe.nn import DenseFFN
from aoe.nn.shared import SharedExperts
from aoe.nn.sparse import SparseFFN

__all__ = ["AoEPreTrainedModel", "AoEForCausalLM"]


class _CacheAdapter:
    """The native ``KVCache`` interface (``batch_size``, ``max_len``, ``update(layer, start_pos, k, v)``)
    over a ``transformers`` ``Cache``: keys/values [B, G, T, Dh] are appended to the HF cache."""

    def __init__(self, cache: Cache, batch_size: int, max_len: int, start_pos: int):
        self.cache, self.batch_size, self.max_len, self.start_pos = cache, batch_size, max_len, start_pos

    def update(self, layer: int, start_pos: int, k: torch.Tensor, v: torch.Tensor):
        if start_pos != self.start_pos:  # pragma: no cover - the native model always passes it through
            raise ValueError(f"cache holds {self.start_pos} positions, got a write at {start_pos}")
        return self.cache.update(k, v, layer)


def _padding_mask(attention_mask, batch: int, start_pos: int, length: int, device) -> torch.Tensor | None:
    """The 2-D mask as bool [B, start_pos + T], or None when it pads nothing (the unpadded path)."""
    if attention_mask is None:
        return None
    if attention_mask.dim() != 2:
        raise ValueError(f"attention_mask must be a 2-D [batch, length] mask of 0s and 1s, got shape {tuple(attention_mask.shape)}")
    mask = check_attention_mask(attention_mask.to(device), batch, start_pos, length)
    return None if bool(mask.all()) else mask


def _check_position_ids(position_ids, mask: torch.Tensor | None, start_pos: int, length: int) -> None:
    """position_ids must be what the model uses anyway: contiguous, or with padding each real
    token's index among its sequence's real tokens (pads may hold anything)."""
    if position_ids is None:
        return
    if position_ids.shape[-1] != length:
        raise ValueError(f"position_ids has {position_ids.shape[-1]} positions for {length} tokens")
    if mask is None:
        expected = torch.arange(start_pos, start_pos + length, device=position_ids.device).expand_as(position_ids)
        real = torch.ones_like(expected, dtype=torch.bool)
    else:
        expected = positions(mask, start_pos).to(position_ids.device).expand(position_ids.shape)
        real = mask[:, start_pos:].to(position_ids.device).expand(position_ids.shape)
    wrong_B = ((position_ids != expected) & real).reshape(-1, length).any(dim=1)
    if bool(wrong_B.any()):
        _refuse_empty_prompt(wrong_B, mask, start_pos)
        raise ValueError("position_ids must be the positions the attention mask implies (each real token's index "
                         "among the real tokens of its sequence); other position ids are not supported")


def _refuse_empty_prompt(wrong_B: torch.Tensor, mask: torch.Tensor | None, start_pos: int) -> None:
    """Name the cause when the rows whose positions disagree are sequences whose cached part
    (their prompt) holds no real token: generation then guesses positions for them."""
    if mask is None or start_pos == 0 or wrong_B.shape[0] != mask.shape[0]:
        return
    empty_B = ~mask[:, :start_pos].any(dim=1).to(wrong_B.device)
    rows = (wrong_B & empty_B).nonzero().flatten().tolist()
    if rows:
        raise ValueError(f"attention_mask row {rows[0]} has no real token in its prompt (all 0s): give every "
                         "sequence at least one real token, e.g. the end-of-text token")


def _check_forward_inputs(input_ids, inputs_embeds, output_attentions, output_hidden_states) -> None:
    """Refuses what ``AoEForCausalLM.forward`` does not support (see the module docstring)."""
    if inputs_embeds is not None:
        raise ValueError("AoEForCausalLM does not accept inputs_embeds; pass input_ids")
    if input_ids is None:
        raise ValueError("AoEForCausalLM.forward needs input_ids")
    if output_attentions or output_hidden_states:
        raise ValueError("AoEForCausalLM does not return attentions or hidden states")


def _forward_cache(past_key_values, use_cache: bool) -> Cache | None:
    """The cache this forward appends to: the given ``transformers`` Cache, a new ``DynamicCache``
    when use_cache and none was given, else None."""
    if past_key_values is not None and not isinstance(past_key_values, Cache):
        raise ValueError(f"past_key_values must be a transformers Cache, got {type(past_key_values).__name__}")
    if use_cache and past_key_values is None:
        return DynamicCache()
    return past_key_values


def _next_token_targets(labels: torch.Tensor, mask: torch.Tensor | None, start_pos: int, batch: int) -> torch.Tensor:
    """HF labels [B, T] as the native targets [B, T]: shifted left by one, -100 (ignored) in the
    last column and at every pad (a pad is never a target)."""
    if mask is not None:
        labels = labels.masked_fill(~mask[:, start_pos:], -100)
    return torch.cat([labels[:, 1:], labels.new_full((batch, 1), -100)], dim=1)


def _kept_logits(logits: torch.Tensor, logits_to_keep: int | torch.Tensor) -> torch.Tensor:
    """The logits [B, T, V] at the positions HF's ``logits_to_keep`` asks for: the last n for an
    int n > 0, those indexed by a tensor, all of them for 0."""
    if isinstance(logits_to_keep, int) and logits_to_keep > 0:
        return logits[:, -logits_to_keep:]
    if isinstance(logits_to_keep, torch.Tensor):
        return logits[:, logits_to_keep]
    return logits


class AoEPreTrainedModel(PreTrainedModel):
    config_class = AoEConfig
    config: AoEConfig
    base_model_prefix = "model"
    main_input_name = "input_ids"
    supports_gradient_checkpointing = False
    _no_split_modules = ["Block"]
    _supports_sdpa = True
    _is_stateful = False

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        """The native initialization (``Transformer.reset_parameters``): every matrix ~ N(0, std),
        the residual-stream output projections (attention o_proj, FFN w_out) ~ N(0, std /
        sqrt(2 * n_layers)), RMSNorm weights 1, selection biases and q/k/v biases 0. Uses ``transformers.initialization``
        so that tensors loaded from a checkpoint are left alone."""
        std = self.config.initializer_range
        out_std = std / math.sqrt(2 * self.config.num_hidden_layers)
        if isinstance(module, Attention):
            for proj in (module.q_proj, module.k_proj, module.v_proj):
                hf_init.normal_(proj.weight, mean=0.0, std=std)
                if proj.bias is not None:  # qkv_bias
                    hf_init.zeros_(proj.bias)
            hf_init.normal_(module.o_proj.weight, mean=0.0, std=out_std)
        elif isinstance(module, RMSNorm):
            hf_init.ones_(module.weight)
        elif isinstance(module, nn.Embedding):
            hf_init.normal_(module.weight, mean=0.0, std=std)
        elif isinstance(module, nn.Linear):  # the lm_head (attention projections are done above)
            native = getattr(self, "model", None)
            if native is not None and module is native.lm_head and not self.config.tie_word_embeddings:
                hf_init.normal_(module.weight, mean=0.0, std=std)
        elif isinstance(module, (SparseFFN, DenseFFN, SharedExperts)):
            for name, p in module.named_parameters(recurse=False):
                hf_init.normal_(p, mean=0.0, std=out_std if name == "w_out" else std)
            for _, b in module.named_buffers(recurse=False):
                hf_init.zeros_(b)


class AoEForCausalLM(AoEPreTrainedModel, GenerationMixin):
    """Causal LM over the native ``Transformer`` (``self.model``); see the module docstring."""

    _tied_weights_keys = {"model.lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: AoEConfig):
        super().__init__(config)
        if config.vocab_size is None:
            raise ValueError("AoEConfig.vocab_size is None: set it before building a model")
        self.model = Transformer(config.to_model_config())
        # from_pretrained builds the model on the meta device; the rotary tables are plain tensors
        # outside the state dict, so build them for real (they are a deterministic function of the config).
        cos_cpu = self.model.rotary._tables.get(torch.device("cpu"), (None,))[0]
        if cos_cpu is None or cos_cpu.is_meta:
            with torch.device("cpu"):
                self.model.rotary = RotaryEmbedding(self.model.config.head_dim, self.model.config.max_seq_len,
                                                    self.model.config.rope_theta)
        self.post_init()

    # -- HF plumbing -----------------------------------------------------------------------------
    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.model.embed_tokens = value

    def get_output_embeddings(self) -> nn.Linear:
        return self.model.lm_head

    def set_output_embeddings(self, new_embeddings: nn.Linear) -> None:
        self.model.lm_head = new_embeddings

    @classmethod
    def from_native(cls, model: Transformer, **config_kwargs) -> "AoEForCausalLM":
        """An HF model with a copy of ``model``'s weights (same dtype), e.g. to ``save_pretrained``."""
        config = AoEConfig.from_model_config(model.config, **config_kwargs)
        dtype = model.embed_tokens.weight.dtype
        hf = cls(config).to(dtype)
        hf.model.load_state_dict(model.state_dict(), strict=True)
        hf.tie_weights()
        return hf.eval() if not model.training else hf

    def to_native(self) -> Transformer:
        """The wrapped native ``Transformer`` (the same module, not a copy)."""
        return self.model

    # -- forward ---------------------------------------------------------------------------------
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs,
    ) -> MoeCausalLMOutputWithPast:
        _check_forward_inputs(input_ids, inputs_embeds, output_attentions, output_hidden_states)
        B, T = input_ids.shape
        use_cache = self.config.use_cache if use_cache is None else use_cache
        past_key_values = _forward_cache(past_key_values, use_cache)
        start_pos = past_key_values.get_seq_length() if past_key_values is not None else 0

        mask = _padding_mask(attention_mask, B, start_pos, T, input_ids.device)
        _check_position_ids(position_ids, mask, start_pos, T)

        kv = None
        if past_key_values is not None:
            kv = _CacheAdapter(past_key_values, B, self.model.config.max_seq_len, start_pos)
        targets = None if labels is None else _next_token_targets(labels.to(input_ids.device), mask, start_pos, B)
        out = self.model(input_ids, targets=targets, kv_cache=kv, start_pos=start_pos, attention_mask=mask)
        loss = None if out.loss is None else out.loss + out.aux_loss.to(out.loss.device)
        return MoeCausalLMOutputWithPast(
            loss=loss, aux_loss=out.aux_loss, logits=_kept_logits(out.logits, logits_to_keep),
            past_key_values=past_key_values if use_cache else None,
        )
