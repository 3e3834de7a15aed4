"""Why a dead expert stays dead: each expert's weight norms at init and at the end of a run.

For each run directory given (its newest checkpoint, trained from ``train.seed``), the model's
initial weights are rebuilt from the seed (the trainer seeds torch, then builds the model, so this
is exact) and, per layer and expert, the Frobenius norm of every expert matrix is printed at init
and at the end, beside the expert's share of the tokens at the last logged step (metrics.jsonl).

An expert that no token chooses gets no gradient through its output. What still moves it: AdamW's
decoupled weight decay, which multiplies it by ``1 - lr_t * weight_decay`` every step (the "decay
only" factor printed: that product over the whole run, what a matrix never chosen from step 0 would
keep of its init norm), and, for AoE, the pull below. A dead AoE expert whose ``w_down`` shrinks
scores lower still, so it is never chosen again: nothing in the loss brings it back without a
balancing term. (MoE's top-k weights, renormalized over the chosen experts, give an unchosen
expert's router column no gradient from that token.)

AoE's gate weights are a softmax over ALL experts' norms (not renormalized over the chosen ones, the
default), so an unchosen expert's norm still gets a gradient, through the softmax's denominator.
``--pull N`` measures it: the mean over N training batches of ``d loss / d log ||W_e||``
(``<grad, W>`` per expert) for every expert matrix of the scoring path (``w_down``, ``router``);
positive means a gradient step shrinks the expert's weights (the batches use a sampler seed no run
uses). For a dead expert it is the only gradient left, and it is tiny.

    python docs/results/analysis/expert_norms.py [--pull 8] RUN_DIR [RUN_DIR ...]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from aoe.data.loader import BatchSampler
from aoe.io.checkpoint import find_latest_checkpoint, load_model, load_run_config
from aoe.model import Transformer
from aoe.train.optim import lr_at
from aoe.train.trainer import prepare_data

EXPERT_MATRICES = ("w_down", "w_up", "w_in", "w_gate", "w_out", "router")


def decay_only(cfg, weight_decay: float) -> float:
    """The factor AdamW's decoupled weight decay alone leaves of a weight over the run's steps."""
    factor = 1.0
    for step in range(cfg.train.max_steps):
        factor *= 1.0 - lr_at(step, cfg.train) * weight_decay
    return factor


def token_shares(run_dir: Path) -> dict[int, list[float]]:
    """Per layer, each expert's share of the routed tokens at the last step metrics.jsonl logged them."""
    shares: dict[int, list[float]] = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        for layer in json.loads(line).get("layers") or []:
            counts = layer.get("tokens_per_expert")
            if counts:
                shares[layer["layer"]] = [c / max(sum(counts), 1) for c in counts]
    return shares


def expert_first(name: str, w: torch.Tensor) -> torch.Tensor:
    """The matrix with the expert dimension first: the router is [D, E] (input dimension first)."""
    return w.T if name.endswith("router") else w


def expert_norms(state: dict[str, torch.Tensor], layer: int) -> dict[str, torch.Tensor]:
    """Per expert matrix of the layer: each expert's norm."""
    norms = {}
    for name in EXPERT_MATRICES:
        w = state.get(f"layers.{layer}.ffn.{name}")
        if w is not None and w.dim() >= 2:
            norms[name] = expert_first(name, w).double().flatten(1).norm(dim=1)
    return norms


def norm_pull(run_dir: str, n_batches: int) -> dict[str, torch.Tensor]:
    """Per scoring matrix (w_down, router), each expert's mean ``<grad, W>`` over ``n_batches``
    training batches (a sampler seed no run uses) of the newest checkpoint, in train mode."""
    model, cfg, _ = load_model(run_dir)
    sampler = BatchSampler(prepare_data(cfg).train, cfg.train.batch_size, cfg.train.seq_len, seed=12345)
    model.train()
    pull: dict[str, torch.Tensor] = {}
    for step in range(n_batches):
        model.zero_grad()
        model(*sampler.batch(step)).loss.backward()
        for name, p in model.named_parameters():
            if name.endswith(("ffn.w_down", "ffn.router")):
                w, g = expert_first(name, p), expert_first(name, p.grad)
                pull[name] = pull.get(name, 0) + (g * w).detach().double().flatten(1).sum(1) / n_batches
    return pull


def analyse(run_dir: str, n_pull: int) -> None:
    run = Path(run_dir)
    ckpt = find_latest_checkpoint(run)
    cfg = load_run_config(ckpt)
    torch.manual_seed(cfg.train.seed)
    init = Transformer(cfg.model).state_dict()
    final = load_file(str(ckpt / "model.safetensors"))
    shares = token_shares(run)
    factor = decay_only(cfg, cfg.train.weight_decay)
    print(f"{run_dir} ({ckpt.name}, ffn={cfg.model.ffn}); decay only over the run: x{factor:.3f}")
    for layer in range(cfg.model.n_layers):
        start, end = expert_norms(init, layer), expert_norms(final, layer)
        if not end:
            continue
        share = shares.get(layer)
        if share is not None:
            print(f"  layer {layer} token share   " + " ".join(f"{s:6.3f}" for s in share))
        for name, norm in end.items():
            print(f"  layer {layer} {name:8s} init " + " ".join(f"{v:6.3f}" for v in start[name].tolist()))
            print(f"  layer {layer} {name:8s} end  " + " ".join(f"{v:6.3f}" for v in norm.tolist()))
    for name, value in (norm_pull(run_dir, n_pull) if n_pull else {}).items():
        print(f"  pull {name:22s} " + " ".join(f"{v:+.1e}" for v in value.tolist()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", help="run directories (each with checkpoints/ and metrics.jsonl)")
    parser.add_argument("--pull", type=int, default=0, metavar="N",
                        help="also measure the gradient's pull on each expert's scoring weights over N batches")
    args = parser.parse_args()
    for run_dir in args.runs:
        analyse(run_dir, args.pull)


if __name__ == "__main__":
    main()
