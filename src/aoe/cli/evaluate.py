"""``aoe eval``: the corpus loss, the --mc multiple-choice files and the lm-eval tasks of a model,
printed and, with --json, written in lm-eval's results layout."""

from __future__ import annotations

import argparse
import json
import math
import sys

from aoe.cli.common import CLIError, _check, _check_tokenizer, _device


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
