"""argparse wiring of ``aoe export`` and ``aoe convert`` (called from ``aoe.cli``)."""

from __future__ import annotations

import argparse
from pathlib import Path
import sys

from aoe.errors import one_line

__all__ = ["add_export_parser", "add_convert_parser", "run_export", "run_convert"]

_DTYPES = ("float32", "bfloat16", "float16")


def add_export_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "export",
        help="native checkpoint -> Hugging Face directory (or back with --to-native)",
        description="Write a native checkpoint (or run directory: its newest good checkpoint) as a Hugging Face "
                    "directory loadable with AutoModelForCausalLM.from_pretrained after `import aoe`; with "
                    "--to-native, check that an HF aoe directory loads back as a native model and report it.",
    )
    p.add_argument("src", help="native checkpoint or run directory (HF directory with --to-native)")
    p.add_argument("dst", nargs="?", help="destination: a Hugging Face directory (with --to-native: a native run directory; optional)")
    p.add_argument("--dtype", choices=_DTYPES, default=None, help="cast the weights (default: keep them)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty destination")
    p.add_argument("--to-native", action="store_true",
                   help="the reverse: SRC an HF aoe directory -> a native checkpoint in DST (just checked and described without DST)")
    p.set_defaults(func=run_export)
    return p


def add_convert_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "convert",
        help="HF Mixtral / Qwen2-MoE / Qwen3-MoE / OLMoE / Llama / Mistral / Qwen2 checkpoint -> AoE model (Hugging Face directory)",
        description="Drop the router of an MoE checkpoint (Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE; their q/k norms, "
                    "q/k/v biases and shared experts are kept) or upcycle a dense one (Llama, Mistral, Qwen2) into "
                    "experts, and factorize every expert's gate projection by truncated SVD into AoE's w_down @ w_up. "
                    "With --ffn moe an MoE source keeps its router and experts (the native router MoE). "
                    "DeepSeek-V2/V3 are refused (latent attention, grouped routing).",
    )
    p.add_argument("src", help="source Hugging Face checkpoint directory (config.json + *.safetensors)")
    p.add_argument("dst", help="destination directory")
    p.add_argument("--num-experts", type=int, default=None, help="experts (dense sources; default 1; MoE sources keep theirs)")
    p.add_argument("--top-k", type=int, default=None, help="experts per token (default: the source's, or 1)")
    p.add_argument("--d-low", type=int, default=None, help="rank of the factorized gate (default: full rank, lossless)")
    p.add_argument("--upcycle", choices=("copy", "slice"), default="copy", help="dense sources: copy the FFN or slice it")
    p.add_argument("--renormalize", choices=("yes", "no"), default=None,
                   help="renormalize the chosen experts' weights (default: yes for Mixtral and copy, the source's "
                        "norm_topk_prob for Qwen3-MoE / OLMoE, no for slice)")
    p.add_argument("--ffn", choices=("aoe", "moe"), default="aoe",
                   help="aoe (default): drop the routers, factorize the gates; moe: MoE sources only, keep the "
                        "router and the experts as they are (no --d-low)")
    p.add_argument("--dtype", choices=_DTYPES, default=None, help="dtype of the written weights (default: the source's)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty destination")
    p.set_defaults(func=run_convert)
    return p


def run_export(args) -> int:
    import torch

    try:
        if args.to_native:
            from aoe.hf.export import load_aoe_directory

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
