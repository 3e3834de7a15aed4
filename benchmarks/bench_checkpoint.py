"""Checkpoint save and resume under FSDP with real gloo processes: time and peak memory per rank,
the one-process format (rank 0 gathers everything) against the sharded one (each rank its shards).

Each rank builds the recipe's model under ``train.fsdp=true``, takes one optimizer step (so the
AdamW moments exist), then saves in each format and resumes from each. Peak memory is the rise of
the process's resident-set high-water mark during the call (``VmHWM`` of /proc/self/status, reset
through /proc/self/clear_refs just before, after ``malloc_trim`` has returned freed memory), so it
counts what the save or load allocated beyond what the rank held already (its shards, the model
and the moments). Memory the allocator still keeps from earlier work absorbs part of a rise, so
the numbers are lower bounds.

    PYTHONPATH=src python benchmarks/bench_checkpoint.py --config tiny --ranks 2
    PYTHONPATH=src python benchmarks/bench_checkpoint.py --config small --ranks 2

Linux only (/proc). Short sequences and batches: only the state's size matters here.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import socket
import tempfile
import time
from pathlib import Path

import torch
import torch.multiprocessing as mp

_KB = 1024


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def _measured(fn):
    """``fn()``'s value, its wall time (s) and the rise of this process's peak RSS (MB) during it."""
    ctypes.CDLL("libc.so.6").malloc_trim(0)  # freed memory back to the system: RSS is what is held
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    before = _status_kb("VmRSS")
    start = time.perf_counter()
    value = fn()
    elapsed = time.perf_counter() - start
    return value, elapsed, (_status_kb("VmHWM") - before) / _KB


def _worker(rank: int, world: int, port: int, args, out: str) -> None:
    os.environ.update({"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world),
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    torch.set_num_threads(1)
    from aoe.config import load_config
    from aoe.train.distributed import shutdown_distributed
    from aoe.train.trainer import Trainer

    overrides = ["train.fsdp=true", "train.seq_len=64", f"train.batch_size={2 * world}", "train.micro_batch_size=1",
                 "train.max_steps=10", "train.warmup_steps=1", "train.keep_checkpoints=0", "train.num_threads=1",
                 "data.max_bytes=300000", f"data.vocab_size={args.vocab}", f"data.cache_dir={args.cache}",
                 "train.eval_every=0"]
    rows = []
    try:
        for fmt in ("full", "sharded"):
            run = Path(out) / fmt
            trainer = Trainer(load_config(args.config, [*overrides, f"train.checkpoint_format={fmt}"]), run,
                              progress=False)
            trainer._train_step(collect_routing=False)
            _, save_s, save_mb = _measured(trainer.save)
            fresh = Trainer(load_config(args.config, [*overrides, f"train.checkpoint_format={fmt}"]),
                            Path(out) / f"{fmt}-fresh", progress=False)
            fresh.out_dir = fresh.checkpoints.out_dir = run
            _, load_s, load_mb = _measured(fresh._resume)
            rows.append({"format": fmt, "rank": rank, "save_s": save_s, "save_peak_mb": save_mb, "load_s": load_s,
                         "load_peak_mb": load_mb, "rss_mb": _status_kb("VmRSS") / _KB,
                         "params": trainer.params_total[0]})
        Path(out, f"rank{rank}.json").write_text(json.dumps(rows))
    finally:
        shutdown_distributed()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="tiny")
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--vocab", type=int, default=512, help="data.vocab_size (a small corpus: 512)")
    parser.add_argument("--cache", default=os.path.join(tempfile.gettempdir(), "aoe-bench-cache"))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as out:
        mp.spawn(_worker, args=(args.ranks, _free_port(), args, out), nprocs=args.ranks, join=True)
        rows = [r for rank in range(args.ranks) for r in json.loads(Path(out, f"rank{rank}.json").read_text())]
    print(f"{args.config}, {rows[0]['params'] / 1e6:.1f}M parameters, FSDP over {args.ranks} gloo ranks")
    print("| format | rank | save (s) | peak rise saving (MB) | resume (s) | peak rise resuming (MB) |")
    print("|---|---|---|---|---|---|")
    for r in sorted(rows, key=lambda r: (r["format"], r["rank"])):
        print(f"| {r['format']} | {r['rank']} | {r['save_s']:.2f} | {r['save_peak_mb']:.0f} | {r['load_s']:.2f} | "
              f"{r['load_peak_mb']:.0f} |")


if __name__ == "__main__":
    main()
