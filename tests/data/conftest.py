"""Small real corpora in tmp dirs for the data-pipeline tests."""

from __future__ import annotations

from pathlib import Path

import pytest

from helpers.corpora import WORDS, make_text, write_corpus  # noqa: F401  (for `from .conftest import ...`)


@pytest.fixture
def corpus(tmp_path) -> Path:
    root = tmp_path / "corpus"
    write_corpus(root)
    return root


@pytest.fixture
def cache_dir(tmp_path) -> Path:
    return tmp_path / "cache"
