"""``aoe train``: train a model from a recipe and its overrides and print the run's summary."""

from __future__ import annotations

import argparse


def cmd_train(args: argparse.Namespace) -> int:
    from aoe.config import load_config
    from aoe.train import train

    cfg = load_config(args.config, args.overrides)
    summary = train(cfg, args.out, resume=args.resume, progress=not args.quiet)
    if summary.get("world_size", 1) == 1 or _is_main_process():
        skipped = summary.get("skipped_steps") or 0
        note = f" ({skipped} skipped as non-finite, train.nan_policy=skip)" if skipped else ""
        print(f"trained {summary['step']} steps{note} ({summary['tokens']:,} tokens) in {summary['train_time_s']:.1f} s; "
              f"val_loss {summary['val_loss']:.4f} (unigram entropy {summary['unigram_entropy']:.4f}), "
              f"perplexity {summary['perplexity']:.2f}; checkpoint {summary['checkpoint']}")
    return 0


def _is_main_process() -> bool:
    from aoe.train.distributed import launch_ranks

    return launch_ranks().is_main
