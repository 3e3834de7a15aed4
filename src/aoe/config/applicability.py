"""Options that do nothing in the config they are in, refused by one rule everywhere.

An option set away from its "off" value where nothing reads it (``model.top_p`` with
``selection=top_k``, ``train.fsdp_shard_size`` without ``train.fsdp``...) is refused with a
``ConfigError`` that names it and the value that turns it off, as ``model.d_shared`` without
shared experts is. A run config saved before a rule existed is read with such options at their
"off" value (``settle_saved``): they did nothing in that run either.

Each rule: (key, off value, whether the option is idle given the other values, why).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping

Rule = tuple[str, Any, bool, str]


def _model_rules(v: Mapping[str, Any]) -> list[Rule]:
    selection, ffn = v.get("selection", "top_k"), v.get("ffn")
    not_top_p, not_ec = selection != "top_p", selection != "expert_choice"
    return [
        ("selection", "top_k", ffn == "dense", 'applies to sparse FFNs (ffn="moe" or "aoe") only'),
        ("top_p", None, not_top_p, "applies with model.selection=top_p only"),
        ("min_k", 1, not_top_p, "applies with model.selection=top_p only"),
        ("max_k", None, not_top_p, "applies with model.selection=top_p only"),
        ("capacity_factor", 1.0, not_ec, "applies with model.selection=expert_choice only"),
        ("ec_inference", "top_k", not_ec, "applies with model.selection=expert_choice only"),
    ]


def _train_rules(v: Mapping[str, Any]) -> list[Rule]:
    return [("fsdp_shard_size", None, not v.get("fsdp"), "applies with train.fsdp=true only"),
            ("async_checkpoint", False, v.get("checkpoint_every") == 0,
             "applies with train.checkpoint_every > 0 only (the final save is waited for)")]


RULES: dict[str, Callable[[Mapping[str, Any]], list[Rule]]] = {"model": _model_rules, "train": _train_rules}


def idle_options(section: str, values: Mapping[str, Any]) -> list[tuple[str, Any, str]]:
    """(key, off value, why) of every option of ``section`` set where it does nothing."""
    rules = RULES.get(section)
    if rules is None:
        return []
    return [(key, off, why) for key, off, idle, why in rules(values) if idle and values.get(key, off) != off]


def _as_yaml(value: Any) -> str:
    return "null" if value is None else str(value)


def refuse_idle_options(section) -> None:
    """Refuse (``section._fail``) the first option of a config section that does nothing there."""
    for key, off, why in idle_options(section.SECTION, dataclasses.asdict(section)):
        section._fail(key, f"{why}; set it to {_as_yaml(off)} or leave it out")


def settle_saved(d: dict[str, Any]) -> dict[str, Any]:
    """A saved config dict with its idle options at their off values (in place; returned)."""
    for section in RULES:
        values = d.get(section)
        if not isinstance(values, dict):
            continue
        for _ in range(len(values) + 1):  # one option's reset can make another idle (selection, then its knobs)
            idle = idle_options(section, values)
            if not idle:
                break
            for key, off, _why in idle:
                values[key] = off
    return d
