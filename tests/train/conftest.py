"""The tests that train share the tiny run helpers of ``helpers.tiny_runs`` and the fixtures of the root
conftest (``cache_dir``, ``make_cfg``); here only the one-thread default."""

from __future__ import annotations

import pytest

from helpers.tiny_runs import PYTHON, cli_env, tiny_overrides  # noqa: F401  (for `from .conftest import ...`)


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    yield
