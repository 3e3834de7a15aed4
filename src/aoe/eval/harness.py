"""lm-evaluation-harness (``lm_eval``) adapter for the AoE decoder LM.

``AoEHarnessLM`` wraps a ``Transformer`` and its ``Tokenizer`` as an ``lm_eval.api.model.LM``,
registered under the name ``"aoe"``, so both of these work::

    lm_eval.simple_evaluate(model="aoe", model_args="checkpoint=runs/x/ckpt", tasks=[...])
    run_harness(AoEHarnessLM(model, tokenizer), tokenizer=None, tasks=["hellaswag"])   # aoe.eval.tasks

The three request types follow what the harness's Hugging Face causal-LM backend does:

* ``loglikelihood``: a (context, continuation) pair is tokenized by encoding ``context +
  continuation`` whole and splitting it after the tokens of the context alone; whitespace at the
  end of the context is moved to the start of the continuation first (so " world" merges as BPE
  expects). An empty context is replaced by the EOS token (if the continuation starts with EOS,
  that token becomes the context instead). The model input is the last ``max_length`` tokens of
  ``context + continuation[:-1]`` (left truncation); the result is the summed log-probability of
  the continuation tokens and whether each of them is the argmax at its position.
* ``loglikelihood_rolling``: the text's tokens are predicted after an EOS prefix in windows of at
  most ``max_length`` tokens: the first window predicts tokens 0 .. L-1 from [EOS] + tokens
  0 .. L-2; every later window predicts the next (at most L) tokens, conditioned on the L tokens
  just before the last of them. Every token is predicted exactly once; the sum is returned.
* ``generate_until``: greedy decoding, or sampling when the generation kwargs ask for it (see
  ``AoEHarnessLM.generate_until``), until a stop string, EOS or ``max_gen_toks`` tokens; the text
  is cut before the first stop string.

Requests are scored in batches of ``batch_size`` sequences (right-padded, longest first) and
the answers come back in request order.
"""

from __future__ import annotations

import logging
import os
from typing import Any, Iterable, Sequence

import torch
import torch.nn.functional as F

import lm_eval.models  # noqa: F401  (fill the model registry first, so "hf" etc. stay reachable)
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model

from aoe.model.generate import decode, sample_next

__all__ = ["AoEHarnessLM", "TaskDataUnavailableError", "DEFAULT_MAX_GEN_TOKS"]

log = logging.getLogger(__name__)

DEFAULT_MAX_GEN_TOKS = 256  # the harness's default generation budget


class TaskDataUnavailableError(RuntimeError):
    """An lm-eval task whose dataset could not be downloaded (or found in the local cache)."""


def _load_checkpoint(path: str | os.PathLike, device: str):
    """(model, tokenizer) of a native checkpoint; the tokenizer must have been saved with it."""
    from aoe.io.models import load_model  # lazy: written separately, heavy imports

    model, _run_config, tokenizer = load_model(path, device=device)
    if tokenizer is None:
        raise ValueError(
            f"checkpoint {str(path)!r} holds no tokenizer; the harness needs one to turn text into "
            "token ids (build AoEHarnessLM(model, tokenizer) yourself with the run's tokenizer)"
        )
    return model, tokenizer


def _parse_batch_size(batch_size: Any) -> int:
    """An int from an int or the harness's string forms ("8", "auto", "auto:4")."""
    if isinstance(batch_size, str):
        text = batch_size.strip().lower()
        if text.startswith("auto"):
            log.warning("batch_size=%r: automatic batch sizes are not supported, using 8", batch_size)
            return 8
        try:
            batch_size = int(text)
        except ValueError:
            raise ValueError(f"batch_size={batch_size!r} must be a positive integer") from None
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size={batch_size!r} must be a positive integer")
    return batch_size


@register_model("aoe")
class AoEHarnessLM(LM):
    """An lm-eval ``LM`` over an AoE ``Transformer`` and its ``Tokenizer``.

    Args:
        model: the ``Transformer`` (moved to ``device`` and put in eval mode).
        tokenizer: the ``aoe.data.tokenizer.Tokenizer`` the model was trained with (its EOS
            token is the prefix of empty contexts and of rolling windows, and a stop token).
        batch_size: sequences per forward (an int, or a numeric string as the harness CLI
            passes it; "auto" falls back to 8).
        device: torch device of the model ("cpu", "cuda", "cuda:1", ...).
        max_length: longest input in tokens (default and maximum: ``model.config.max_seq_len``).
        max_gen_toks: default generation budget when a request does not give one.
        checkpoint: instead of model and tokenizer: the path of a native checkpoint
            (``aoe.io.models.load_model``); this is what ``model_args="checkpoint=PATH"``
            of ``lm_eval.simple_evaluate(model="aoe", ...)`` sets.
        **unused: other keyword arguments the harness passes to every model (``max_batch_size``,
            ...) are accepted and ignored.
    """

    def __init__(
        self,
        model=None,
        tokenizer=None,
        batch_size: int | str = 8,
        device: str | torch.device = "cpu",
        max_length: int | None = None,
        max_gen_toks: int = DEFAULT_MAX_GEN_TOKS,
        checkpoint: str | os.PathLike | None = None,
        **unused: Any,
    ) -> None:
        super().__init__()
        unused = {k: v for k, v in unused.items() if v is not None and k != "max_batch_size"}
        if unused:
            log.warning("AoEHarnessLM: ignoring arguments %s", sorted(unused))
        device = "cpu" if device is None else device
        if checkpoint is not None:
            if model is not None:
                raise ValueError("give either model (and tokenizer) or checkpoint, not both")
            model, loaded_tok = _load_checkpoint(checkpoint, str(device))
            tokenizer = tokenizer if tokenizer is not None else loaded_tok
        if model is None:
            raise ValueError("AoEHarnessLM needs a model (and its tokenizer) or checkpoint=PATH")
        if tokenizer is None:
            raise ValueError("AoEHarnessLM needs the model's tokenizer")
        vocab = model.config.vocab_size
        if tokenizer.vocab_size > vocab:
            raise ValueError(f"tokenizer has {tokenizer.vocab_size} tokens, more than the model's vocab_size={vocab}")
        self._device = torch.device(device)
        self.model = model.to(self._device).eval()
        self.tokenizer = tokenizer
        self.batch_size = _parse_batch_size(batch_size)
        limit = model.config.max_seq_len
        if max_length is None:
            max_length = limit
        if isinstance(max_length, bool) or not isinstance(max_length, int) or not 2 <= max_length <= limit:
            raise ValueError(f"max_length={max_length!r} must be an integer in [2, max_seq_len={limit}]")
        self.max_length = max_length
        if isinstance(max_gen_toks, bool) or not isinstance(max_gen_toks, int) or max_gen_toks < 1:
            raise ValueError(f"max_gen_toks={max_gen_toks!r} must be a positive integer")
        self.max_gen_toks = max_gen_toks

    @classmethod
    def from_checkpoint(
        cls, path: str | os.PathLike, batch_size: int = 8, device: str = "cpu", **kwargs: Any
    ) -> "AoEHarnessLM":
        """Load a native checkpoint (model and its saved tokenizer) onto ``device``; ``kwargs``
        go to the constructor (``max_length``, ``max_gen_toks``)."""
        return cls(checkpoint=path, batch_size=batch_size, device=device, **kwargs)

    # -- tokenization ----------------------------------------------------------------------------
    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_id

    @property
    def tokenizer_name(self) -> str:
        return f"aoe-bpe-{self.tokenizer.hash[:16]}"

    def tok_encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text)

    def tok_decode(self, ids: Iterable[int]) -> str:
        return self.tokenizer.decode(ids)

    def encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """(context ids, continuation ids) of a request, tokenized as the harness does (see the
        module docstring). Raises ValueError for an empty continuation."""
        if not continuation and not context[len(context.rstrip()):]:
            raise ValueError(f"empty continuation (context {context[-40:]!r}): nothing to score")
        if context == "":
            cont = self.tok_encode(continuation)
            if cont[0] == self.eot_token_id:
                return cont[:1], cont[1:]
            return [self.eot_token_id], cont
        stripped = context.rstrip()
        if stripped != context:
            continuation = context[len(stripped):] + continuation
            context = stripped
        if context == "":  # the context was whitespace only
            return self.encode_pair("", continuation)
        whole = self.tok_encode(context + continuation)
        ctx = self.tok_encode(context)
        return ctx, whole[len(ctx):]

    # -- scoring ---------------------------------------------------------------------------------
    @torch.no_grad()
    def _score_tokens(self, pairs: Sequence[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
        """(sum of log p(continuation | context), all-greedy) for token-level pairs, batched.

        The input of a pair is the last max_length tokens of context + continuation[:-1]."""
        L = self.max_length
        items = []
        for i, (ctx, cont) in enumerate(pairs):
            if len(cont) == 0:
                raise ValueError("a continuation tokenized to no tokens: nothing to score")
            if len(cont) > L:
                raise ValueError(f"a continuation of {len(cont)} tokens is longer than max_length={L}")
            if len(ctx) == 0:
                raise ValueError("a context tokenized to no tokens")
            inp = (ctx + cont)[-(L + 1):][:-1]
            items.append((i, inp, cont))
        # longest first: each batch's first row sets its padded length; ties by tokens for determinism
        items.sort(key=lambda it: (-len(it[1]), it[1]))
        results: list[tuple[float, bool] | None] = [None] * len(pairs)
        pad = self.eot_token_id
        for start in range(0, len(items), self.batch_size):
            chunk = items[start:start + self.batch_size]
            width = len(chunk[0][1])
            idx = torch.full((len(chunk), width), pad, dtype=torch.long)
            for row, (_, inp, _) in enumerate(chunk):
                idx[row, :len(inp)] = torch.tensor(inp, dtype=torch.long)
            logits = self.model(idx.to(self._device)).logits
            logprobs = F.log_softmax(logits.float(), dim=-1)
            for row, (i, inp, cont) in enumerate(chunk):
                n = len(cont)
                lp = logprobs[row, len(inp) - n:len(inp)]  # [n, V]: predictions of the continuation
                target = torch.tensor(cont, dtype=torch.long, device=lp.device)
                total = float(lp.gather(-1, target[:, None]).sum())
                greedy = bool((lp.argmax(dim=-1) == target).all())
                results[i] = (total, greedy)
        return results  # type: ignore[return-value]

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        """``(log p(continuation | context), is_greedy)`` per request; ``req.args`` =
        (context, continuation)."""
        args = [req.args for req in requests]
        pairs = [self.encode_pair(context, continuation) for context, continuation in args]
        results = self._score_tokens(pairs)
        for a, r in zip(args, results):
            self.cache_hook.add_partial("loglikelihood", a, r)
        return results

    def rolling_windows(self, tokens: Sequence[int]) -> list[tuple[list[int], list[int]]]:
        """Disjoint (context, predicted) windows that predict each of ``tokens`` exactly once
        after an EOS prefix, each input at most max_length tokens (see the module docstring)."""
        L, tokens = self.max_length, list(tokens)
        seq = [self.eot_token_id] + tokens  # seq[j] is the input that predicts tokens[j]
        windows, done = [], 0
        while done < len(tokens):
            n = min(L, len(tokens) - done)
            end = done + n  # predict tokens[done:end] from inputs seq[max(0, end - L):end]
            inputs = seq[max(0, end - L):end]
            windows.append((inputs[:len(inputs) - n + 1], tokens[done:end]))
            done = end
        return windows

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Log-likelihood of each whole text (``req.args`` = (text,)), conditioned on EOS."""
        texts = [req.args[0] for req in requests]
        pairs, owner = [], []
        for i, text in enumerate(texts):
            for window in self.rolling_windows(self.tok_encode(text)):
                pairs.append(window)
                owner.append(i)
        totals = [0.0] * len(texts)
        for i, (lp, _) in zip(owner, self._score_tokens(pairs)):
            totals[i] += lp
        for text, total in zip(texts, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", (text,), total)
        return totals

    # -- generation ------------------------------------------------------------------------------
    def _generation_settings(self, gen_kwargs: dict | None) -> dict:
        """Normalized settings of one request's generation kwargs.

        until: a string or list of stop strings (EOS is always added); max_gen_toks (aliases
        max_new_tokens, max_tokens) default self.max_gen_toks; do_sample: True samples, False
        is greedy, unset samples iff temperature > 0; temperature (default 0; with do_sample=True
        and no temperature, 1.0; temperature 0 is always greedy); top_k, top_p, seed optional.
        """
        kw = dict(gen_kwargs or {})
        until = kw.pop("until", None)
        if until is None:
            until = []
        elif isinstance(until, str):
            until = [until]
        elif not isinstance(until, (list, tuple)) or not all(isinstance(u, str) for u in until):
            raise ValueError(f"until={until!r} must be a string or a list of strings")
        until = [u for u in until if u]
        eos = self.tok_decode([self.eot_token_id])
        if eos not in until:
            until.append(eos)
        max_gen = None
        for key in ("max_gen_toks", "max_new_tokens", "max_tokens", "max_completion_tokens"):
            value = kw.pop(key, None)
            if max_gen is None and value is not None:
                max_gen = int(value)
        max_gen = self.max_gen_toks if max_gen is None else max_gen
        if max_gen < 1:
            raise ValueError(f"max_gen_toks={max_gen} must be at least 1")
        do_sample = kw.pop("do_sample", None)
        temperature = kw.pop("temperature", None)
        if do_sample is None:
            temperature = float(temperature or 0.0)
        elif do_sample:
            temperature = 1.0 if temperature is None else float(temperature)
        else:
            temperature = 0.0
        top_k, top_p, seed = kw.pop("top_k", None), kw.pop("top_p", None), kw.pop("seed", None)
        kw.pop("max_length", None)
        if kw:
            log.warning("generate_until: ignoring generation kwargs %s", sorted(kw))
        return {
            "until": until, "max_gen_toks": max_gen, "temperature": temperature,
            "top_k": None if top_k is None else int(top_k),
            "top_p": None if top_p is None else float(top_p),
            "seed": None if seed is None else int(seed),
        }

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Continuation text per request; ``req.args`` = (context, gen_kwargs).

        gen_kwargs: see ``_generation_settings``. The budget is capped at max_length // 2 when
        it would leave the context no room (with a warning); the context keeps its last
        max_length - budget tokens (an empty context becomes [EOS]). Generation stops at EOS,
        when the decoded text contains a stop string, or after the budget; the returned text is
        cut before the first stop string. Requests with the same settings are decoded together
        (batch_size at a time, left-padded, with a KV cache); each request samples from its own
        generator seeded with the request's seed, so its text does not depend on the batch.
        """
        jobs = []
        for i, req in enumerate(requests):
            context, gen_kwargs = req.args[0], (req.args[1] if len(req.args) > 1 else {})
            s = self._generation_settings(gen_kwargs)
            if s["max_gen_toks"] >= self.max_length:
                capped = self.max_length // 2
                log.warning("max_gen_toks=%d leaves no room for the context in max_length=%d; generating at most %d tokens",
                            s["max_gen_toks"], self.max_length, capped)
                s["max_gen_toks"] = capped
            ids = self.tok_encode(context) if context else []
            ids = ids[-(self.max_length - s["max_gen_toks"]):] or [self.eot_token_id]
            key = (tuple(s["until"]), s["max_gen_toks"], s["temperature"], s["top_k"], s["top_p"], s["seed"])
            jobs.append((key, i, ids, s))
        jobs.sort(key=lambda j: (repr(j[0]), -len(j[2]), j[1]))  # longest first: little padding per batch
        out: list[str | None] = [None] * len(jobs)
        start = 0
        while start < len(jobs):
            stop = start
            while stop < len(jobs) and stop - start < self.batch_size and jobs[stop][0] == jobs[start][0]:
                stop += 1
            chunk = jobs[start:stop]
            texts = self._generate_batch([j[2] for j in chunk], chunk[0][3])
            for (_, i, _, _), text in zip(chunk, texts):
                out[i] = text
            start = stop
        for req, text in zip(requests, out):
            self.cache_hook.add_partial("generate_until", req.args, text)
        return out  # type: ignore[return-value]

    @torch.no_grad()
    def _generate_batch(self, prompts: list[list[int]], s: dict) -> list[str]:
        """Decode B prompts together, left-padded (``aoe.model.generate.decode``); the texts,
        cut before stop strings. A sequence stops at EOS or once its text holds a stop string;
        only the last tokens that can complete a stop string are decoded each step (each token
        holds at least one byte), so checking costs the same at every step."""
        T = max(len(q) for q in prompts)
        idx = torch.tensor([[self.eot_token_id] * (T - len(q)) + q for q in prompts], dtype=torch.long, device=self._device)
        mask = torch.tensor([[0] * (T - len(q)) + [1] * len(q) for q in prompts], device=self._device)
        generator = None
        if s["seed"] is not None:
            generator = [torch.Generator(device=self._device).manual_seed(s["seed"]) for _ in prompts]
        window = max(len(u.encode("utf-8")) for u in s["until"]) + 1
        generated: list[list[int]] = [[] for _ in prompts]
        done = [False] * len(prompts)

        def choose(logits_BV: torch.Tensor) -> torch.Tensor:
            token = sample_next(logits_BV, s["temperature"], s["top_k"], s["top_p"], generator)
            for b, t in enumerate(token.tolist()):
                if not done[b]:
                    generated[b].append(t)
                    tail = self.tok_decode(generated[b][-window:])
                    done[b] = t == self.eot_token_id or any(u in tail for u in s["until"])
            return token

        decode(self.model, idx, s["max_gen_toks"], choose, stop=lambda: all(done),
               attention_mask=None if bool(mask.all()) else mask)
        texts = []
        for ids in generated:
            text = self.tok_decode(ids)
            for u in s["until"]:
                text = text.split(u)[0]
            texts.append(text)
        return texts
