"""The ``aoe`` command: train, evaluate, sample, compare, export and convert AoE / MoE language models.

This module runs it: ``main`` parses the command line, calls the command and reports the user's
errors as one ``error: ...`` line. The commands live in the submodules (``train``, ``evaluate``,
``generate``, ``compare``, ``hf_commands``), their options in ``parser``, what they share in
``common``; each imports torch and the other heavy modules only when its command runs."""

from __future__ import annotations

import sys

from aoe.errors import InputError, one_line
from aoe.cli.common import CLIError
from aoe.cli.compare import cmd_list_variants
from aoe.cli.parser import build_parser

# The names the single module ``aoe.cli`` had, importable from here as before.
from aoe.cli.common import _check, _check_tokenizer, _device  # noqa: F401
from aoe.cli.compare import _split_overrides, cmd_compare, cmd_demo  # noqa: F401
from aoe.cli.evaluate import (  # noqa: F401
    _check_eval_args, _check_eval_flags_apply, _corpus_loss, _eval_config, _load_mc_files, _recorded_source,
    _run_tasks, _score_mc_files, _task_names, cmd_eval)
from aoe.cli.generate import (  # noqa: F401
    _check_generate_args, _check_sampling_flags, _encoded_prompts, _jsonl_prompt, _new_token_budget, _prompts,
    _read_prompts_file, cmd_generate)
from aoe.cli.hf_commands import _add_hf_parsers, _needs_hf, _reporting_missing_hf  # noqa: F401
from aoe.cli.parser import (  # noqa: F401
    EXAMPLES, MODEL_PATHS, _add_checkpoint_parser, _add_compare_parser, _add_config_args, _add_demo_parser,
    _add_eval_parser, _add_generate_parser, _add_train_parser)
from aoe.cli.train import _is_main_process, cmd_train  # noqa: F401


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
