"""Small statistics helpers for the comparison report: seed means, spreads and the verdict rule.

Everything here takes plain sequences that may hold ``None`` or NaN (a run that failed, a dense
variant without expert statistics); such entries are dropped before any statistic is computed, and a
statistic that cannot be computed is NaN.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Iterable, Sequence

NAN = float("nan")

#: The rule used to decide whether a difference of mean validation losses is larger than seed noise.
VERDICT_RULE = (
    "the difference of the seed means counts as larger than the seed spread when "
    "|diff| > max(std_a, std_b) (sample standard deviations over seeds) and, with at least 2 seeds "
    "per variant, also |diff| > sqrt(se_a^2 + se_b^2) (the two standard errors of the mean, "
    "se = std / sqrt(n), combined); with fewer than 2 seeds for either variant no spread is "
    "available and the difference is not judged"
)


def is_number(x: object) -> bool:
    """True for a finite int/float (bools excluded)."""
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        return False
    return math.isfinite(float(x))


def finite(values: Iterable[object] | None) -> list[float]:
    """The finite numbers among ``values`` as floats (None, NaN, inf and non-numbers dropped)."""
    if values is None:
        return []
    return [float(v) for v in values if is_number(v)]


def mean(values: Iterable[object] | None) -> float:
    """Arithmetic mean of the finite values; NaN when there are none."""
    xs = finite(values)
    return sum(xs) / len(xs) if xs else NAN


def std(values: Iterable[object] | None) -> float:
    """Sample standard deviation (ddof=1) of the finite values; NaN with fewer than 2."""
    xs = finite(values)
    if len(xs) < 2:
        return NAN
    m = sum(xs) / len(xs)
    return math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1))


def stderr(values: Iterable[object] | None) -> float:
    """Standard error of the mean, std / sqrt(n); NaN with fewer than 2 finite values."""
    xs = finite(values)
    if len(xs) < 2:
        return NAN
    return std(xs) / math.sqrt(len(xs))


def minmax(values: Iterable[object] | None) -> tuple[float, float]:
    """(min, max) of the finite values; (NaN, NaN) when there are none."""
    xs = finite(values)
    return (min(xs), max(xs)) if xs else (NAN, NAN)


@dataclass(frozen=True)
class Verdict:
    """Outcome of comparing variant a (AoE) against variant b (MoE) on mean validation loss."""

    label_a: str
    label_b: str
    n_a: int
    n_b: int
    mean_a: float
    mean_b: float
    diff: float  # mean_a - mean_b (negative: a has the lower loss)
    std_a: float
    std_b: float
    se_combined: float  # sqrt(se_a^2 + se_b^2), NaN with < 2 seeds
    exceeds: bool | None  # True/False: judged by VERDICT_RULE; None: cannot be judged
    sentence: str


def _f(x: float, digits: int = 4) -> str:
    return f"{x:.{digits}f}" if is_number(x) else "–"


def compare_means(
    values_a: Sequence[object], values_b: Sequence[object], label_a: str = "AoE", label_b: str = "MoE"
) -> Verdict:
    """Apply :data:`VERDICT_RULE` to two sets of per-seed validation losses (a minus b) and phrase it."""
    xa, xb = finite(values_a), finite(values_b)
    ma, mb = mean(xa), mean(xb)
    diff = ma - mb if xa and xb else NAN
    se = math.sqrt(stderr(xa) ** 2 + stderr(xb) ** 2) if len(xa) >= 2 and len(xb) >= 2 else NAN
    numbers = Verdict(label_a, label_b, len(xa), len(xb), ma, mb, diff, std(xa), std(xb), se, None, "")
    if not xa or not xb:
        return replace(numbers, sentence=_no_verdict_sentence(numbers))
    if len(xa) < 2 or len(xb) < 2:
        return replace(numbers, sentence=_unjudged_sentence(numbers))
    judged = replace(numbers, exceeds=abs(diff) > max(numbers.std_a, numbers.std_b) and abs(diff) > se)
    return replace(judged, sentence=_judged_sentence(judged))


def _no_verdict_sentence(v: Verdict) -> str:
    """The sentence when a variant has no validation loss at all."""
    missing = v.label_a if not v.n_a else v.label_b
    return (
        f"No verdict: {missing} has no completed run with a validation loss, so {v.label_a} and "
        f"{v.label_b} cannot be compared."
    )


def _lower(v: Verdict) -> str:
    """The label of the variant with the lower mean loss (b when they are equal)."""
    return v.label_a if v.diff < 0 else v.label_b


def _head(v: Verdict) -> str:
    """The sentence's first clause: both means, their difference and which is lower."""
    head = (
        f"{v.label_a} reaches a mean validation loss of {_f(v.mean_a)} nats against {_f(v.mean_b)} for {v.label_b}: "
        f"{v.label_a} − {v.label_b} = {v.diff:+.4f} nats"
    )
    return head + (" (identical)" if v.diff == 0 else f" ({_lower(v)} lower)")


def _unjudged_sentence(v: Verdict) -> str:
    """The sentence when a variant has a single seed: the difference, with no spread to judge it by."""
    who = (
        "one seed per variant"
        if v.n_a < 2 and v.n_b < 2
        else f"only one seed for {v.label_a if v.n_a < 2 else v.label_b}"
    )
    return (
        f"{_head(v)}. With {who} no seed spread is available, so whether this difference is larger "
        f"than seed-to-seed noise cannot be judged."
    )


def _judged_sentence(v: Verdict) -> str:
    """The sentence of a judged difference (``v.exceeds`` set): the rule's numbers and its outcome."""
    spread = max(v.std_a, v.std_b)
    detail = f"|diff| = {abs(v.diff):.4f} vs max std {spread:.4f} and combined standard error {v.se_combined:.4f}"
    if v.exceeds:
        better = _lower(v)
        return (
            f"{_head(v)}. The difference exceeds the seed spread ({detail}; {v.n_a} and {v.n_b} seeds), "
            f"so {better} is better than {v.label_a if better == v.label_b else v.label_b} in this comparison."
        )
    return (
        f"{_head(v)}. The difference is within the seed spread ({detail}; {v.n_a} and {v.n_b} seeds), "
        f"so this comparison cannot tell {v.label_a} and {v.label_b} apart."
    )


def compare_entropies(
    ent_load_a: float,
    ent_load_b: float,
    ent_conf_a: float,
    ent_conf_b: float,
    label_a: str = "AoE",
    label_b: str = "MoE",
    max_entropy: float = NAN,
) -> str:
    """Plain-words comparison of load balance (Ent_load) and selection confidence (Ent_conf)."""
    parts = []
    if is_number(ent_load_a) and is_number(ent_load_b):
        cap = f"; the maximum, perfectly balanced, is log E = {max_entropy:.3f}" if is_number(max_entropy) else ""
        if ent_load_a > ent_load_b:
            word = f"{label_a} spreads tokens over its experts more evenly than {label_b}"
        elif ent_load_a < ent_load_b:
            word = f"{label_b} spreads tokens over its experts more evenly than {label_a}"
        else:
            word = f"{label_a} and {label_b} are equally balanced"
        parts.append(
            f"Load balance: {word} (Ent_load {label_a} {ent_load_a:.3f}, {label_b} {ent_load_b:.3f} nats, "
            f"mean over layers and seeds; higher is more balanced{cap})."
        )
    else:
        parts.append(f"Load balance: Ent_load is not available for both {label_a} and {label_b}.")
    if is_number(ent_conf_a) and is_number(ent_conf_b):
        if ent_conf_a < ent_conf_b:
            word = f"{label_a} chooses its experts more confidently than {label_b}"
        elif ent_conf_a > ent_conf_b:
            word = f"{label_b} chooses its experts more confidently than {label_a}"
        else:
            word = f"{label_a} and {label_b} are equally confident"
        parts.append(
            f"Selection confidence: {word} (Ent_conf {label_a} {ent_conf_a:.3f}, {label_b} {ent_conf_b:.3f} "
            f"nats; lower means a sharper score distribution)."
        )
    else:
        parts.append(f"Selection confidence: Ent_conf is not available for both {label_a} and {label_b}.")
    return " ".join(parts)


def ema(values: Sequence[float], beta: float) -> list[float]:
    """Debiased exponential moving average (as TensorBoard): s_t = beta*s_{t-1} + (1-beta)*x_t,
    divided by (1 - beta^t). Non-finite inputs are carried over as the previous smoothed value."""
    out: list[float] = []
    acc, weight = 0.0, 0.0
    for x in values:
        if is_number(x):
            acc = beta * acc + (1.0 - beta) * float(x)
            weight = beta * weight + (1.0 - beta)
        out.append(acc / weight if weight > 0 else NAN)
    return out
