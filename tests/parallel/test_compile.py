"""``train.compile=true`` under FSDP and under expert parallelism with FSDP (real processes, gloo):
each block compiles with no graph break but the expert dispatcher's exchange (eager on purpose:
its sizes are data), and the losses and gradient norms equal the eager one-process run's."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from helpers.processes import spawn, torchrun_env

from .runs import losses, same_losses

MODES = {"fsdp": ["train.fsdp=true"], "ep_fsdp": ["train.expert_parallel=2", "train.fsdp=true"]}


def _compiled_worker(rank: int, world: int, port: int, overrides: list[str], out: str) -> None:
    os.environ.update(torchrun_env(rank, world, port))
    torch.set_num_threads(1)
    from torch._dynamo.utils import counters

    from aoe.config import load_config
    from aoe.train.distributed import shutdown_distributed
    from aoe.train.trainer import Trainer

    try:
        Trainer(load_config("tiny", overrides), out, progress=False).fit()
        Path(out, f"dynamo-{rank}.json").write_text(json.dumps(
            {"breaks": list(counters["graph_break"]), "graphs": counters["stats"]["unique_graphs"]}))
    finally:
        shutdown_distributed()


@pytest.mark.slow
@pytest.mark.parametrize("mode", MODES)
def test_compiled_sharded_training_matches_one_eager_process(mode, single_run, tmp_path):
    overrides, single = single_run
    run = tmp_path / mode
    spawn(_compiled_worker, 2, [*overrides, *MODES[mode], "train.compile=true"], str(run))
    same_losses(losses(run), losses(single), f"compiled, {mode}, 2 ranks")
    for rank in (0, 1):
        dynamo = json.loads((run / f"dynamo-{rank}.json").read_text())
        assert dynamo["graphs"] >= 1, dynamo  # it did compile
        if mode == "fsdp":
            assert dynamo["breaks"] == [], dynamo["breaks"]
        else:  # the one deliberate break: the dispatcher's exchange between ranks
            assert dynamo["breaks"] and all("ExpertDispatcher.expert_outputs" in b for b in dynamo["breaks"]), \
                dynamo["breaks"]
