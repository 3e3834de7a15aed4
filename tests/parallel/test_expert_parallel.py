"""Expert parallelism with real processes (gloo on 127.0.0.1): the sharded layers and the trainer
against one process on the same tokens.

Layer level: the outputs, the input gradients and every parameter gradient of a layer whose
experts are sharded over 2 or 4 ranks equal those of the whole layer on all the tokens (fp32
rel 1e-6, fp64 rel 1e-12); an expert no token chose gets an exactly-zero gradient. Trainer level:
the per-step losses of EP=2 and EP=2 x DP=2 equal the single-process run at the same global batch
(rel 1e-5), and their checkpoints (single-process format) resume in one process and back.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.distributed as dist

from aoe.nn.aoe import AoE
from aoe.nn.moe import MoE

from helpers.processes import join_gloo, spawn
from .runs import close, copy_until, losses, same_losses, trainer_worker

D, T_PER_RANK = 8, 6
TOL = {torch.float32: 1e-6, torch.float64: 1e-12}


# -- layer level -------------------------------------------------------------------------------------
LAYERS = {
    "aoe": lambda: AoE(D, d_low=4, n_experts=8, top_k=2, d_wide=12, bias_update_rate=1e-3),
    "moe": lambda: MoE(D, d_ffn=12, n_experts=8, top_k=2, bias_update_rate=1e-3),
    "moe_factorized": lambda: MoE(D, d_ffn=12, n_experts=8, top_k=2, gate_rank=3, bias_update_rate=1e-3),
}
IDLE = 5  # the expert no token may choose (its selection bias is -inf-like)


def _check_layer(kind: str, dtype: torch.dtype, rank: int, world: int, groups) -> None:
    from aoe.parallel import shard_layer
    from aoe.parallel.expert import ExpertShard, sharded_names

    torch.manual_seed(0)
    whole = LAYERS[kind]().to(dtype)
    whole.selection_bias[IDLE] = -1e4  # selection only: the gate weights stay the softmax's
    part = copy.deepcopy(whole)
    shard_layer(part, ExpertShard(groups.ep_group, world, rank, whole.n_experts // world))
    x = torch.randn(world * T_PER_RANK, D, dtype=dtype, requires_grad=True)
    probe = torch.randn(world * T_PER_RANK, D, dtype=dtype)
    mine = slice(rank * T_PER_RANK, (rank + 1) * T_PER_RANK)
    x_mine = x.detach()[mine].clone().requires_grad_()

    (whole(x) * probe).sum().backward()
    y_mine = part(x_mine)
    (y_mine * probe[mine]).sum().backward()
    tol, name = TOL[dtype], f"{kind} {dtype} rank {rank}/{world}"
    close(y_mine, whole(x.detach())[mine], tol, f"{name} output")
    close(x_mine.grad, x.grad[mine], tol, f"{name} input grad")
    shard = part.expert_dispatcher.shard
    lo, hi = shard.first, shard.first + shard.n_local
    sharded = set(sharded_names(part))
    for pname, p in part.named_parameters():
        full_grad = dict(whole.named_parameters())[pname].grad
        if pname in sharded:  # this rank's experts: every rank's tokens already summed in
            close(p.grad, full_grad[lo:hi], tol, f"{name} {pname}.grad")
            if lo <= IDLE < hi:
                assert torch.equal(p.grad[IDLE - lo], torch.zeros_like(p.grad[IDLE - lo])), f"{name} idle {pname}"
        else:  # replicated (router, AoE's w_down): each rank's share, summed over ranks
            grad = p.grad.clone()
            dist.all_reduce(grad)
            close(grad, full_grad, tol, f"{name} {pname}.grad (summed)")
    assert int(part.last_routing.tokens_per_expert[IDLE]) == 0


def _check_model_gradients(kind: str, ep_size: int, rank: int, world: int) -> None:
    """A whole model, experts sharded over ``ep_size`` ranks x ``world / ep_size`` replicas, each
    rank its own sequences: after ``reduce_gradients`` every gradient is the one-process gradient
    of the mean loss over all sequences, and the clipped global norm is the one-process norm."""
    from aoe.config import ModelConfig
    from aoe.model import Transformer
    from aoe.parallel import ExpertParallel

    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=32, d_model=16, n_layers=2, n_heads=2, max_seq_len=8, ffn=kind, d_ffn=16,
                      n_experts=4, top_k=2, d_low=4, aux_loss_coef=0.0)
    whole = Transformer(cfg).double()
    part = copy.deepcopy(whole)
    ep = ExpertParallel(part, ep_size)
    idx = torch.randint(0, 32, (world, 2, 8))
    whole(idx.view(-1, 8), idx.view(-1, 8).roll(1, 1)).loss.backward()
    part(idx[rank], idx[rank].roll(1, 1)).loss.backward()
    ep.reduce_gradients(part)
    sharded = {id(p) for _, _, p in ep.sharded()}
    name = f"{kind} EP={ep_size} of {world} rank {rank}"
    for (pname, p), w in zip(part.named_parameters(), whole.parameters()):
        want = w.grad
        if id(p) in sharded:
            first = ep.layers[0].expert_dispatcher.shard.first
            want = want[first:first + p.shape[0]]
        close(p.grad, want, 1e-12, f"{name} {pname}.grad")
    norm = ep.clip_grad_norm_(list(part.parameters()), 1e-3)
    want_norm = float(torch.nn.utils.clip_grad_norm_(list(whole.parameters()), 1e-3))
    assert abs(norm - want_norm) <= 1e-6 * want_norm, f"{name}: grad norm {norm} != {want_norm}"


def _layer_worker(rank: int, world: int, port: int, cases: list[tuple[str, torch.dtype]]) -> None:
    from aoe.parallel import expert_groups

    join_gloo(rank, world, port)
    groups = expert_groups(world)
    for kind, dtype in cases:
        _check_layer(kind, dtype, rank, world, groups)
    if world == 2:
        _check_empty_rank(rank, world, groups)
        _check_model_gradients("aoe", 2, rank, world)
    else:
        _check_model_gradients("moe", 2, rank, world)  # expert parallel x data parallel
    dist.barrier()  # no rank tears its connections down while a peer still uses them (gloo aborts then)
    dist.destroy_process_group()


def test_sharded_layers_match_the_whole_layer_on_two_ranks():
    """... and a rank without tokens still serves its experts."""
    cases = [(k, dt) for k in ("aoe", "moe") for dt in (torch.float32, torch.float64)]
    spawn(_layer_worker, 2, cases + [("moe_factorized", torch.float64)])


@pytest.mark.slow  # four processes on the machine's two cores
def test_sharded_layers_match_the_whole_layer_on_four_ranks():
    spawn(_layer_worker, 4, [("aoe", torch.float64), ("moe", torch.float32)])


def _check_empty_rank(rank: int, world: int, groups) -> None:
    """Rank 1 has no tokens at all: it still serves its experts, and rank 0's result is exact."""
    from aoe.parallel import shard_layer
    from aoe.parallel.expert import ExpertShard

    torch.manual_seed(0)
    whole = LAYERS["aoe"]().double()
    part = copy.deepcopy(whole)
    shard_layer(part, ExpertShard(groups.ep_group, world, rank, whole.n_experts // world))
    x = torch.randn(5, D, dtype=torch.float64)
    y = part(x if rank == 0 else x[:0])
    y.sum().backward()
    if rank == 0:
        close(y, whole(x), 1e-12, "output")
    else:
        assert y.shape == (0, D)


def test_bad_expert_parallel_sizes_are_config_errors():
    from aoe.config import ConfigError
    from aoe.parallel import check_expert_parallel

    with pytest.raises(ConfigError, match=r"train.expert_parallel=3 does not divide the world size 4"):
        check_expert_parallel(3, 4, 8)
    with pytest.raises(ConfigError, match=r"train.expert_parallel=4 does not divide model.n_experts=6"):
        check_expert_parallel(4, 4, 6)
    with pytest.raises(ConfigError, match=r"train.expert_parallel=0"):
        check_expert_parallel(0, 4, 8)


def test_expert_parallel_needs_torchrun_and_is_validated(make_cfg, tmp_path):
    from aoe.config import ConfigError
    from aoe.train.trainer import Trainer

    with pytest.raises(ConfigError, match=r"train.expert_parallel=2 does not divide the world size 1"):
        Trainer(make_cfg(**{"train.expert_parallel": 2}), tmp_path / "run", progress=False)
    assert make_cfg(**{"train.expert_parallel": 2, "train.compile": True}).train.compile  # test_compile.py


# -- trainer level ---------------------------------------------------------------------------------


@pytest.mark.slow
def test_expert_parallel_training_matches_one_process_and_resumes_there(single_run, tmp_path):
    from aoe.config import load_config
    from safetensors.torch import load_file

    from aoe.train.trainer import Trainer

    overrides, single = single_run
    ep = tmp_path / "ep2"
    full = [*overrides, "train.expert_parallel=2", "train.checkpoint_format=full"]  # sharded: test_sharded_checkpoint
    spawn(trainer_worker, 2, full, str(ep), None)
    want = losses(single)
    same_losses(losses(ep), want, "EP=2")
    final = "checkpoints/step_00000004/model.safetensors"  # the single-process format, full experts
    got, expected = load_file(ep / final), load_file(single / final)
    assert got.keys() == expected.keys()
    for name, b in expected.items():
        assert got[name].shape == b.shape, name
        # 1e-4, not 1e-5: fp32 gradients summed in another order differ by rounding, and AdamW
        # divides each gradient by its own running RMS, so a small gradient's relative rounding
        # error becomes the same relative error of an lr-sized step (measured: 1.6e-5 of the
        # largest weight after 4 steps; the losses above still agree to 1e-5)
        close(got[name], b, 1e-4, f"EP=2 checkpoint {name}")
    resumed = copy_until(ep, tmp_path / "resumed", 2)  # full experts and AdamW moments, gathered
    torch.set_num_threads(1)
    Trainer(load_config("tiny", overrides), resumed, resume=True, progress=False).fit()
    same_losses(losses(resumed), want, "EP=2 checkpoint resumed in one process")


@pytest.mark.slow
def test_expert_and_data_parallel_training_matches_one_process(single_run, tmp_path):
    overrides, single = single_run
    run, resumed = tmp_path / "ep2dp2", copy_until(single, tmp_path / "resumed", 2)
    spawn(trainer_worker, 4, [*overrides, "train.expert_parallel=2"], str(run), str(resumed))
    want = losses(single)
    same_losses(losses(run), want, "EP=2 x DP=2")
    same_losses(losses(resumed), want, "one-process checkpoint resumed by EP=2 x DP=2")
