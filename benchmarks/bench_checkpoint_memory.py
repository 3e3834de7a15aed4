"""Peak resident memory of each rank while saving and while resuming a checkpoint under FSDP (gloo),
the one-process format ("full": rank 0 gathers everything) against the sharded one, at several
world sizes, each case in fresh processes.

A case is (recipe, world size, format, phase). "save": every rank builds the recipe's model under
``train.fsdp=true``, takes one AdamW step (so the moments exist) and saves; "resume": fresh
processes build the same run and load the checkpoint the save case wrote. Only the measured call
runs between two readings of ``/proc/self/status``: ``VmRSS`` just before it (after
``malloc_trim`` returned freed memory and ``/proc/self/clear_refs`` reset the high-water mark to
it) and ``VmHWM`` just after. "peak" is that high-water mark, "rise" how far it went above what
the rank held before the call, "shard" what the rank holds of the weights and AdamW moments
(12 bytes a parameter, over the ranks). A case's processes never ran another case, so no earlier
case's allocations hide in the allocator.

    PYTHONPATH=src python benchmarks/bench_checkpoint_memory.py --configs tiny small --ranks 2 4

Linux only (/proc). Short sequences and batches: only the state's size matters here.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import socket
import tempfile
import time
from pathlib import Path

import torch
import torch.multiprocessing as mp

_MB = 1024 * 1024
FORMATS = ("full", "sharded")


def _status_mb(field: str) -> float:
    """A field of /proc/self/status (kB there) in MB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024 / _MB
    raise RuntimeError(f"no {field} in /proc/self/status")


def _measured(fn) -> dict[str, float]:
    """Run ``fn()``: this process's resident set before it, its high-water mark during it, the wall time."""
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)  # freed memory back to the system: RSS is what is held
    Path("/proc/self/clear_refs").write_text("5")  # the high-water mark restarts at the current RSS
    before = _status_mb("VmRSS")
    start = time.perf_counter()
    fn()
    seconds = time.perf_counter() - start
    return {"before_mb": before, "peak_mb": _status_mb("VmHWM"), "seconds": seconds}


def _local_mb(trainer) -> float:
    """This rank's part of the weights and the AdamW moments (MB): the local shards of the DTensors."""
    from torch.distributed.tensor import DTensor

    def local(t: torch.Tensor) -> torch.Tensor:
        return t.to_local() if isinstance(t, DTensor) else t

    tensors = [local(p) for p in trainer.model.parameters()]
    tensors += [local(v) for s in trainer.optimizer.state.values() for v in s.values()
                if isinstance(v, torch.Tensor) and v.dim() > 0]
    return sum(t.numel() * t.element_size() for t in tensors) / _MB


def _overrides(args, world: int, fmt: str) -> list[str]:
    return ["train.fsdp=true", "train.seq_len=64", f"train.batch_size={2 * world}", "train.micro_batch_size=1",
            "train.max_steps=10", "train.warmup_steps=1", "train.keep_checkpoints=0", "train.num_threads=1",
            "train.eval_every=0", "data.max_bytes=300000", f"data.vocab_size={args.vocab}",
            f"data.cache_dir={args.cache}", f"train.checkpoint_format={fmt}"]


def _case(rank: int, world: int, port: int, args, fmt: str, phase: str, run: str, out: str) -> None:
    """One rank of one case: the measured save or resume, its numbers written to ``out/rank{rank}.json``."""
    os.environ.update({"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world),
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    torch.set_num_threads(1)
    from aoe.config import load_config
    from aoe.train.distributed import shutdown_distributed
    from aoe.train.trainer import Trainer

    cfg = load_config(args.config, _overrides(args, world, fmt))
    try:
        if phase == "save":
            trainer = Trainer(cfg, run, progress=False)
            trainer._train_step(collect_routing=False)
            row = _measured(trainer.save)
        else:  # a fresh run pointed at the saved one, so that only the load is measured
            trainer = Trainer(cfg, Path(out) / "fresh", progress=False)
            trainer.out_dir = trainer.checkpoints.out_dir = Path(run)
            row = _measured(trainer._resume)
        row.update(rank=rank, shard_mb=_local_mb(trainer), params=trainer.params_total[0])
        Path(out, f"rank{rank}.json").write_text(json.dumps(row))
    finally:
        shutdown_distributed()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_case(args, world: int, fmt: str, phase: str, run: Path, out: Path) -> list[dict]:
    """Spawn ``world`` fresh processes for one case; their rows, by rank."""
    out.mkdir(parents=True)
    mp.spawn(_case, args=(world, _free_port(), args, fmt, phase, str(run), str(out)), nprocs=world, join=True)
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(world)]


def _print_table(rows: list[dict], show_ranks: int) -> None:
    print("| recipe | ranks | format | phase | rank | shard (MB) | RSS before (MB) | peak (MB) | rise (MB) | time (s) |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        if r["rank"] < show_ranks:
            print(f"| {r['config']} ({r['params'] / 1e6:.1f}M) | {r['world']} | {r['format']} | {r['phase']} | "
                  f"{r['rank']} | {r['shard_mb']:.0f} | {r['before_mb']:.0f} | {r['peak_mb']:.0f} | "
                  f"{r['peak_mb'] - r['before_mb']:.0f} | {r['seconds']:.2f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", nargs="+", default=["tiny", "small"])
    parser.add_argument("--ranks", nargs="+", type=int, default=[2, 4])
    parser.add_argument("--vocab", type=int, default=512, help="data.vocab_size (a small corpus: 512)")
    parser.add_argument("--cache", default=os.path.join(tempfile.gettempdir(), "aoe-bench-cache"))
    parser.add_argument("--show-ranks", type=int, default=2, help="ranks printed per case (0 and 1 by default)")
    parser.add_argument("--json", help="also write every rank's row here")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for config in args.configs:
            args.config = config
            for world in args.ranks:
                for fmt in FORMATS:
                    run = Path(tmp, f"{config}-{world}-{fmt}")
                    for phase in ("save", "resume"):
                        for row in _run_case(args, world, fmt, phase, run, Path(tmp, f"{run.name}-{phase}")):
                            rows.append({"config": config, "world": world, "format": fmt, "phase": phase, **row})
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    _print_table(rows, args.show_ranks)


if __name__ == "__main__":
    main()
