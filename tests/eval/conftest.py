"""The evaluation tests run on one thread; their tiny model and tokenizer are tests/conftest.py's."""

from __future__ import annotations

import pytest
import torch

torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    yield
