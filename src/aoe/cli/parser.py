"""The argparse tree of ``aoe``: every command's options and help text, each bound to the function
that runs it."""

from __future__ import annotations

import argparse

from aoe.cli.compare import cmd_compare, cmd_demo
from aoe.cli.evaluate import cmd_eval
from aoe.cli.generate import cmd_generate
from aoe.cli.hf_commands import _add_hf_parsers
from aoe.cli.train import cmd_train

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
recipes: tiny (default), small, paper-732m, paper-4b; override any key as section.key=value (see configs/).
"""


MODEL_PATHS = ("a native checkpoint directory, a run directory (its newest good checkpoint), or a Hugging Face "
               "directory written by aoe export or aoe convert (config.json with model_type 'aoe', *.safetensors, "
               "tokenizer.json)")


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default="tiny", help="a YAML file or a packaged recipe name (default: tiny)")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="config overrides, e.g. model.ffn=moe train.max_steps=500 train.seed=1")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="aoe", description="Autonomy-of-Experts (AoE) and router-MoE language models: train, evaluate, compare.",
        epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    _add_train_parser(sub)
    _add_eval_parser(sub)
    _add_generate_parser(sub)
    _add_compare_parser(sub)
    _add_demo_parser(sub)
    _add_hf_parsers(sub)
    _add_checkpoint_parser(sub)
    return parser


def _add_train_parser(sub) -> None:
    """``aoe train``: the run directory, resuming, and the config overrides."""
    p = sub.add_parser("train", help="train a model (resumable; torchrun for several processes)",
                       epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="run directory: checkpoints/, metrics.jsonl, config.yaml, summary.json")
    p.add_argument("--resume", action="store_true", help="continue from the newest good checkpoint in --out")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    _add_config_args(p)
    p.set_defaults(func=cmd_train)


def _add_eval_parser(sub) -> None:
    """``aoe eval``: the corpus loss, multiple-choice files, lm-eval tasks, the results file."""
    p = sub.add_parser("eval", help="validation loss / perplexity / bits per byte; multiple choice; lm-eval tasks")
    p.add_argument("checkpoint", metavar="MODEL", help=MODEL_PATHS)
    p.add_argument("--data", help="corpus to score (default: the one the model was trained on; for a Hugging Face "
                                  "directory, which does not record it, the default corpus 'stdlib')")
    p.add_argument("--split", default="val", choices=("train", "val"))
    p.add_argument("--cache-dir", default=None, metavar="DIR",
                   help="where the corpus's tokens are cached (default: $AOE_CACHE, else ~/.cache/aoe; never the "
                        "directory the checkpoint's config records)")
    p.add_argument("--seq-len", type=int, default=None,
                   help="window length (default: the training seq_len; for a Hugging Face directory min(128, "
                        "max_seq_len))")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-batches", type=int, default=None, help="score only this many batches")
    p.add_argument("--skip-loss", action="store_true", help="skip the corpus loss (only --mc / --tasks)")
    p.add_argument("--mc", nargs="+", metavar="FILE",
                   help="JSON Lines multiple-choice files {context, choices, label}: acc and acc_norm. Each choice "
                        "is scored after the context and --mc-delimiter, as lm-eval does: write choices without a "
                        "leading space (a file whose choices begin with whitespace gets a warning)")
    p.add_argument("--mc-delimiter", default=" ", metavar="TEXT",
                   help="what goes between the context and each --mc choice (default ' ', lm-eval's "
                        "target_delimiter; '' for files whose choices carry their own leading space)")
    p.add_argument("--tasks", help="comma-separated lm-evaluation-harness tasks (their data must be reachable)")
    p.add_argument("--num-fewshot", type=int, default=0)
    p.add_argument("--limit", type=int, default=None, help="examples per lm-eval task")
    p.add_argument("--device", default=None)
    p.add_argument("--json", metavar="FILE",
                   help="also write the results to FILE in lm-eval's results layout: \"results\" {task: {\"alias\", "
                        "\"acc,none\", \"acc_stderr,none\", ...}}, \"configs\", \"versions\", \"n-shot\", "
                        "\"higher_is_better\", \"n-samples\", \"config\" (model path, batch size, device, dtype, "
                        "limit); the corpus loss is the task corpus_SPLIT (\"loss,none\", \"perplexity,none\", "
                        "\"bits_per_byte,none\", \"unigram_entropy,none\"), each --mc file the task mc_STEM. Changed after "
                        "0.1.0, which wrote only the flat keys (checkpoint, source, split, loss, perplexity, "
                        "bits_per_byte, tokens, unigram_entropy, layers, multiple_choice, tasks): they are kept, "
                        "unchanged, beside the layout's keys at the top level")
    p.set_defaults(func=cmd_eval)


def _add_generate_parser(sub) -> None:
    """``aoe generate``: the prompt and the sampling options."""
    p = sub.add_parser("generate", help="continue a prompt with a trained model")
    p.add_argument("checkpoint", metavar="MODEL", help=MODEL_PATHS)
    p.add_argument("--prompt", action="append", default=None,
                   help="text to continue (default: start of a document); give it several times for several "
                        "prompts, generated together (left-padded): then each result is printed as one JSON line "
                        "{\"prompt\", \"text\"}; row i samples with --seed + i")
    p.add_argument("--prompts-file", metavar="FILE",
                   help="more prompts, one per line (a .jsonl file: a JSON string or {\"prompt\": ...} per line)")
    p.add_argument("--max-new-tokens", type=int, default=100,
                   help="tokens to add (default 100); capped, with a warning, where the prompt and the new tokens "
                        "would pass the model's context (max_seq_len)")
    p.add_argument("--temperature", type=float, default=None, help="softmax temperature (default 0.8; 0 = greedy)")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--greedy", action="store_true",
                   help="argmax decoding (temperature 0; refused with --temperature, --top-k, --top-p or --seed)")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--no-stop", action="store_true", help="do not stop at the end-of-text token")
    p.add_argument("--device", default=None)
    p.set_defaults(func=cmd_generate)


def _add_compare_parser(sub) -> None:
    """``aoe compare``: the variants, seeds and learning-rate sweep of the study."""
    p = sub.add_parser("compare", help="the paper's study: train matched variants and write a report")
    p.add_argument("--out", help="comparison directory (required; results.json, report.md, plots/, one run per variant and seed)")
    p.add_argument("--variants", nargs="+", default=None,
                   help="variants to train (default: dense moe moe_aux aoe aoe_aux; see --list-variants)")
    p.add_argument("--suite", default=None,
                   help="a named suite instead of --variants: paper-table2 = the paper's Table 2, its 12 "
                        "configurations numbered as there (see aoe.compare.suites)")
    p.add_argument("--seeds", nargs="+", default=None, help="training seeds (default: 0)")
    p.add_argument("--lr-sweep", nargs="+", default=None, metavar="LR",
                   help="learning rates to try first: each variant trains at its best one (lowest val loss)")
    p.add_argument("--sweep-steps", type=int, default=None,
                   help="steps of each sweep run (default: train.max_steps; shorter sweeps favour larger lrs)")
    p.add_argument("--mc", nargs="+", default=None, metavar="FILE",
                   help="score every finished run on these multiple-choice JSON Lines files (task = file stem, "
                        "e.g. piqa.jsonl fills Table 2's PIQA column)")
    p.add_argument("--tasks", default=None, help="score every finished run on these lm-eval tasks (comma-separated)")
    p.add_argument("--num-fewshot", type=int, default=0, help="few-shot examples for --tasks (default 0)")
    p.add_argument("--limit", type=int, default=None, help="examples per --tasks task (default: all)")
    p.add_argument("--quiet", action="store_true")
    p.add_argument("--list-variants", action="store_true", help="print the known variants and exit")
    _add_config_args(p)
    p.set_defaults(func=cmd_compare)


def _add_demo_parser(sub) -> None:
    """``aoe demo``: the small MoE vs AoE comparison."""
    p = sub.add_parser("demo", help="the small MoE vs AoE comparison on the embedded corpus (a few minutes on a CPU)")
    p.add_argument("--out", default="runs/demo")
    p.add_argument("--quick", action="store_true", help="a much shorter run (a smoke test)")
    p.set_defaults(func=cmd_demo)


def _add_checkpoint_parser(sub) -> None:
    """``aoe checkpoint consolidate`` (``aoe.cli.checkpoint``: outside aoe.io, whose import loads torch)."""
    from aoe.cli.checkpoint import add_checkpoint_parser

    add_checkpoint_parser(sub)
