"""gpu_check's last step: the numbers of every step that left its files, as markdown on stdout.

    python benchmarks/gpu_check_summary.py OUTDIR TMPDIR

Reads OUTDIR/env.json, OUTDIR/scores.json, TMPDIR/run-{aoe,moe}/ (metrics.jsonl, summary.json) and
TMPDIR/layers-*.json; writes OUTDIR/layers.json (the layer benchmarks together) and appends the
training results to OUTDIR/train.log. A missing or broken input is reported, never fatal.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

MIB = 2**20


def section(title, fn, *args):
    print(f"\n## {title}\n")
    try:
        fn(*args)
    except Exception as e:  # a step that failed leaves nothing (or something partial) to read
        print(f"(not available: {e!r})")


def env(out: Path):
    for key, value in json.loads((out / "env.json").read_text()).items():
        print(f"- {key}: {value}")


def scores(out: Path):
    print("| path | T | E | L | step ms | saved MiB | step peak MiB | norms rel err | grad x rel err |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in json.loads((out / "scores.json").read_text()):
        if "saved_mib" in r:
            print(f"| {r['path']} | {r['T']} | {r['E']} | {r['L']} | {r['step_ms']:.3f} | {r['saved_mib']:.1f} | "
                  f"{r['step_peak_mib']:.1f} | {r['norms_rel_err']:.1e} | {r['grad_x_rel_err']:.1e} |")
        else:
            print(f"| {r['path']} | {r['T']} | {r['E']} | | {r['step_ms']:.3f} | {r['tflops']:.0f} TFLOP/s | | | |")


def train(out: Path, tmp: Path):
    print("| ffn | steps | first loss | last loss | tokens/s | MFU (last log) | peak memory GiB |")
    print("|---|---|---|---|---|---|---|")
    with open(out / "train.log", "a") as log:
        for ffn in ("aoe", "moe"):
            run = tmp / f"run-{ffn}"
            try:
                metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
                steps = [m for m in metrics if "loss" in m and "tokens_per_s" in m]
                summary = json.loads((run / "summary.json").read_text())
            except (OSError, ValueError) as e:
                print(f"| {ffn} | (no results: {e!r}) | | | | | |")
                continue
            log.write(f"### {ffn} summary.json\n{json.dumps(summary, indent=1)}\n")
            tps = summary.get("tokens_per_s") or 0
            print(f"| {ffn} | {summary['step']} | {steps[0]['loss']:.3f} | {steps[-1]['loss']:.3f} | {tps:,.0f} | "
                  f"{steps[-1].get('mfu', float('nan')):.3f} | {summary['peak_memory_bytes'] / 2**30:.2f} |")


def layers(out: Path, tmp: Path):
    runs = [(p.stem, json.loads(p.read_text())) for p in tmp.glob("layers-*.json")]
    merged = dict(sorted(runs, key=lambda run: run[1]["config"]["n_experts"]))
    (out / "layers.json").write_text(json.dumps(merged, indent=1))
    print("| run | layer | fwd+bwd ms | vs ours-MoE | peak MiB | mem vs ours-MoE |")
    print("|---|---|---|---|---|---|")
    for name, r in merged.items():
        med, peak = r["median_s"], r["peak_bytes"]
        for layer in med:
            print(f"| {name} (E={r['config']['n_experts']}) | {layer} | {med[layer] * 1e3:.2f} | "
                  f"{med[layer] / med['ours-MoE']:.2f}x | {peak[layer] / MIB:.0f} | {peak[layer] / peak['ours-MoE']:.2f}x |")


if __name__ == "__main__":
    out, tmp = Path(sys.argv[1]), Path(sys.argv[2])
    section("Environment", env, out)
    section("Fused AoE scoring against the PyTorch path (bench_scores.py)", scores, out)
    section("Training steps (small recipe)", train, out, tmp)
    section("Layer benchmark (bench_layers.py)", layers, out, tmp)
