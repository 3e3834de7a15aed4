"""argparse wiring of ``aoe checkpoint consolidate`` (outside ``aoe.io``, whose import loads torch, so that
``aoe --help`` imports none; the command imports ``aoe.io`` when it runs)."""

from __future__ import annotations

import argparse
from pathlib import Path

__all__ = ["add_checkpoint_parser", "run_consolidate"]


def add_checkpoint_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("checkpoint", help="checkpoint tools: consolidate a sharded checkpoint")
    sub = p.add_subparsers(dest="checkpoint_command", metavar="ACTION", required=True)
    c = sub.add_parser(
        "consolidate", help="a sharded checkpoint -> the one-process format",
        description="Write a sharded checkpoint (torch.distributed.checkpoint, saved under FSDP or expert "
                    "parallelism), or a run directory's newest good one, in the one-process format "
                    "(model.safetensors and the full optimizer state) under OUT/checkpoints/, with the run's "
                    "config.yaml; `aoe train --out OUT --resume` continues from it in any layout.")
    c.add_argument("src", help="sharded checkpoint directory or run directory")
    c.add_argument("out", help="new run directory to write the consolidated checkpoint into")
    c.set_defaults(func=run_consolidate)
    return p


def run_consolidate(args: argparse.Namespace) -> int:
    from aoe.config import save_config
    from aoe.io.checkpoint import CheckpointError, list_checkpoints, load_run_config
    from aoe.train.consolidate import consolidate

    out = Path(args.out)
    if list_checkpoints(out):
        raise CheckpointError(f"{str(out)!r} already holds checkpoints: choose a new directory (nothing was written)")
    path = consolidate(args.src, out)
    if not (out / "config.yaml").exists():
        save_config(load_run_config(path), out / "config.yaml")
    print(f"consolidated into {path}")
    return 0
