"""The ``aoe`` command: train, evaluate, sample, compare, export and convert AoE / MoE language models."""

from __future__ import annotations

import argparse
import json
import math
import shlex
import sys
from pathlib import Path

from aoe.errors import InputError, one_line

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


class CLIError(InputError):
    """A usage problem reported as ``error: ...`` with exit status 2."""


def _reported_errors() -> tuple[type[BaseException], ...]:
    """The exceptions ``main`` reports as one ``error: ...`` line (exit status 2): the user's input
    (``InputError``: ConfigError, CLIError, MultipleChoiceFormatError, ConversionError), a corpus or
    tokenizer (DataError), a checkpoint (CheckpointError), a run that cannot go on (TrainingError),
    and the system refusing a file operation (OSError: the message names the path). Anything else
    is a bug and keeps its traceback."""
    from aoe.data import DataError
    from aoe.io.checkpoint import CheckpointError
    from aoe.train.trainer import TrainingError

    return (InputError, DataError, CheckpointError, TrainingError, OSError)


def _check(ok: bool, flag: str, value, rule: str) -> None:
    """Refuse a command-line value that breaks ``rule``, naming the flag."""
    if not ok:
        raise CLIError(f"{flag} {value} {rule}")


def _device(name: str | None) -> str:
    """The --device to use: the given torch device, checked, or cuda when available, else cpu."""
    from aoe.utils.device import resolve_device

    return str(resolve_device(name, error=CLIError))


def _check_tokenizer(loaded) -> None:
    """A model's tokenizer (``aoe.io.models.LoadedModel``) must exist and give ids its model has
    embeddings for."""
    if loaded.tokenizer is None:
        raise CLIError(f"{loaded.tokenizer_missing}: cannot encode text for this model")
    vocab, size = loaded.model.config.vocab_size, loaded.tokenizer.vocab_size
    if size > vocab:
        raise CLIError(f"{loaded.path}: its tokenizer has {size} tokens, more than the model's "
                       f"vocab_size={vocab}: the tokenizer.json does not belong to this model")


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
        skipped = summary.get("skipped_steps") or 0
        note = f" ({skipped} skipped as non-finite, train.nan_policy=skip)" if skipped else ""
        print(f"trained {summary['step']} steps{note} ({summary['tokens']:,} tokens) in {summary['train_time_s']:.1f} s; "
              f"val_loss {summary['val_loss']:.4f} (unigram entropy {summary['unigram_entropy']:.4f}), "
              f"perplexity {summary['perplexity']:.2f}; checkpoint {summary['checkpoint']}")
    return 0


def _is_main_process() -> bool:
    from aoe.train.distributed import launch_ranks

    return launch_ranks().is_main


# ---------------------------------------------------------------------------------------------
# eval
# ---------------------------------------------------------------------------------------------
def _check_eval_args(args: argparse.Namespace) -> None:
    _check(args.batch_size >= 1, "--batch-size", args.batch_size, "must be at least 1")
    _check(args.seq_len is None or args.seq_len >= 1, "--seq-len", args.seq_len, "must be at least 1")
    _check(args.max_batches is None or args.max_batches >= 1, "--max-batches", args.max_batches, "must be at least 1")
    _check(args.num_fewshot >= 0, "--num-fewshot", args.num_fewshot, "must be >= 0")
    _check(args.limit is None or args.limit >= 1, "--limit", args.limit, "must be at least 1")
    if args.tasks is not None and not _task_names(args.tasks):
        raise CLIError(f"--tasks {args.tasks!r} names no task: give comma-separated lm-eval tasks, e.g. piqa,arc_easy")
    _check_eval_flags_apply(args)


def _check_eval_flags_apply(args: argparse.Namespace) -> None:
    """Refuse eval options that the other options leave with nothing to do."""
    if args.skip_loss:
        unused = [flag for flag, value in (("--data", args.data), ("--seq-len", args.seq_len),
                                           ("--max-batches", args.max_batches), ("--cache-dir", args.cache_dir))
                  if value is not None]
        if unused:
            raise CLIError(f"--skip-loss skips the corpus loss, so {', '.join(unused)} would do nothing: drop "
                           f"{'them' if len(unused) > 1 else 'it'}, or drop --skip-loss")
    if args.tasks is None:
        unused = [flag for flag, value in (("--num-fewshot", args.num_fewshot or None), ("--limit", args.limit))
                  if value is not None]
        if unused:
            raise CLIError(f"{', '.join(unused)} {'apply' if len(unused) > 1 else 'applies'} to lm-eval tasks only: "
                           "add --tasks, or drop " + ("them" if len(unused) > 1 else "it"))


def _task_names(tasks: str) -> list[str]:
    return [t.strip() for t in tasks.split(",") if t.strip()]


def _load_mc_files(paths: list[str], delimiter: str) -> dict[str, list[dict]]:
    """Every --mc file read and checked before the model is loaded (a bad line fails fast); a file
    whose choices begin with whitespace, or that lists a choice twice, gets one ``warning:`` line
    on stderr for each."""
    from aoe.eval.multiple_choice import load_multiple_choice_files

    return load_multiple_choice_files(paths, delimiter, say=lambda message: print(f"warning: {message}", file=sys.stderr))


def _run_tasks(lm, tokenizer, args: argparse.Namespace) -> dict:
    """lm-eval tasks (lm-eval's own results); an unknown task or unreachable task data is reported
    as a CLIError."""
    from aoe.eval.harness import TaskDataUnavailableError
    from aoe.eval.tasks import run_harness

    try:
        return run_harness(lm, tokenizer, _task_names(args.tasks), num_fewshot=args.num_fewshot, limit=args.limit,
                           batch_size=args.batch_size, raw=True)
    except TaskDataUnavailableError as e:
        raise CLIError(str(e)) from None
    except ValueError as e:  # run_harness documents this ValueError for a task name it does not know
        if not str(e).startswith("unknown lm-eval task"):
            raise
        raise CLIError(f"--tasks: {e}") from None


def _corpus_loss(loaded, args: argparse.Namespace):
    """The corpus loss, printed: (``aoe.io.results.LocalTask`` ``corpus_{split}``, the keys the
    --json file of earlier versions had for it: loss, perplexity, ..., the per-layer routing)."""
    from aoe.data import prepare_tokens, unigram_entropy
    from aoe.data.tokenizer import EOS_TOKEN
    from aoe.io.results import corpus_task
    from aoe.train.evaluate import evaluate

    model, d = loaded.model, loaded.config.data
    if loaded.tokenizer is None:
        raise CLIError(f"{loaded.tokenizer_missing}: the corpus loss needs the model's tokenizer")
    if loaded.tokenizer.eos_token != EOS_TOKEN:
        raise CLIError(f"{loaded.path}: the corpus loss needs a tokenizer whose document separator is {EOS_TOKEN!r}; "
                       f"this model's ends documents with {loaded.tokenizer.eos_token!r}: pass --skip-loss "
                       "(--mc and --tasks work)")
    source = args.data or _recorded_source(loaded)
    data = prepare_tokens(source, vocab_size=d.vocab_size, tokenizer_path=loaded.tokenizer_file,
                          val_fraction=d.val_fraction, max_bytes=d.max_bytes if args.data is None else None,
                          text_field=d.text_field, on_decode_error=d.on_decode_error, cache_dir=args.cache_dir)
    split = data.split(args.split)
    seq_len = loaded.config.train.seq_len if args.seq_len is None else args.seq_len
    _check(seq_len <= model.config.max_seq_len, "--seq-len", seq_len,
           f"exceeds the model's context (max_seq_len={model.config.max_seq_len})")
    val = evaluate(model, split, batch_size=args.batch_size, seq_len=seq_len, max_batches=args.max_batches,
                   bytes_per_token=data.bytes_per_token(args.split))
    entropy = unigram_entropy(split)
    print(f"{args.split} loss {val['val_loss']:.4f} nats/token, perplexity {val['val_ppl']:.2f}, "
          f"bits/byte {val.get('val_bpb', math.nan):.4f} over {val['val_tokens']:,} tokens of {source} "
          f"(unigram entropy {entropy:.4f})")
    for layer in val["layers"]:
        print(f"  layer {layer['layer']} ({layer['kind']}): Ent_load {layer['ent_load']:.3f}  "
              f"Ent_conf {layer['ent_conf']:.3f}  max/mean load {layer['imbalance']:.2f}")
    settings = {"seq_len": seq_len, "batch_size": args.batch_size, "max_batches": args.max_batches,
                "val_fraction": d.val_fraction, "max_bytes": d.max_bytes if args.data is None else None}
    earlier = {"source": str(source), "split": args.split, "loss": val["val_loss"], "perplexity": val["val_ppl"],
               "bits_per_byte": val.get("val_bpb"), "tokens": val["val_tokens"], "unigram_entropy": entropy,
               "layers": val["layers"]}
    return corpus_task(args.split, str(source), val, entropy, len(split), settings), earlier


def _recorded_source(loaded) -> str:
    """The corpus the model was trained on (its config's data.source), said on stderr when it is
    local files: a checkpoint's record chooses what is read only where --data does not."""
    source = loaded.config.data.source
    if str(source) != "stdlib" and not str(source).startswith("hf:"):
        print(f"note: scoring the corpus this model records, data.source={source!r}; pass --data to score "
              "another", file=sys.stderr)
    return source


def _score_mc_files(lm, mc_files: dict[str, list[dict]], delimiter: str, taken: set[str]) -> tuple[list, dict]:
    """Each --mc file scored, printed: (an ``aoe.io.results.LocalTask`` ``mc_{stem}`` each, {path:
    scores} as the --json file of earlier versions had them)."""
    from aoe.eval.multiple_choice import score_multiple_choice
    from aoe.io.results import local_task_name, multiple_choice_task

    tasks, earlier = [], {}
    for path, examples in mc_files.items():
        scores = score_multiple_choice(lm, examples, target_delimiter=delimiter, source=str(path))
        name = local_task_name("mc", path, taken)
        taken.add(name)
        tasks.append(multiple_choice_task(name, str(path), scores, delimiter))
        earlier[str(path)] = {k: v for k, v in scores.items() if k != "predictions"}
        print(f"{path}: acc {scores['acc']:.4f}  acc_norm {scores['acc_norm']:.4f}  (n={scores['n']})")
    return tasks, earlier


def _eval_config(loaded, args: argparse.Namespace, device: str) -> dict:
    """The top-level "config" of the --json file (lm-eval's keys, and the model's path and kind)."""
    model = loaded.model
    return {
        "model": str(loaded.path), "model_args": {"path": str(args.checkpoint), "kind": loaded.kind},
        "model_num_parameters": sum(p.numel() for p in model.parameters()),
        "model_dtype": str(next(model.parameters()).dtype), "batch_size": args.batch_size, "batch_sizes": [],
        "device": device, "limit": args.limit, "num_fewshot": args.num_fewshot,
        "mc_delimiter": args.mc_delimiter if args.mc else None, "max_batches": args.max_batches,
    }


def cmd_eval(args: argparse.Namespace) -> int:
    from aoe.io.models import load_any

    _check_eval_args(args)
    device = _device(args.device)
    mc_files = _load_mc_files(args.mc, args.mc_delimiter) if args.mc else {}
    loaded = load_any(args.checkpoint, device=device)
    if args.mc or args.tasks:
        _check_tokenizer(loaded)
    local, harness, earlier = [], None, {"checkpoint": str(loaded.path)}  # earlier: the keys of 0.1.0's --json
    if not args.skip_loss:
        corpus, earlier_corpus = _corpus_loss(loaded, args)
        local.append(corpus)
        earlier.update(earlier_corpus)
    if args.mc or args.tasks:
        from aoe.eval.harness import AoEHarnessLM

        lm = AoEHarnessLM(loaded.model, loaded.tokenizer, batch_size=args.batch_size, device=device)
        if args.mc:
            taken = {t.name for t in local} | set(_task_names(args.tasks or ""))
            mc_tasks, earlier["multiple_choice"] = _score_mc_files(lm, mc_files, args.mc_delimiter, taken)
            local += mc_tasks
        if args.tasks:
            from aoe.eval.tasks import flatten_results

            harness = _run_tasks(lm, loaded.tokenizer, args)
            earlier["tasks"] = flatten_results(harness)
            for task, metrics in earlier["tasks"].items():
                shown = "  ".join(f"{k} {v:.4f}" for k, v in metrics.items() if isinstance(v, (int, float)))
                print(f"{task}: {shown}")
    if args.json:
        from aoe.io.results import json_default, results_layout
        from aoe.utils.files import atomic_write_text

        layout = results_layout(local, _eval_config(loaded, args, device), harness, extra=earlier)
        atomic_write_text(args.json, json.dumps(layout, indent=2, default=json_default, ensure_ascii=False))
    return 0


# ---------------------------------------------------------------------------------------------
# generate
# ---------------------------------------------------------------------------------------------
def _check_generate_args(args: argparse.Namespace) -> None:
    _check(args.max_new_tokens >= 0, "--max-new-tokens", args.max_new_tokens, "must be >= 0")
    _check(args.temperature is None or args.temperature >= 0, "--temperature", args.temperature,
           "must be >= 0 (0 = greedy)")
    _check(args.top_k is None or args.top_k >= 1, "--top-k", args.top_k, "must be at least 1")
    _check(args.top_p is None or 0 < args.top_p <= 1, "--top-p", args.top_p, "must be in (0, 1]")
    _check_sampling_flags(args)


def _check_sampling_flags(args: argparse.Namespace) -> None:
    """Refuse sampling flags (and the sampling seed) that greedy decoding would ignore."""
    greedy = "--greedy" if args.greedy else "--temperature 0" if args.temperature == 0 else None
    if greedy is None:
        return
    unused = [flag for flag, value in (("--temperature", None if args.temperature == 0 else args.temperature),
                                       ("--top-k", args.top_k), ("--top-p", args.top_p), ("--seed", args.seed))
              if value is not None]
    if unused:
        raise CLIError(f"{greedy} takes the most likely token, so {', '.join(unused)} would do nothing: drop "
                       f"{'them' if len(unused) > 1 else 'it'}, or drop {greedy} to sample")


def _prompts(args: argparse.Namespace) -> list[str]:
    """The prompts of --prompt (each one) and --prompts-file (one per line; in a .jsonl file a JSON
    string or {"prompt": ...} per line); [""] (the start of a document) when none is given."""
    prompts = list(args.prompt or [])
    if args.prompts_file:
        prompts += _read_prompts_file(Path(args.prompts_file))
    return prompts or [""]


def _read_prompts_file(path: Path) -> list[str]:
    """The non-blank lines of a prompts file (see ``_prompts``)."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise CLIError(f"--prompts-file {str(path)!r}: cannot read it as UTF-8 text ({e})") from None
    if path.suffix != ".jsonl":
        return [line for line in lines if line.strip()]
    prompts = []
    for number, line in enumerate(lines, start=1):
        if line.strip():
            prompts.append(_jsonl_prompt(line, f"{path}:{number}"))
    return prompts


def _jsonl_prompt(line: str, where: str) -> str:
    try:
        value = json.loads(line)
    except (json.JSONDecodeError, RecursionError) as e:
        raise CLIError(f"--prompts-file {where}: not JSON ({e}); write one JSON string or {{\"prompt\": ...}} "
                       "per line") from None
    value = value.get("prompt") if isinstance(value, dict) else value
    if not isinstance(value, str):
        raise CLIError(f"--prompts-file {where}: expected a JSON string or an object with a \"prompt\" string")
    return value


def _new_token_budget(requested: int, prompt_len: int, limit: int) -> int:
    """``requested``, capped (with a warning on stderr) so that prompt and new tokens fit the context."""
    room = limit - prompt_len
    if requested > room:
        print(f"warning: --max-new-tokens {requested} capped to {room}: the model's context (max_seq_len={limit}) "
              f"holds the prompt's {prompt_len} token(s) and at most {room} new ones", file=sys.stderr)
        return room
    return requested


def _encoded_prompts(prompts: list[str], tokenizer, limit: int) -> list[list[int]]:
    """Each prompt's ids (an empty prompt: the end-of-text token), refused when one fills the context."""
    encoded = [(tokenizer.encode(p) if p else []) or [tokenizer.eos_id] for p in prompts]
    for number, ids in enumerate(encoded, start=1):
        if len(ids) >= limit:
            which = "the prompt" if len(encoded) == 1 else f"prompt {number}"
            raise CLIError(f"{which} is {len(ids)} tokens long; the model's context (max_seq_len) is {limit}: "
                           "shorten the prompt")
    return encoded


def cmd_generate(args: argparse.Namespace) -> int:
    from aoe.model import generate
    from aoe.io.models import load_any

    _check_generate_args(args)
    prompts = _prompts(args)
    device = _device(args.device)
    loaded = load_any(args.checkpoint, device=device)
    _check_tokenizer(loaded)
    model, tokenizer = loaded.model, loaded.tokenizer
    limit = model.config.max_seq_len
    encoded = _encoded_prompts(prompts, tokenizer, limit)
    max_new = _new_token_budget(args.max_new_tokens, max(len(ids) for ids in encoded), limit)
    temperature = 0.0 if args.greedy else 0.8 if args.temperature is None else args.temperature
    out = generate(model, encoded, max_new, temperature=temperature, top_k=args.top_k, top_p=args.top_p,
                   seed=args.seed, eos_id=None if args.no_stop else tokenizer.eos_id)
    texts = [prompt + tokenizer.decode(row[len(ids):]) for prompt, ids, row in zip(prompts, encoded, out)]
    if len(texts) == 1:
        print(texts[0])
    else:
        for prompt, text in zip(prompts, texts):
            print(json.dumps({"prompt": prompt, "text": text}, ensure_ascii=False))
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


# ---------------------------------------------------------------------------------------------
# the parser
# ---------------------------------------------------------------------------------------------
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


def _add_hf_parsers(sub) -> None:
    """``aoe export`` and ``aoe convert`` (``aoe.hf_cli``; transformers is imported only when one
    runs); without transformers, or with one aoe cannot use, two commands that say they need it."""
    import importlib.util

    from aoe.hf_cli import add_convert_parser, add_export_parser

    if importlib.util.find_spec("transformers") is None:
        for name in ("export", "convert"):
            unavailable = _needs_hf("transformers is not installed")
            sub.add_parser(name, help="(needs transformers)").set_defaults(func=unavailable)
        return
    for add in (add_export_parser, add_convert_parser):
        parser = add(sub)
        parser.set_defaults(func=_reporting_missing_hf(parser.get_default("func")))


def _needs_hf(why: str):
    def unavailable(args):
        raise CLIError(f"this command needs the 'hf' extra (pip install 'autonomy-of-experts[hf]'): {why}")

    return unavailable


def _reporting_missing_hf(run):
    """``run``, with an ImportError of the Hugging Face modules (an incompatible transformers)
    reported as the missing 'hf' extra."""

    def guarded(args):
        try:
            from aoe.hf import commands  # noqa: F401  (imports transformers)
        except ImportError as e:
            _needs_hf(str(e))(args)
        return run(args)

    return guarded


def _add_checkpoint_parser(sub) -> None:
    """``aoe checkpoint consolidate`` (``aoe.checkpoint_cli``: outside aoe.io, whose import loads torch)."""
    from aoe.checkpoint_cli import add_checkpoint_parser

    add_checkpoint_parser(sub)


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


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    args.argv = argv
    if getattr(args, "list_variants", False):
        args.func = cmd_list_variants
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    reported = _reported_errors()
    try:
        return int(args.func(args) or 0)
    except reported as e:
        print(f"error: {one_line(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
