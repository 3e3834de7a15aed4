"""What a checkpoint directory holds in each format, and which format a directory is in.

Both formats share one directory layout (``checkpoints/step_{step:08d}/`` with ``config.yaml``,
``trainer_state.pt``, the tokenizer and ``checkpoint.json``) and differ in where the weights and
optimizer moments are: ``model.safetensors`` and ``trainer_state.pt`` (the one-process format,
``aoe.io.checkpoint``) or DCP's shards and ``.metadata`` (the sharded format, ``aoe.io.sharded``,
whose ``checkpoint.json`` records ``"layout": "sharded"``). Verification needs to know the files
each format must list, and loading which format it reads; both read them here, so that
``aoe.io.sharded`` builds on ``aoe.io.checkpoint`` and not the other way round.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

FORMAT_VERSION = 1
CHECKPOINT_DIR = "checkpoints"
MODEL_FILE = "model.safetensors"
CONFIG_FILE = "config.yaml"
TOKENIZER_FILE = "tokenizer.json"
STATE_FILE = "trainer_state.pt"
META_FILE = "checkpoint.json"

#: ``checkpoint.json``'s "layout" of a sharded checkpoint (a one-process one has none)
SHARDED = "sharded"
#: DCP's global metadata file: every tensor's full shape and where its chunks are
DCP_METADATA = ".metadata"
#: the files every checkpoint.json of each format must list
FULL_REQUIRED = (MODEL_FILE, CONFIG_FILE, STATE_FILE)
SHARDED_REQUIRED = (CONFIG_FILE, STATE_FILE, DCP_METADATA)


def rank_file(rank: int) -> str:
    """The file of a sharded checkpoint that holds ``rank``'s data position and RNG."""
    return f"rank_{rank:05d}.pt"


def required_files(meta: dict) -> tuple[str, ...]:
    """The files a checkpoint's metadata must list: the one-process format's, or the sharded one's."""
    return SHARDED_REQUIRED if meta.get("layout") == SHARDED else FULL_REQUIRED


def is_sharded(path: str | os.PathLike) -> bool:
    """Whether the checkpoint directory ``path`` is in the sharded layout (reads checkpoint.json only)."""
    try:
        return json.loads((Path(path) / META_FILE).read_text()).get("layout") == SHARDED
    except (OSError, ValueError, AttributeError):
        return False
