"""Curves over training steps, from metrics.jsonl entries, and their aggregates over seeds.

Training entries carry "loss" (and "layers": routing statistics of the logged window); validation
entries carry "val_loss". A step logged twice (a resumed run) keeps its last value. Nothing here
draws: ``aoe.compare.report.plots`` does.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable, Mapping

from aoe.compare.report.results import LayerStats
from aoe.compare.report.stats import NAN, ema, is_number, mean, minmax


@dataclass(frozen=True)
class Curve:
    """One run's values against step."""

    steps: tuple[float, ...]
    values: tuple[float, ...]

    @classmethod
    def from_map(cls, by_step: Mapping[float, float]) -> Curve:
        steps = sorted(by_step)
        return cls(tuple(steps), tuple(by_step[s] for s in steps))

    def smoothed(self, beta: float) -> Curve:
        return Curve(self.steps, tuple(ema(self.values, beta)))

    def __bool__(self) -> bool:
        return bool(self.steps)


@dataclass(frozen=True)
class Band:
    """Seeds aggregated: the mean, min and max at each step."""

    steps: tuple[float, ...]
    mean: tuple[float, ...]
    lo: tuple[float, ...]
    hi: tuple[float, ...]

    def __bool__(self) -> bool:
        return bool(self.steps)

    @property
    def spread(self) -> bool:
        """Whether the seeds differ anywhere (a band is worth drawing)."""
        return any(h != l for l, h in zip(self.lo, self.hi) if is_number(l) and is_number(h))


EMPTY_BAND = Band((), (), (), ())


def logged(entries: Iterable[dict], key: str) -> Curve:
    """The entries that carry ``key`` (training: "loss"; validation: "val_loss") as a curve."""
    by_step: dict[float, float] = {}
    for e in entries:
        if key in e and is_number(e.get("step")):
            by_step[float(e["step"])] = float(e[key]) if is_number(e[key]) else NAN
    return Curve.from_map(by_step)


def layer_mean(entries: Iterable[dict], stat: Callable[[LayerStats], float]) -> Curve:
    """``stat`` of the training entries' layers, mean over layers, against step (steps where no
    layer has a value are left out)."""
    by_step: dict[float, float] = {}
    for e in entries:
        layers = e.get("layers")
        if "loss" in e and is_number(e.get("step")) and isinstance(layers, list):
            m = mean(stat(LayerStats.from_dict(l)) for l in layers if isinstance(l, dict))
            if is_number(m):
                by_step[float(e["step"])] = m
    return Curve.from_map(by_step)


def over_seeds(curves: Iterable[Curve]) -> Band:
    """Mean, min and max over seeds on the steps every seed logged; the longest curve alone when
    the seeds share no step."""
    maps = [dict(zip(c.steps, c.values)) for c in curves if c]
    if not maps:
        return EMPTY_BAND
    common = sorted(set.intersection(*(set(m) for m in maps)))
    if not common:
        maps = [max(maps, key=len)]
        common = sorted(maps[0])
    means, los, his = [], [], []
    for step in common:
        values = [m[step] for m in maps]
        means.append(mean(values))
        lo, hi = minmax(values)
        los.append(lo)
        his.append(hi)
    return Band(tuple(common), tuple(means), tuple(los), tuple(his))


def paired_difference(a: Mapping[int, Curve], b: Mapping[int, Curve]) -> Band:
    """a − b per seed both have (same seed: same data order and initialization draw), on the
    steps both logged; then aggregated over those seeds."""
    diffs = []
    for seed in sorted(set(a) & set(b)):
        vb = dict(zip(b[seed].steps, b[seed].values))
        by_step = {s: v - vb[s] for s, v in zip(a[seed].steps, a[seed].values) if s in vb}
        diffs.append(Curve.from_map(by_step))
    return over_seeds(diffs)


def smoothing_beta(n_points: int) -> float:
    """EMA weight for the training-loss plot, lighter when few points were logged."""
    if n_points >= 200:
        return 0.95
    if n_points >= 50:
        return 0.9
    if n_points >= 15:
        return 0.8
    return 0.5
