"""Layer benchmark: forward+backward time and peak training memory of one sparse layer.

Compared in one process, interleaved (every repetition runs every contender once, in turn):
- ours-MoE: ``aoe.MoE`` (router, fused dispatch, grouped matmuls, custom backward);
- ours-AoE: ``aoe.AoE`` parameter-matched to the MoE (d_wide from ``match_d_wide``), cache kept
  (``recompute_scores=False``; which of the two AoE's default picks at the shape is printed);
- ours-AoE-recompute: the same with ``recompute_scores=True`` (the [T, E, d_low] cache is
  recomputed in backward instead of kept);
- naive-loop: the same MoE math as a per-expert Python loop with boolean masks and index_add_
  (how MoE layers are commonly written);
- hf-olmoe-<impl>: Hugging Face transformers' ``OlmoeSparseMoeBlock`` of the same shape, with each
  experts implementation of the installed transformers that runs on the device (eager, grouped_mm).
- with ``--before REV``: ours-MoE and ours-AoE (same weights) on ``aoe/nn/experts.py`` as it was at
  git revision REV (``ours-MoE@REV``...), for memory and time before/after an engine change;
- with ``--rules``: ours-MoE and ours-AoE under the other selection rules (``aoe.nn.selection``):
  ``-topp`` (top-p with p = k/E: at most k experts per token, k where the probabilities are near
  uniform, as at init) and ``-ec`` (expert choice, capacity factor 1: exactly top-k's T*k rows per
  sequence of ``--seq-len`` tokens). Their mean experts per token is printed beside them.

Also measured: the dense matmul rate of this device and dtype (an [T*k, D] x [D, F] matmul), and
each layer's ideal time = its training FLOPs / that rate. Training FLOPs are 3x the forward matmul
FLOPs (forward + two backward matmuls each) per token:
    MoE: 3 * (2*D*E + k * 2*3*D*F)
    AoE: 3 * (2*E*D*L + k * 2*(L*W + 2*D*W))      (L = d_low, W = d_wide)
AoE's recomputations in backward are extra work, not counted in its FLOPs.

Peak memory: on CUDA the allocator's peak; on CPU the peak of live tensor storages seen by
``aoe.utils.memory.TensorMemoryTracker``; both include parameters, gradients and the input.

Usage:
    python benchmarks/bench_layers.py                        # CPU target shape, fp32
    python benchmarks/bench_layers.py --preset cpu-e64       # fp32, T=2048, D=512, F=128, E=64, k=8
    python benchmarks/bench_layers.py --before 69e9e7b       # + our layers on the expert engine of a git revision
    python benchmarks/bench_layers.py --preset gpu-e64       # bf16, T=16384, D=2048, F=1024, E=64, k=8
    python benchmarks/bench_layers.py --preset gpu-e8        # bf16, T=16384, D=2048, F=4096, E=8, k=2
    python benchmarks/bench_layers.py --rules --no-hf        # + top-p and expert choice, against top-k
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import sys
import time

import torch
import torch.nn.functional as F

from aoe import AoE, MoE
from aoe.utils.memory import TensorMemoryTracker, tensor_bytes

PRESETS = {
    "cpu": dict(tokens=4096, d_model=512, d_ffn=1024, n_experts=8, top_k=2, d_low=128, dtype="float32", device="cpu"),
    # fine-grained: many small experts (E = 64, k = 8, d_ffn = D/4), the shape where AoE's scoring is dearest
    "cpu-e64": dict(tokens=2048, d_model=512, d_ffn=128, n_experts=64, top_k=8, d_low=64, dtype="float32", device="cpu"),
    "gpu-e64": dict(tokens=16384, d_model=2048, d_ffn=1024, n_experts=64, top_k=8, d_low=512, dtype="bfloat16", device="cuda"),
    "gpu-e8": dict(tokens=16384, d_model=2048, d_ffn=4096, n_experts=8, top_k=2, d_low=512, dtype="bfloat16", device="cuda"),
}


def naive_loop_moe(layer: MoE, x: torch.Tensor) -> torch.Tensor:
    """The MoE math as a per-expert loop over boolean masks (the common hand-written layer)."""
    x_TD = x.reshape(-1, layer.d_model)
    probs = torch.softmax((x_TD @ layer.router).float(), dim=-1)
    weights, chosen = torch.topk(probs, layer.top_k, dim=-1)
    weights = (weights / weights.sum(-1, keepdim=True)).to(x.dtype)
    out = torch.zeros_like(x_TD)
    for e in range(layer.n_experts):
        token, slot = torch.where(chosen == e)
        if token.numel() == 0:
            continue
        xe = x_TD[token]
        ye = (F.silu(xe @ layer.w_gate[e]) * (xe @ layer.w_in[e])) @ layer.w_out[e]
        out.index_add_(0, token, ye * weights[token, slot, None])
    return out.view_as(x)


def hf_blocks(cfg, device, dtype):
    """OLMoE sparse MoE blocks of the same shape, one per experts implementation available."""
    try:
        from transformers import OlmoeConfig
        from transformers.models.olmoe.modeling_olmoe import OlmoeSparseMoeBlock
    except ImportError:
        return {}
    blocks = {}
    for impl in ("eager", "grouped_mm"):  # batched_mm copies weights per token: for tiny decode batches only
        hf_cfg = OlmoeConfig(hidden_size=cfg["d_model"], intermediate_size=cfg["d_ffn"], num_experts=cfg["n_experts"],
                             num_experts_per_tok=cfg["top_k"], norm_topk_prob=True)
        hf_cfg._experts_implementation = impl
        block = OlmoeSparseMoeBlock(hf_cfg).to(device=device, dtype=dtype)
        for p in block.parameters():
            torch.nn.init.normal_(p, std=0.02)
        try:  # keep only implementations that run here
            probe = torch.randn(1, 64, cfg["d_model"], device=device, dtype=dtype, requires_grad=True)
            block(probe).float().sum().backward()
            block.zero_grad(set_to_none=True)
        except Exception as err:  # noqa: BLE001 - an implementation this device lacks
            print(f"  (hf-olmoe-{impl} skipped: {type(err).__name__}: {str(err)[:80]})", file=sys.stderr)
            continue
        blocks[f"hf-olmoe-{impl}"] = block
    return blocks


def train_flops_per_token(name, cfg, d_wide):
    D, F_, E, k, L = cfg["d_model"], cfg["d_ffn"], cfg["n_experts"], cfg["top_k"], cfg["d_low"]
    if name.startswith("ours-AoE"):
        return 3 * (2 * E * D * L + k * 2 * (L * d_wide + 2 * D * d_wide))
    return 3 * (2 * D * E + k * 2 * 3 * D * F_)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def step(fn, x, grad):
    out = fn(x)
    out.backward(grad)


def measure_matmul_rate(cfg, device, dtype, reps):
    rows = cfg["tokens"] * cfg["top_k"]
    a = torch.randn(rows, cfg["d_model"], device=device, dtype=dtype)
    b = torch.randn(cfg["d_model"], cfg["d_ffn"], device=device, dtype=dtype)
    for _ in range(2):
        a @ b
    sync(device)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        a @ b
        sync(device)
        times.append(time.perf_counter() - t0)
    return 2 * rows * cfg["d_model"] * cfg["d_ffn"] / statistics.median(times)


def peak_memory(fn, params, x, grad, device):
    for p in params:
        p.grad = None
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        step(fn, x, grad)
        torch.cuda.synchronize()
        # parameters + input + grad_output are allocated before; count them as the CPU path does
        return torch.cuda.max_memory_allocated() - base + tensor_bytes([*params, x, grad])
    with TensorMemoryTracker(baseline_bytes=tensor_bytes([*params, x, grad])) as tracker:
        step(fn, x, grad)
    return tracker.peak_bytes


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    ap.add_argument("--reps", type=int, default=7, help="timed repetitions per contender (median reported)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    ap.add_argument("--no-hf", action="store_true", help="skip the transformers OLMoE block")
    ap.add_argument("--json", default=None, help="also write the results to this JSON file")
    ap.add_argument("--before", default=None, metavar="REV",
                    help="also our layers on the expert engine of this git revision (before/after)")
    ap.add_argument("--rules", action="store_true", help="also top-p and expert choice of both layers")
    ap.add_argument("--only-ours", action="store_true", help="skip the naive loop and the transformers block")
    ap.add_argument("--seq-len", type=int, default=None,
                    help="tokens per sequence (expert choice routes within each; default: one sequence of all)")
    for key in ("tokens", "d_model", "d_ffn", "n_experts", "top_k", "d_low"):
        ap.add_argument(f"--{key.replace('_', '-')}", type=int, default=None)
    ap.add_argument("--backward-chunks", type=int, default=None,
                    help="our layers' backward_chunks (default: the layers' automatic choice)")
    args = ap.parse_args(argv)
    cfg = dict(PRESETS[args.preset])
    for key in ("tokens", "d_model", "d_ffn", "n_experts", "top_k", "d_low"):
        if getattr(args, key) is not None:
            cfg[key] = getattr(args, key)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(cfg["device"])
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("this preset needs a CUDA device")
    dtype = getattr(torch, cfg["dtype"])
    torch.manual_seed(0)
    D, F_, E, k, L = cfg["d_model"], cfg["d_ffn"], cfg["n_experts"], cfg["top_k"], cfg["d_low"]

    chunks = {"backward_chunks": args.backward_chunks}
    moe = MoE(D, F_, E, k, **chunks).to(device=device, dtype=dtype)
    aoe = AoE(D, L, E, k, d_ffn=F_, recompute_scores=False, **chunks).to(device=device, dtype=dtype)
    aoe_rc = AoE(D, L, E, k, d_ffn=F_, recompute_scores=True, **chunks).to(device=device, dtype=dtype)
    contenders = {"ours-MoE": moe, "ours-AoE": aoe, "ours-AoE-recompute": aoe_rc}
    picked = "recompute" if AoE(D, L, E, k, d_ffn=F_).recompute_scores else "cache"
    print(f"AoE's default here (recompute_scores=None): {picked}")
    if not args.only_ours:
        contenders["naive-loop"] = lambda x: naive_loop_moe(moe, x)
    if not args.no_hf and not args.only_ours:
        contenders.update(hf_blocks(cfg, device, dtype))
    if args.rules:
        contenders.update(rule_contenders(moe, aoe, device, dtype))
    owner = {"naive-loop": moe}
    if args.before:
        old_engine = engine_at(args.before)
        for name, layer in (("ours-MoE", moe), ("ours-AoE", aoe), ("ours-AoE-recompute", aoe_rc)):
            contenders[f"{name}@{args.before}"] = on_engine(old_engine, layer)
            owner[f"{name}@{args.before}"] = layer
    params_of = {n: list(owner.get(n, m).parameters()) for n, m in contenders.items()}

    seq_len = args.seq_len or cfg["tokens"]
    if cfg["tokens"] % seq_len:
        sys.exit(f"--seq-len {seq_len} does not divide tokens={cfg['tokens']}")
    x = torch.randn(cfg["tokens"] // seq_len, seq_len, D, device=device, dtype=dtype, requires_grad=True)
    grad = torch.randn_like(x)
    fns = {n: m for n, m in contenders.items()}

    for _ in range(args.warmup):
        for fn in fns.values():
            step(fn, x, grad)
    times = {n: [] for n in fns}
    for _ in range(args.reps):
        for n, fn in fns.items():  # interleaved: noise hits every contender alike
            for p in params_of[n]:
                p.grad = None
            x.grad = None
            sync(device)
            t0 = time.perf_counter()
            step(fn, x, grad)
            sync(device)
            times[n].append(time.perf_counter() - t0)
    rate = measure_matmul_rate(cfg, device, dtype, max(args.reps, 5))
    memory = {n: peak_memory(fn, params_of[n], x, grad, device) for n, fn in fns.items()}

    med = {n: statistics.median(t) for n, t in times.items()}
    flops = {n: train_flops_per_token(n, cfg, aoe.d_wide) * cfg["tokens"] for n in fns}
    experts_per_token = {}
    for n, m in contenders.items():
        if getattr(m, "last_routing", None) is not None:
            experts_per_token[n] = float(m.last_routing.experts_per_token_counts().double().mean())
            flops[n] *= experts_per_token[n] / k if n.endswith(("-topp", "-ec")) else 1  # the rows it computed
    machine = f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads" if device.type == "cpu" \
        else torch.cuda.get_device_name(device)
    print(f"# bench_layers --preset {args.preset}: {json.dumps(cfg)}")
    print(f"# torch {torch.__version__}, device {device.type} ({machine}); d_wide={aoe.d_wide}; "
          f"params MoE {sum(p.numel() for p in moe.parameters()):,} AoE {sum(p.numel() for p in aoe.parameters()):,}")
    print(f"# dense {cfg['dtype']} matmul rate: {rate / 1e9:.1f} GFLOP/s; reps={args.reps} (median)")
    print()
    print("| layer | fwd+bwd ms | vs ours-MoE | ideal ms | % of matmul rate | peak MiB | mem vs ours-MoE |")
    print("|---|---|---|---|---|---|---|")
    for n in fns:
        ideal = flops[n] / rate
        print(f"| {n} | {med[n] * 1e3:.1f} | {med[n] / med['ours-MoE']:.2f}x | {ideal * 1e3:.1f} | "
              f"{100 * ideal / med[n]:.0f}% | {memory[n] / 2**20:.1f} | {memory[n] / memory['ours-MoE']:.3f}x |")
    flop_ratio = flops["ours-AoE"] / flops["ours-MoE"]
    print()
    print(f"AoE/MoE FLOP ratio R = {flop_ratio:.3f}; time ratio AoE/MoE = {med['ours-AoE'] / med['ours-MoE']:.3f} "
          f"= {med['ours-AoE'] / med['ours-MoE'] / flop_ratio:.3f} R (recompute: "
          f"{med['ours-AoE-recompute'] / med['ours-MoE'] / flop_ratio:.3f} R)")
    for n in fns:
        if n.startswith("hf-"):
            print(f"ours-MoE is {med[n] / med['ours-MoE']:.2f}x faster than {n}")
    print(f"peak memory AoE/MoE = {memory['ours-AoE'] / memory['ours-MoE']:.3f} "
          f"(recompute: {memory['ours-AoE-recompute'] / memory['ours-MoE']:.3f})")
    print_targets(med, memory, flops, rate, flop_ratio, args.before,
                  default="ours-AoE-recompute" if picked == "recompute" else "ours-AoE")
    if args.rules:
        print_rules(med, memory, experts_per_token)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(config=cfg, machine=machine, torch=torch.__version__, matmul_flops_per_s=rate,
                           median_s=med, peak_bytes=memory, train_flops=flops, experts_per_token=experts_per_token,
                           seq_len=seq_len), f, indent=2)


def engine_at(rev: str):
    """``swiglu_experts`` of ``src/aoe/nn/experts.py`` at git revision ``rev``, as a function taking
    (and ignoring) today's ``tokens=`` argument."""
    import subprocess
    import types

    src = subprocess.run(["git", "show", f"{rev}:src/aoe/nn/experts.py"], check=True, capture_output=True, text=True).stdout
    module = types.ModuleType(f"experts_at_{rev}")
    exec(compile(src, f"experts.py@{rev}", "exec"), module.__dict__)
    return lambda *args, tokens=None, **kw: module.swiglu_experts(*args, **kw)


def on_engine(engine, layer):
    """Call ``layer`` with ``engine`` in place of the layers' ``swiglu_experts`` (forward only:
    the backward is the engine's own autograd Function, already in the graph)."""
    import aoe.nn.aoe as aoe_module
    import aoe.nn.moe as moe_module

    def call(x):
        kept = moe_module.swiglu_experts, aoe_module.swiglu_experts
        moe_module.swiglu_experts = aoe_module.swiglu_experts = engine
        try:
            return layer(x)
        finally:
            moe_module.swiglu_experts, aoe_module.swiglu_experts = kept
    return call


def print_targets(med, memory, flops, rate, flop_ratio, before, default="ours-AoE"):
    """The issue-24 targets, each with its number (``met`` / ``not met``), the AoE ones judged on
    ``default``, the contender that AoE's default ``recompute_scores=None`` builds at this shape."""
    def verdict(ok):
        return "met" if ok else "NOT met"

    print()
    mem = {name: memory[name] / memory["ours-MoE"] for name in ("ours-AoE", "ours-AoE-recompute")}
    print(f"target AoE peak <= 1.05x MoE's: {mem[default]:.3f} ({default}, the default; cache {mem['ours-AoE']:.3f}, "
          f"recompute {mem['ours-AoE-recompute']:.3f}): {verdict(mem[default] <= 1.05)}")
    if "hf-olmoe-grouped_mm" in memory:
        hf_ratio = memory["ours-MoE"] / memory["hf-olmoe-grouped_mm"]
        print(f"target our MoE's peak below HF grouped_mm's (<= 0.8x at E = 64): {hf_ratio:.3f}x: "
              f"{verdict(hf_ratio < 1)} (< 1), {verdict(hf_ratio <= 0.8)} (<= 0.8)")
    time_r = {name: med[name] / med["ours-MoE"] / flop_ratio for name in ("ours-AoE", "ours-AoE-recompute")}
    print(f"target AoE time <= 1.05 R x MoE's: {time_r[default]:.3f} R ({default}; cache {time_r['ours-AoE']:.3f} R, "
          f"recompute {time_r['ours-AoE-recompute']:.3f} R): {verdict(time_r[default] <= 1.05)}")
    print(f"our MoE at {100 * flops['ours-MoE'] / rate / med['ours-MoE']:.0f}% of the dense matmul rate "
          f"(target >= 85% where the FLOPs are in large matmuls)")
    if before:
        for name in ("ours-MoE", "ours-AoE", "ours-AoE-recompute"):
            old = f"{name}@{before}"
            print(f"{name}: peak {memory[name] / 2**20:.1f} MiB against {memory[old] / 2**20:.1f} MiB at {before} "
                  f"({memory[name] / memory[old]:.3f}x, {(memory[old] - memory[name]) / 2**20:.1f} MiB saved); "
                  f"time {med[name] / med[old]:.3f}x")


def rule_contenders(moe: MoE, aoe: AoE, device, dtype) -> dict:
    """ours-MoE and ours-AoE (same weights) under top-p (p = k/E) and expert choice (capacity 1)."""
    out = {}
    for name, base in (("ours-MoE", moe), ("ours-AoE", aoe)):
        for suffix, rule in (("-topp", dict(selection="top_p")), ("-ec", dict(selection="expert_choice"))):
            layer = copy.deepcopy(base)
            layer._init_selection(rule["selection"], None, 1, None, 1.0, "top_k")
            out[name + suffix] = layer.to(device=device, dtype=dtype)
    return out


def print_rules(med, memory, experts_per_token):
    print()
    print("| layer | rule | experts/token | fwd+bwd ms | vs its top-k | peak MiB | mem vs its top-k |")
    print("|---|---|---|---|---|---|---|")
    for base in ("ours-MoE", "ours-AoE"):
        for suffix, rule in (("", "top-k"), ("-topp", "top-p (p = k/E)"), ("-ec", "expert choice (capacity 1)")):
            n = base + suffix
            print(f"| {base} | {rule} | {experts_per_token.get(n, float('nan')):.3f} | {med[n] * 1e3:.1f} | "
                  f"{med[n] / med[base]:.2f}x | {memory[n] / 2**20:.1f} | {memory[n] / memory[base]:.3f}x |")


if __name__ == "__main__":
    main()
