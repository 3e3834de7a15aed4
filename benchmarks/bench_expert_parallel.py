"""Expert-parallel benchmark: one MoE and one AoE layer with their experts sharded over N ranks.

For N = 1, 2, 4 (``--ranks``) spawned processes on this machine (gloo on CPU; nccl with one GPU
per rank when ``--device cuda`` and enough GPUs), each rank feeds its own ``--tokens`` tokens per
step (weak scaling: the global batch is N x tokens). A step is forward + backward of the layer,
then the all-reduce of the replicated parameters' gradients (MoE's router, AoE's w_down).
Reported per layer and N:

- tokens/s: N x tokens / the slowest rank's median step time, and its ratio to N = 1;
- bytes moved per step by one rank (mean over ranks), counted from the all-to-all split sizes
  (``aoe.parallel.TRAFFIC``: rows sent to other ranks, forward and backward, plus the count
  exchanges), and the size of the replicated gradients each rank all-reduces;
- for AoE, the scoring choice worked out for the same shape (``scoring_bytes``): replicated
  w_down (what ``aoe.parallel`` does) against sharded w_down (all-gather the tokens, send the
  [T, E] norms home, the selection back to the owners).

Usage:
    python benchmarks/bench_expert_parallel.py                      # CPU, gloo, N = 1 2 4
    python benchmarks/bench_expert_parallel.py --device cuda --ranks 1 2 4 8
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def make_layer(kind: str, a: argparse.Namespace):
    from aoe.nn.aoe import AoE
    from aoe.nn.moe import MoE

    if kind == "moe":
        return MoE(a.d_model, d_ffn=a.d_ffn, n_experts=a.n_experts, top_k=a.top_k)
    return AoE(a.d_model, d_low=a.d_low, n_experts=a.n_experts, top_k=a.top_k, d_ffn=a.d_ffn)


def scoring_bytes(T: int, D: int, E: int, L: int, k: int, N: int, b: int) -> dict[str, float]:
    """Bytes one rank sends per AoE layer and step (forward + backward), uniform routing (a
    fraction (N-1)/N of the T*k rows go to other ranks), ring collectives:

    replicated w_down: rows out (x, c, gate weight: D+L+1) and results back (D), each again in
        backward, plus the all-reduce of w_down's gradient (2 (N-1)/N x E*D*L);
    sharded w_down: every token to every rank ((N-1) x T*D, the gradient back the same), the
        [T, E/N] norms home and their gradient back, the selection (index + weight) to the owners
        and the weight's gradient back, the results (D) home and their gradient back.
    """
    remote = (N - 1) / N
    S = T * k
    replicated = 2 * remote * S * (2 * D + L + 1) * b + 2 * remote * E * D * L * b
    sharded = 2 * (N - 1) * T * D * b + 2 * remote * T * E * b + remote * S * (8 + 2 * b) + 2 * remote * S * D * b
    return {"replicated_w_down": replicated, "sharded_w_down": sharded}


def _worker(rank: int, world: int, port: int, kind: str, a: argparse.Namespace, out: str) -> None:
    from aoe.parallel import TRAFFIC, expert_groups, shard_experts

    torch.set_num_threads(a.threads)
    device = torch.device(f"cuda:{rank}") if a.device == "cuda" else torch.device("cpu")
    if world > 1:
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                                **({"device_id": device} if device.type == "cuda" else {}))
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    torch.manual_seed(0)
    layer = make_layer(kind, a)
    if world > 1:
        shard_experts(torch.nn.Sequential(layer), expert_groups(world))
    layer = layer.to(device)
    replicated = [p for n, p in layer.named_parameters() if n not in layer.CHOSEN_EXPERT_PARAMS]
    x = torch.randn(a.tokens, a.d_model, device=device, generator=torch.Generator().manual_seed(rank)
                    if device.type == "cpu" else None)
    times, traffic = [], []
    for i in range(a.warmup + a.repeats):
        layer.zero_grad(set_to_none=True)
        TRAFFIC.reset()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        with torch.autocast(device.type, dtype=dtype, enabled=device.type == "cuda"):
            y = layer(x)
        y.float().square().mean().backward()
        if world > 1:
            for p in replicated:
                dist.all_reduce(p.grad)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if i >= a.warmup:
            times.append(time.perf_counter() - start)
            traffic.append(TRAFFIC.total)
    if world > 1:
        gathered = [None] * world
        dist.all_gather_object(gathered, (statistics.median(times), statistics.mean(traffic)))
        dist.destroy_process_group()
    else:
        gathered = [(statistics.median(times), statistics.mean(traffic))]
    if rank == 0:
        grad_bytes = sum(p.numel() * p.element_size() for p in replicated)
        with open(out, "w") as f:
            json.dump({"step_s": max(t for t, _ in gathered), "bytes_per_rank": statistics.mean(b for _, b in gathered),
                       "replicated_grad_bytes": grad_bytes if world > 1 else 0}, f)


def run(kind: str, world: int, a: argparse.Namespace) -> dict:
    out = f"/tmp/bench_ep_{os.getpid()}_{kind}_{world}.json"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_worker, args=(world, port, kind, a, out), nprocs=world, join=True)
    with open(out) as f:
        result = json.load(f)
    os.remove(out)
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ranks", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--layers", nargs="+", default=["moe", "aoe"], choices=["moe", "aoe"])
    p.add_argument("--tokens", type=int, default=1024, help="tokens per rank and step")
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--d-ffn", type=int, default=512, help="MoE expert width; AoE's d_wide is matched to it")
    p.add_argument("--d-low", type=int, default=64)
    p.add_argument("--n-experts", type=int, default=8)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=1, help="torch threads per rank (CPU)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    a = p.parse_args()
    print(f"# {platform.platform()}, {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"torch {torch.__version__}, device {a.device}")
    print(f"# per rank: T={a.tokens} tokens, D={a.d_model}, E={a.n_experts}, k={a.top_k}, F={a.d_ffn}, "
          f"L={a.d_low}; {a.threads} thread(s) per rank; median of {a.repeats} steps after {a.warmup}")
    print("| layer | EP | tokens/s | vs EP=1 | all-to-all bytes/step/rank | replicated grad bytes/rank |")
    print("|---|---|---|---|---|---|")
    for kind in a.layers:
        base = None
        for world in a.ranks:
            r = run(kind, world, a)
            tps = world * a.tokens / r["step_s"]
            base = base or tps
            print(f"| {kind} | {world} | {tps:,.0f} | {tps / base:.2f} | {r['bytes_per_rank'] / 1e6:.2f} MB | "
                  f"{r['replicated_grad_bytes'] / 1e6:.2f} MB |", flush=True)
    b = 2 if a.device == "cuda" else 4
    print("\n# AoE scoring, bytes one rank sends per layer and step (model, uniform routing):")
    print("| EP | replicated w_down | sharded w_down |")
    print("|---|---|---|")
    for world in a.ranks:
        s = scoring_bytes(a.tokens, a.d_model, a.n_experts, a.d_low, a.top_k, world, b)
        print(f"| {world} | {s['replicated_w_down'] / 1e6:.2f} MB | {s['sharded_w_down'] / 1e6:.2f} MB |")


if __name__ == "__main__":
    main()
