"""The training stall of a checkpoint save, synchronous against asynchronous (train.async_checkpoint),
with real gloo processes under FSDP (the sharded format).

Each rank builds the recipe's model under ``train.fsdp=true`` and times its steps; after
``--warmup`` steps every ``--every``-th step saves. A step's time is the slowest rank's (the
ranks wait for each other in every collective); the last ``--every`` steps do not save, so that
every save has steps after it. The stall of a save is the time of the step
that saved (its training step and the ``save`` call) minus the median of the steps that did not
save. An asynchronous save returns once the state is copied; its write then shares the machine
with the steps that follow, so the bench also counts how many steps ran until the write was done
and how much longer than the median they took together ("overlap extra"). Both modes run in the
same processes, one after the other, on the same data.

    PYTHONPATH=src python benchmarks/bench_checkpoint_stall.py --config small --ranks 2

Short sequences and batches: the state's size decides the save, the batch only the step.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.multiprocessing as mp


def _overrides(args, world: int, background: bool) -> list[str]:
    return ["train.fsdp=true", f"train.seq_len={args.seq_len}", f"train.batch_size={2 * world}",
            "train.micro_batch_size=1", f"train.max_steps={args.steps + 1}", "train.warmup_steps=1",
            "train.keep_checkpoints=0", "train.num_threads=1", "data.max_bytes=300000",
            f"data.vocab_size={args.vocab}", f"data.cache_dir={args.cache}", "train.eval_every=0",
            f"train.checkpoint_every={args.every}", f"train.async_checkpoint={str(background).lower()}"]


def _timed_steps(trainer, args, background: bool) -> list[dict]:
    """Per step: its wall time (s), whether it saved, and whether a background write was in flight
    when it started (so ran beside it)."""
    rows = []
    for step in range(1, args.steps + 1):
        pending = trainer.checkpoints._pending
        writing = pending is not None and not pending.done()
        start = time.perf_counter()
        trainer._train_step(collect_routing=False)
        saves = args.warmup < step <= args.steps - args.every and step % args.every == 0  # steps follow each save
        if saves:
            trainer.checkpoints.save(trainer.state, background=background)
        rows.append({"step": step, "s": time.perf_counter() - start, "saves": saves, "writing": writing})
    trainer.checkpoints.finish()
    return rows


def _worker(rank: int, world: int, port: int, args, out: str) -> None:
    os.environ.update({"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world),
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    torch.set_num_threads(1)
    from aoe.config import load_config
    from aoe.train.distributed import shutdown_distributed
    from aoe.train.trainer import Trainer

    result = {}
    try:
        for mode in ("sync", "async"):
            trainer = Trainer(load_config(args.config, _overrides(args, world, mode == "async")), Path(out) / mode,
                              progress=False)
            result[mode] = _timed_steps(trainer, args, mode == "async")
            result["params"] = trainer.params_total[0]
        Path(out, f"rank{rank}.json").write_text(json.dumps(result))
    finally:
        shutdown_distributed()


def _summary(per_rank: list[list[dict]]) -> dict:
    """The slowest rank's time per step, then the stall and overlap of the saves."""
    steps = [dict(rows[0], s=max(r["s"] for r in rows), writing=any(r["writing"] for r in rows))
             for rows in zip(*per_rank)]
    warm = [s for s in steps if s["step"] > 1]
    median = statistics.median(s["s"] for s in warm if not s["saves"] and not s["writing"])
    saving = [s for s in warm if s["saves"]]
    overlapping = [s for s in warm if s["writing"] and not s["saves"]]
    return {"median": median, "saving": statistics.mean(s["s"] for s in saving), "saves": len(saving),
            "stall": statistics.mean(s["s"] - median for s in saving),
            "overlap_steps": len(overlapping) / len(saving),
            "overlap_extra": sum(s["s"] - median for s in overlapping) / len(saving)}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="tiny")
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--steps", type=int, default=20, help="steps timed in each mode")
    parser.add_argument("--warmup", type=int, default=4, help="steps before the first save")
    parser.add_argument("--every", type=int, default=5, help="save every this many steps")
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--vocab", type=int, default=512, help="data.vocab_size (a small corpus: 512)")
    parser.add_argument("--cache", default=os.path.join(tempfile.gettempdir(), "aoe-bench-cache"))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as out:
        mp.spawn(_worker, args=(args.ranks, _free_port(), args, out), nprocs=args.ranks, join=True)
        results = [json.loads(Path(out, f"rank{rank}.json").read_text()) for rank in range(args.ranks)]
    print(f"{args.config}, {results[0]['params'] / 1e6:.1f}M parameters, FSDP over {args.ranks} gloo ranks, "
          f"torch {torch.__version__}, {os.cpu_count()} CPUs")
    print("| save | saves | normal step (s) | saving step (s) | stall (s) | steps while writing | overlap extra (s) |")
    print("|---|---|---|---|---|---|---|")
    summary = {mode: _summary([r[mode] for r in results]) for mode in ("sync", "async")}
    for mode, m in summary.items():
        print(f"| {mode} | {m['saves']} | {m['median']:.3f} | {m['saving']:.3f} | {m['stall']:.3f} | "
              f"{m['overlap_steps']:.1f} | {m['overlap_extra']:.3f} |")
    sync, background = summary["sync"], summary["async"]
    print(f"stall: async / sync = {background['stall'] / sync['stall']:.3f}; stall + overlap extra: "
          f"{(background['stall'] + background['overlap_extra']) / sync['stall']:.3f} of the synchronous stall")


if __name__ == "__main__":
    main()
