"""Named suites of variants that reproduce one of the paper's tables: ``aoe compare --suite NAME``.

``paper-table2``: the 12 numbered configurations of the paper's Table 2 (732M models, 100B tokens),
scaled to the base recipe. AoE's d_low keeps the paper's ratios to d_model (64, 128, 256 and 512 of
768: 1/12, 1/6, 1/3 and 2/3), rounded to a multiple of 8 (bf16 rows 16-byte aligned) unless that
would make two ranks equal (then to the nearest integer); every d_wide is parameter-matched
(``aoe.nn.match_d_wide``). The two MoE ablations (3: factorized W_g, 4: large router) use the rank
of the 1/3 configuration, the paper's main AoE (d_low 256 at d_model 768). Every MoE and AoE
renormalizes its chosen gate weights (Algorithms 1 and 2) unless the base config says otherwise.

The paper's scores are kept here (``TABLE2``) so that the report can set its own numbers beside them.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from fractions import Fraction

from aoe.config import ConfigError, ModelConfig
from aoe.compare.variants import Variant, large_router_shape, moe_factorized_overrides

#: Table 2's columns: (the paper's header, the lm-eval task that has the data).
TABLE2_TASKS = (("ARC-E", "arc_easy"), ("PIQA", "piqa"), ("SIQA", "social_iqa"), ("WINO", "winogrande"),
                ("HELLA", "hellaswag"), ("MNLI", "mnli"), ("QNLI", "qnli"), ("SST2", "sst2"))

#: The paper's Table 2 (accuracy %): configuration number -> (its label, the 8 scores, the average).
TABLE2 = {
    1: ("MoE", (39.90, 58.43, 35.67, 52.09, 27.98, 33.09, 49.28, 49.66), 43.28),
    2: ("MoE + L_aux", (40.74, 58.49, 36.13, 51.30, 28.11, 32.67, 50.23, 51.83), 43.68),
    3: ("MoE + L_aux + factorized W_g", (40.45, 58.65, 36.75, 52.09, 28.03, 32.55, 50.08, 51.03), 43.70),
    4: ("MoE + L_aux + large router", (41.41, 57.62, 36.64, 52.33, 28.34, 33.18, 49.53, 50.69), 43.71),
    5: ("AoE d_low 64", (39.77, 58.71, 35.31, 52.33, 28.29, 32.78, 50.27, 52.98), 43.81),
    6: ("AoE d_low 64 + L_aux", (42.17, 57.67, 36.75, 50.75, 28.15, 34.06, 50.49, 53.10), 44.12),
    7: ("AoE d_low 128", (40.70, 59.41, 36.64, 52.09, 28.06, 34.38, 50.69, 53.21), 44.39),
    8: ("AoE d_low 128 + L_aux", (41.33, 58.65, 36.80, 50.75, 28.40, 33.71, 49.55, 53.10), 44.04),
    9: ("AoE d_low 256", (41.08, 58.81, 36.44, 51.70, 28.23, 32.24, 50.54, 53.90), 44.12),
    10: ("AoE d_low 256 + L_aux", (41.16, 58.32, 36.80, 53.04, 28.37, 32.78, 50.61, 54.59), 44.46),
    11: ("AoE d_low 512", (40.57, 57.89, 36.75, 50.59, 28.38, 32.71, 49.72, 53.56), 43.77),
    12: ("AoE d_low 512 + L_aux", (41.16, 57.83, 36.75, 52.09, 28.30, 34.92, 50.67, 50.92), 44.08),
}

#: The paper's d_low of configurations 5-12 as fractions of its d_model 768.
TABLE2_DLOW_RATIOS = (Fraction(1, 12), Fraction(1, 6), Fraction(1, 3), Fraction(2, 3))
PAPER_AUX = "model.aux_loss_coef=0.01"
NO_AUX = "model.aux_loss_coef=0.0"


@dataclass(frozen=True)
class Suite:
    """A named list of variants; ``numbers`` maps a variant name to its row of the paper's table."""

    name: str
    description: str
    variants: tuple[Variant, ...]
    numbers: dict[str, int]

    def as_dict(self) -> dict:
        return {"name": self.name, "numbers": dict(self.numbers)}


def table2_ranks(d_model: int) -> tuple[int, ...]:
    """AoE's d_low for configurations 5/6, 7/8, 9/10, 11/12 at ``d_model``: the paper's ratios,
    rounded to a multiple of 8 when that keeps the four distinct, else to the nearest integer >= 1."""
    exact = [r * d_model for r in TABLE2_DLOW_RATIOS]
    by_8 = tuple(max(8, 8 * round(x / 8)) for x in exact)
    if len(set(by_8)) == len(by_8):
        return by_8
    nearest = tuple(max(1, round(x)) for x in exact)
    if len(set(nearest)) != len(nearest):
        raise ConfigError(f"model.d_model={d_model} is too small for Table 2's four d_low (d_model/12 .. 2 d_model/3 "
                          "must be distinct integers); use a base recipe with d_model >= 12")
    return nearest


def _moe_rows(m: ModelConfig, rank: int) -> list[Variant]:
    """Configurations 1-4: MoE, + L_aux, + L_aux + factorized W_g, + L_aux + large router (rank ``rank``)."""
    at_rank = replace(m, d_low=rank)
    hidden, router_ffn = large_router_shape(at_rank)
    return [
        Variant("moe", "MoE", "router MoE, no balancing loss", ("model.ffn=moe", NO_AUX), "moe"),
        Variant("moe_aux", "MoE + L_aux", "router MoE, load-balancing loss 0.01", ("model.ffn=moe", PAPER_AUX),
                "moe", "moe"),
        Variant("moe_aux_factorized", "MoE + L_aux + factorized W_g",
                f"router MoE + L_aux with AoE's factorized gate at rank {rank} (width matched)",
                (*moe_factorized_overrides(at_rank), PAPER_AUX), "moe", "moe_aux"),
        Variant("moe_aux_large_router", "MoE + L_aux + large router",
                f"router MoE + L_aux with a two-layer router {m.d_model}->{hidden}->{m.n_experts} (about AoE's "
                f"w_down at rank {rank}), experts of width {router_ffn}",
                ("model.ffn=moe", f"model.moe_router_hidden={hidden}", f"model.d_ffn={router_ffn}", PAPER_AUX),
                "moe", "moe_aux"),
    ]


def _aoe_rows(ranks: tuple[int, ...]) -> list[Variant]:
    """Configurations 5-12: AoE at each rank, without and with L_aux (against MoE and MoE + L_aux)."""
    rows = []
    for r in ranks:
        base = ("model.ffn=aoe", f"model.d_low={r}", "model.d_wide=null")
        rows.append(Variant(f"aoe_dlow{r}", f"AoE d_low {r}", f"AoE at rank {r}, no balancing loss",
                            (*base, NO_AUX), "aoe", "moe"))
        rows.append(Variant(f"aoe_dlow{r}_aux", f"AoE d_low {r} + L_aux", f"AoE at rank {r}, load-balancing loss 0.01",
                            (*base, PAPER_AUX), "aoe", "moe_aux"))
    return rows


def paper_table2(m: ModelConfig) -> Suite:
    ranks = table2_ranks(m.d_model)
    variants = (*_moe_rows(m, ranks[2]), *_aoe_rows(ranks))
    numbers = {v.name: i for i, v in enumerate(variants, 1)}
    return Suite("paper-table2", "the 12 configurations of the paper's Table 2", variants, numbers)


SUITES = {"paper-table2": paper_table2}


def resolve_suite(name: str, model: ModelConfig) -> Suite:
    if name not in SUITES:
        raise ConfigError(f"--suite {name!r} is not a suite; known: {', '.join(SUITES)}")
    return SUITES[name](model)


def describe_suite(name: str, model: ModelConfig) -> str:
    """``aoe compare --suite NAME --list-variants``: the suite's variants, numbered, with overrides."""
    suite = resolve_suite(name, model)
    lines = [f"{suite.name}: {suite.description}"]
    for v in suite.variants:
        lines.append(f"{suite.numbers[v.name]:>3} {v.name:<24} {v.description}   [{' '.join(v.overrides)}]")
    return "\n".join(lines)
