"""Fuzz: random configs, overrides, option combinations, corpora, multiple-choice files, edited Hugging
Face config.json files and renamed or edited checkpoints meet success or one clear error.

Every case ends in success or in one of the project's error types with a one-line message
(through ``aoe.cli.main``: exit status 2 and a single ``error: ...`` line on stderr, the last
one), never in another exception. The inputs are random but seeded, so a failure names a case
that reproduces; the whole module takes a few seconds. A failing case is printed as a note on
the exception (its inputs, shortened).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import random

import pytest
import yaml

from aoe.cli import main
from aoe.config import SECTIONS, ConfigError, load_config
from aoe.data import DataError, prepare_tokens
from aoe.errors import shown

SEED = 1234
KEYS = {name: [f.name for f in dataclasses.fields(cls)] for name, cls in SECTIONS.items()}
DEFAULTS = {name: dataclasses.asdict(cls()) for name, cls in SECTIONS.items()}
CHOICES = ("aoe", "moe", "dense", "l2", "linf", "auto", "cpu", "float32", "stdlib", "stop", "skip", "head", "balanced")
ALPHABET = "abcxyz _.-=:#[]{},&*!|>'\"\\\n\t0123456789eé中\u2028\x85\ufeff\x00\udcff"
YAML_SYNTAX = ("[", "{", ": ", "\t", "&a ", "*a", "!!python/object:os.system ", "? ")
WORDS = ("the cat sat on a mat while experts route each token to themselves by norm "
         "model answer question paris rome berlin red blue green yes no because").split()


# ---------------------------------------------------------------------------------------------
# Random values
# ---------------------------------------------------------------------------------------------
def text(rng: random.Random, longest: int = 12) -> str:
    return "".join(rng.choice(ALPHABET) for _ in range(rng.randint(0, longest)))


def scalar(rng: random.Random):
    kind = rng.randrange(6)
    if kind == 0:
        return rng.randint(-3, 300)
    if kind == 1:
        return rng.choice([0, -1, 2**31, 2**63, -(2**64), 10**30, 10**400])
    if kind == 2:
        return rng.choice([0.0, -0.0, 1e-320, 1e-45, 3e-4, 0.5, 1e38, 3.5e38, 1e300, math.inf, -math.inf, math.nan])
    if kind == 3:
        return rng.choice([True, False, None])
    return rng.choice(CHOICES) if kind == 4 else text(rng)


def value(rng: random.Random, depth: int = 0):
    """A scalar, or a list / mapping of random values (nested at most three deep)."""
    r = rng.random()
    if depth < 3 and r < 0.15:
        return [value(rng, depth + 1) for _ in range(rng.randint(0, 4))]
    if depth < 3 and r < 0.25:
        return {rng.choice([text(rng), scalar(rng)]): value(rng, depth + 1) for _ in range(rng.randint(0, 3))}
    return scalar(rng)


def plausible(rng: random.Random, section: str, key: str):
    """A value near the key's default (to reach the checks behind the type checks), else a random one."""
    default = DEFAULTS.get(section, {}).get(key, rng.random())
    if rng.random() < 0.4:
        return value(rng)
    if isinstance(default, bool):
        return rng.random() < 0.5
    if isinstance(default, (int, float)):
        return type(default)(default * rng.choice([0, 0.5, 1, 2, -1])) if default else rng.choice([0, 1, 4, 64])
    if isinstance(default, str):
        return rng.choice([default, *CHOICES])
    if isinstance(default, list):
        return [rng.randint(-1, 5) for _ in range(rng.randint(0, 3))]
    return rng.choice([None, 1, 8, 64])  # a None default: an optional int


def random_key(rng: random.Random, section: str) -> str:
    return rng.choice(KEYS[section]) if section in KEYS and rng.random() < 0.85 else text(rng) or "x"


def config_doc(rng: random.Random):
    """A config's content: mostly sections of known keys, sometimes anything at all."""
    if rng.random() < 0.1:
        return value(rng)
    doc = {}
    for _ in range(rng.randint(0, 3)):
        section = rng.choice([*SECTIONS, *SECTIONS, text(rng)])
        if rng.random() < 0.15:
            doc[section] = value(rng)
            continue
        keys = [random_key(rng, section) for _ in range(rng.randint(0, 4))]
        doc[section] = {k: plausible(rng, section, k) for k in keys}
    return doc


def corrupt(rng: random.Random, data: bytes) -> bytes:
    """Sometimes damage the bytes: a random byte, bytes that are not UTF-8, a cut, YAML syntax."""
    r = rng.random()
    at = rng.randint(0, len(data))
    if r < 0.1:
        return data[:at] + bytes([rng.randrange(256)]) + data[at + 1:]
    if r < 0.2:
        return data[:at] + rng.choice([b"\xff\xfe", b"\xc3", b"\xed\xa0\x80"]) + data[at:]
    if r < 0.3:
        return data[:at]
    if r < 0.4:
        return data[:at] + rng.choice(YAML_SYNTAX).encode() + data[at:]
    return data


def config_bytes(rng: random.Random) -> tuple[str, bytes]:
    doc = config_doc(rng)
    if rng.random() < 0.2:
        return ".json", corrupt(rng, json.dumps(doc, default=str).encode())
    return ".yaml", corrupt(rng, yaml.safe_dump(doc, allow_unicode=rng.random() < 0.5).encode("utf-8", "surrogatepass"))


def override(rng: random.Random) -> str:
    item = text(rng, 20) if rng.random() < 0.08 else key_value(rng)
    return "x" + item if item.startswith("-") else item  # an item starting with - would be an option


def key_value(rng: random.Random) -> str:
    section = rng.choice([*SECTIONS, *SECTIONS, *SECTIONS, text(rng)])
    key = random_key(rng, section) + ("." + text(rng) if rng.random() < 0.05 else "")
    r = rng.random()
    if r < 0.1:
        raw = rng.choice([text(rng, 20), "9" * 5000, "[[[[0", "2001-13-01", "!!int x", "1e300", ".nan"])
    else:
        raw = yaml.safe_dump(plausible(rng, section, key), default_flow_style=True, width=10**9)
        raw = raw.strip().removesuffix("...").strip()
    return f"{section}.{key}={raw}"


@pytest.fixture(scope="module", autouse=True)
def _command_line_imported():
    """Build the command line's parser once first: its imports (transformers, for export and
    convert) take seconds that are no part of the fuzzing."""
    from aoe.cli import build_parser

    build_parser()


# ---------------------------------------------------------------------------------------------
# Outcomes
# ---------------------------------------------------------------------------------------------
@contextlib.contextmanager
def case(description: str):
    """Name the fuzz case on any exception that escapes it."""
    try:
        yield
    except BaseException as e:
        e.add_note(f"fuzz case: {description}")
        raise


def outcome(call, allowed: tuple[type[BaseException], ...]):
    """Run ``call``: its result, or None when it raised one of ``allowed`` with a one-line message."""
    try:
        return call()
    except allowed as e:
        message = str(e)
        assert message.strip() and "\n" not in message, f"not one line: {message!r}"
        return None


def cli_outcome(argv: list[str], capsys) -> int:
    """``aoe ARGV`` in process: exit status 0, or 2 with one ``error: ...`` line, the last on stderr."""
    capsys.readouterr()
    rc = main(argv)
    err = capsys.readouterr().err
    assert "Traceback" not in err
    if rc != 0:
        lines = err.splitlines()
        assert rc == 2 and lines and lines[-1].startswith("error: "), (rc, err[-2000:])
        assert sum(line.startswith("error: ") for line in lines) == 1, err[-2000:]
    return rc


# ---------------------------------------------------------------------------------------------
# Configs: files of random shapes and bytes, random overrides
# ---------------------------------------------------------------------------------------------
def test_random_config_files_and_overrides(tmp_path):
    rng = random.Random(SEED)
    built = refused = 0
    for i in range(200):
        suffix, data = config_bytes(rng)
        path = tmp_path / f"c{i}{suffix}"
        path.write_bytes(data)
        where = rng.choice([path, path, None, "tiny"])
        items = [override(rng) for _ in range(rng.randint(0, 3))]
        with case(f"{i}: load_config({shown(where)}, {shown(items)}) with {shown(data, 300)}"):
            cfg = outcome(lambda: load_config(where, items), (ConfigError,))
        built += cfg is not None
        refused += cfg is None
    assert built > 10 and refused > 100  # both outcomes are exercised


def test_random_configs_through_the_command_line(tmp_path, capsys, monkeypatch):
    import aoe.train

    def no_training(cfg, out, **kwargs):  # the config is what is fuzzed here, not the trainer
        return {"step": 0, "tokens": 0, "train_time_s": 0.0, "val_loss": 0.0, "unigram_entropy": 0.0,
                "perplexity": 1.0, "checkpoint": str(out)}

    monkeypatch.setattr(aoe.train, "train", no_training)
    rng = random.Random(SEED + 1)
    statuses = []
    for i in range(40):
        suffix, data = config_bytes(rng)
        path = tmp_path / f"c{i}{suffix}"
        path.write_bytes(data)
        argv = ["train", "--quiet", "--out", str(tmp_path / "run"), "--config", str(path),
                *[override(rng) for _ in range(rng.randint(0, 3))]]
        with case(f"{i}: aoe {shown(argv, 500)} with {shown(data, 300)}"):
            statuses.append(cli_outcome(argv, capsys))
    assert 0 in statuses and 2 in statuses


# ---------------------------------------------------------------------------------------------
# Corpora: random bytes as a tiny data source
# ---------------------------------------------------------------------------------------------
def corpus_bytes(rng: random.Random) -> bytes:
    kind = rng.randrange(4)
    n = rng.choice([0, 1, 40, 2000])
    if kind == 0:
        return bytes(rng.randrange(256) for _ in range(n))
    if kind == 1:
        return text(rng, n).encode("utf-8", "surrogatepass")
    if kind == 2:
        lines = [json.dumps({rng.choice(["text", "txt"]): value(rng)}, default=str) for _ in range(rng.randint(0, 8))]
        return corrupt(rng, "\n".join(lines).encode())
    return corrupt(rng, " ".join(rng.choice(WORDS) for _ in range(n)).encode())


def write_corpus(rng: random.Random, directory, i: int):
    suffix = rng.choice([".txt", ".jsonl", ".py", "", ".jsonl.gz", ".jsonl.zst", ".parquet"])
    path = directory / f"corpus{i}{suffix}"
    path.write_bytes(compressed(rng, suffix, corpus_bytes(rng)))
    return path


def compressed(rng: random.Random, suffix: str, data: bytes) -> bytes:
    """``data``, compressed as ``suffix`` says half the time (else left raw: a damaged file)."""
    if rng.random() < 0.5:
        return data
    if suffix == ".jsonl.gz":
        import gzip

        return gzip.compress(data)
    if suffix == ".jsonl.zst":
        with contextlib.suppress(ImportError):
            import zstandard

            return zstandard.ZstdCompressor().compress(data)
    return data


def test_random_corpora(tmp_path):
    rng = random.Random(SEED + 2)
    prepared = 0
    for i in range(25):
        path = write_corpus(rng, tmp_path, i)
        settings = dict(vocab_size=rng.choice([257, 300, 512]), val_fraction=rng.choice([0.0, 0.1, 0.5]),
                        on_decode_error=rng.choice(["replace", "skip"]), max_bytes=rng.choice([None, 1, 500]))
        with case(f"{i}: prepare_tokens({path.name}, {settings}) of {shown(path.read_bytes(), 300)}"):
            data = outcome(lambda: prepare_tokens(str(path), cache_dir=tmp_path / "cache", num_workers=1, **settings),
                           (DataError, ConfigError))
        prepared += data is not None
    assert prepared > 0


# ---------------------------------------------------------------------------------------------
# A tiny model for scoring: multiple-choice files, and corpora through `aoe eval`
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    import torch

    from aoe.config import ModelConfig
    from aoe.data import train_tokenizer
    from aoe.model import Transformer
    from aoe.io.checkpoint import save_model_checkpoint

    rng = random.Random(0)
    lines = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 12))) + "." for _ in range(200)]
    tokenizer = train_tokenizer(lines, vocab_size=300)
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=tokenizer.vocab_size, d_model=16, n_layers=1, n_heads=2, max_seq_len=16,
                                    d_ffn=32, n_experts=4, top_k=2, d_low=4)).eval()
    run = tmp_path_factory.mktemp("fuzz") / "run"
    save_model_checkpoint(run, model, tokenizer)
    return run, model, tokenizer


def mc_line(rng: random.Random, noise: float = 1.0) -> bytes:
    """A JSON Lines multiple-choice line; ``noise`` scales how often it is damaged."""
    r = rng.random() / noise if noise else 1.0
    if r < 0.08:
        return bytes(rng.randrange(256) for _ in range(rng.randint(0, 30))).replace(b"\n", b"")
    if r < 0.12:
        return rng.choice([b"", b"  ", b"\t"])
    n = rng.randint(2, 4) if rng.random() > noise else rng.randint(1, 4)
    choices = [" ".join(rng.choice(WORDS) for _ in range(rng.choice([1, 2, 3, 30]))) for _ in range(n)]
    example = {"context": " ".join(rng.choice(WORDS) for _ in range(rng.randint(0, 6))), "choices": choices,
               "label": rng.randint(-1, n)}
    if rng.random() > noise:
        example["label"] = rng.randrange(n)
    for key in list(example):
        if rng.random() < 0.1 * noise:
            example[key] = value(rng)
        if rng.random() < 0.03 * noise:
            del example[key]
    if rng.random() < 0.1:
        example[text(rng)] = value(rng)
    line = json.dumps(example, default=str, ensure_ascii=rng.random() < 0.5).encode("utf-8", "surrogatepass")
    return (corrupt(rng, line) if rng.random() < noise else line).replace(b"\n", b" ")


def mc_file(rng: random.Random, directory, i: int, noise: float = 1.0):
    path = directory / f"mc{i}.jsonl"
    path.write_bytes(b"\n".join(mc_line(rng, noise) for _ in range(rng.randint(0, 4))))
    return path


def test_random_multiple_choice_files(tmp_path, tiny_checkpoint, one_thread):
    from aoe.eval import AoEHarnessLM, MultipleChoiceFormatError, load_multiple_choice, score_multiple_choice

    _, model, tokenizer = tiny_checkpoint
    lm = AoEHarnessLM(model, tokenizer, batch_size=8)
    rng = random.Random(SEED + 3)
    scored = refused = 0
    for i in range(80):
        path = mc_file(rng, tmp_path, i)
        with case(f"{i}: {shown(path.read_bytes(), 600)}"):
            examples = outcome(lambda: load_multiple_choice(path), (MultipleChoiceFormatError,))
            if examples is not None:
                scores = outcome(lambda: score_multiple_choice(lm, examples, source=path.name),
                                 (MultipleChoiceFormatError,))
                scored += scores is not None
                refused += scores is None
    assert scored > 0 and refused > 0


def test_random_inputs_to_aoe_eval(tmp_path, tiny_checkpoint, capsys, monkeypatch, one_thread):
    monkeypatch.setenv("AOE_CACHE", str(tmp_path / "cache"))
    run = str(tiny_checkpoint[0])
    rng = random.Random(SEED + 4)
    statuses = []
    for i in range(12):
        if i % 2:
            path = mc_file(rng, tmp_path, i, noise=rng.choice([0.0, 0.3, 1.0]))
            argv = ["eval", run, "--skip-loss", "--mc", str(path)]
        else:
            path = write_corpus(rng, tmp_path, i)
            argv = ["eval", run, "--data", str(path), "--split", rng.choice(["train", "val"]),
                    "--seq-len", str(rng.choice([4, 8, 16])), "--batch-size", "2", "--max-batches", "1"]
        with case(f"{i}: aoe {shown(argv, 500)} with {shown(path.read_bytes(), 300)}"):
            statuses.append(cli_outcome(argv, capsys))
    assert 0 in statuses and 2 in statuses


# ---------------------------------------------------------------------------------------------
# Hostile model directories: edited config.json, renamed and edited checkpoints
# ---------------------------------------------------------------------------------------------
HF_SIZE_FIELDS = ("hidden_size", "num_hidden_layers", "intermediate_size", "num_experts", "num_experts_per_tok",
                  "num_attention_heads", "num_key_value_heads", "vocab_size", "max_position_embeddings", "d_low",
                  "d_wide")


def hostile_size(rng: random.Random):
    return rng.choice([0, 1, 2, 3, 8, 16, 48, 8192, 10**9, 10**12, 2**63, -1, 2.5, "wide", None, [16]])


def test_random_hf_config_edits_through_generate(tmp_path, tiny_checkpoint, capsys, one_thread):
    pytest.importorskip("transformers")
    import shutil

    from aoe.hf.export import export_to_hf

    _, model, tokenizer = tiny_checkpoint
    exported = export_to_hf(model, tmp_path / "hf", tokenizer)
    rng = random.Random(SEED + 5)
    statuses = []
    for i in range(24):
        edited = tmp_path / f"hf{i}"
        shutil.copytree(exported, edited)
        config = json.loads((edited / "config.json").read_text())
        fields = {name: hostile_size(rng) for name in rng.sample(HF_SIZE_FIELDS, rng.randint(1, 3))}
        config.update(fields)
        (edited / "config.json").write_text(json.dumps(config))
        argv = ["generate", str(edited), "--prompt", "the cat", "--max-new-tokens", "2", "--greedy"]
        with case(f"{i}: config.json edited with {fields}"):
            statuses.append(cli_outcome(argv, capsys))
    assert 2 in statuses


def test_renamed_and_edited_checkpoints(tmp_path, tiny_checkpoint, capsys, one_thread):
    import shutil

    rng = random.Random(SEED + 6)
    statuses = []
    for i in range(16):
        run = tmp_path / f"run{i}"
        shutil.copytree(tiny_checkpoint[0], run)
        step_dir = next((run / "checkpoints").iterdir())
        meta = json.loads((step_dir / "checkpoint.json").read_text())
        edits = []
        if rng.random() < 0.6:
            meta["step"] = rng.choice([0, 1, 99, -1, "0", None, 2**40])
            (step_dir / "checkpoint.json").write_text(json.dumps(meta))
            edits.append(f"step={meta['step']!r}")
        if rng.random() < 0.6:
            new_name = rng.choice(["step_00000099", "step_00000000", "step_x", "step_00000001.corrupt"])
            step_dir = step_dir.rename(step_dir.with_name(new_name))
            edits.append(f"renamed {new_name}")
        target = rng.choice([run, step_dir])
        argv = ["generate", str(target), "--prompt", "the", "--max-new-tokens", "1", "--greedy"]
        with case(f"{i}: {edits}, generate from {target.name}"):
            statuses.append(cli_outcome(argv, capsys))
    assert 0 in statuses and 2 in statuses


IDLE_OPTIONS = (("model.ffn", ["dense", "moe", "aoe"]), ("model.selection", ["top_k", "top_p", "expert_choice"]),
                ("model.top_p", [None, 0.5, 1.0]), ("model.min_k", [1, 2]), ("model.max_k", [None, 2]),
                ("model.capacity_factor", [1.0, 2.0, 1e30]), ("model.ec_inference", ["top_k", "expert_choice"]),
                ("train.fsdp", [False, True]), ("train.fsdp_shard_size", [None, 2]))


def test_random_option_combinations_build_only_configs_where_every_option_applies():
    from aoe.config.applicability import idle_options

    rng = random.Random(SEED + 7)
    built = 0
    for i in range(150):
        items = [f"{key}={json.dumps(rng.choice(values))}" for key, values in rng.sample(IDLE_OPTIONS, rng.randint(1, 5))]
        with case(f"{i}: {items}"):
            cfg = outcome(lambda: load_config("tiny", items), (ConfigError,))
        if cfg is not None:
            built += 1
            assert idle_options("model", dataclasses.asdict(cfg.model)) == []
            assert idle_options("train", dataclasses.asdict(cfg.train)) == []
    assert 10 < built < 150
