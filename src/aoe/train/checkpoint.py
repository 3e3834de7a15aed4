"""The checkpoint format moved to ``aoe.io.checkpoint`` (loading a model needs no trainer); this
module keeps the old import path working."""

from aoe.io.checkpoint import *  # noqa: F401,F403
from aoe.io.checkpoint import CheckpointError, CheckpointWriteError, load_model, save_checkpoint  # noqa: F401
