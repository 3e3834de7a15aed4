"""The verdicts: the headline (AoE against MoE, loss and routing) and one per declared comparison."""

from __future__ import annotations

import math

from aoe.compare.report.markdown import fmt_mean_std, fmt_signed, table
from aoe.compare.report.stats import NAN, VERDICT_RULE, Verdict, compare_entropies, compare_means, mean
from aoe.compare.report.study import Comparison, Study
from aoe.compare.report.summary import VariantSummary, pick


def headline_verdict(aoe: VariantSummary | None, moe: VariantSummary | None) -> list[str]:
    """AoE against MoE: the loss verdict and the routing sentence."""
    if aoe is None or moe is None:
        missing = " and ".join(x for x, v in (("an AoE variant", aoe), ("a MoE variant", moe)) if v is None)
        return [f"No verdict: the study has no {missing} to compare.", ""]
    la = aoe.label if aoe.label != moe.label else f"{aoe.label} ({aoe.name})"
    lb = moe.label if moe.label != aoe.label else f"{moe.label} ({moe.name})"
    v = compare_means(aoe.val_loss, moe.val_loss, la, lb)
    chosen = "" if aoe.name == "aoe" else (
        f" ({aoe.label} is the AoE variant with the lowest mean validation loss; there is no variant named `aoe`.)")
    E = aoe.n_experts if aoe.n_experts == moe.n_experts else None
    routing = compare_entropies(mean(aoe.ent_load), mean(moe.ent_load), mean(aoe.ent_conf), mean(moe.ent_conf),
                                la, lb, math.log(E) if E else NAN)
    return [v.sentence + chosen, "", routing, ""]


def judgement(v: Verdict) -> str:
    """The verdict column: what the rule says about one difference."""
    if v.exceeds is True:
        return f"exceeds the seed spread ({v.label_a if v.diff < 0 else v.label_b} lower)"
    if v.exceeds is False:
        return "within the seed spread"
    if not v.n_a or not v.n_b:
        return "no verdict (no completed run)"
    return "not judged (fewer than 2 seeds)"


def comparison_row(c: Comparison) -> list[str]:
    v, b = c.variant, c.baseline
    verdict = compare_means(v.val_loss, b.val_loss, v.label, b.label)
    return [v.label, b.label, fmt_mean_std(v.val_loss, 4), fmt_mean_std(b.val_loss, 4),
            fmt_signed(verdict.diff, 4), judgement(verdict)]


def per_comparison(comparisons: list[Comparison]) -> list[str]:
    if not comparisons:
        return []
    header = ["variant", "baseline", "val loss", "baseline val loss", "difference (nats)", "verdict"]
    return ["### Per comparison", "",
            "Each variant against the baseline the study compares it with (mean ± std over completed seeds; "
            "difference = variant − baseline, negative: the variant has the lower loss), judged by the rule above.",
            "", table(header, [comparison_row(c) for c in comparisons], align="llrrrl"), ""]


def verdict(study: Study) -> list[str]:
    """The headline verdict, the rule (stated once), then the per-comparison table."""
    aoe, moe = pick(study.summaries, "aoe", "aoe"), pick(study.summaries, "moe", "moe")
    comparisons = study.comparisons()
    lines = ["## Verdict", "", *headline_verdict(aoe, moe)]
    if (aoe is None or moe is None) and not comparisons:
        return lines
    return lines + [f"Rule: {VERDICT_RULE}.", "", *per_comparison(comparisons)]
