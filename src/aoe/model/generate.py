"""Autoregressive sampling from a ``Transformer``: greedy, temperature, top-k and nucleus (top-p).

``decode`` is the one decoding loop (KV cache, early stop); ``generate`` and the lm-eval adapter's
``generate_until`` choose their tokens and their stopping rule around it."""

from __future__ import annotations

import contextlib
from typing import Callable, Sequence

import torch

from aoe.model.attention import KVCache
from aoe.model.padding import check_attention_mask


def _is_id(i) -> bool:
    return isinstance(i, int) and not isinstance(i, bool)


def _left_padded(seqs: list) -> tuple[torch.Tensor, torch.Tensor]:
    """Sequences of any lengths -> ids [B, T] and attention mask [B, T], left-padded with id 0."""
    if not all(isinstance(q, (list, tuple)) and all(_is_id(i) for i in q) for q in seqs):
        raise ValueError("prompt_ids must be a list of ints, a list of lists of ints, or an integer tensor")
    if any(len(q) == 0 for q in seqs):
        raise ValueError("a prompt is empty: give every sequence at least one token id")
    T = max(len(q) for q in seqs)
    idx = torch.tensor([[0] * (T - len(q)) + list(q) for q in seqs], dtype=torch.long)
    mask = torch.tensor([[0] * (T - len(q)) + [1] * len(q) for q in seqs], dtype=torch.long)
    return idx, mask


def _as_batch(prompt_ids, device: torch.device) -> tuple[torch.Tensor, bool]:
    """[B, T] long tensor on ``device`` and whether the input was one sequence."""
    if isinstance(prompt_ids, torch.Tensor):
        idx = prompt_ids
    else:
        ids = list(prompt_ids)
        if not all(_is_id(i) for i in ids):
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
    generator: torch.Generator | Sequence[torch.Generator] | None = None,
) -> torch.Tensor:
    """Next token ids [B] from last-position logits [B, V]; temperature 0 = greedy (argmax).

    ``generator``: one generator for the whole batch, or one per row (row b then draws from its
    own stream only, so its tokens do not depend on the other rows)."""
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
    if isinstance(generator, (list, tuple)):
        return torch.cat([torch.multinomial(probs[b:b + 1], 1, generator=g) for b, g in enumerate(generator)]).squeeze(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def _check_sampling(max_new_tokens, temperature, top_k, top_p) -> None:
    if not isinstance(max_new_tokens, int) or isinstance(max_new_tokens, bool) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens={max_new_tokens!r} must be a non-negative integer")
    if not temperature >= 0:
        raise ValueError(f"temperature={temperature!r} must be >= 0 (0 = greedy)")
    if top_k is not None and (not isinstance(top_k, int) or top_k < 1):
        raise ValueError(f"top_k={top_k!r} must be a positive integer or None")
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"top_p={top_p!r} must be in (0, 1] or None")


def _check_prompt(model, idx: torch.Tensor, mask: torch.Tensor | None, max_new_tokens: int) -> None:
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
    if mask is not None:
        mask = check_attention_mask(mask, B, 0, T)
        if not bool(mask.any(dim=1).all()):
            raise ValueError("attention_mask marks every token of a prompt as padding: give every sequence at least one real token")


def _generators(seed: int | None, batch: int, device: torch.device) -> list[torch.Generator] | None:
    """One generator per row, row b seeded with seed + b (None: the global RNG)."""
    if seed is None:
        return None
    return [torch.Generator(device=device).manual_seed(seed + b) for b in range(batch)]


@torch.no_grad()
def generate(
    model: torch.nn.Module,
    prompt_ids: Sequence[int] | Sequence[Sequence[int]] | torch.Tensor,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int | None = None,
    use_cache: bool = True,
    eos_id: int | None = None,
    attention_mask: torch.Tensor | None = None,
) -> torch.Tensor | list[list[int]]:
    """Sample up to max_new_tokens tokens after a prompt.

    Args:
        model: a ``Transformer`` (put in eval mode for the call; its mode is restored after).
        prompt_ids: a list of ints or a 1-D tensor (one sequence); a [B, T] tensor (B sequences,
            padded as ``attention_mask`` says); or a list of lists of ints (sequences of any
            lengths, left-padded here).
        max_new_tokens: tokens to add; prompt length + max_new_tokens must be <= max_seq_len.
        temperature: softmax temperature; 0 = greedy (argmax, top_k / top_p unused).
        top_k: sample among the k most likely tokens only (None = all).
        top_p: nucleus sampling: among the smallest set of tokens whose probability reaches
            top_p (None or 1.0 = all).
        seed: seed of private generators, one per row: row b draws from a generator seeded
            with seed + b (reproducible; the global RNG is untouched). A sequence therefore
            gives the same tokens in a batch, padded or not, as alone with seed + b.
        use_cache: decode with a ``KVCache`` (one new token per step); False recomputes the
            whole context every step (slow; the reference the cache is tested against).
        eos_id: stop once every sequence has produced this id; a finished sequence is padded
            with eos_id until the others finish.
        attention_mask: with a [B, T] tensor prompt, 1 for real tokens and 0 for pads (left,
            right or in between); each row then continues from its last real token and gives
            the tokens it would give alone (see ``Transformer.forward``).

    Returns:
        Long tensor of the prompt followed by the new tokens: [T + n] for one sequence, else
        [B, T + n] (n <= max_new_tokens, fewer when every sequence stopped at eos_id; the new
        tokens follow the prompt's last column, pads included). For a list of lists: one list
        per sequence, its prompt and its new tokens (up to and including eos_id), no padding.
    """
    _check_sampling(max_new_tokens, temperature, top_k, top_p)
    idx, mask, form = _prompt(model, prompt_ids, attention_mask, max_new_tokens)
    choose, stop = _sampler(idx, temperature, top_k, top_p, seed, eos_id)
    with _eval_mode(model):
        out = decode(model, idx, max_new_tokens, choose, stop=stop, use_cache=use_cache, attention_mask=mask)
    if form == "ragged":
        return [_unpadded(row, row_mask, idx.shape[1], eos_id) for row, row_mask in zip(out.tolist(), mask.tolist())]
    return out[0] if form == "one" else out


def _prompt(model, prompt_ids, attention_mask: torch.Tensor | None,
            max_new_tokens: int) -> tuple[torch.Tensor, torch.Tensor | None, str]:
    """``generate``'s prompt -> ids [B, T] and mask [B, T] (or None) on the model's device, checked
    against the model, and its form: "one" (one sequence), "batch" (a [B, T] tensor) or "ragged"
    (a list of lists, left-padded here: the mask marks the pads)."""
    device = model.embed_tokens.weight.device
    ragged = isinstance(prompt_ids, (list, tuple)) and len(prompt_ids) > 0 and isinstance(prompt_ids[0], (list, tuple))
    if ragged:
        if attention_mask is not None:
            raise ValueError("attention_mask is for a [B, T] tensor prompt; a list of lists is padded here")
        prompt_ids, attention_mask = _left_padded(list(prompt_ids))
    idx, single = _as_batch(prompt_ids, device)
    mask = None if attention_mask is None else attention_mask.to(device)
    _check_prompt(model, idx, mask, max_new_tokens)
    return idx, mask, "ragged" if ragged else "one" if single else "batch"


def _sampler(idx_BT: torch.Tensor, temperature: float, top_k: int | None, top_p: float | None, seed: int | None,
             eos_id: int | None) -> tuple[Callable[[torch.Tensor], torch.Tensor], Callable[[], bool]]:
    """``decode``'s (choose, stop) for ``generate``: choose samples each row's next token [B]
    (``sample_next``; with eos_id, a finished row gets eos_id again); stop is true once every row
    has produced eos_id (never without one)."""
    generators = _generators(seed, idx_BT.shape[0], idx_BT.device)
    finished = torch.zeros(idx_BT.shape[0], dtype=torch.bool, device=idx_BT.device)

    def choose(logits_BV: torch.Tensor) -> torch.Tensor:
        token = sample_next(logits_BV, temperature, top_k, top_p, generators)
        if eos_id is not None:  # a finished sequence is padded with eos_id
            token = torch.where(finished, torch.full_like(token, eos_id), token)
            finished.logical_or_(token == eos_id)
        return token

    return choose, lambda: eos_id is not None and bool(finished.all())


@contextlib.contextmanager
def _eval_mode(model: torch.nn.Module):
    """The model in eval mode inside the block; its mode before is restored after."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def _unpadded(row: list[int], prompt_mask: list[int], prompt_len: int, eos_id: int | None) -> list[int]:
    """A left-padded output row without its pads, cut after its first new eos_id."""
    prompt = [t for t, m in zip(row[:prompt_len], prompt_mask) if m]
    new = row[prompt_len:]
    if eos_id is not None and eos_id in new:
        new = new[: new.index(eos_id) + 1]
    return prompt + new


def _last_real(mask_BT: torch.Tensor) -> torch.Tensor:
    """Index of each row's last real token [B]."""
    T = mask_BT.shape[1]
    return T - 1 - mask_BT.flip(1).to(torch.long).argmax(dim=1)


@torch.no_grad()
def decode(
    model: torch.nn.Module,
    idx_BT: torch.Tensor,
    max_new_tokens: int,
    choose: Callable[[torch.Tensor], torch.Tensor],
    stop: Callable[[], bool] = lambda: False,
    use_cache: bool = True,
    attention_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """The decoding loop (every generation of the project runs it): ``idx_BT`` [B, T] followed by
    up to ``max_new_tokens`` tokens [B, T + n].

    Each step hands the logits [B, V] of each row's last real token to ``choose``, which returns
    the next tokens [B] (sampling, forcing, bookkeeping are the caller's); after appending them,
    ``stop()`` ends the loop early. With ``use_cache`` a ``KVCache`` holds the context (one new
    token per step); without, the whole context is recomputed each step (the reference the cache
    is tested against). ``attention_mask`` [B, T] marks the prompt's pads (0); the new tokens are
    real. No forward pass runs after the last token.
    """
    B, T = idx_BT.shape
    out = idx_BT
    mask = None if attention_mask is None else check_attention_mask(attention_mask, B, 0, T)  # bool from here on
    cache = KVCache.for_model(model, B, max_len=T + max_new_tokens) if use_cache and max_new_tokens else None
    rows = torch.arange(B, device=idx_BT.device)
    last = None if mask is None else _last_real(mask)
    step_input, pos = idx_BT, 0
    for _ in range(max_new_tokens):
        if cache is not None:
            logits = model(step_input, kv_cache=cache, start_pos=pos, attention_mask=mask).logits
            pos += step_input.shape[1]
        else:
            logits = model(out, attention_mask=mask).logits
        token = choose(logits[:, -1] if last is None else logits[rows, last])
        out = torch.cat((out, token[:, None]), dim=1)
        if mask is not None:
            mask = torch.cat((mask, torch.ones_like(mask[:, :1])), dim=1)
        last = None  # from now on the last token of every row is a new, real one
        step_input = token[:, None]
        if stop():
            break
    return out
