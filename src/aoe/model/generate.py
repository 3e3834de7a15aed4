"""Autoregressive sampling from a ``Transformer``: greedy, temperature, top-k and nucleus (top-p).

``decode`` is the one decoding loop (KV cache, early stop); ``generate`` and the lm-eval adapter's
``generate_until`` choose their tokens and their stopping rule around it."""

from __future__ import annotations

from typing import Callable, Sequence

import torch

from aoe.model.attention import KVCache


def _as_batch(prompt_ids, device: torch.device) -> tuple[torch.Tensor, bool]:
    """[B, T] long tensor on ``device`` and whether the input was one sequence."""
    if isinstance(prompt_ids, torch.Tensor):
        idx = prompt_ids
    else:
        ids = list(prompt_ids)
        if not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
            raise ValueError("prompt_ids must be a list of ints or an integer tensor")
        idx = torch.tensor(ids, dtype=torch.long)
    if idx.dtype.is_floating_point or idx.dtype == torch.bool:
        raise ValueError(f"prompt_ids must hold integer token ids, got dtype {idx.dtype}")
    if idx.dim() not in (1, 2):
        raise ValueError(f"prompt_ids must be 1-D [T] or 2-D [B, T], got shape {tuple(idx.shape)}")
    single = idx.dim() == 1
    idx = idx.reshape(1, -1) if single else idx
    if idx.shape[1] == 0:
        raise ValueError("the prompt is empty: give at least one token id")
    return idx.to(device=device, dtype=torch.long), single


def sample_next(
    logits_BV: torch.Tensor,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Next token ids [B] from last-position logits [B, V]; temperature 0 = greedy (argmax)."""
    logits = logits_BV.float()
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        # drop a token when the tokens ranked above it already reach top_p (the best always stays)
        drop = (probs.cumsum(dim=-1) - probs) >= top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate(
    model: torch.nn.Module,
    prompt_ids: Sequence[int] | torch.Tensor,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int | None = None,
    use_cache: bool = True,
    eos_id: int | None = None,
) -> torch.Tensor:
    """Sample up to max_new_tokens tokens after a prompt.

    Args:
        model: a ``Transformer`` (put in eval mode for the call; its mode is restored after).
        prompt_ids: a list of ints or a 1-D tensor (one sequence), or a [B, T] tensor (B
            sequences of the same length).
        max_new_tokens: tokens to add; prompt length + max_new_tokens must be <= max_seq_len.
        temperature: softmax temperature; 0 = greedy (argmax, top_k / top_p unused).
        top_k: sample among the k most likely tokens only (None = all).
        top_p: nucleus sampling: among the smallest set of tokens whose probability reaches
            top_p (None or 1.0 = all).
        seed: seed of a private generator (reproducible samples; the global RNG is untouched).
        use_cache: decode with a ``KVCache`` (one new token per step); False recomputes the
            whole context every step (slow; the reference the cache is tested against).
        eos_id: stop once every sequence has produced this id; a finished sequence is padded
            with eos_id until the others finish.

    Returns:
        Long tensor of the prompt followed by the new tokens: [T + n] for one sequence, else
        [B, T + n] (n <= max_new_tokens, fewer when every sequence stopped at eos_id).
    """
    if not isinstance(max_new_tokens, int) or isinstance(max_new_tokens, bool) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens={max_new_tokens!r} must be a non-negative integer")
    if not temperature >= 0:
        raise ValueError(f"temperature={temperature!r} must be >= 0 (0 = greedy)")
    if top_k is not None and (not isinstance(top_k, int) or top_k < 1):
        raise ValueError(f"top_k={top_k!r} must be a positive integer or None")
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"top_p={top_p!r} must be in (0, 1] or None")
    device = model.embed_tokens.weight.device
    idx, single = _as_batch(prompt_ids, device)
    B, T = idx.shape
    max_len = model.config.max_seq_len
    if T + max_new_tokens > max_len:
        raise ValueError(
            f"prompt of {T} tokens + max_new_tokens={max_new_tokens} = {T + max_new_tokens} tokens "
            f"exceeds the model's max_seq_len={max_len}"
        )
    vocab = model.config.vocab_size
    if int(idx.min()) < 0 or int(idx.max()) >= vocab:
        raise ValueError(f"prompt token ids must be in [0, {vocab}), got min {int(idx.min())} and max {int(idx.max())}")
    generator = None
    if seed is not None:
        generator = torch.Generator(device=device)
        generator.manual_seed(seed)

    finished = torch.zeros(B, dtype=torch.bool, device=device)

    def choose(logits_BV: torch.Tensor) -> torch.Tensor:
        token = sample_next(logits_BV, temperature, top_k, top_p, generator)
        if eos_id is not None:  # a finished sequence is padded with eos_id
            token = torch.where(finished, torch.full_like(token, eos_id), token)
            finished.logical_or_(token == eos_id)
        return token

    was_training = model.training
    model.eval()
    try:
        out = decode(model, idx, max_new_tokens, choose, stop=lambda: eos_id is not None and bool(finished.all()),
                     use_cache=use_cache)
    finally:
        model.train(was_training)
    return out[0] if single else out


@torch.no_grad()
def decode(
    model: torch.nn.Module,
    idx_BT: torch.Tensor,
    max_new_tokens: int,
    choose: Callable[[torch.Tensor], torch.Tensor],
    stop: Callable[[], bool] = lambda: False,
    use_cache: bool = True,
) -> torch.Tensor:
    """The decoding loop (every generation of the project runs it): ``idx_BT`` [B, T] followed by
    up to ``max_new_tokens`` tokens [B, T + n].

    Each step hands the last position's logits [B, V] to ``choose``, which returns the next tokens
    [B] (sampling, forcing, bookkeeping are the caller's); after appending them, ``stop()`` ends
    the loop early. With ``use_cache`` a ``KVCache`` holds the context (one new token per step);
    without, the whole context is recomputed each step (the reference the cache is tested against).
    No forward pass runs after the last token.
    """
    B, T = idx_BT.shape
    out = idx_BT
    cache = KVCache.for_model(model, B, max_len=T + max_new_tokens) if use_cache and max_new_tokens else None
    step_input, pos = idx_BT, 0
    for _ in range(max_new_tokens):
        if cache is not None:
            logits = model(step_input, kv_cache=cache, start_pos=pos).logits[:, -1]
            pos += step_input.shape[1]
        else:
            logits = model(out).logits[:, -1]
        token = choose(logits)
        out = torch.cat((out, token[:, None]), dim=1)
        step_input = token[:, None]
        if stop():
            break
    return out
