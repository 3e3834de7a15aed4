"""``aoe export`` and ``aoe convert``: what they run (their options: ``aoe.cli.hf_options``, which imports
nothing heavy, so that ``aoe --help`` does not import transformers)."""

from __future__ import annotations

import sys
from pathlib import Path

from aoe.errors import one_line

__all__ = ["run_export", "run_convert"]


def run_export(args) -> int:
    import torch

    try:
        if args.to_native:
            from aoe.hf.native import load_aoe_directory

            model = load_aoe_directory(Path(args.src))
            print(f"{args.src}: native {model.extra_repr()}, {model.num_params():,} parameters")
            if args.dst:
                from aoe.io.checkpoint import list_checkpoints, save_model_checkpoint

                if list_checkpoints(args.dst) or (Path(args.dst) / "metrics.jsonl").exists():
                    # a training run's checkpoints are never mixed with an imported model, --overwrite or not
                    print(f"aoe export: error: {args.dst} holds a training run or native checkpoints, which "
                          "--to-native never writes into: choose a new directory (nothing was changed)", file=sys.stderr)
                    return 1
                tokenizer = None
                if (Path(args.src) / "tokenizer.json").is_file():
                    from aoe.data import DataError, Tokenizer

                    try:
                        tokenizer = Tokenizer.load(args.src)
                    except DataError as e:
                        print(f"aoe export: warning: tokenizer not carried over ({e})", file=sys.stderr)
                path = save_model_checkpoint(args.dst, model, tokenizer)
                print(f"wrote native checkpoint {path}")
            return 0
        if not args.dst:
            print("aoe export: DST is required (unless --to-native)", file=sys.stderr)
            return 2
        from aoe.hf.export import export_checkpoint

        dtype = getattr(torch, args.dtype) if args.dtype else None
        export_checkpoint(args.src, args.dst, dtype=dtype, overwrite=args.overwrite)
        print(f"exported {args.src} -> {args.dst}")
        return 0
    except (ValueError, OSError, RuntimeError) as e:
        print(f"aoe export: error: {one_line(e)}", file=sys.stderr)
        return 1


def run_convert(args) -> int:
    from aoe.hf.convert import ConversionError, convert_to_aoe

    renorm = None if args.renormalize is None else args.renormalize == "yes"
    try:
        convert_to_aoe(
            args.src, args.dst, num_experts=args.num_experts, top_k=args.top_k, d_low=args.d_low,
            upcycle=args.upcycle, renormalize=renorm, dtype=args.dtype, overwrite=args.overwrite, ffn=args.ffn,
        )
        return 0
    except (ConversionError, OSError) as e:  # the source, the options or the destination; anything else is a bug
        print(f"aoe convert: error: {one_line(e)}", file=sys.stderr)
        return 1
