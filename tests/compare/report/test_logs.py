"""Reading the runs' metrics.jsonl: one reader (aoe.train.metrics.read_metrics) for the project."""

import json

import pytest

from aoe.compare.report import logs
from aoe.compare.report import read_metrics
from aoe.train import metrics as train_metrics


def test_read_metrics_tolerates_bad_input(tmp_path):
    entries, problem = read_metrics(tmp_path / "nope" / "metrics.jsonl")
    assert entries == [] and "missing" in problem
    p = tmp_path / "m.jsonl"
    p.write_text('{"step": 1, "loss": 2.0}\n[1, 2]\n{broken\n\n')
    entries, problem = read_metrics(p)
    assert len(entries) == 1 and "2 malformed" in problem


def test_the_one_reader_skips_a_line_cut_by_a_crash(tmp_path):
    p = tmp_path / "metrics.jsonl"
    good = [{"step": 1, "loss": 3.0}, {"step": 2, "val_loss": 2.5}]
    cut = json.dumps({"step": 3, "loss": 2.0, "layers": [{"layer": 0, "ent_load": 1.0}]})[:25]
    p.write_bytes(("\n".join(json.dumps(g) for g in good) + "\n" + cut).encode() + b"\xc3")  # half a character
    skipped = []
    assert train_metrics.read_metrics(p, skipped) == good
    assert skipped == [3]
    assert train_metrics.read_metrics(p) == good  # without the list too
    with pytest.raises(FileNotFoundError):
        train_metrics.read_metrics(tmp_path / "missing.jsonl")


def test_the_report_reads_through_the_one_reader(tmp_path, monkeypatch):
    calls = []
    real = train_metrics.read_metrics
    monkeypatch.setattr(logs, "read_metrics_file", lambda path, skipped: calls.append(path) or real(path, skipped))
    p = tmp_path / "metrics.jsonl"
    p.write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "lo')
    entries, problem = read_metrics(p, shown="run/metrics.jsonl")
    assert calls == [p] and entries == [{"step": 1, "loss": 2.0}]
    assert problem == "1 malformed line(s) skipped in run/metrics.jsonl"
    p.write_text("")
    assert read_metrics(p) == ([], f"metrics file empty: {p}")
    assert read_metrics(tmp_path)[1].startswith("metrics file unreadable")  # a directory
