from __future__ import annotations

import json
import math

import pytest

from aoe.eval import AoEHarnessLM, MultipleChoiceFormatError, load_multiple_choice, score_multiple_choice

from .test_harness import direct_logprob, split_like_harness

EXAMPLES = [
    {"context": "the cat sat on", "choices": ["a mat", "paris", "the blue green model"], "label": 0},
    {"context": "experts route each token to", "choices": ["themselves", "rome"], "label": 1, "id": "x"},
    {"context": "red blue", "choices": ["green", "yes", "no", "because"], "label": 2},
    {"context": "", "choices": ["the cat", "the question"], "label": 0},
    {"context": "question answer", "choices": ["yes", "no"], "label": 0},
]


def write_jsonl(path, rows, raw_lines=()):
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
        for line in raw_lines:
            f.write(line + "\n")
    return path


def test_load_roundtrip(tmp_path):
    path = write_jsonl(tmp_path / "mc.jsonl", EXAMPLES[:2], raw_lines=["", json.dumps(EXAMPLES[2])])
    loaded = load_multiple_choice(path)
    assert loaded == EXAMPLES[:3]


@pytest.mark.parametrize("line, message", [
    ("{not json", r"mc.jsonl:2: invalid JSON"),
    ('[1, 2]', r"mc.jsonl:2: expected a JSON object"),
    ('{"choices": ["a", "b"], "label": 0}', r"mc.jsonl:2: missing field 'context'"),
    ('{"context": 3, "choices": ["a", "b"], "label": 0}', r"mc.jsonl:2: field 'context' must be a string"),
    ('{"context": "c", "choices": "ab", "label": 0}', r"mc.jsonl:2: field 'choices'"),
    ('{"context": "c", "choices": ["a"], "label": 0}', r"mc.jsonl:2: field 'choices' must be a list of at least 2"),
    ('{"context": "c", "choices": ["a", 7], "label": 0}', r"mc.jsonl:2: field 'choices' item 1"),
    ('{"context": "c", "choices": ["a", ""], "label": 0}', r"mc.jsonl:2: field 'choices' item 1"),
    ('{"context": "c", "choices": ["a", "b"], "label": "0"}', r"mc.jsonl:2: field 'label' must be an integer"),
    ('{"context": "c", "choices": ["a", "b"], "label": true}', r"mc.jsonl:2: field 'label' must be an integer"),
    ('{"context": "c", "choices": ["a", "b"], "label": 2}', r"mc.jsonl:2: field 'label'=2 is out of range"),
    ('{"context": "c", "choices": ["a", "b"], "label": -1}', r"mc.jsonl:2: field 'label'=-1 is out of range"),
])
def test_malformed_lines_rejected(tmp_path, line, message):
    path = write_jsonl(tmp_path / "mc.jsonl", EXAMPLES[:1], raw_lines=[line])
    with pytest.raises(MultipleChoiceFormatError, match=message):
        load_multiple_choice(path)


def test_empty_file_rejected(tmp_path):
    path = tmp_path / "empty.jsonl"
    path.write_text("\n\n")
    with pytest.raises(MultipleChoiceFormatError, match="no examples"):
        load_multiple_choice(path)


def test_scores_match_direct_computation(model, tokenizer):
    lm = AoEHarnessLM(model, tokenizer, batch_size=3)
    out = score_multiple_choice(lm, EXAMPLES)
    assert out["n"] == len(EXAMPLES)
    acc, acc_norm = [], []
    for ex, pred in zip(EXAMPLES, out["predictions"]):
        lls = []
        for choice in ex["choices"]:
            if ex["context"]:
                ctx, cont = split_like_harness(tokenizer, ex["context"], " " + choice)
            else:
                ctx, cont = [tokenizer.eos_id], tokenizer.encode(" " + choice)
            lls.append(direct_logprob(model, ctx, cont)[0])
        assert pred["loglikelihoods"] == pytest.approx(lls, abs=1e-4)
        best = max(range(len(lls)), key=lambda i: lls[i])
        best_norm = max(range(len(lls)), key=lambda i: lls[i] / len(ex["choices"][i]))
        assert pred["pred"] == best and pred["pred_norm"] == best_norm
        acc.append(float(best == ex["label"]))
        acc_norm.append(float(best_norm == ex["label"]))
    assert out["acc"] == pytest.approx(sum(acc) / len(acc))
    assert out["acc_norm"] == pytest.approx(sum(acc_norm) / len(acc_norm))
    n, m = len(acc), sum(acc) / len(acc)
    assert out["acc_stderr"] == pytest.approx(math.sqrt(sum((a - m) ** 2 for a in acc) / (n - 1) / n))


def test_stub_lm_hand_checked():
    """Hand-made loglikelihoods: acc picks the largest sum, acc_norm divides by characters."""
    class Stub:
        def __init__(self, table):
            self.table = table
            self.seen = []

        def loglikelihood(self, requests):
            self.seen += [r.args for r in requests]
            return [(self.table[r.args[1]], False) for r in requests]

    # " aa": -2 (per char of "aa": -1); " bbbbbb": -3 (per char: -0.5); " é": -1.5 (per char -1.5, per byte -0.75)
    stub = Stub({" aa": -2.0, " bbbbbb": -3.0, " é": -1.5})
    examples = [
        {"context": "q1", "choices": ["aa", "bbbbbb"], "label": 0},   # acc 1, acc_norm 0
        {"context": "q2", "choices": ["aa", "bbbbbb"], "label": 1},   # acc 0, acc_norm 1
        {"context": "q3", "choices": ["aa", "é"], "label": 1},        # acc 1 (-1.5 > -2), norm 0 (-1.5 < -1), bytes 1
    ]
    out = score_multiple_choice(stub, examples)
    assert stub.seen[:2] == [("q1", " aa"), ("q1", " bbbbbb")]
    assert [p["pred"] for p in out["predictions"]] == [0, 0, 1]
    assert [p["pred_norm"] for p in out["predictions"]] == [1, 1, 0]
    assert [p["pred_bytes"] for p in out["predictions"]] == [1, 1, 1]
    assert out["acc"] == pytest.approx(2 / 3) and out["acc_norm"] == pytest.approx(1 / 3)
    assert out["acc_bytes"] == pytest.approx(2 / 3)
    assert out["acc_stderr"] == pytest.approx(math.sqrt(1 / 3) / math.sqrt(3))
    with pytest.raises(MultipleChoiceFormatError, match="example 0: field 'label'=5"):
        score_multiple_choice(stub, [{"context": "q", "choices": ["aa", "b"], "label": 5}])


def test_a_line_that_is_not_utf8_names_the_file_and_line(tmp_path):
    path = write_jsonl(tmp_path / "mc.jsonl", EXAMPLES[:1])
    with open(path, "ab") as f:
        f.write(b'{"context": "caf\xe9", "choices": ["a", "b"], "label": 0}\n')
    with pytest.raises(MultipleChoiceFormatError, match=r"mc.jsonl:2: not UTF-8 text \(byte 0xe9 at column 17\)"):
        load_multiple_choice(path)


@pytest.mark.parametrize("line", ["[" * 5000, '{"label": 1' + "0" * 5000 + "}"])
def test_json_the_parser_refuses_names_the_line(tmp_path, line):
    path = write_jsonl(tmp_path / "mc.jsonl", EXAMPLES[:1], raw_lines=[line])
    with pytest.raises(MultipleChoiceFormatError, match=r"mc.jsonl:2: invalid JSON"):
        load_multiple_choice(path)


def test_a_choice_longer_than_the_context_names_the_example(model, tokenizer):
    lm = AoEHarnessLM(model, tokenizer, batch_size=2)
    long_choice = " ".join(["because"] * 80)  # more tokens than max_seq_len=64
    examples = [EXAMPLES[0], {"context": "red blue", "choices": ["green", long_choice], "label": 0}]
    with pytest.raises(MultipleChoiceFormatError, match=r"mc.jsonl: example 1: choice 1 is \d+ tokens long, more than "
                                                         r"the model's context of 64 tokens"):
        score_multiple_choice(lm, examples, source="mc.jsonl")
    with pytest.raises(MultipleChoiceFormatError, match="no examples"):
        score_multiple_choice(lm, [])


# ---------------------------------------------------------------------------------------------
# Choices that begin with whitespace: one warning per file; the scoring is unchanged
# ---------------------------------------------------------------------------------------------
SPACED = [
    {"context": "the cat sat on", "choices": [" a mat", " paris", "the blue green model"], "label": 0},
    {"context": "experts route each token to", "choices": ["\tthemselves", " rome"], "label": 1},
    {"context": "red blue", "choices": ["green", "yes"], "label": 0},
]


def _whitespace_warnings(caught):
    from aoe.eval.multiple_choice import MultipleChoiceWhitespaceWarning

    return [w for w in caught if issubclass(w.category, MultipleChoiceWhitespaceWarning)]


def test_choices_beginning_with_whitespace_warn_once_naming_the_file(tmp_path):
    import warnings

    path = write_jsonl(tmp_path / "spaced.jsonl", SPACED)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert load_multiple_choice(path) == SPACED
    found = _whitespace_warnings(caught)
    assert len(found) == 1, [str(w.message) for w in caught]
    message = str(found[0].message)
    assert str(path) in message and "4 of 7 choices begin with whitespace" in message
    assert "--mc-delimiter ''" in message and found[0].filename == __file__  # points at the caller


def test_no_warning_for_a_normal_file_or_an_empty_delimiter(tmp_path):
    import warnings

    normal = write_jsonl(tmp_path / "normal.jsonl", EXAMPLES)
    spaced = write_jsonl(tmp_path / "spaced.jsonl", SPACED)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_multiple_choice(normal)
        load_multiple_choice(normal, target_delimiter="")
        load_multiple_choice(spaced, target_delimiter="")  # the choices carry their own space
        load_multiple_choice(spaced, target_delimiter="=")  # lm-eval's rule: only a delimiter ending in whitespace


def test_scoring_is_unchanged_by_leading_whitespace(model, tokenizer):
    """The default scores a spaced choice after two spaces (as lm-eval does); the delimiter ''
    scores the spaced file exactly as the default scores the same file without the spaces."""
    lm = AoEHarnessLM(model, tokenizer, batch_size=3)
    stripped = [{**ex, "choices": [c.lstrip() for c in ex["choices"]]} for ex in SPACED]
    own_space = [{**ex, "choices": [" " + c for c in ex["choices"]]} for ex in stripped]
    plain = score_multiple_choice(lm, stripped)
    own_space = score_multiple_choice(lm, own_space, target_delimiter="")
    doubled = score_multiple_choice(lm, SPACED)
    assert [p["loglikelihoods"] for p in own_space["predictions"]] == [p["loglikelihoods"] for p in plain["predictions"]]
    ctx, cont = split_like_harness(tokenizer, SPACED[0]["context"], "  a mat")  # the double space, by hand
    assert doubled["predictions"][0]["loglikelihoods"][0] == pytest.approx(direct_logprob(model, ctx, cont)[0], abs=1e-4)
    assert doubled["predictions"][0]["loglikelihoods"][0] != plain["predictions"][0]["loglikelihoods"][0]


def test_duplicate_choices_warn_once_and_count_the_labels_that_cannot_be_right(tmp_path):
    from aoe.eval.multiple_choice import MultipleChoiceDuplicateWarning

    examples = [{"context": "a", "choices": ["x", "y"], "label": 0},
                {"context": "b", "choices": ["x", "y", "x"], "label": 2},  # on the second copy: never right
                {"context": "c", "choices": ["z", "z"], "label": 0}]
    path = write_jsonl(tmp_path / "dup.jsonl", examples)
    with pytest.warns(MultipleChoiceDuplicateWarning) as caught:
        assert load_multiple_choice(path) == examples
    assert len(caught) == 1
    message = str(caught[0].message)
    assert str(path) in message and "2 example(s) list the same choice twice (first on line 2)" in message
    assert "1 label(s) on a later copy can never be right" in message


def test_the_cli_prints_the_duplicate_choice_warning(tmp_path, capsys):
    from aoe.cli import _load_mc_files

    path = write_jsonl(tmp_path / "dup.jsonl", [{"context": "b", "choices": ["x", "x"], "label": 1}])
    _load_mc_files([str(path)], " ")
    err = capsys.readouterr().err
    assert err.startswith("warning: ") and "list the same choice twice" in err and err.count("\n") == 1


def test_the_files_reader_keeps_the_order_names_a_missing_file_and_routes_the_warnings(tmp_path):
    from aoe.eval.multiple_choice import MultipleChoiceDuplicateWarning, MultipleChoiceFormatError, load_multiple_choice_files

    a = write_jsonl(tmp_path / "a.jsonl", [{"context": "x", "choices": [" p", "q"], "label": 0}])
    b = write_jsonl(tmp_path / "b.jsonl", [{"context": "y", "choices": ["p", "p"], "label": 0}])
    said = []
    assert list(load_multiple_choice_files([str(b), str(a)], say=said.append)) == [str(b), str(a)]
    assert len(said) == 2 and "same choice twice" in said[0] and "whitespace" in said[1]
    with pytest.warns(MultipleChoiceDuplicateWarning):  # no ``say``: Python's warnings
        load_multiple_choice_files([str(b)])
    with pytest.raises(MultipleChoiceFormatError, match=r"^--mc .*nope.jsonl: no such file; give the path"):
        load_multiple_choice_files([str(a), str(tmp_path / "nope.jsonl")])
