"""How much of what an unfactorized gate learns a rank-r gate could hold.

For each run directory given (its newest checkpoint, trained from ``train.seed``), the model's
initial weights are rebuilt from the seed (the trainer seeds torch then builds the model, so this
is exact) and, per layer and expert, the learned change of the gate projection
``dW = W_gate(final) - W_gate(init)`` [d_model, d_ffn] is split by its singular values: the share
of ||dW||^2 in the top r directions is what a rank-r factorized gate (AoE's w_down @ w_up, r =
d_low) could represent of that change; the rest it cannot. A random Gaussian matrix of the same
shape is printed beside it for scale.

    python docs/results/analysis/gate_rank.py --rank 32 RUN_DIR [RUN_DIR ...]
"""

from __future__ import annotations

import argparse

import torch
from safetensors.torch import load_file

from aoe.model import Transformer
from aoe.io.checkpoint import find_latest_checkpoint, load_run_config


def top_share(w: torch.Tensor, rank: int) -> float:
    """Share of ||w||^2 in its top ``rank`` singular values (w: [m, n])."""
    s = torch.linalg.svdvals(w.double())
    return float((s[:rank] ** 2).sum() / (s**2).sum())


def gate_matrices(state: dict[str, torch.Tensor], layer: int) -> torch.Tensor | None:
    """The layer's gate projections [E, D, F] (MoE w_gate) or [1, D, F] (dense w_gate); None if factorized."""
    for key in (f"layers.{layer}.ffn.w_gate",):
        if key in state:
            w = state[key]
            return w if w.dim() == 3 else w[None]
    return None


def analyse(run_dir: str, rank: int) -> None:
    ckpt = find_latest_checkpoint(run_dir)
    cfg = load_run_config(ckpt)
    torch.manual_seed(cfg.train.seed)
    init = Transformer(cfg.model).state_dict()
    final = load_file(str(ckpt / "model.safetensors"))
    print(f"{run_dir} ({ckpt.name}, ffn={cfg.model.ffn}, rank {rank})")
    for layer in range(cfg.model.n_layers):
        w0, w1 = gate_matrices(init, layer), gate_matrices(final, layer)
        if w0 is None or w1 is None:
            print(f"  layer {layer}: no unfactorized gate")
            continue
        shares = [top_share(w1[e] - w0[e], rank) for e in range(w1.shape[0])]
        rel = [float((w1[e] - w0[e]).norm() / w0[e].norm()) for e in range(w1.shape[0])]
        print(f"  layer {layer}: update share in top-{rank}: mean {sum(shares) / len(shares):.3f} "
              f"(min {min(shares):.3f}, max {max(shares):.3f}); |dW|/|W_init| mean {sum(rel) / len(rel):.2f}")
    shape = w1.shape[-2:] if w1 is not None else None
    if shape is not None:
        torch.manual_seed(0)
        print(f"  random Gaussian {tuple(shape)}: top-{rank} share {top_share(torch.randn(*shape), rank):.3f}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("runs", nargs="+")
    p.add_argument("--rank", type=int, default=32)
    args = p.parse_args()
    for run in args.runs:
        analyse(run, args.rank)


if __name__ == "__main__":
    main()
