"""The options of ``aoe export`` and ``aoe convert``, importing nothing heavy: their commands
(``aoe.hf.commands``, which needs transformers) are imported when they run."""

from __future__ import annotations

import argparse
from typing import Callable

__all__ = ["add_convert_parser", "add_export_parser"]


def _run_later(name: str) -> Callable[[argparse.Namespace], int]:
    """A command function that imports ``aoe.hf.commands`` when called and runs its ``name``."""

    def run(args: argparse.Namespace) -> int:
        from aoe.hf import commands

        return getattr(commands, name)(args)

    run.__name__ = name
    return run


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
    p.set_defaults(func=_run_later("run_export"))
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
    p.set_defaults(func=_run_later("run_convert"))
    return p
