"""Checkpoints survive faults (cp = 2, gloo): a corrupted newest save resumes from the previous one.

The manifest of checksums catches a truncated shard, flipped bytes, an empty .metadata and an
empty newer step folder; resume warns naming what it skipped and why, errors only when nothing
is intact; metrics.jsonl keeps one record per step across resumes; a full disk or a missing
permission names the path and the fix.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import warnings

import pytest

from multiproc import run_spawned


def _cfg(out_dir: str, steps: int = 3) -> dict:
    return {
        "out_dir": out_dir,
        "model": {"preset": "tiny", "attn_implementation": "magi",
                  "overrides": {"num_hidden_layers": 1, "hidden_size": 32, "intermediate_size": 64}},
        "data": {"kind": "recall", "seq_len": 128, "recall": {"num_pairs": 1}},
        "parallel": {"cp": 2, "chunk_size": 16},
        "train": {"steps": steps, "grad_accum": 1, "lr": 3e-3, "warmup_steps": 1, "loss_chunk_tokens": 64},
        "checkpoint": {"every": 1, "resume": True, "export_hf": False, "keep": 5},
        "logging": {"progress": "none", "log_every": 1, "tensorboard": False},
    }


def _train(rank: int, world: int, out_dir: str, steps: int) -> list[float]:
    from flexcp.train.config import from_dict
    from flexcp.train.loop import Trainer

    trainer = Trainer(from_dict(_cfg(out_dir, steps)))
    trainer.fit()
    return [m.loss for m in trainer.metrics.history]


def _resume(rank: int, world: int, out_dir: str) -> dict:
    from flexcp.train.config import from_dict
    from flexcp.train.loop import Trainer

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            trainer = Trainer(from_dict(_cfg(out_dir)))
        except RuntimeError as exc:
            return {"error": f"{type(exc).__name__}: {exc}"}
    resumed = trainer.resumed_from
    trainer.fit()  # a finished run (resumed at train.steps) does nothing and logs nothing
    return {"resumed": resumed, "warnings": [str(w.message) for w in caught],
            "losses": [m.loss for m in trainer.metrics.history] if trainer.metrics else []}


def _corrupt(step_dir: str, how: str) -> None:
    shard = sorted(f for f in os.listdir(step_dir) if f.endswith(".distcp"))[0]
    path = os.path.join(step_dir, shard)
    if how == "truncate":
        with open(path, "r+b") as f:
            f.truncate(os.path.getsize(path) // 2)
    elif how == "flip":
        with open(path, "r+b") as f:
            f.seek(os.path.getsize(path) // 2)
            block = f.read(64)
            f.seek(os.path.getsize(path) // 2)
            f.write(bytes(b ^ 0xFF for b in block))
    elif how == "metadata":
        open(os.path.join(step_dir, ".metadata"), "w").close()
    elif how == "manifest":
        os.remove(os.path.join(step_dir, "manifest.json"))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    base = str(tmp_path_factory.mktemp("ckpt") / "run")
    losses = run_spawned(_train, 2, base, 3, timeout=300)[0]
    return base, losses


@pytest.mark.parametrize("how", ["truncate", "flip", "metadata", "manifest", "empty_newer"])
def test_corrupt_newest_checkpoint_resumes_from_the_previous_one(trained, tmp_path, how):
    base, straight = trained
    out = str(tmp_path / "run")
    shutil.copytree(base, out)
    root = os.path.join(out, "checkpoints")
    if how == "empty_newer":
        os.makedirs(os.path.join(root, "step_00000009"))
        expect, bad = "step_00000003", "step_00000009"
    else:
        _corrupt(os.path.join(root, "step_00000003"), how)
        expect, bad = "step_00000002", "step_00000003"
    got = run_spawned(_resume, 2, out, timeout=300)[0]
    assert "error" not in got, got
    assert got["resumed"].endswith(expect)
    assert any(bad in w and "not intact" in w for w in got["warnings"]), got["warnings"]
    if how != "empty_newer":  # step 3 is trained again, exactly as before
        assert got["losses"] == straight[2:]
    steps = [json.loads(line)["step"] for line in open(os.path.join(out, "metrics.jsonl"))]
    assert steps == [1, 2, 3], steps  # one record per step after the resume


def test_no_intact_checkpoint_is_a_clear_error(trained, tmp_path):
    out = str(tmp_path / "run")
    shutil.copytree(trained[0], out)
    root = os.path.join(out, "checkpoints")
    for name in os.listdir(root):
        _corrupt(os.path.join(root, name), "flip")
    got = run_spawned(_resume, 2, out, timeout=300)[0]
    assert "CheckpointError" in got["error"] and "no intact checkpoint" in got["error"]
    assert "step_00000001" in got["error"] and "checksum" in got["error"]


def test_metrics_keep_one_record_per_step_after_resumes(tmp_path):
    from flexcp.train.replay import drop_records_after

    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"step": s, "loss": 1.0}) + "\n" for s in (1, 2, 3, 4)) + '{"step": 5, "lo')
    assert drop_records_after(str(path), 2) == 3
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [1, 2]


@pytest.mark.parametrize("error, match", [
    (OSError(errno.ENOSPC, "No space left on device"), "disk is full.*free space, lower checkpoint.keep"),
    (RuntimeError("[enforce fail at inline_container.cc:672] . PytorchStreamWriter failed writing file data/0: "
                  "file write failed"), "disk is full"),
    (PermissionError(errno.EACCES, "Permission denied"), "no permission.*writable"),
])
def test_save_errors_name_the_path_and_the_fix(error, match, tmp_path):
    from flexcp.train.manifest import CheckpointError, save_error

    path = str(tmp_path / "checkpoints" / "step_00000004.tmp")
    err = save_error(error, path)
    assert isinstance(err, CheckpointError) and path in str(err)
    import re

    assert re.search(match, str(err)), str(err)


def _save_on_full_disk(rank: int, world: int, out_dir: str) -> str:
    from flexcp.train import checkpoint
    from flexcp.train.config import from_dict
    from flexcp.train.loop import Trainer

    trainer = Trainer(from_dict(_cfg(out_dir)))
    real = checkpoint.dcp.save

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    checkpoint.dcp.save = full
    try:
        checkpoint.save_checkpoint(out_dir, trainer.model, trainer.optimizer, trainer.scheduler, trainer.progress, 2)
    except checkpoint.CheckpointError as exc:
        return str(exc)
    finally:
        checkpoint.dcp.save = real
    return "no error"


def test_full_disk_during_save_names_the_path(tmp_path):
    for message in run_spawned(_save_on_full_disk, 2, str(tmp_path / "run"), timeout=300):
        assert "step_00000000.tmp" in message and "disk is full" in message, message
    assert not os.path.exists(tmp_path / "run" / "checkpoints" / "step_00000000.tmp")  # the partial save is gone
