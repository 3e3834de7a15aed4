"""The aux-loss-free balancing under torch.distributed (gloo, 2 real processes): each expert's load
is summed over the ranks before the bias step, so that every rank keeps the same biases, whether
the step is taken by the trainer's parallel plan or by the public ``update_selection_biases``
given ``torch.distributed.all_reduce`` (without it, refused)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from helpers.processes import join_gloo, spawn


RATE = 0.5


def _layers():
    from aoe.nn.aoe import AoE
    from aoe.nn.moe import MoE

    torch.manual_seed(0)
    model = torch.nn.ModuleList([MoE(8, d_ffn=8, n_experts=4, top_k=2, bias_update_rate=RATE),
                                 AoE(8, d_low=4, n_experts=3, top_k=1, d_wide=8, bias_update_rate=RATE),
                                 MoE(8, d_ffn=8, n_experts=4, top_k=2)])  # rate 0: its load is left alone
    return model


def _worker(rank: int, world: int, port: int, out: str) -> None:
    import torch.distributed as dist

    from aoe.nn import update_selection_biases
    from aoe.train.distributed import DistInfo
    from aoe.train.plans.base import ParallelPlan

    join_gloo(rank, world, port)
    try:
        result = {}
        for how in ("plan", "public"):
            model = _layers()
            for i, m in enumerate(model):  # rank 0 saw only expert 0, rank 1 every other expert
                load = torch.zeros(m.n_experts)
                load[0 if rank == 0 else slice(1, None)] = 10.0 + i
                m.load_since_update.copy_(load)
            if how == "plan":
                ParallelPlan(model, DistInfo(rank=rank, world_size=world)).update_selection_biases()
            else:
                try:  # several processes: refused without a sum over the ranks
                    update_selection_biases(model)
                    raise AssertionError("not refused")
                except ValueError as e:
                    assert "pass sum_over_ranks=torch.distributed.all_reduce" in str(e)
                update_selection_biases(model, sum_over_ranks=dist.all_reduce)
            result[how] = [m.selection_bias.tolist() for m in model] + [model[2].load_since_update.tolist()]
        Path(out, f"rank{rank}.json").write_text(json.dumps(result))
    finally:
        dist.destroy_process_group()


def test_the_loads_are_summed_over_the_ranks_before_the_bias_step(tmp_path):
    spawn(_worker, 2, str(tmp_path))
    got = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    # summed: every expert has the same load, 10 + i, so no bias moves; alone, each rank would
    # have moved its own experts down and the others up, differently on each rank
    unmoved = [[0.0] * 4, [0.0] * 3, [0.0] * 4]
    own_load = [[12.0, 0.0, 0.0, 0.0], [0.0, 12.0, 12.0, 12.0]]  # the layer without balancing: not reduced
    for r in range(2):
        assert got[r] == {"plan": unmoved + [own_load[r]], "public": unmoved + [own_load[r]]}, f"rank {r}"
