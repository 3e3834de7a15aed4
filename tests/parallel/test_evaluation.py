"""Validation spread over the ranks with real processes (gloo on CPU), 2 ranks, 5 validation
batches (rank 0 runs three, rank 1 two and one uncounted padding forward): under FSDP, EP and
EP + FSDP, every rank returns the one-process result on the same weights (the token counts and
the tokens per expert exactly; the loss and the other statistics to fp64 rounding), and each rank
ran only its share of the batches.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
import torch

from helpers.processes import spawn, torchrun_env


EVAL_BATCHES, MICRO = 5, 2
MODES = {"fsdp": ["train.fsdp=true"], "ep": ["train.expert_parallel=2"],
         "ep_fsdp": ["train.expert_parallel=2", "train.fsdp=true"]}


def _overrides(cache_dir: Path) -> list[str]:
    from helpers.tiny_runs import tiny_overrides

    return tiny_overrides(cache_dir, **{"train.eval_batches": EVAL_BATCHES, "train.micro_batch_size": MICRO,
                                        "train.max_steps": 1})


def _validate(overrides: list[str], out: Path) -> tuple[dict, int]:
    """The trainer's validation of the freshly built model, and the rows its forwards saw here."""
    from aoe.config import load_config
    from aoe.train.trainer import Trainer

    trainer = Trainer(load_config("tiny", overrides), out, progress=False)
    rows = []
    trainer.model.register_forward_pre_hook(lambda module, args: rows.append(args[0].shape[0]))
    return trainer.validate(), sum(rows)


def _worker(rank: int, world: int, port: int, overrides: list[str], out: str) -> None:
    os.environ.update(torchrun_env(rank, world, port))
    torch.set_num_threads(1)
    from aoe.train.distributed import shutdown_distributed

    try:
        val, rows = _validate(overrides, Path(out) / "run")
        Path(out, f"rank{rank}.json").write_text(json.dumps({"val": val, "rows": rows}))
    finally:
        shutdown_distributed()


def _same_value(got, want, what: str, rel: float) -> None:
    """Equal, recursively; a float to ``rel`` of its size (exactly when an int)."""
    if isinstance(want, dict):
        assert got.keys() == want.keys(), what
        for key in want:
            _same_value(got[key], want[key], f"{what}.{key}", rel)
    elif isinstance(want, list):
        assert len(got) == len(want), what
        for i, (a, b) in enumerate(zip(got, want)):
            _same_value(a, b, f"{what}[{i}]", rel)
    elif isinstance(want, float) and not isinstance(got, bool):
        assert (math.isnan(got) and math.isnan(want)) or abs(got - want) <= rel * abs(want), f"{what}: {got} != {want}"
    else:
        assert got == want, f"{what}: {got!r} != {want!r}"


@pytest.fixture(scope="module")
def one_process(tmp_path_factory, cache_dir):
    torch.set_num_threads(1)
    overrides = _overrides(cache_dir)
    val, rows = _validate(overrides, tmp_path_factory.mktemp("eval") / "one")
    assert rows == EVAL_BATCHES * MICRO and val["val_tokens"] == rows * 32  # train.seq_len 32
    return overrides, val


@pytest.mark.slow
@pytest.mark.parametrize("mode", sorted(MODES))
def test_validation_is_spread_over_the_ranks_and_equals_one_process(one_process, mode, tmp_path):
    overrides, want = one_process
    spawn(_worker, 2, [*overrides, *MODES[mode]], str(tmp_path))
    got = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    # fp64 sums of the same fp32 per-batch losses in another order (rank by rank, then the
    # all-reduce): 1e-12 leaves three orders of magnitude above what that reordering can change
    for r, result in enumerate(got):
        _same_value(result["val"], want, f"{mode} rank {r}", rel=1e-12)
    assert got[0]["val"]["val_tokens"] == want["val_tokens"]  # the padding forward counted nowhere
    for layer, one in zip(got[0]["val"]["layers"], want["layers"]):
        assert layer["tokens_per_expert"] == one["tokens_per_expert"]
    # batches 0, 2, 4 on rank 0; 1, 3 and one padding window on rank 1: nobody ran all five
    assert [result["rows"] for result in got] == [3 * MICRO, 2 * MICRO + 1]
