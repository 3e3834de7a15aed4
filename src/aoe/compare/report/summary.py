"""Per-variant aggregates over the completed seeds, from the typed results.

A ``VariantSummary`` holds one value per completed run for each headline quantity (the report takes
means and spreads of these lists), and per layer one value per completed run for each routing
statistic. Statistics a variant does not have (a dense FFN's routing) are NaN, never errors.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from aoe.compare.report.results import LayerStats, Results, Run
from aoe.compare.variants import Variant
from aoe.compare.report.stats import NAN, finite, is_number, mean

LN2 = math.log(2.0)
GATE_RANKS = 2  # the report shows the mean top-1 and top-2 gate weights


@dataclass
class LayerSeries:
    """One layer's routing statistics, one value per completed run."""

    ent_load: list[float] = field(default_factory=list)
    ent_conf: list[float] = field(default_factory=list)
    imbalance: list[float] = field(default_factory=list)
    n_experts: list[float] = field(default_factory=list)
    gate_weight: list[list[float]] = field(default_factory=lambda: [[] for _ in range(GATE_RANKS)])
    dead_experts: list[float] = field(default_factory=list)

    def add(self, l: LayerStats) -> None:
        self.ent_load.append(l.ent_load)
        self.ent_conf.append(l.ent_conf)
        self.imbalance.append(l.imbalance)
        self.n_experts.append(float(len(l.tokens_per_expert)) if l.tokens_per_expert else NAN)
        for rank, values in enumerate(self.gate_weight):
            values.append(l.gate_weight(rank))
        self.dead_experts.append(l.dead)


@dataclass
class VariantSummary:
    """A variant's aggregates; the lists hold one value per completed run (layer means where per layer)."""

    info: Variant
    runs: list[Run] = field(default_factory=list)  # all runs of this variant, by seed
    val_loss: list[float] = field(default_factory=list)
    perplexity: list[float] = field(default_factory=list)
    bits_per_byte: list[float] = field(default_factory=list)
    ent_load: list[float] = field(default_factory=list)
    ent_conf: list[float] = field(default_factory=list)
    imbalance: list[float] = field(default_factory=list)
    gate_weight: list[list[float]] = field(default_factory=lambda: [[] for _ in range(GATE_RANKS)])
    gate_weight_sum: list[float] = field(default_factory=list)  # all k ranks summed
    dead_experts: list[float] = field(default_factory=list)
    tokens_per_s: list[float] = field(default_factory=list)
    peak_memory: list[float] = field(default_factory=list)
    params_total: float = NAN
    params_active: float = NAN
    flops_per_token: float = NAN
    per_layer: dict[int, LayerSeries] = field(default_factory=dict)
    accuracy: dict[str, list[float]] = field(default_factory=dict)  # task -> one accuracy per scored run

    name = property(lambda self: self.info.name)
    label = property(lambda self: self.info.label)
    description = property(lambda self: self.info.description)
    overrides = property(lambda self: list(self.info.overrides))
    kind = property(lambda self: self.info.kind)
    baseline = property(lambda self: self.info.baseline)

    @property
    def done(self) -> list[Run]:
        return [r for r in self.runs if r.done]

    @property
    def sparse(self) -> bool:
        return self.info.sparse or bool(finite(self.ent_load) or finite(self.ent_conf))

    @property
    def n_experts(self) -> int | None:
        ns = [n for d in self.per_layer.values() for n in finite(d.n_experts)]
        return int(max(ns)) if ns else None

    @property
    def lrs(self) -> list[float]:
        """The distinct learning rates of the completed runs."""
        return sorted(set(finite(r.lr for r in self.done)))


def _first_number(values) -> float:
    return next((float(v) for v in values if is_number(v)), NAN)


def _add_run(s: VariantSummary, r: Run, bytes_per_token: float) -> None:
    vl = r.val_loss
    s.val_loss.append(vl)
    ppl = r.perplexity
    s.perplexity.append(ppl if is_number(ppl) else (math.exp(vl) if is_number(vl) and vl < 700 else NAN))
    bpb = r.bits_per_byte
    if not is_number(bpb) and is_number(vl) and is_number(bytes_per_token) and bytes_per_token > 0:
        bpb = vl / LN2 / bytes_per_token
    s.bits_per_byte.append(bpb)
    s.ent_load.append(mean(l.ent_load for l in r.layers))
    s.ent_conf.append(mean(l.ent_conf for l in r.layers))
    s.imbalance.append(mean(l.imbalance for l in r.layers))
    for rank, values in enumerate(s.gate_weight):
        values.append(mean(l.gate_weight(rank) for l in r.layers))
    s.gate_weight_sum.append(mean(sum(l.gate_weight_mean) if l.gate_weight_mean else NAN for l in r.layers))
    s.dead_experts.append(mean(l.dead for l in r.layers))
    s.tokens_per_s.append(r.tokens_per_s)
    s.peak_memory.append(r.peak_memory_bytes)
    for task, acc in r.downstream.items():
        s.accuracy.setdefault(task, []).append(acc)
    for i, l in enumerate(r.layers):
        s.per_layer.setdefault(l.layer if l.layer is not None else i, LayerSeries()).add(l)


def summarize(results) -> list[VariantSummary]:
    """One :class:`VariantSummary` per variant, in the order of results.json's variants (then any
    variant that only appears in its runs). ``results``: the stored dict or :class:`Results`."""
    res = Results.from_dict(results)
    bytes_per_token = float(res.corpus.get("bytes_per_token")) if is_number(res.corpus.get("bytes_per_token")) else NAN
    out = []
    for info in res.variants:
        s = VariantSummary(info, runs=res.runs_of(info.name))
        for r in s.done:
            _add_run(s, r, bytes_per_token)
        pool = s.done or s.runs
        s.params_total = _first_number(r.params_total for r in pool)
        s.params_active = _first_number(r.params_active for r in pool)
        s.flops_per_token = _first_number(r.flops_per_token for r in pool)
        s.per_layer = dict(sorted(s.per_layer.items()))
        out.append(s)
    return out


def by_name(summaries: list[VariantSummary], name: str | None) -> VariantSummary | None:
    return next((s for s in summaries if s.name == name), None)


def pick(summaries: list[VariantSummary], name: str, kind: str) -> VariantSummary | None:
    """The variant called ``name`` if it has a val loss; else the ``kind`` variant with the lowest
    one; else the variant called ``name`` even without one; else None."""
    named = by_name(summaries, name)
    if named is not None and finite(named.val_loss):
        return named
    cands = [s for s in summaries if s.kind == kind and finite(s.val_loss)]
    return min(cands, key=lambda s: mean(s.val_loss)) if cands else named
