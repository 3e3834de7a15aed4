"""aoe.utils.files: the atomic writers every module uses."""

import os

from aoe.utils.files import atomic_write_bytes, atomic_write_text, replace_directory


def test_atomic_write_replaces_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "a.json"
    assert atomic_write_text(path, "old") == path
    atomic_write_bytes(path, b"new")
    assert path.read_bytes() == b"new" and os.listdir(tmp_path) == ["a.json"]


def test_replace_directory_swaps_a_complete_directory(tmp_path):
    dst, aside = tmp_path / "out", tmp_path / ".out.old"
    for name, text in (("new", "2"), ("first", "1")):
        (tmp_path / name).mkdir()
        (tmp_path / name / "f").write_text(text)
    replace_directory(tmp_path / "first", dst, aside)
    assert (dst / "f").read_text() == "1" and sorted(os.listdir(tmp_path)) == ["new", "out"]
    replace_directory(tmp_path / "new", dst, aside)
    assert (dst / "f").read_text() == "2" and os.listdir(tmp_path) == ["out"]
