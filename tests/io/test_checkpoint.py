import errno
import json
import os
import signal
from pathlib import Path

import pytest
import torch

from aoe.config import DataConfig, ModelConfig, RunConfig, TrainConfig
from aoe.model import Transformer
from aoe.io.checkpoint import (
    CheckpointError, CheckpointWriteError, find_latest_checkpoint, list_checkpoints, load_trainer_state,
    save_checkpoint, verify_checkpoint,
)
from aoe.io.models import load_model


def _model_and_cfg(tie=True):
    cfg = RunConfig(model=ModelConfig(vocab_size=64, d_model=16, n_layers=2, n_heads=2, d_ffn=32, n_experts=4,
                                      top_k=2, d_low=4, max_seq_len=16, tie_embeddings=tie),
                    train=TrainConfig(seq_len=16), data=DataConfig(vocab_size=64))
    return Transformer(cfg.model), cfg


@pytest.mark.parametrize("tie", [True, False])
def test_round_trip_gives_identical_logits(tmp_path, tie):
    model, cfg = _model_and_cfg(tie)
    path = save_checkpoint(tmp_path, 7, model, cfg, {"step": 7, "note": torch.arange(3)})
    assert path.name == "step_00000007" and verify_checkpoint(path)["step"] == 7
    loaded, cfg2, tok = load_model(tmp_path)  # a run directory resolves to its newest checkpoint
    assert tok is None and cfg2.model == cfg.model
    idx = torch.randint(0, 64, (2, 10))
    assert torch.equal(model(idx).logits, loaded(idx).logits)
    if tie:
        assert loaded.lm_head.weight is loaded.embed_tokens.weight
    assert torch.equal(load_trainer_state(path)["note"], torch.arange(3))


def test_corrupt_and_truncated_checkpoints_are_refused_and_skipped(tmp_path):
    model, cfg = _model_and_cfg()
    good = save_checkpoint(tmp_path, 1, model, cfg, {"step": 1})
    bad = save_checkpoint(tmp_path, 2, model, cfg, {"step": 2})
    weights = bad / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])  # truncated
    with pytest.raises(CheckpointError, match="truncated"):
        verify_checkpoint(bad)
    with pytest.raises(CheckpointError, match="model.safetensors"):
        load_model(bad)
    with pytest.warns(UserWarning, match="skipping a bad checkpoint"):
        assert find_latest_checkpoint(tmp_path) == good
    weights.write_bytes(bytes([data[0] ^ 1]) + data[1:])  # same size, altered content
    with pytest.raises(CheckpointError, match="SHA-256"):
        verify_checkpoint(bad)
    (good / "checkpoint.json").unlink()
    with pytest.raises(CheckpointError, match="checkpoint.json is missing"):
        verify_checkpoint(good)


def test_nan_model_is_never_saved_and_good_state_kept(tmp_path):
    model, cfg = _model_and_cfg()
    good = save_checkpoint(tmp_path, 1, model, cfg, {"step": 1})
    with torch.no_grad():
        model.layers[0].ffn.w_in[0, 0, 0] = float("nan")
    with pytest.raises(CheckpointError, match="NaN"):
        save_checkpoint(tmp_path, 2, model, cfg, {"step": 2})
    assert list_checkpoints(tmp_path) == [good]
    assert not list((tmp_path / "checkpoints").glob(".tmp-*"))


def test_half_written_checkpoint_is_invisible_and_keep_prunes_old(tmp_path):
    model, cfg = _model_and_cfg()
    save_checkpoint(tmp_path, 1, model, cfg, {"step": 1})
    crashed = tmp_path / "checkpoints" / ".tmp-step_00000002-dead"
    crashed.mkdir()
    (crashed / "model.safetensors").write_bytes(b"partial")
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_00000001"]
    save_checkpoint(tmp_path, 3, model, cfg, {"step": 3}, keep=2)
    save_checkpoint(tmp_path, 5, model, cfg, {"step": 5}, keep=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_00000003", "step_00000005"]
    assert not crashed.exists()
    meta = json.loads((tmp_path / "checkpoints" / "step_00000005" / "checkpoint.json").read_text())
    assert set(meta["files"]) == {"model.safetensors", "config.yaml", "trainer_state.pt"}


def test_not_a_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match="neither a checkpoint"):
        load_model(tmp_path)
    (tmp_path / "checkpoints").mkdir()
    with pytest.raises(CheckpointError, match="no complete checkpoint"):
        load_model(tmp_path)


def _steps(run_dir):
    return [p.name for p in list_checkpoints(run_dir)]


def test_retention_counts_only_checkpoints_that_verify(tmp_path):
    model, cfg = _model_and_cfg()
    for step in (2, 4, 6):
        save_checkpoint(tmp_path, step, model, cfg, {"step": step})
    junk = tmp_path / "checkpoints" / "step_99999999"
    junk.mkdir()
    (junk / "model.safetensors").write_bytes(b"not a checkpoint")
    with pytest.warns(UserWarning, match="moved it to .*step_99999999.corrupt"):
        save_checkpoint(tmp_path, 8, model, cfg, {"step": 8}, keep=2)
    assert _steps(tmp_path) == ["step_00000006", "step_00000008"]  # the bad one took no place
    aside = tmp_path / "checkpoints" / "step_99999999.corrupt"
    assert (aside / "model.safetensors").read_bytes() == b"not a checkpoint"
    for path in list_checkpoints(tmp_path):
        verify_checkpoint(path)


def test_a_corrupt_checkpoint_is_moved_aside_never_overwritten(tmp_path):
    model, cfg = _model_and_cfg()
    path = save_checkpoint(tmp_path, 6, model, cfg, {"step": 6})
    for n, suffix in ((1, ".corrupt"), (2, ".corrupt-2")):
        (path / "trainer_state.pt").write_bytes(b"garbage %d" % n)
        with pytest.warns(UserWarning, match=f"moved it to .*step_00000006{suffix}'"):
            assert save_checkpoint(tmp_path, 6, model, cfg, {"step": 6}) == path
        assert (path.with_name("step_00000006" + suffix) / "trainer_state.pt").read_bytes() == b"garbage %d" % n
        verify_checkpoint(path)  # the new one is in place
    save_checkpoint(tmp_path, 6, model, cfg, {"step": 6, "again": 1})  # a good one is simply replaced
    assert load_trainer_state(path)["again"] == 1
    assert _steps(tmp_path) == ["step_00000006"]


def test_finding_the_latest_moves_a_corrupt_one_aside_only_when_asked(tmp_path):
    model, cfg = _model_and_cfg()
    good = save_checkpoint(tmp_path, 1, model, cfg, {"step": 1})
    bad = save_checkpoint(tmp_path, 2, model, cfg, {"step": 2})
    (bad / "checkpoint.json").write_text("{")
    with pytest.warns(UserWarning, match="skipping a bad checkpoint"):
        assert find_latest_checkpoint(tmp_path) == good
    assert bad.is_dir()  # reading changes nothing
    with pytest.warns(UserWarning, match="skipping a bad checkpoint.*moved it to .*step_00000002.corrupt"):
        assert find_latest_checkpoint(tmp_path, move_aside=True) == good
    assert not bad.exists() and bad.with_name("step_00000002.corrupt").is_dir()


def test_retention_does_not_hash_again_what_it_wrote(tmp_path, monkeypatch):
    import aoe.io.checkpoint as ckpt

    model, cfg = _model_and_cfg()
    calls = []
    real = ckpt.file_sha256
    monkeypatch.setattr(ckpt, "file_sha256", lambda path: calls.append(path) or real(path))
    for step in range(1, 6):
        save_checkpoint(tmp_path, step, model, cfg, {"step": step}, keep=2)
    assert len(calls) == 5 * 3  # three files hashed once each, as they were written
    assert _steps(tmp_path) == ["step_00000004", "step_00000005"]
    (tmp_path / "checkpoints" / "step_00000005" / "trainer_state.pt").write_bytes(b"changed")
    with pytest.warns(UserWarning, match="step_00000005.corrupt"):  # a changed file is noticed
        save_checkpoint(tmp_path, 6, model, cfg, {"step": 6}, keep=2)
    assert _steps(tmp_path) == ["step_00000004", "step_00000006"]


def _no_space(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


@pytest.mark.parametrize("where", ["weights", "trainer_state"])
def test_disk_full_while_saving_names_the_cause_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch, where):
    import aoe.io.checkpoint as ckpt

    model, cfg = _model_and_cfg()
    good = save_checkpoint(tmp_path, 1, model, cfg, {"step": 1})
    if where == "weights":  # safetensors writes half the file, then the disk is full
        def save_file(state, filename, metadata=None):
            Path(filename).write_bytes(b"\0" * 100)
            _no_space()
        monkeypatch.setattr(ckpt, "save_file", save_file)
    else:  # every low-level write fails, as on a full disk
        monkeypatch.setattr(os, "write", _no_space)
    with pytest.raises(CheckpointWriteError) as info:
        save_checkpoint(tmp_path, 2, model, cfg, {"step": 2})
    message = str(info.value)
    assert message.startswith("no space left on device while writing ") and "step_00000002" in message
    assert f"the newest good checkpoint is {str(good)!r}" in message and message.endswith("then try again")
    assert isinstance(info.value, OSError) and info.value.errno == errno.ENOSPC
    monkeypatch.undo()
    assert _steps(tmp_path) == ["step_00000001"]
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["step_00000001"]  # no temporary left
    verify_checkpoint(good)


def test_a_signal_during_the_final_renames_waits_until_they_are_done(tmp_path, monkeypatch, request):
    import aoe.io.checkpoint as ckpt

    model, cfg = _model_and_cfg()
    path = save_checkpoint(tmp_path, 3, model, cfg, {"step": 3})
    real = os.replace
    # Ctrl-C's own handler, whatever this process inherited (a job started in the background
    # of a non-interactive shell ignores SIGINT)
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    request.addfinalizer(lambda: signal.signal(signal.SIGINT, previous))

    def replace_then_interrupt(src, dst):  # Ctrl-C right after the old checkpoint was renamed away
        real(src, dst)
        monkeypatch.setattr(ckpt.os, "replace", real)
        os.kill(os.getpid(), signal.SIGINT)

    monkeypatch.setattr(ckpt.os, "replace", replace_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(tmp_path, 3, model, cfg, {"step": 3, "new": True})
    assert load_trainer_state(path)["new"] is True and verify_checkpoint(path)
    assert _steps(tmp_path) == ["step_00000003"]


def test_a_replacement_cut_short_is_put_back(tmp_path):
    model, cfg = _model_and_cfg()
    path = save_checkpoint(tmp_path, 5, model, cfg, {"step": 5})
    path.rename(path.with_name(".tmp-old-step_00000005-1234abcd"))  # killed between the two renames
    save_checkpoint(tmp_path, 6, model, cfg, {"step": 6})
    assert _steps(tmp_path) == ["step_00000005", "step_00000006"]
    verify_checkpoint(path)


@pytest.mark.parametrize("big", ["weights", "trainer_state"])
def test_a_real_refused_write_is_reported_with_its_cause(tmp_path, big):
    """The system itself refuses the write (a file-size limit: EFBIG), in safetensors or torch.save."""
    import resource

    model, cfg = _model_and_cfg()
    good = save_checkpoint(tmp_path, 1, model, cfg, {"step": 1})
    weights = (good / "model.safetensors").stat().st_size
    limit = weights // 2 if big == "weights" else weights + 4096
    state = {"step": 2, "big": torch.zeros(4 * weights)}  # larger than the limit in both cases
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))
    try:
        with pytest.raises(CheckpointWriteError, match="^file too large while writing .*step_00000002.*"
                                                        "the newest good checkpoint is"):
            save_checkpoint(tmp_path, 2, model, cfg, state)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, previous)
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["step_00000001"]
    verify_checkpoint(good)


def test_save_model_checkpoint_leaves_the_callers_model_as_it_is(tmp_path):
    """A bf16 model is saved as fp32 weights (the native format) without being converted in place."""
    from aoe.config import ModelConfig
    from aoe.model import Transformer
    from aoe.io.checkpoint import save_model_checkpoint
    from aoe.io.models import load_model

    model = Transformer(ModelConfig(vocab_size=64, d_model=16, n_layers=1, n_heads=2, d_ffn=24, n_experts=2,
                                    top_k=1, d_low=4, max_seq_len=16)).to(torch.bfloat16)
    save_model_checkpoint(tmp_path / "run", model)
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    loaded, _, _ = load_model(tmp_path / "run")
    for (name, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert b.dtype == torch.float32 and torch.equal(a.float(), b), name


def test_a_renamed_checkpoint_is_not_taken_for_the_step_of_its_name(tmp_path):
    model, cfg = _model_and_cfg()
    good = save_checkpoint(tmp_path, 3, model, cfg, {"step": 3})
    renamed = save_checkpoint(tmp_path, 6, model, cfg, {"step": 6}).rename(tmp_path / "checkpoints" / "step_00000099")
    with pytest.raises(CheckpointError, match="named for step 99 but its checkpoint.json records step 6.*"
                                              "rename it back to step_00000006"):
        verify_checkpoint(renamed)
    with pytest.raises(CheckpointError, match="named for step 99"):
        load_model(renamed)
    with pytest.warns(UserWarning, match="skipping a bad checkpoint.*named for step 99"):
        assert find_latest_checkpoint(tmp_path) == good


def test_a_checkpoint_whose_recorded_step_was_edited_is_refused(tmp_path):
    model, cfg = _model_and_cfg()
    path = save_checkpoint(tmp_path, 6, model, cfg, {"step": 6})
    meta = json.loads((path / "checkpoint.json").read_text())
    for step in (99, "6", None):
        meta["step"] = step
        (path / "checkpoint.json").write_text(json.dumps(meta))
        with pytest.raises(CheckpointError, match=f"named for step 6 but its checkpoint.json records step {step!r}"):
            verify_checkpoint(path)


@pytest.fixture
def umask():
    """Set the process umask for a test (``umask(0o022)``), restored after."""
    before = os.umask(0o022)
    os.umask(before)
    yield os.umask
    os.umask(before)


@pytest.mark.parametrize("mask", [0o022, 0o002, 0o077])
def test_checkpoint_files_get_the_permissions_the_umask_gives(tmp_path, umask, mask):
    umask(mask)
    model, cfg = _model_and_cfg()
    path = save_checkpoint(tmp_path, 1, model, cfg, {"step": 1})
    assert path.stat().st_mode & 0o777 == 0o777 & ~mask
    for file in path.iterdir():
        assert file.stat().st_mode & 0o777 == 0o666 & ~mask, file.name
    verify_checkpoint(path)


@pytest.mark.parametrize("edit, message", [
    ({"n_layers": 48, "d_model": 8192}, "model.n_layers=48, but the weights hold 2 layer(s): this config.yaml"),
    ({"d_model": 10**12}, "model.d_model=1000000000000 is larger than the"),
    ({"d_ffn": 64}, "layers.0.ffn.w_up has shape [4, 4, 41] in the weights, but"),
])
def test_a_checkpoint_config_edited_to_claim_more_than_its_weights_is_refused_before_building(tmp_path, edit, message):
    import yaml

    from aoe.utils.files import file_sha256

    model, cfg = _model_and_cfg()
    path = save_checkpoint(tmp_path, 1, model, cfg, {"step": 1})
    config = yaml.safe_load((path / "config.yaml").read_text())
    config["model"].update(edit)
    (path / "config.yaml").write_text(yaml.safe_dump(config))
    meta = json.loads((path / "checkpoint.json").read_text())  # sums made to match: only the sizes are hostile
    meta["files"]["config.yaml"] = {"bytes": (path / "config.yaml").stat().st_size,
                                    "sha256": file_sha256(path / "config.yaml")}
    (path / "checkpoint.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError) as e:
        load_model(path)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_the_formats_depend_one_way_and_loading_dispatches_in_one_place(tmp_path):
    """aoe.io.checkpoint knows nothing of aoe.io.sharded (which builds on it), and neither imports
    the trainer; aoe.io.models reads both formats, and the one-process reader refuses a sharded
    checkpoint by name instead of failing on a missing file."""
    import subprocess
    import sys

    code = ("import sys, aoe.io.checkpoint\nprint('aoe.io.sharded' in sys.modules)\n"
            "import aoe.io.sharded, aoe.io.models\nprint('aoe.train' in sys.modules)\n")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2] / "src")}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert out.stdout.split() == ["False", "False"], out.stderr

    from aoe.io.checkpoint import load_model_state
    from aoe.io.models import load_weights

    model, cfg = _model_and_cfg()
    path = save_checkpoint(tmp_path, 1, model, cfg, {"step": 1})
    meta = json.loads((path / "checkpoint.json").read_text())
    (path / "checkpoint.json").write_text(json.dumps({**meta, "layout": "sharded"}))
    with pytest.raises(CheckpointError, match=r"step_00000001' is a sharded checkpoint.*aoe.io.models.load_weights"):
        load_model_state(model, path)
    with pytest.raises(CheckpointError, match=r"cannot read the sharded checkpoint .*step_00000001"):
        load_weights(model, path)  # dispatched to aoe.io.sharded, which finds no DCP metadata
