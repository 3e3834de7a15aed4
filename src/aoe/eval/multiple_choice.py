"""Local multiple-choice evaluation, scored exactly like lm-eval's ``multiple_choice`` tasks.

File format (JSON Lines, one example per line; blank lines are skipped; other fields are kept)::

    {"context": "The capital of France is", "choices": ["Paris", "Rome", "Berlin"], "label": 0}

Scoring (lm_eval 0.4.13, ``ConfigurableTask.construct_requests`` / ``process_results``): every
choice is one loglikelihood request ``(context, target_delimiter + choice)`` with
``target_delimiter = " "`` (the task default), ll_i its summed log-probability. Then

* ``acc``      = 1 if argmax_i ll_i == label,
* ``acc_norm`` = 1 if argmax_i ll_i / len(choice_i) == label, where len counts the CHARACTERS of
  the choice string (Python ``len``, without the delimiter),
* ``acc_bytes`` = 1 if argmax_i ll_i / len(choice_i.encode("utf-8")) == label (UTF-8 bytes),

argmax taking the first index on ties (``numpy.argmax``). The reported value is the mean over
examples and its stderr is lm-eval's ``mean_stderr``: the sample standard deviation (n - 1) of
the 0/1 scores divided by sqrt(n) (NaN for n < 2).

Whitespace (lm-eval's convention): the scorer puts ``target_delimiter`` (" ") between the context
and every choice, so write choices WITHOUT a leading space and contexts without a trailing one:
``{"context": "The capital of France is", "choices": ["Paris", "Rome"]}`` is scored on "The
capital of France is Paris". A choice written " Paris" is scored on a double space ("is  Paris"),
which changes its log-likelihood (usually for the worse) and so acc / acc_norm; lm-eval only logs
such a choice at DEBUG level. ``load_multiple_choice`` warns (``MultipleChoiceWhitespaceWarning``,
once per file, naming the file and how many choices) when choices begin with whitespace and the
delimiter ends with it, and (``MultipleChoiceDuplicateWarning``) when examples list the same choice
twice. The scores are computed as lm-eval computes them either way; a file of
space-prefixed choices is scored as intended with ``target_delimiter=""`` (``aoe eval
--mc-delimiter ''``).
"""

from __future__ import annotations

import json
import math
import os
import warnings
from pathlib import Path
from typing import Any, Callable, Sequence

from lm_eval.api.instance import Instance

from aoe.errors import InputError, shown

__all__ = ["MultipleChoiceDuplicateWarning", "MultipleChoiceFormatError", "MultipleChoiceWhitespaceWarning",
           "load_multiple_choice", "load_multiple_choice_files", "validate_example", "score_multiple_choice",
           "DEFAULT_TARGET_DELIMITER"]

#: What lm-eval's multiple_choice tasks put between the context and each choice (their default).
DEFAULT_TARGET_DELIMITER = " "


class MultipleChoiceFormatError(InputError):
    """A malformed multiple-choice file or example (the message names the line and field), or an
    example the model cannot score (a choice longer than its context). A ``ValueError``."""


class MultipleChoiceWhitespaceWarning(UserWarning):
    """A multiple-choice file whose choices begin with whitespace, which the delimiter doubles."""


class MultipleChoiceDuplicateWarning(UserWarning):
    """A multiple-choice file with examples that list the same choice twice (the copies score
    alike and the first wins a tie, so a label on a later copy can never be right)."""


_FILE_WARNINGS = (MultipleChoiceWhitespaceWarning, MultipleChoiceDuplicateWarning)


def validate_example(example: Any, where: str = "example") -> dict:
    """Check one example's fields; return it as a new dict (extra fields kept).

    context: a string (may be empty); choices: a list of at least 2 non-empty strings; label:
    an integer index into choices. ``where`` prefixes error messages (e.g. "data.jsonl:3").
    """
    if not isinstance(example, dict):
        raise MultipleChoiceFormatError(f"{where}: expected a JSON object, got {type(example).__name__}")
    for key in ("context", "choices", "label"):
        if key not in example:
            raise MultipleChoiceFormatError(f"{where}: missing field {key!r}")
    context, choices, label = example["context"], example["choices"], example["label"]
    if not isinstance(context, str):
        raise MultipleChoiceFormatError(f"{where}: field 'context' must be a string, got {type(context).__name__}")
    if not isinstance(choices, list) or len(choices) < 2:
        raise MultipleChoiceFormatError(f"{where}: field 'choices' must be a list of at least 2 strings, got {shown(choices)}")
    for j, choice in enumerate(choices):
        if not isinstance(choice, str) or not choice:
            raise MultipleChoiceFormatError(f"{where}: field 'choices' item {j} must be a non-empty string, got {shown(choice)}")
    if isinstance(label, bool) or not isinstance(label, int):
        raise MultipleChoiceFormatError(f"{where}: field 'label' must be an integer index, got {shown(label)}")
    if not 0 <= label < len(choices):
        raise MultipleChoiceFormatError(f"{where}: field 'label'={label} is out of range for {len(choices)} choices (0..{len(choices) - 1})")
    return dict(example)


def load_multiple_choice(path: str | os.PathLike, target_delimiter: str = DEFAULT_TARGET_DELIMITER) -> list[dict]:
    """Read and validate a JSON Lines multiple-choice file (format in the module docstring).

    Warns (``MultipleChoiceWhitespaceWarning``, once, naming the file and how many choices) when
    choices begin with whitespace and ``target_delimiter`` (the one they will be scored with) ends
    with whitespace: they would be scored after a double space.

    Raises:
        MultipleChoiceFormatError: invalid JSON, a line that is not UTF-8, or a bad field, naming
            ``path:line`` and the field; or a file without examples.
        FileNotFoundError: no such file (OSError for a file that cannot be read).
    """
    path = Path(path)
    examples, lines = [], []
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, start=1):
            where = f"{path}:{lineno}"
            line = _decode_line(raw, where)
            if line.strip():
                examples.append(validate_example(_parse_line(line, where), where))
                lines.append(lineno)
    if not examples:
        raise MultipleChoiceFormatError(f"{path}: no examples (the file is empty)")
    _warn_leading_whitespace(examples, path, target_delimiter)
    _warn_duplicate_choices(examples, lines, path)
    return examples


def load_multiple_choice_files(paths: Sequence[str | os.PathLike], target_delimiter: str = DEFAULT_TARGET_DELIMITER,
                               say: Callable[[str], None] | None = None) -> dict[str, list[dict]]:
    """{path: examples} of every ``--mc`` file, in order, each read and checked before anything
    runs (a bad line fails fast). ``say``: where this module's warnings about a file's choices
    (``MultipleChoiceWhitespaceWarning``, ``MultipleChoiceDuplicateWarning``) go, one message each
    (None: Python's warnings); other warnings pass on as they are.

    Raises:
        MultipleChoiceFormatError: a path that is not a file (naming it), or a bad file.
    """
    loaded = {}
    for path in paths:
        if not Path(path).is_file():
            raise MultipleChoiceFormatError(f"--mc {path}: no such file; give the path of a JSON Lines file of "
                                            "{context, choices, label} objects")
        with warnings.catch_warnings(record=say is not None) as caught:
            if say is not None:
                for category in _FILE_WARNINGS:
                    warnings.simplefilter("always", category)
            loaded[str(path)] = load_multiple_choice(path, target_delimiter=target_delimiter)
        for w in caught or ():
            if issubclass(w.category, _FILE_WARNINGS):
                say(str(w.message))
            else:
                warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    return loaded


def _warn_duplicate_choices(examples: Sequence[dict], lines: Sequence[int], path: Path) -> None:
    """One warning for the file when examples list a choice twice, naming the first and counting
    the labels that point at a later copy (never right: the first copy wins the tie)."""
    repeated, unreachable = [], 0
    for ex, lineno in zip(examples, lines):
        first = {}
        for j, choice in enumerate(ex["choices"]):
            first.setdefault(choice, j)
        if len(first) < len(ex["choices"]):
            repeated.append(lineno)
            unreachable += first[ex["choices"][ex["label"]]] != ex["label"]
    if not repeated:
        return
    warnings.warn(
        f"{path}: {len(repeated)} example(s) list the same choice twice (first on line {repeated[0]}); copies "
        f"score alike and the first one wins, so {unreachable} label(s) on a later copy can never be right: "
        "remove the duplicate choices", MultipleChoiceDuplicateWarning, stacklevel=3)


def _warn_leading_whitespace(examples: Sequence[dict], path: Path, target_delimiter: str) -> None:
    """One warning for the file when choices begin with whitespace that the delimiter doubles
    (lm-eval's rule: the delimiter ends with whitespace and the choice begins with it)."""
    if target_delimiter.rstrip() == target_delimiter:
        return
    choices = [c for ex in examples for c in ex["choices"]]
    spaced = [c for c in choices if c[0].isspace()]
    if not spaced:
        return
    warnings.warn(
        f"{path}: {len(spaced)} of {len(choices)} choices begin with whitespace (e.g. {shown(spaced[0], 40)}); "
        f"the scorer puts {target_delimiter!r} before every choice (lm-eval's target_delimiter), so these are "
        "scored after a double space: remove the leading whitespace from the choices, or score them with the "
        "delimiter '' (aoe eval --mc-delimiter '')",
        MultipleChoiceWhitespaceWarning, stacklevel=3)


def _decode_line(raw: bytes, where: str) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise MultipleChoiceFormatError(f"{where}: not UTF-8 text (byte 0x{raw[e.start]:02x} at column {e.start + 1}); "
                                        "save the file as UTF-8") from None


def _parse_line(line: str, where: str) -> Any:
    try:
        return json.loads(line)
    except json.JSONDecodeError as e:
        raise MultipleChoiceFormatError(f"{where}: invalid JSON at column {e.colno} ({e.msg})") from None
    except RecursionError:
        raise MultipleChoiceFormatError(f"{where}: invalid JSON (nested too deeply)") from None
    except ValueError as e:  # an integer of more digits than Python converts
        raise MultipleChoiceFormatError(f"{where}: invalid JSON ({e})") from None


def _argmax(values: Sequence[float]) -> int:
    """Index of the largest value, the first one on ties (as numpy.argmax)."""
    best = 0
    for i, v in enumerate(values):
        if v > values[best]:
            best = i
    return best


def _mean_stderr(scores: Sequence[float]) -> float:
    n = len(scores)
    if n < 2:
        return float("nan")
    mu = sum(scores) / n
    return math.sqrt(sum((x - mu) ** 2 for x in scores) / (n - 1)) / math.sqrt(n)


def _check_choices_fit(lm, examples: Sequence[dict], target_delimiter: str, where) -> None:
    """Refuse a choice the model cannot score, naming its example and index: one of more tokens
    than the model's context (``lm.max_length``), or none. Checked when ``lm`` tokenizes requests
    with ``encode_pair`` (as ``AoEHarnessLM`` does); other LMs apply their own rules."""
    encode, limit = getattr(lm, "encode_pair", None), getattr(lm, "max_length", None)
    if not callable(encode) or isinstance(limit, bool) or not isinstance(limit, int):
        return
    for i, ex in enumerate(examples):
        for j, choice in enumerate(ex["choices"]):
            _, cont = encode(ex["context"], target_delimiter + choice)
            if not cont:
                raise MultipleChoiceFormatError(f"{where(i)}: choice {j} ({shown(choice, 40)}) leaves no token to score "
                                                "after the context: give a choice with text of its own")
            if len(cont) > limit:
                raise MultipleChoiceFormatError(f"{where(i)}: choice {j} is {len(cont)} tokens long, more than the model's "
                                                f"context of {limit} tokens: shorten it")


def score_multiple_choice(lm, examples: Sequence[dict], target_delimiter: str = DEFAULT_TARGET_DELIMITER, *,
                          source: str | None = None) -> dict:
    """Score examples with ``lm.loglikelihood`` as lm-eval's multiple_choice tasks do.

    Args:
        lm: an ``AoEHarnessLM`` (any lm-eval ``LM`` works).
        examples: dicts with context / choices / label (e.g. from ``load_multiple_choice``).
        target_delimiter: put between context and each choice (the harness default " ").
        source: where the examples come from (e.g. the file's path), named in error messages.

    Raises:
        MultipleChoiceFormatError: an invalid example, no examples, or (with an ``lm`` that has
            ``encode_pair`` and ``max_length``, as ``AoEHarnessLM``) a choice whose tokens do not
            fit the model's context; the message names the example (its index) and the choice.

    Returns:
        {"n", "acc", "acc_stderr", "acc_norm", "acc_norm_stderr", "acc_bytes",
        "acc_bytes_stderr", "predictions"}; predictions[i] = {"label", "pred", "pred_norm",
        "pred_bytes", "loglikelihoods" (one per choice), "is_greedy" (one per choice), "correct",
        "correct_norm", "correct_bytes"}. Definitions in the module docstring.
    """
    def where(i: int) -> str:
        return f"{source}: example {i}" if source else f"example {i}"

    examples = [validate_example(ex, where(i)) for i, ex in enumerate(examples)]
    if not examples:
        raise MultipleChoiceFormatError(f"{source or 'score_multiple_choice'}: no examples")
    _check_choices_fit(lm, examples, target_delimiter, where)
    per_example = _loglikelihoods(lm, examples, target_delimiter)
    predictions = [_prediction(ex, answer) for ex, answer in zip(examples, per_example)]
    out: dict[str, Any] = {"n": len(examples)}
    for metric, field in (("acc", "correct"), ("acc_norm", "correct_norm"), ("acc_bytes", "correct_bytes")):
        scores = [1.0 if p[field] else 0.0 for p in predictions]
        out[metric] = sum(scores) / len(scores)
        out[f"{metric}_stderr"] = _mean_stderr(scores)
    out["predictions"] = predictions
    return out


def _loglikelihoods(lm, examples: Sequence[dict], target_delimiter: str) -> list[list[tuple[float, bool]]]:
    """Each example's (loglikelihood, is_greedy) per choice: one ``lm.loglikelihood`` call over
    every (context, target_delimiter + choice) request, as lm-eval builds them."""
    requests, owner = [], []
    for i, ex in enumerate(examples):
        for j, choice in enumerate(ex["choices"]):
            requests.append(Instance(
                request_type="loglikelihood", doc=ex, arguments=(ex["context"], target_delimiter + choice),
                idx=j, metadata=("local_multiple_choice", i, 1),
            ))
            owner.append(i)
    answers = lm.loglikelihood(requests)
    per_example: list[list[tuple[float, bool]]] = [[] for _ in examples]
    for i, answer in zip(owner, answers):
        per_example[i].append((float(answer[0]), bool(answer[1])))
    return per_example


def _prediction(ex: dict, answer: Sequence[tuple[float, bool]]) -> dict:
    """One example's predictions (raw, per character, per UTF-8 byte) from its choices' answers."""
    lls = [a[0] for a in answer]
    chars = [ll / len(c) for ll, c in zip(lls, ex["choices"])]
    nbytes = [ll / len(c.encode("utf-8")) for ll, c in zip(lls, ex["choices"])]
    pred, pred_norm, pred_bytes = _argmax(lls), _argmax(chars), _argmax(nbytes)
    label = ex["label"]
    return {
        "label": label, "pred": pred, "pred_norm": pred_norm, "pred_bytes": pred_bytes,
        "loglikelihoods": lls, "is_greedy": [a[1] for a in answer],
        "correct": pred == label, "correct_norm": pred_norm == label, "correct_bytes": pred_bytes == label,
    }
