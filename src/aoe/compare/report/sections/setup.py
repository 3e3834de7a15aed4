"""The sections that say what was run: title, command, machine, corpus, configuration."""

from __future__ import annotations

import json
import math
from typing import Sequence

from aoe.compare.report.markdown import DASH, fmt, fmt_lr, table
from aoe.compare.report.results import number
from aoe.compare.report.stats import finite, is_number
from aoe.compare.report.study import Study
from aoe.compare.report.summary import LN2, VariantSummary


def title(study: Study) -> list[str]:
    lines = ["# Autonomy-of-Experts vs router MoE: comparison report", ""]
    if study.results.created:
        lines += [f"Created {study.results.created}.", ""]
    return lines


def command(study: Study) -> list[str]:
    return ["## Command", "", "```bash", study.results.command or "(command not recorded)", "```", ""]


def machine(study: Study) -> list[str]:
    m = study.results.machine
    return ["## Machine", "", *(f"- {k}: {m[k] if m.get(k) is not None else DASH}"
                                for k in ("platform", "python", "torch", "device", "threads")), ""]


def unigram_baseline(corpus: dict) -> tuple[float, str, str]:
    """(cross entropy in nats, perplexity, bits per byte) of the training unigram on validation."""
    uce, bpt = number(corpus, "unigram_cross_entropy"), number(corpus, "bytes_per_token")
    ppl = fmt(math.exp(uce), 1) if is_number(uce) and uce < 700 else DASH
    bpb = fmt(uce / LN2 / bpt, 4) if is_number(uce) and is_number(bpt) and bpt > 0 else DASH
    return uce, ppl, bpb


def corpus(study: Study) -> list[str]:
    c = study.results.corpus
    train, val = c.get("train_tokens", DASH), c.get("val_tokens", DASH)
    tokens = (f"{train:,} train, {val:,} validation" if is_number(train) and is_number(val)
              else f"{train} train, {val} validation")
    uce, ppl, bpb = unigram_baseline(c)
    return [
        "## Corpus", "",
        f"- source: {c.get('source', DASH)}",
        f"- tokens: {tokens}",
        f"- vocabulary: {c.get('vocab_size', DASH)} tokens; {fmt(number(c, 'bytes_per_token'), 3)} bytes per token "
        "(validation)",
        f"- unigram entropy of the validation tokens: {fmt(number(c, 'unigram_entropy'), 4)} nats/token",
        f"- unigram baseline (training unigram scored on validation): {fmt(uce, 4)} nats/token, perplexity {ppl}, "
        f"{bpb} bits/byte",
        "",
    ]


def _kv(d: dict, keys: Sequence[str]) -> str:
    return ", ".join(f"{k} = {d[k]}" for k in keys if k in d and d[k] is not None)


MODEL_KEYS = ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "max_seq_len", "ffn", "d_ffn", "n_experts",
              "top_k", "d_low", "d_wide", "renormalize", "norm", "aux_loss_coef", "dense_d_ffn")
TRAIN_KEYS = ("max_steps", "batch_size", "micro_batch_size", "seq_len", "lr", "min_lr_ratio", "warmup_steps",
              "weight_decay", "grad_clip", "eval_every", "eval_batches", "dtype", "device")
DATA_KEYS = ("source", "vocab_size", "tokenizer", "val_fraction", "max_bytes")


def _tokens_line(study: Study) -> str | None:
    train = study.results.config.get("train") or {}
    steps, bs, sl = train.get("max_steps"), train.get("batch_size"), train.get("seq_len")
    parts = []
    if all(is_number(x) for x in (steps, bs, sl)):
        parts.append(f"{steps * bs * sl:,} planned per run (max_steps × batch_size × seq_len)")
    actual = finite(r.tokens for s in study.summaries for r in s.done)
    if actual:
        lo, hi = min(actual), max(actual)
        trained = f"{int(lo):,}" if lo == hi else f"{int(lo):,}–{int(hi):,}"
        parts.append(f"{trained} trained per completed run")
    return f"- Tokens: {'; '.join(parts)}" if parts else None


def config_summary(study: Study) -> list[str]:
    cfg = study.results.config
    lines = []
    for text, d, keys in (("Model (base, before each variant's overrides)", cfg.get("model"), MODEL_KEYS),
                          ("Training", cfg.get("train"), TRAIN_KEYS), ("Data", cfg.get("data"), DATA_KEYS)):
        kv = _kv(d or {}, keys)
        if kv:
            lines.append(f"- {text}: {kv}")
    tokens = _tokens_line(study)
    if tokens:
        lines.append(tokens)
    if study.results.seeds:
        lines.append(f"- Seeds: {', '.join(str(x) for x in study.results.seeds)}")
    return lines


def variant_lr(study: Study, s: VariantSummary) -> str:
    """The peak lr a variant's main runs trained at, and where it came from."""
    if s.info.lr is not None:
        return f"{fmt_lr(s.info.lr)} (sweep)"
    lrs = s.lrs or finite([study.results.base_lr])
    return ", ".join(fmt_lr(x) for x in lrs) if lrs else DASH


def variants_table(study: Study) -> list[str]:
    if not study.summaries:
        return []
    rows = [[s.name, s.label, s.kind, s.baseline or DASH, variant_lr(study, s), s.description or DASH,
             " ".join(s.overrides) or "(none)"] for s in study.summaries]
    header = ["variant", "label", "kind", "baseline", "lr", "description", "overrides"]
    return [table(header, rows, align="l" * len(header)), ""]


def configuration(study: Study) -> list[str]:
    lines = ["## Configuration", "", *config_summary(study), "", *variants_table(study)]
    if study.results.config:
        lines += ["<details><summary>Resolved base configuration</summary>", "", "```json",
                  json.dumps(study.results.config, indent=2, sort_keys=True, default=str), "```", "", "</details>", ""]
    return lines
