"""Synthetic comparison results (dense, moe, aoe) with metrics.jsonl files, for the report tests.

``make_results(..., new_schema=False)`` writes results.json as the runner did before variants had a
kind and a baseline and layers had gate weights; ``new_schema=True`` adds every newer key: variants'
kind/baseline/lr, runs' lr, layers' gate_weight_mean and dead_experts (results and training logs),
and a learning-rate sweep.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

COMMAND = "aoe compare --out runs/cmp model.d_model=64 train.max_steps=40 --seeds 0 1"
E = 4
CLEAR_WIN = {"dense": [4.10, 4.12], "moe": [4.00, 4.02], "aoe": [3.80, 3.81]}
WITHIN_NOISE = {"dense": [4.10, 4.12], "moe": [4.00, 4.10], "aoe": [3.98, 4.08]}

# new schema: the lr each variant's main runs use (chosen by the sweep), and the sweep itself
CHOSEN = {"dense": 3e-3, "moe": 3e-3, "aoe": 1e-2}
SWEEP_LRS = [1e-3, 3e-3, 1e-2]
SWEEP_LOSS = {"dense": [4.9, 4.6, 4.8], "moe": [4.8, 4.5, 4.7], "aoe": [4.5, 4.4, 4.3]}
BASELINES = {"dense": None, "moe": "dense", "aoe": "moe"}  # explicit: MoE is compared against Dense
GATE = {"moe": (0.70, 0.30), "aoe": (0.60, 0.25)}  # top-1, top-2 of seed 0; + 0.01 per seed
DEAD = {"moe": (1, 0), "aoe": (0, 0)}  # per layer, seed 0; + seed
VAL_AMPLITUDE = {"dense": 2.0, "moe": 2.0, "aoe": 2.5}  # new schema: the val curves' initial excess


def _layer(i: int, counts: list[int], ent_conf: float) -> dict:
    tot = sum(counts)
    q = [c / tot for c in counts]
    return {
        "layer": i,
        "kind": None,
        "ent_load": -sum(x * math.log(x) for x in q if x > 0),
        "ent_conf": ent_conf,
        "imbalance": max(counts) / (tot / len(counts)),
        "tokens_per_expert": counts,
    }


def _layers(name: str, seed: int, new_schema: bool) -> list[dict]:
    if name == "dense":
        return []
    if name == "moe":
        layers = [_layer(0, [400, 100, 200, 100], 1.2), _layer(1, [300, 300, 100, 100], 1.1)]
    else:
        layers = [_layer(0, [210, 190, 200, 200], 0.6), _layer(1, [220, 180, 200, 200], 0.5)]
    for i, l in enumerate(layers):
        l["kind"] = name
        if new_schema:
            l["gate_weight_mean"] = [g + 0.01 * seed for g in GATE[name]]
            l["dead_experts"] = DEAD[name][i] + seed
    return layers


def _training_layers(layers: list[dict], step: int, new_schema: bool) -> list[dict]:
    out = []
    for l in layers:
        e = dict(l, ent_load=l["ent_load"] * (1 - 0.2 * math.exp(-step / 10)))
        if new_schema:
            e["ent_conf"] = l["ent_conf"] + math.exp(-step / 10)
            e["gate_weight_mean"] = [g * (1 - 0.5 * math.exp(-step / 10)) for g in l["gate_weight_mean"]]
            e["dead_experts"] = 2 if step <= 10 else l["dead_experts"]
        out.append(e)
    return out


def _write_metrics(d: Path, name: str, seed: int, vl: float, layers: list[dict], new_schema: bool) -> None:
    amplitude = VAL_AMPLITUDE[name] if new_schema else 2.0
    lines = []
    for step in range(1, 41):
        lines.append({
            "step": step, "loss": vl + 3.0 * math.exp(-step / 10) + 0.01 * seed, "aux_loss": 0.0,
            "lr": 1e-3, "grad_norm": 1.0, "tokens_per_s": 12000.0, "mfu": float("nan"),
            "layers": _training_layers(layers, step, new_schema),
        })
        if step % 10 == 0:
            vv = vl + amplitude * math.exp(-step / 10)
            lines.append({"step": step, "val_loss": vv, "val_ppl": math.exp(vv), "val_bpb": 1.0})
    text = "\n".join(json.dumps(x) for x in lines) + "\n"
    if (name, seed) == ("moe", 0):
        text += "{not json\n"  # a truncated last line must be skipped
    d.mkdir(parents=True, exist_ok=True)
    (d / "metrics.jsonl").write_text(text)


def _sweep(tmp_path: Path) -> dict:
    runs = []
    for name, losses in SWEEP_LOSS.items():
        for lr, vl in zip(SWEEP_LRS, losses):
            runs.append({"variant": name, "lr": lr, "status": "done", "val_loss": vl,
                         "run_dir": f"sweep/{name}-lr{lr:g}"})
    runs.append({"variant": "dense", "lr": 3e-2, "status": "failed", "val_loss": None, "run_dir": "sweep/dense-lr0.03"})
    return {"lrs": [*SWEEP_LRS, 3e-2], "steps": 20, "seed": 0, "runs": runs, "chosen": dict(CHOSEN)}


def make_results(tmp_path: Path, val_losses: dict[str, list[float]], skip_metrics=(), extra_runs=(),
                 new_schema: bool = False) -> dict:
    """A consistent fake results dict plus metrics.jsonl files for dense, moe and aoe."""
    variants = [
        {"name": "dense", "label": "Dense", "description": "dense SwiGLU", "overrides": ["model.ffn=dense"]},
        {"name": "moe", "label": "MoE", "description": "router MoE, top-2 of 4", "overrides": ["model.ffn=moe"]},
        {"name": "aoe", "label": "AoE", "description": "AoE, d_low 16", "overrides": ["model.ffn=aoe"]},
    ]
    if new_schema:
        for v in variants:
            v.update(kind=v["name"], baseline=BASELINES[v["name"]], lr=CHOSEN[v["name"]])
    seeds = list(range(len(next(iter(val_losses.values())))))
    bytes_per_token = 3.5
    runs = []
    for v in variants:
        name = v["name"]
        for seed, vl in zip(seeds, val_losses[name]):
            layers = _layers(name, seed, new_schema)
            run_dir = f"{name}-s{seed}"
            runs.append({
                "variant": name, "seed": seed, "status": "done", "run_dir": run_dir,
                "val_loss": vl, "perplexity": math.exp(vl), "bits_per_byte": vl / math.log(2) / bytes_per_token,
                "params_total": 1_234_567 if name != "dense" else 600_000,
                "params_active": 700_000 if name != "dense" else 600_000,
                "flops_per_token": 4_200_000, "tokens_per_s": 12345.6 + seed,
                "peak_memory_bytes": None, "train_time_s": 12.5, "steps": 40, "tokens": 40 * 8 * 32,
                "layers": layers, **({"lr": CHOSEN[name]} if new_schema else {}),
            })
            if (name, seed) not in skip_metrics:
                _write_metrics(tmp_path / run_dir, name, seed, vl, layers, new_schema)
    runs.extend(extra_runs)
    results = {
        "command": COMMAND,
        "created": "2026-11-23T12:00:00Z",
        "machine": {"platform": "Linux-x86_64", "python": "3.11.9", "torch": "2.6.0", "device": "cpu", "threads": 2},
        "config": {
            "model": {"d_model": 64, "n_layers": 2, "n_heads": 4, "ffn": "aoe", "d_ffn": 128, "n_experts": E,
                      "top_k": 2, "d_low": 16, "vocab_size": 512},
            "data": {"source": "stdlib", "vocab_size": 512},
            "train": {"max_steps": 40, "batch_size": 8, "seq_len": 32, "lr": 1e-3},
        },
        "corpus": {"source": "stdlib", "train_tokens": 100000, "val_tokens": 5000, "vocab_size": 512,
                   "unigram_entropy": 5.1, "unigram_cross_entropy": 5.3, "bytes_per_token": bytes_per_token},
        "variants": variants,
        "seeds": seeds,
        "runs": runs,
    }
    if new_schema:
        results["sweep"] = _sweep(tmp_path)
    return results
