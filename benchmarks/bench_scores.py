"""AoE's scoring paths against each other: the fused Triton kernel and the PyTorch path (cache kept,
and recompute_scores), forward + backward of the scores and the chosen rows, in one process.

What one step runs, per path: ``expert_scores`` (the norms [T, E]), top-k, the chosen rows [S, L]
(``AoE.chosen_activations``), then the backward of ``<norms, g> + <rows, h>``. Reported per path:
the median step time, the memory held from forward to backward (``saved_mib``: what stays alive
for backward, the cache or not), the step's peak above its inputs (CUDA), and the relative error of
the norms and of x's gradient against the same step in fp32 on the PyTorch path.

``--memory-table`` prints the computed memory (no run) of one layer's scoring at the issue's shape.

Usage:
    python benchmarks/bench_scores.py --json scores.json                 # CUDA: bf16, T=16384, D=2048, L=256, E=64, 256
    TRITON_INTERPRET=1 python benchmarks/bench_scores.py --dry-run      # CPU: tiny, fp16, checks the script runs
    python benchmarks/bench_scores.py --memory-table

Shape legend: T tokens, D model dim, E experts, k chosen per token, L = d_low, S = T*k rows.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from aoe import AoE
from aoe.nn.dispatch import Dispatch

MIB = 2**20
GPU_SHAPES = [(16384, 2048, 64, 8, 256), (16384, 2048, 256, 8, 256)]  # (T, D, E, k, L)
DRY_SHAPES = [(40, 32, 4, 2, 16)]


def memory_table(T=16384, D=2048, L=256, k=8, experts=(64, 256), elem=2, block_bytes=256 * MIB) -> str:
    """Computed bytes of one AoE layer's scoring in bf16 (MiB): what stays saved from forward to
    backward and the backward's largest [T, E, L]-sized transients."""
    rows = ["| E | cache [T, E, L] saved (torch) | saved (fused: norms [T, E] fp32) | saved per layer | "
            "old forward fp32 copy | backward peak, torch (cache + grad) | backward peak, fused (dc block) |",
            "|---|---|---|---|---|---|---|"]
    for E in experts:
        cache, norms = T * E * L * elem, T * E * 4
        dc_block = min(cache, max(1, block_bytes // (E * L * elem)) * E * L * elem)
        rows.append(f"| {E} | {cache / MIB:.0f} | {norms / MIB:.0f} | {(cache - norms) / MIB:.0f} | "
                    f"{2 * cache / MIB:.0f} | {2 * cache / MIB:.0f} | {dc_block / MIB:.0f} |")
    rows.append(f"\nT={T}, D={D}, L={L}, k={k}, bf16. Both paths also keep the chosen rows [T*k, L] for the "
                f"gate branch ({T * k * L * elem / MIB:.0f} MiB) and x.")
    return "\n".join(rows)


def _timer(cuda: bool, reps: int):
    if cuda:
        import triton.testing

        return lambda fn: triton.testing.do_bench(fn, warmup=10, rep=max(20, reps * 10), return_mode="median")

    def cpu(fn):
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(times)
    return cpu


def _paths(D, E, k, L, device, dtype):
    base = AoE(D, L, E, k, d_wide=64, scores_backend="torch").to(device=device, dtype=dtype)
    paths = {"torch-cache": base}
    for name, kw in (("torch-recompute", dict(recompute_scores=True)), ("triton-fused", dict(scores_backend="triton"))):
        layer = AoE(D, L, E, k, d_wide=64, **{"scores_backend": "torch", **kw}).to(device=device, dtype=dtype)
        layer.load_state_dict(base.state_dict())
        paths[name] = layer
    return paths


def _step(layer, x, dispatch, g_TE, g_SL, dtype):
    """Forward (scores, rows) and backward; returns the norms, x's gradient and the bytes saved."""
    x.grad = None
    before = torch.cuda.memory_allocated() if x.is_cuda else 0
    scores_TE, act_TEL = layer.expert_scores(x, dtype)
    act_SL = layer.chosen_activations(x, act_TEL, dispatch, dtype)
    saved = (torch.cuda.memory_allocated() - before) if x.is_cuda else float("nan")
    del act_TEL
    torch.autograd.backward([scores_TE, act_SL], [g_TE, g_SL])
    return scores_TE.detach(), x.grad, saved


def _peak_mib(fn, cuda):
    if not cuda:
        return float("nan")
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / MIB


def rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm())


def bench_shape(T, D, E, k, L, device, dtype, reps):
    cuda = device.type == "cuda"
    torch.manual_seed(0)
    paths = _paths(D, E, k, L, device, dtype)
    x = torch.randn(T, D, device=device, dtype=dtype, requires_grad=True)
    with torch.no_grad():
        indices_TK = torch.topk(paths["torch-cache"].expert_scores(x, dtype)[0], k, dim=-1).indices
    dispatch = Dispatch.build(indices_TK, E)
    g_TE = torch.randn(T, E, device=device)
    g_SL = torch.randn(T * k, L, device=device, dtype=dtype)
    ref = _paths(D, E, k, L, device, torch.float32)["torch-cache"]
    ref.load_state_dict(paths["torch-cache"].state_dict())
    x32 = x.detach().float().requires_grad_()
    norms_ref, gx_ref, _ = _step(ref, x32, dispatch, g_TE, g_SL.float(), torch.float32)
    timer, rows = _timer(cuda, reps), []
    for name, layer in paths.items():
        norms, gx, saved = _step(layer, x, dispatch, g_TE, g_SL, dtype)
        run = lambda layer=layer: _step(layer, x, dispatch, g_TE, g_SL, dtype)  # noqa: E731
        rows.append(dict(path=name, T=T, D=D, E=E, k=k, L=L, dtype=str(dtype), step_ms=timer(run),
                         saved_mib=saved / MIB, step_peak_mib=_peak_mib(run, cuda),
                         norms_rel_err=rel(norms, norms_ref), grad_x_rel_err=rel(gx, gx_ref)))
        print(json.dumps(rows[-1]), flush=True)
    if cuda:
        with torch.no_grad():
            w = paths["torch-cache"].w_down.transpose(0, 1).reshape(D, E * L).contiguous()
            ms = timer(lambda: x @ w)
        rows.append(dict(path="dense-matmul x @ w_down", T=T, D=D, E=E, step_ms=ms, tflops=2 * T * D * E * L / ms / 1e9))
        print(json.dumps(rows[-1]), flush=True)
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dry-run", action="store_true", help="CPU, tiny shapes, fp16 (under TRITON_INTERPRET=1)")
    ap.add_argument("--memory-table", action="store_true", help="print the computed memory table and exit")
    ap.add_argument("--experts", type=int, nargs="+", default=None, help="E values (default 64 256)")
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    if args.memory_table:
        print(memory_table())
        return
    cuda = torch.cuda.is_available() and not args.dry_run
    device, dtype = (torch.device("cuda"), torch.bfloat16) if cuda else (torch.device("cpu"), torch.float16)
    shapes = GPU_SHAPES if cuda else DRY_SHAPES
    if args.experts:
        shapes = [(T, D, E, k, L) for T, D, _, k, L in shapes[:1] for E in args.experts]
    rows = [r for shape in shapes for r in bench_shape(*shape, device, dtype, args.reps if cuda else 1)]
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
