import pytest
import torch

from helpers.tiny_runs import tiny_overrides

from .runs import STEPS


@pytest.fixture(scope="session")
def single_run(tmp_path_factory, cache_dir):
    """The one-process run the parallel layouts are compared with: (its overrides, its directory)."""
    from aoe.config import load_config
    from aoe.train.trainer import Trainer

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    overrides = tiny_overrides(cache_dir, **STEPS)
    out = tmp_path_factory.mktemp("ep") / "single"
    Trainer(load_config("tiny", overrides), out, progress=False).fit()
    torch.set_num_threads(before)
    return overrides, out
