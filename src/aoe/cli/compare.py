"""``aoe compare``, ``aoe compare --list-variants`` and ``aoe demo``: the study of matched variants."""

from __future__ import annotations

import argparse
import shlex

from aoe.cli.common import CLIError


def cmd_compare(args: argparse.Namespace) -> int:
    from aoe.compare.runner import run_comparison

    if not args.out:
        raise CLIError("aoe compare: --out DIR is required")
    _split_overrides(args)
    command = "aoe " + shlex.join(args.argv)
    from aoe.compare.downstream import plan_downstream

    downstream = plan_downstream(args.mc, args.tasks, args.num_fewshot, args.limit)
    run_comparison(args.out, config=args.config, overrides=args.overrides, variants=args.variants,
                   seeds=args.seeds, progress=not args.quiet, command=command, lr_sweep=args.lr_sweep,
                   sweep_steps=args.sweep_steps, suite=args.suite, downstream=downstream)
    return 0


def _split_overrides(args: argparse.Namespace) -> None:
    """`--seeds 0 1 train.max_steps=500`: key=value items after a list option are overrides."""
    for name in ("seeds", "variants", "lr_sweep", "mc"):
        items = getattr(args, name, None) or []
        kept = [i for i in items if "=" not in i]
        args.overrides = [i for i in items if "=" in i] + list(args.overrides)
        setattr(args, name, kept or None)
    try:
        args.seeds = [int(s) for s in args.seeds] if args.seeds else [0]
    except ValueError:
        raise CLIError(f"--seeds takes integers, got {args.seeds}") from None
    try:
        args.lr_sweep = [float(lr) for lr in args.lr_sweep] if getattr(args, "lr_sweep", None) else None
    except ValueError:
        raise CLIError(f"--lr-sweep takes learning rates (numbers), got {args.lr_sweep}") from None


def cmd_demo(args: argparse.Namespace) -> int:
    from aoe.compare.demo import run_demo

    return run_demo(args.out, quick=args.quick)


def cmd_list_variants(args: argparse.Namespace) -> int:
    from aoe.compare.variants import describe_variants
    from aoe.config import load_config

    _split_overrides(args)
    model = load_config(args.config, args.overrides).model
    if getattr(args, "suite", None):
        from aoe.compare.suites import describe_suite

        print(describe_suite(args.suite, model))
    else:
        print(describe_variants(model))
    return 0
