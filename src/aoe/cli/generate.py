"""``aoe generate``: read and check the prompts and sampling options, continue the prompts with a
model and print the texts."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from aoe.cli.common import CLIError, _check, _check_tokenizer, _device


def _check_generate_args(args: argparse.Namespace) -> None:
    _check(args.max_new_tokens >= 0, "--max-new-tokens", args.max_new_tokens, "must be >= 0")
    _check(args.temperature is None or args.temperature >= 0, "--temperature", args.temperature,
           "must be >= 0 (0 = greedy)")
    _check(args.top_k is None or args.top_k >= 1, "--top-k", args.top_k, "must be at least 1")
    _check(args.top_p is None or 0 < args.top_p <= 1, "--top-p", args.top_p, "must be in (0, 1]")
    _check_sampling_flags(args)


def _check_sampling_flags(args: argparse.Namespace) -> None:
    """Refuse sampling flags (and the sampling seed) that greedy decoding would ignore."""
    greedy = "--greedy" if args.greedy else "--temperature 0" if args.temperature == 0 else None
    if greedy is None:
        return
    unused = [flag for flag, value in (("--temperature", None if args.temperature == 0 else args.temperature),
                                       ("--top-k", args.top_k), ("--top-p", args.top_p), ("--seed", args.seed))
              if value is not None]
    if unused:
        raise CLIError(f"{greedy} takes the most likely token, so {', '.join(unused)} would do nothing: drop "
                       f"{'them' if len(unused) > 1 else 'it'}, or drop {greedy} to sample")


def _prompts(args: argparse.Namespace) -> list[str]:
    """The prompts of --prompt (each one) and --prompts-file (one per line; in a .jsonl file a JSON
    string or {"prompt": ...} per line); [""] (the start of a document) when none is given."""
    prompts = list(args.prompt or [])
    if args.prompts_file:
        prompts += _read_prompts_file(Path(args.prompts_file))
    return prompts or [""]


def _read_prompts_file(path: Path) -> list[str]:
    """The non-blank lines of a prompts file (see ``_prompts``)."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise CLIError(f"--prompts-file {str(path)!r}: cannot read it as UTF-8 text ({e})") from None
    if path.suffix != ".jsonl":
        return [line for line in lines if line.strip()]
    prompts = []
    for number, line in enumerate(lines, start=1):
        if line.strip():
            prompts.append(_jsonl_prompt(line, f"{path}:{number}"))
    return prompts


def _jsonl_prompt(line: str, where: str) -> str:
    try:
        value = json.loads(line)
    except (json.JSONDecodeError, RecursionError) as e:
        raise CLIError(f"--prompts-file {where}: not JSON ({e}); write one JSON string or {{\"prompt\": ...}} "
                       "per line") from None
    value = value.get("prompt") if isinstance(value, dict) else value
    if not isinstance(value, str):
        raise CLIError(f"--prompts-file {where}: expected a JSON string or an object with a \"prompt\" string")
    return value


def _new_token_budget(requested: int, prompt_len: int, limit: int) -> int:
    """``requested``, capped (with a warning on stderr) so that prompt and new tokens fit the context."""
    room = limit - prompt_len
    if requested > room:
        print(f"warning: --max-new-tokens {requested} capped to {room}: the model's context (max_seq_len={limit}) "
              f"holds the prompt's {prompt_len} token(s) and at most {room} new ones", file=sys.stderr)
        return room
    return requested


def _encoded_prompts(prompts: list[str], tokenizer, limit: int) -> list[list[int]]:
    """Each prompt's ids (an empty prompt: the end-of-text token), refused when one fills the context."""
    encoded = [(tokenizer.encode(p) if p else []) or [tokenizer.eos_id] for p in prompts]
    for number, ids in enumerate(encoded, start=1):
        if len(ids) >= limit:
            which = "the prompt" if len(encoded) == 1 else f"prompt {number}"
            raise CLIError(f"{which} is {len(ids)} tokens long; the model's context (max_seq_len) is {limit}: "
                           "shorten the prompt")
    return encoded


def cmd_generate(args: argparse.Namespace) -> int:
    from aoe.model import generate
    from aoe.io.models import load_any

    _check_generate_args(args)
    prompts = _prompts(args)
    device = _device(args.device)
    loaded = load_any(args.checkpoint, device=device)
    _check_tokenizer(loaded)
    model, tokenizer = loaded.model, loaded.tokenizer
    limit = model.config.max_seq_len
    encoded = _encoded_prompts(prompts, tokenizer, limit)
    max_new = _new_token_budget(args.max_new_tokens, max(len(ids) for ids in encoded), limit)
    temperature = 0.0 if args.greedy else 0.8 if args.temperature is None else args.temperature
    out = generate(model, encoded, max_new, temperature=temperature, top_k=args.top_k, top_p=args.top_p,
                   seed=args.seed, eos_id=None if args.no_stop else tokenizer.eos_id)
    texts = [prompt + tokenizer.decode(row[len(ids):]) for prompt, ids, row in zip(prompts, encoded, out)]
    if len(texts) == 1:
        print(texts[0])
    else:
        for prompt, text in zip(prompts, texts):
            print(json.dumps({"prompt": prompt, "text": text}, ensure_ascii=False))
    return 0
