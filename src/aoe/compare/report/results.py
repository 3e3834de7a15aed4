"""What OUT/results.json holds, as typed records read tolerantly from the stored dict.

``Results.from_dict`` never raises on odd input: a missing number is NaN, a missing string None,
entries that are not objects are dropped. Schema (keys marked "new" may be absent in files written
before they existed; ``from_dict`` then derives them as stated)::

    {"command": str, "created": str (ISO 8601),
     "machine": {"platform", "python", "torch", "device", "threads"},
     "config": {"model": {...}, "data": {...}, "train": {...}},          # the resolved base config
     "corpus": {"source", "train_tokens", "val_tokens", "vocab_size",
                "unigram_entropy", "unigram_cross_entropy", "bytes_per_token"},
     "variants": [{"name", "label", "description", "overrides": [str, ...],
                   "kind": "dense" | "moe" | "aoe",                        # new; else model.ffn= override,
                                                                            #   else the base model.ffn
                   "baseline": str | null,                                 # new; see derive_baseline
                   "lr": float | null}, ...],                              # new: lr chosen by the sweep
     "seeds": [int, ...],
     "runs": [{"variant", "seed", "status" ("done" or anything else = incomplete), "error" (optional),
               "run_dir" (relative to OUT), "lr" (new; else the base train.lr),
               "val_loss", "perplexity", "bits_per_byte", "params_total", "params_active",
               "flops_per_token", "tokens_per_s", "peak_memory_bytes", "train_time_s", "steps", "tokens",
               "layers": [{"layer", "kind", "ent_load", "ent_conf", "imbalance", "tokens_per_expert",
                           "gate_weight_mean": [float] * k, "dead_experts": int | null,
                           # new, for a layer whose selection is not top-k (aoe.train.metrics):
                           "selection", "experts_per_token", "experts_per_token_hist": [int, ...],
                           "unchosen_tokens": int, "causal": bool}, ...],
               "downstream": {task: accuracy in [0, 1]}}, ...],                # new, optional (--mc, --tasks)
     "sweep": {"lrs": [float, ...], "steps": int, "seed": int,              # new, optional
               "runs": [{"variant", "lr", "status", "val_loss", "run_dir"}, ...],
               "chosen": {variant: lr}},
     "suite": {"name": str, "numbers": {variant: int}},                     # new, optional (--suite)
     "definitions": {"peak_memory": str, "flops_per_token": str}           # optional wording overrides
    }

A variant that appears only in ``runs`` gets a record of its own (kind from the base config).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Mapping

from aoe.compare.report.stats import NAN, is_number
from aoe.compare.variants import Variant

KINDS = ("dense", "moe", "aoe")


def number(d: Any, key: str) -> float:
    """``d[key]`` as a float, NaN when absent or not a finite number."""
    v = d.get(key) if isinstance(d, Mapping) else None
    return float(v) if is_number(v) else NAN


def integer(d: Any, key: str) -> int | None:
    """``d[key]`` as an int when it is a whole finite number, else None."""
    v = number(d, key)
    return int(v) if is_number(v) and float(v).is_integer() else None


def text(d: Any, key: str) -> str | None:
    v = d.get(key) if isinstance(d, Mapping) else None
    return None if v is None else str(v)


def section(d: Any, key: str) -> dict:
    v = d.get(key) if isinstance(d, Mapping) else None
    return dict(v) if isinstance(v, Mapping) else {}


def objects(d: Any, key: str) -> list[dict]:
    v = d.get(key) if isinstance(d, Mapping) else None
    return [x for x in v if isinstance(x, Mapping)] if isinstance(v, list) else []


def numbers(values: Any) -> tuple[float, ...]:
    """A list of numbers with NaN for the entries that are not; () for anything but a list."""
    return tuple(float(v) if is_number(v) else NAN for v in values) if isinstance(values, list) else ()


def override(overrides: tuple[str, ...], key: str) -> str | None:
    """The value a ``key=value`` override sets (the last one wins), or None."""
    found = None
    for o in overrides:
        k, sep, v = o.partition("=")
        if sep and k.strip() == key:
            found = v.strip()
    return found


@dataclass(frozen=True)
class LayerStats:
    """Routing statistics of one sparse layer (validation batches at the end of training, or a
    logged training window)."""

    layer: int | None
    kind: str | None
    ent_load: float
    ent_conf: float
    imbalance: float
    tokens_per_expert: tuple[float, ...]
    gate_weight_mean: tuple[float, ...]  # () when not recorded
    dead_experts: int | None  # None when not recorded
    # the selection rule's statistics (absent for top-k and in older files: None / NaN / ())
    selection: str | None = None
    experts_per_token: float = NAN
    experts_per_token_hist: tuple[float, ...] = ()
    unchosen_tokens: int | None = None
    causal: bool | None = None

    @classmethod
    def from_dict(cls, d: Mapping) -> LayerStats:
        causal = d.get("causal") if isinstance(d, Mapping) else None
        return cls(integer(d, "layer"), text(d, "kind"), number(d, "ent_load"), number(d, "ent_conf"),
                   number(d, "imbalance"), numbers(d.get("tokens_per_expert")),
                   numbers(d.get("gate_weight_mean")), integer(d, "dead_experts"), text(d, "selection"),
                   number(d, "experts_per_token"), numbers(d.get("experts_per_token_hist")),
                   integer(d, "unchosen_tokens"), causal if isinstance(causal, bool) else None)

    @property
    def unchosen_share(self) -> float:
        """The share of tokens no expert took (NaN when not recorded)."""
        total = sum(h for h in self.experts_per_token_hist if is_number(h))
        return self.unchosen_tokens / total if self.unchosen_tokens is not None and total > 0 else NAN

    def gate_weight(self, rank: int) -> float:
        """Mean gate weight of the ``rank``-th largest chosen expert (0 = top-1); NaN when absent."""
        return self.gate_weight_mean[rank] if rank < len(self.gate_weight_mean) else NAN

    @property
    def dead(self) -> float:
        return float(self.dead_experts) if self.dead_experts is not None else NAN


@dataclass(frozen=True)
class Run:
    """One trained variant x seed. ``index``: its position in results.json's runs (a unique key)."""

    index: int
    variant: str
    seed: int | None
    status: str
    error: str | None
    run_dir: str | None
    lr: float
    val_loss: float
    perplexity: float
    bits_per_byte: float
    params_total: float
    params_active: float
    flops_per_token: float
    tokens_per_s: float
    peak_memory_bytes: float
    train_time_s: float
    steps: int | None
    tokens: float
    layers: tuple[LayerStats, ...]
    downstream: dict[str, float] = field(default_factory=dict)  # task -> accuracy in [0, 1]

    @classmethod
    def from_dict(cls, index: int, d: Mapping, base_lr: float) -> Run:
        lr = number(d, "lr")
        return cls(
            index=index, variant=str(d.get("variant", "?")), seed=integer(d, "seed"),
            status=str(d.get("status", "unknown")), error=text(d, "error"), run_dir=text(d, "run_dir") or None,
            lr=lr if is_number(lr) else base_lr, val_loss=number(d, "val_loss"),
            perplexity=number(d, "perplexity"), bits_per_byte=number(d, "bits_per_byte"),
            params_total=number(d, "params_total"), params_active=number(d, "params_active"),
            flops_per_token=number(d, "flops_per_token"), tokens_per_s=number(d, "tokens_per_s"),
            peak_memory_bytes=number(d, "peak_memory_bytes"), train_time_s=number(d, "train_time_s"),
            steps=integer(d, "steps"), tokens=number(d, "tokens"),
            layers=tuple(LayerStats.from_dict(l) for l in objects(d, "layers")),
            downstream={str(k): float(v) for k, v in section(d, "downstream").items() if is_number(v)},
        )

    @property
    def done(self) -> bool:
        return self.status == "done"


def derive_kind(overrides: tuple[str, ...], base_ffn: str | None) -> str:
    """The FFN kind a variant trains: its ``model.ffn=`` override, else the base config's model.ffn."""
    kind = override(overrides, "model.ffn") or base_ffn
    return kind if kind in KINDS else "unknown"


def derive_baseline(name: str, kind: str, names: list[str]) -> str | None:
    """For results.json files without "baseline": a sparse variant is compared against "moe" when
    the study has it; dense variants and "moe" itself have no baseline."""
    if kind in ("moe", "aoe") and name != "moe" and "moe" in names:
        return "moe"
    return None


def _variant(d: Mapping, names: list[str], base_ffn: str | None) -> Variant:
    name = str(d["name"])
    overrides = tuple(str(o) for o in d.get("overrides") or [] if o is not None)
    kind = text(d, "kind")
    if kind not in KINDS:
        kind = derive_kind(overrides, base_ffn)
    baseline = text(d, "baseline") if "baseline" in d else derive_baseline(name, kind, names)
    lr = number(d, "lr")
    return Variant(name, str(d.get("label") or name), str(d.get("description") or ""), overrides, kind,
                   baseline if baseline != name else None, lr if is_number(lr) else None)


@dataclass(frozen=True)
class SweepRun:
    variant: str
    lr: float
    status: str
    val_loss: float
    run_dir: str | None

    @property
    def done(self) -> bool:
        return self.status == "done"


@dataclass(frozen=True)
class Sweep:
    """The short learning-rate sweep run before the main runs."""

    lrs: tuple[float, ...]
    steps: int | None
    seed: int | None
    runs: tuple[SweepRun, ...]
    chosen: dict[str, float]

    @classmethod
    def from_dict(cls, d: Mapping) -> Sweep:
        runs = tuple(SweepRun(str(r.get("variant", "?")), number(r, "lr"), str(r.get("status", "unknown")),
                              number(r, "val_loss"), text(r, "run_dir")) for r in objects(d, "runs"))
        lrs = [x for x in numbers(d.get("lrs")) if is_number(x)]
        for r in runs:  # an lr that only the runs mention still gets a column
            if is_number(r.lr) and r.lr not in lrs:
                lrs.append(r.lr)
        chosen = {str(k): float(v) for k, v in section(d, "chosen").items() if is_number(v)}
        return cls(tuple(sorted(lrs)), integer(d, "steps"), integer(d, "seed"), runs, chosen)

    def run(self, variant: str, lr: float) -> SweepRun | None:
        """The sweep run of ``variant`` at ``lr`` (the last one recorded), or None."""
        found = None
        for r in self.runs:
            if r.variant == variant and is_number(r.lr) and math.isclose(r.lr, lr, rel_tol=1e-9):
                found = r
        return found

    def chosen_lr(self, variant: str) -> float | None:
        """The lr the sweep chose for ``variant`` ("chosen"), else its lowest-loss lr, else None."""
        return self.chosen.get(variant, self.lowest(variant))

    def lowest(self, variant: str) -> float | None:
        """The lr with the lowest completed sweep validation loss of ``variant`` (ties: the smaller
        lr), or None."""
        done = [r for r in self.runs if r.variant == variant and r.done and is_number(r.val_loss)]
        return min(done, key=lambda r: (r.val_loss, r.lr)).lr if done else None


@dataclass(frozen=True)
class Results:
    """A comparison's results.json, typed. ``raw`` keeps the dict as stored (for the verbatim config)."""

    raw: dict
    command: str | None
    created: str | None
    machine: dict
    config: dict
    corpus: dict
    variants: tuple[Variant, ...]
    seeds: tuple[int, ...]
    runs: tuple[Run, ...]
    sweep: Sweep | None
    definitions: dict

    @classmethod
    def from_dict(cls, d: Any) -> Results:
        if isinstance(d, Results):
            return d
        d = dict(d) if isinstance(d, Mapping) else {}
        config = section(d, "config")
        model, train = section(config, "model"), section(config, "train")
        base_ffn = text(model, "ffn")
        runs = tuple(Run.from_dict(i, r, number(train, "lr")) for i, r in enumerate(objects(d, "runs")))
        declared = [v for v in objects(d, "variants") if v.get("name")]
        names = list(dict.fromkeys([str(v["name"]) for v in declared] + [r.variant for r in runs]))
        entries = {str(v["name"]): v for v in reversed(declared)}  # the first declaration wins
        variants = tuple(_variant(entries.get(n, {"name": n}), names, base_ffn) for n in names)
        sweep = Sweep.from_dict(d["sweep"]) if isinstance(d.get("sweep"), Mapping) else None
        seeds = tuple(int(s) for s in d.get("seeds") or [] if is_number(s) and float(s).is_integer())
        return cls(d, text(d, "command"), text(d, "created"), section(d, "machine"), config,
                   section(d, "corpus"), variants, seeds, runs, sweep, section(d, "definitions"))

    @property
    def base_lr(self) -> float:
        return number(section(self.config, "train"), "lr")

    def variant(self, name: str | None) -> Variant | None:
        return next((v for v in self.variants if v.name == name), None)

    def runs_of(self, name: str) -> list[Run]:
        """The runs of variant ``name``, by seed (runs without a seed last)."""
        return sorted((r for r in self.runs if r.variant == name),
                      key=lambda r: (r.seed is None, r.seed if r.seed is not None else 0, r.index))
