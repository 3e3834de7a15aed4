"""The result tables: the headline (one row per variant), every run, and the per-layer routing."""

from __future__ import annotations

import math

from aoe.compare.report.figures import Figures
from aoe.compare.report.markdown import DASH, escape, fmt, fmt_bytes, fmt_lr, fmt_mean_std, fmt_si, table
from aoe.compare.report.sections.setup import unigram_baseline
from aoe.compare.report.stats import mean
from aoe.compare.report.study import Study
from aoe.compare.report.results import LayerStats
from aoe.compare.report.summary import LayerSeries, VariantSummary

HEADLINE = ["variant", "seeds", "params total", "params active", "FLOPs/token", "val loss (nats)", "perplexity",
            "bits/byte", "Ent_load", "Ent_conf", "max/mean load", "tokens/s", "peak memory"]


def max_entropy_note(summaries: list[VariantSummary]) -> str:
    by_e: dict[int, list[str]] = {}
    for s in summaries:
        if s.n_experts:
            by_e.setdefault(s.n_experts, []).append(s.label)
    if not by_e:
        return ""
    parts = [f"log {e} = {math.log(e):.3f} ({', '.join(labels)})" for e, labels in sorted(by_e.items())]
    return "The maximum of Ent_load and Ent_conf is log E: " + "; ".join(parts) + ". "


def headline(study: Study) -> list[str]:
    rows = [[s.label, f"{len(s.done)}/{len(s.runs)}", fmt_si(s.params_total), fmt_si(s.params_active),
             fmt_si(s.flops_per_token), fmt_mean_std(s.val_loss, 4), fmt(mean(s.perplexity), 2),
             fmt(mean(s.bits_per_byte), 4), fmt(mean(s.ent_load), 3), fmt(mean(s.ent_conf), 3),
             fmt(mean(s.imbalance), 2), fmt_si(mean(s.tokens_per_s), 2), fmt_bytes(mean(s.peak_memory))]
            for s in study.summaries]
    uce, ppl, bpb = unigram_baseline(study.results.corpus)
    rows.append(["unigram baseline", DASH, DASH, DASH, DASH, fmt(uce, 4), ppl, bpb] + [DASH] * 5)
    return [
        "## Results", "", table(HEADLINE, rows), "",
        "Means over the completed seeds (val loss: mean ± std); Ent_load, Ent_conf and max/mean load are means over "
        "layers, measured on validation batches at the end of training. " + max_entropy_note(study.summaries)
        + "See Definitions.", "",
    ]


def runs(study: Study) -> list[str]:
    rows = [[s.label, r.seed if r.seed is not None else DASH, r.status, r.steps if r.steps is not None else DASH,
             fmt_lr(r.lr), fmt_si(r.tokens), fmt(r.val_loss, 4), fmt(r.perplexity, 2), fmt(r.bits_per_byte, 4),
             fmt_si(r.tokens_per_s, 2), fmt(r.train_time_s, 1), fmt_bytes(r.peak_memory_bytes), r.run_dir or DASH]
            for s in study.summaries for r in s.runs]
    lines = ["### Runs", ""]
    if rows:
        lines.append(table(["variant", "seed", "status", "steps", "lr", "tokens", "val loss", "perplexity", "bits/byte",
                            "tokens/s", "train time (s)", "peak memory", "run dir"], rows, align="lrlrrrrrrrrrl"))
    else:
        lines.append("No runs were recorded.")
    return lines + [""] + incomplete(study)


def incomplete(study: Study) -> list[str]:
    bad = [(s, r) for s in study.summaries for r in s.runs if not r.done]
    if not bad:
        return []
    lines = ["**Incomplete runs** (left out of every mean, plot and verdict):", ""]
    for s, r in bad:
        err = f" ({escape(r.error)})" if r.error else ""
        seed = r.seed if r.seed is not None else DASH
        lines.append(f"- {s.label} (`{s.name}`), seed {seed}: status `{r.status}`{err}")
    return lines + [""]


def _layer_row(i: int, d: LayerSeries) -> list[object]:
    return [i, fmt_mean_std(d.ent_load, 3), fmt_mean_std(d.ent_conf, 3), fmt_mean_std(d.imbalance, 2),
            fmt_mean_std(d.gate_weight[0], 3), fmt_mean_std(d.gate_weight[1], 3), fmt_mean_std(d.dead_experts, 1)]


def per_layer(study: Study, figures: Figures) -> list[str]:
    sparse = study.sparse
    if not sparse:
        return []
    lines = ["### Per layer", "",
             "Mean over completed seeds (± std), measured on validation batches at the end of training; gate top-1 "
             "and top-2 are the mean weights of the largest and second-largest chosen expert (see Definitions); "
             "– where a run did not record a statistic.", ""]
    for s in sparse:
        E = s.n_experts
        lines += [f"**{s.label}** (`{s.name}`" + (f", E = {E}, max log E = {math.log(E):.3f}" if E else "") + ")", ""]
        lines += [table(["layer", "Ent_load", "Ent_conf", "max/mean load", "gate top-1", "gate top-2", "dead experts"],
                        [_layer_row(i, d) for i, d in s.per_layer.items()]), ""]
    lines += selection_rules(study)
    lines += figures.markdown("ent_load_layers", "ent_conf_layers")
    heatmaps = figures.markdown(*(f"heatmap:{s.name}" for s in sparse))
    if heatmaps:
        lines += ["### Expert load", "", *heatmaps]
    return lines


def _last_training_layers(study: Study, s: VariantSummary) -> list[tuple[LayerStats, ...]]:
    """Per completed run, the layers of its last logged training window (() when none)."""
    out = []
    for r in s.done:
        logged = [e for e in study.logs.of(r) if "loss" in e and isinstance(e.get("layers"), list)]
        out.append(tuple(LayerStats.from_dict(d) for d in logged[-1]["layers"] if isinstance(d, dict)) if logged else ())
    return out


def _rule_row(layer: int, train: list[LayerStats], val: list[LayerStats]) -> list[object]:
    hists = [l.experts_per_token_hist for l in train if l.experts_per_token_hist]
    width = max((len(h) for h in hists), default=0)
    hist = [sum(h[j] for h in hists if j < len(h)) for j in range(width)]
    total = sum(hist)
    shares = " / ".join(f"{h / total:.2f}" for h in hist) if total > 0 else DASH
    rule = next((l.selection for l in val if l.selection), None)
    causal = [l.causal for l in val if l.causal is not None]
    evaluation = DASH if rule is None or not causal else ("causal (top-k)" if all(causal) else f"{rule} (sees later tokens)")
    return [layer, fmt_mean_std([l.experts_per_token for l in train], 2), shares,
            fmt_mean_std([l.unchosen_share for l in train], 3), fmt_mean_std([l.experts_per_token for l in val], 2),
            evaluation]


def selection_rules(study: Study) -> list[str]:
    """The per-layer statistics of the top-p and expert-choice variants: experts per token (mean and
    distribution) and tokens no expert took, in the last training window and on validation batches."""
    lines = []
    for s in study.sparse:
        train_runs, val_runs = _last_training_layers(study, s), [r.layers for r in s.done]
        if not any(l.selection for layers in (*train_runs, *val_runs) for l in layers):
            continue
        rows = []
        for layer in s.per_layer:
            train = [l for layers in train_runs for l in layers if l.layer == layer]
            val = [l for layers in val_runs for l in layers if l.layer == layer]
            rows.append(_rule_row(layer, train, val))
        lines += [f"**{s.label}** (`{s.name}`): selection rule statistics", "",
                  table(["layer", "experts/token (train)", "share of tokens with 0 / 1 / 2 / ... experts (train)",
                         "unchosen tokens (train)", "experts/token (eval)", "evaluation routing"], rows), ""]
    if lines:
        lines = ["### Selection rules", "",
                 "For the top-p and expert-choice variants: the experts each token used, in the last logged training "
                 "window (mean ± std over seeds; the distribution pooled over seeds) and on the validation batches; "
                 "unchosen tokens are those no expert took (expert choice: they pass through the residual only). "
                 "Expert choice evaluated with ec_inference=top_k routes validation tokens by top-k (causal); with "
                 "ec_inference=expert_choice a token's routing sees later tokens of its sequence.", "", *lines]
    return lines
