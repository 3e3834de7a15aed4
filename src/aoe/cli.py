"""The ``aoe`` command: train, evaluate, sample, compare, export and convert AoE / MoE language models."""

from __future__ import annotations

import argparse
import json
import math
import shlex
import sys
from pathlib import Path

EXAMPLES = """\
examples:
  aoe train --out runs/aoe                              # the tiny AoE recipe on the embedded corpus
  aoe train --config small --out runs/moe model.ffn=moe train.max_steps=2000
  aoe train --out runs/aoe --resume                     # continue from the newest good checkpoint
  torchrun --nproc_per_node 2 -m aoe.cli train --out runs/ddp   # data parallel (gloo on CPU, nccl on GPU)
  aoe eval runs/aoe                                     # validation loss, perplexity, bits per byte
  aoe eval runs/aoe --mc my_choices.jsonl --tasks piqa  # multiple choice (local files, lm-eval tasks)
  aoe generate runs/aoe --prompt "def main(" --max-new-tokens 80
  aoe compare --out runs/cmp --seeds 0 1                # the paper's study: dense, MoE(+L_aux), AoE(+L_aux)
  aoe export runs/aoe hf/aoe-tiny                       # a Hugging Face transformers directory
  aoe convert mixtral-dir aoe-dir --d-low 256           # drop the routers of an MoE checkpoint
  aoe demo                                              # the small MoE vs AoE comparison (a few minutes)
recipes: tiny (default), small, paper-732m; override any key as section.key=value (see configs/).
"""


class CLIError(Exception):
    """A usage problem reported as ``error: ...`` with exit status 2."""


# ---------------------------------------------------------------------------------------------
# train
# ---------------------------------------------------------------------------------------------
def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default="tiny", help="a YAML file or a packaged recipe name (default: tiny)")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="config overrides, e.g. model.ffn=moe train.max_steps=500 train.seed=1")


def cmd_train(args: argparse.Namespace) -> int:
    from aoe.config import load_config
    from aoe.train import train

    cfg = load_config(args.config, args.overrides)
    summary = train(cfg, args.out, resume=args.resume, progress=not args.quiet)
    if summary.get("world_size", 1) == 1 or _is_main_process():
        print(f"trained {summary['step']} steps ({summary['tokens']:,} tokens) in {summary['train_time_s']:.1f} s; "
              f"val_loss {summary['val_loss']:.4f} (unigram entropy {summary['unigram_entropy']:.4f}), "
              f"perplexity {summary['perplexity']:.2f}; checkpoint {summary['checkpoint']}")
    return 0


def _is_main_process() -> bool:
    import os

    return os.environ.get("RANK", "0") == "0"


# ---------------------------------------------------------------------------------------------
# eval
# ---------------------------------------------------------------------------------------------
def cmd_eval(args: argparse.Namespace) -> int:
    import torch

    from aoe.data import prepare_tokens, unigram_entropy
    from aoe.train.checkpoint import load_model, resolve_checkpoint
    from aoe.train.evaluate import evaluate

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    ckpt = resolve_checkpoint(args.checkpoint)
    model, cfg, tokenizer = load_model(ckpt, device=device)
    results: dict = {"checkpoint": str(ckpt)}
    if not args.skip_loss:
        d = cfg.data
        source = args.data or d.source
        data = prepare_tokens(source, vocab_size=d.vocab_size, tokenizer_path=ckpt / "tokenizer.json",
                              val_fraction=d.val_fraction, max_bytes=d.max_bytes if args.data is None else None,
                              text_field=d.text_field, on_decode_error=d.on_decode_error, cache_dir=d.cache_dir)
        split = data.split(args.split)
        seq_len = args.seq_len or cfg.train.seq_len
        val = evaluate(model, split, batch_size=args.batch_size, seq_len=seq_len, max_batches=args.max_batches,
                       bytes_per_token=data.bytes_per_token(args.split))
        results.update({"source": str(source), "split": args.split, "loss": val["val_loss"],
                        "perplexity": val["val_ppl"], "bits_per_byte": val.get("val_bpb"),
                        "tokens": val["val_tokens"], "unigram_entropy": unigram_entropy(split), "layers": val["layers"]})
        print(f"{args.split} loss {val['val_loss']:.4f} nats/token, perplexity {val['val_ppl']:.2f}, "
              f"bits/byte {val.get('val_bpb', math.nan):.4f} over {val['val_tokens']:,} tokens of {source} "
              f"(unigram entropy {results['unigram_entropy']:.4f})")
        for layer in val["layers"]:
            print(f"  layer {layer['layer']} ({layer['kind']}): Ent_load {layer['ent_load']:.3f}  "
                  f"Ent_conf {layer['ent_conf']:.3f}  max/mean load {layer['imbalance']:.2f}")
    if args.mc or args.tasks:
        from aoe.eval.harness import AoEHarnessLM

        lm = AoEHarnessLM(model, tokenizer, batch_size=args.batch_size, device=device)
        if args.mc:
            from aoe.eval.multiple_choice import load_multiple_choice, score_multiple_choice

            results["multiple_choice"] = {}
            for path in args.mc:
                scores = score_multiple_choice(lm, load_multiple_choice(path))
                results["multiple_choice"][str(path)] = {k: v for k, v in scores.items() if k != "predictions"}
                print(f"{path}: acc {scores['acc']:.4f}  acc_norm {scores['acc_norm']:.4f}  (n={scores['n']})")
        if args.tasks:
            from aoe.eval.harness import run_harness

            tasks = [t for t in args.tasks.split(",") if t]
            results["tasks"] = run_harness(lm, tokenizer, tasks, num_fewshot=args.num_fewshot, limit=args.limit,
                                           batch_size=args.batch_size)
            for task, metrics in results["tasks"].items():
                shown = "  ".join(f"{k} {v:.4f}" for k, v in metrics.items() if isinstance(v, (int, float)))
                print(f"{task}: {shown}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2, default=float))
    return 0


# ---------------------------------------------------------------------------------------------
# generate
# ---------------------------------------------------------------------------------------------
def cmd_generate(args: argparse.Namespace) -> int:
    import torch

    from aoe.model import generate
    from aoe.train.checkpoint import load_model

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model, cfg, tokenizer = load_model(args.checkpoint, device=device)
    if tokenizer is None:
        raise CLIError(f"{args.checkpoint} has no tokenizer.json: cannot encode a text prompt")
    prompt_ids = tokenizer.encode(args.prompt) if args.prompt else [tokenizer.eos_id]
    limit = model.config.max_seq_len
    if len(prompt_ids) >= limit:
        raise CLIError(f"the prompt is {len(prompt_ids)} tokens long; the model's context (max_seq_len) is {limit}: "
                       "shorten the prompt")
    max_new = min(args.max_new_tokens, limit - len(prompt_ids))
    temperature = 0.0 if args.greedy else args.temperature
    out = generate(model, prompt_ids, max_new, temperature=temperature, top_k=args.top_k, top_p=args.top_p,
                   seed=args.seed, eos_id=None if args.no_stop else tokenizer.eos_id)
    text = tokenizer.decode(out.tolist()[len(prompt_ids):])
    print((args.prompt or "") + text)
    return 0


# ---------------------------------------------------------------------------------------------
# compare and demo
# ---------------------------------------------------------------------------------------------
def cmd_compare(args: argparse.Namespace) -> int:
    from aoe.compare.runner import run_comparison

    if not args.out:
        raise CLIError("aoe compare: --out DIR is required")
    _split_overrides(args)
    command = "aoe " + shlex.join(args.argv)
    run_comparison(args.out, config=args.config, overrides=args.overrides, variants=args.variants,
                   seeds=args.seeds, progress=not args.quiet, command=command, lr_sweep=args.lr_sweep,
                   sweep_steps=args.sweep_steps)
    return 0


def _split_overrides(args: argparse.Namespace) -> None:
    """`--seeds 0 1 train.max_steps=500`: key=value items after a list option are overrides."""
    for name in ("seeds", "variants", "lr_sweep"):
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


# ---------------------------------------------------------------------------------------------
# the parser
# ---------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="aoe", description="Autonomy-of-Experts (AoE) and router-MoE language models: train, evaluate, compare.",
        epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("train", help="train a model (resumable; torchrun for several processes)",
                       epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="run directory: checkpoints/, metrics.jsonl, config.yaml, summary.json")
    p.add_argument("--resume", action="store_true", help="continue from the newest good checkpoint in --out")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    _add_config_args(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("eval", help="validation loss / perplexity / bits per byte; multiple choice; lm-eval tasks")
    p.add_argument("checkpoint", help="a checkpoint directory or a run directory (its newest good checkpoint)")
    p.add_argument("--data", help="corpus to score (default: the one the model was trained on)")
    p.add_argument("--split", default="val", choices=("train", "val"))
    p.add_argument("--seq-len", type=int, default=None, help="window length (default: the training seq_len)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-batches", type=int, default=None, help="score only this many batches")
    p.add_argument("--skip-loss", action="store_true", help="skip the corpus loss (only --mc / --tasks)")
    p.add_argument("--mc", nargs="+", metavar="FILE",
                   help="JSON Lines multiple-choice files {context, choices, label}: acc and acc_norm")
    p.add_argument("--tasks", help="comma-separated lm-evaluation-harness tasks (their data must be reachable)")
    p.add_argument("--num-fewshot", type=int, default=0)
    p.add_argument("--limit", type=int, default=None, help="examples per lm-eval task")
    p.add_argument("--device", default=None)
    p.add_argument("--json", help="also write the results to this JSON file")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("generate", help="continue a prompt with a trained model")
    p.add_argument("checkpoint")
    p.add_argument("--prompt", default="", help="text to continue (default: start of a document)")
    p.add_argument("--max-new-tokens", type=int, default=100)
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--greedy", action="store_true", help="argmax decoding (temperature 0)")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--no-stop", action="store_true", help="do not stop at the end-of-text token")
    p.add_argument("--device", default=None)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("compare", help="the paper's study: train matched variants and write a report")
    p.add_argument("--out", help="comparison directory (required; results.json, report.md, plots/, one run per variant and seed)")
    p.add_argument("--variants", nargs="+", default=None,
                   help="variants to train (default: dense moe moe_aux aoe aoe_aux; see --list-variants)")
    p.add_argument("--seeds", nargs="+", default=None, help="training seeds (default: 0)")
    p.add_argument("--lr-sweep", nargs="+", default=None, metavar="LR",
                   help="learning rates to try first: each variant trains at its best one (lowest val loss)")
    p.add_argument("--sweep-steps", type=int, default=None,
                   help="steps of each sweep run (default: train.max_steps; shorter sweeps favour larger lrs)")
    p.add_argument("--quiet", action="store_true")
    p.add_argument("--list-variants", action="store_true", help="print the known variants and exit")
    _add_config_args(p)
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser("demo", help="the small MoE vs AoE comparison on the embedded corpus (a few minutes on a CPU)")
    p.add_argument("--out", default="runs/demo")
    p.add_argument("--quick", action="store_true", help="a much shorter run (a smoke test)")
    p.set_defaults(func=cmd_demo)

    try:
        from aoe.hf.commands import add_convert_parser, add_export_parser
    except ImportError as e:  # transformers missing: the other commands still work
        _missing = str(e)

        def _unavailable(args):
            raise CLIError(f"this command needs the 'hf' extra (pip install 'autonomy-of-experts[hf]'): {_missing}")

        for name in ("export", "convert"):
            sub.add_parser(name, help="(needs transformers)").set_defaults(func=_unavailable)
    else:
        add_export_parser(sub)
        add_convert_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    from aoe.config import ConfigError
    from aoe.data import DataError
    from aoe.train.checkpoint import CheckpointError
    from aoe.train.trainer import TrainingError

    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    args.argv = argv
    if getattr(args, "list_variants", False):
        from aoe.compare.variants import describe_variants
        from aoe.config import load_config

        _split_overrides(args)
        print(describe_variants(load_config(args.config, args.overrides).model))
        return 0
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    try:
        return int(args.func(args) or 0)
    except (CLIError, ConfigError, DataError, CheckpointError, TrainingError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except ValueError as e:  # bad values reaching the library (prompt ids, shapes): name them, no traceback
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
