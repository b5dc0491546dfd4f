"""`flexcp finetune` under real faults: a read-only file system, a full disk, a folder it may not write,
an out_dir that is a file, a diverging run, another run in out_dir. Each ends with one clear line
(the path or step and the fix), exit status 2, no traceback.

The faults are real, not mocked: a read-only bind mount and a 128 KiB tmpfs in a private mount
namespace (``unshare -rm``), and a folder without write permission (``chmod``; as root, which
ignores permissions, the run goes through a user namespace where it is an ordinary user). Where
the machine forbids those namespaces the test is skipped, saying so.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from functools import lru_cache

import pytest
import torch

TINY = ["model.overrides.num_hidden_layers=1", "model.overrides.hidden_size=32", "model.overrides.intermediate_size=64",
        "data.seq_len=128", "parallel.chunk_size=16", "train.steps=2", "train.warmup_steps=1",
        "train.loss_chunk_tokens=64", "checkpoint.every=1", "checkpoint.export_hf=false", "logging.progress=none",
        "logging.tensorboard=false"]


def _finetune(out_dir, *overrides: str, setup: str | None = None, user_ns: bool = False) -> subprocess.CompletedProcess:
    """Run the CLI in a fresh process; ``setup`` is shell run first in a private mount namespace."""
    cmd = [sys.executable, "-m", "flexcp.cli", "finetune", f"out_dir={out_dir}", *TINY, *overrides]
    if setup is not None:
        cmd = ["unshare", "-rm", "sh", "-c", f"{setup} && exec {shlex.join(cmd)}"]
    elif user_ns:
        cmd = ["unshare", "--user", "--map-user=1000", "--map-group=1000", *cmd]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)


@lru_cache(maxsize=None)
def _allowed(*cmd: str) -> bool:
    try:
        return subprocess.run(list(cmd), capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def _needs_mount_namespace() -> None:
    if not _allowed("unshare", "-rm", "sh", "-c", "mount -t tmpfs -o size=64k tmpfs /mnt"):
        pytest.skip("this machine allows no private mount namespace (unshare -rm), so no real read-only "
                    "or full file system can be made without root on the host")


def _assert_clear(proc: subprocess.CompletedProcess, *needles: str) -> str:
    err = proc.stderr
    assert proc.returncode == 2, (proc.returncode, err[-3000:])
    assert "Traceback" not in err and "AttributeError" not in err, err[-3000:]
    line = [x for x in err.splitlines() if x.startswith("flexcp finetune: error:")]
    assert len(line) == 1, err[-3000:]
    for needle in needles:
        assert needle in line[0], line[0]
    return line[0]


def test_read_only_file_system_names_the_folder(tmp_path):
    _needs_mount_namespace()
    ck = tmp_path / "run" / "checkpoints"
    ck.mkdir(parents=True)
    proc = _finetune(tmp_path / "run", setup=f"mount --bind -o ro {shlex.quote(str(ck))} {shlex.quote(str(ck))}")
    _assert_clear(proc, str(ck), "read-only file system", "set out_dir")


def test_full_disk_during_a_save_names_the_path_and_the_fix(tmp_path):
    """A 128 KiB disk: the write probe fits, the first checkpoint (~470 KiB) does not."""
    _needs_mount_namespace()
    ck = tmp_path / "run" / "checkpoints"
    ck.mkdir(parents=True)
    proc = _finetune(tmp_path / "run", setup=f"mount -t tmpfs -o size=128k tmpfs {shlex.quote(str(ck))}")
    line = _assert_clear(proc, "step_00000001.tmp", "disk is full", "lower checkpoint.keep")
    assert "No space left on device" in line


def test_checkpoint_folder_without_write_permission(tmp_path):
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    os.chmod(run / "checkpoints", 0o555)
    user_ns = os.geteuid() == 0  # root writes anyway: run as an ordinary user of a user namespace
    if user_ns and not _allowed("unshare", "--user", "--map-user=1000", "--map-group=1000", "true"):
        pytest.skip("running as root (which ignores folder permissions) on a machine without user namespaces")
    try:
        proc = _finetune(run, user_ns=user_ns)
    finally:
        os.chmod(run / "checkpoints", 0o755)
    _assert_clear(proc, str(run / "checkpoints"), "no permission", "writable")


def test_out_dir_naming_a_file(tmp_path):
    path = tmp_path / "results.txt"
    path.write_text("not a folder")
    _assert_clear(_finetune(path), "is a file, not a directory")
    assert path.read_text() == "not a folder"


def test_save_error_reads_a_real_checkpoint_exception(tmp_path):
    """torch.distributed.checkpoint's own exception (failures: rank -> (exception, traceback)), not a mock of it."""
    import torch.distributed.checkpoint as dcp

    from flexcp.train.manifest import CheckpointError, save_error

    (tmp_path / "a_file").write_text("x")
    path = str(tmp_path / "a_file" / "step_00000001.tmp")
    with pytest.raises(dcp.api.CheckpointException) as caught:
        dcp.save({"w": torch.zeros(4)}, checkpoint_id=path, no_dist=True)
    err = save_error(caught.value, path)
    assert isinstance(err, CheckpointError) and path in str(err)
    assert "Not a directory" in str(err) and "Traceback" not in str(err), str(err)


def test_a_diverging_run_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    run = tmp_path / "run"
    proc = _finetune(run, "train.lr=1e25", "train.max_grad_norm=0", "train.steps=4")
    _assert_clear(proc, "step 2 gave a non-finite", f"the last good checkpoint is {run}/checkpoints/step_00000001")
    assert sorted(os.listdir(run / "checkpoints")) == ["step_00000001"]


def test_one_run_per_out_dir(tmp_path):
    """A second run never mixes with the first: resume=false refuses, a changed model refuses, resuming says so."""
    run = tmp_path / "run"
    assert _finetune(run).returncode == 0
    _assert_clear(_finetune(run, "checkpoint.resume=false"), "holds another run's checkpoints",
                  "checkpoint.overwrite=true")
    _assert_clear(_finetune(run, "model.overrides.hidden_size=64", "train.steps=3"),
                  "holds a run of another model", "model.overrides", "checkpoint.allow_config_change=true")
    _assert_clear(_finetune(run, "model.overrides.hidden_size=64", "train.steps=3",
                            "checkpoint.allow_config_change=true"), "this out_dir holds a run of another model")
    resumed = _finetune(run, "train.steps=3")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"flexcp finetune: resuming run in {run} from step 2" in resumed.stdout.splitlines()[0]
    fresh = _finetune(run, "checkpoint.resume=false", "checkpoint.overwrite=true")
    assert fresh.returncode == 0 and "resuming" not in fresh.stdout, fresh.stderr[-3000:]
    assert sorted(os.listdir(run / "checkpoints")) == ["step_00000001", "step_00000002"]  # step 3 of the old run: gone


@pytest.mark.parametrize("override, message", [
    ("train.lr=.inf", "train.lr must be a finite number; got inf"),
    ("train.eps=.nan", "train.eps must be a finite number; got nan"),
    ("train.betas=[0.9, .inf]", "train.betas[1] must be a finite number; got inf"),
    ("model.overrides.rope_theta=-.inf", "model.overrides.rope_theta must be a finite number; got -inf"),
])
def test_every_float_in_the_config_must_be_finite(override, message):
    from flexcp.train.config import check, load_config

    assert message in check(load_config(None, [override]), 1)


def test_resuming_may_change_how_a_run_runs_not_what_it_computes():
    from flexcp.train.config import load_config, to_dict
    from flexcp.train.run_dir import config_changes

    saved = to_dict(load_config(None, []))
    same_run = to_dict(load_config(None, ["train.steps=500", "logging.log_every=1", "checkpoint.keep=9",
                                          "model.activation_checkpointing=true", "eval.every=5"]))
    assert config_changes(saved, same_run) == []
    other = to_dict(load_config(None, ["parallel.cp=2", "data.seq_len=4096", "train.lr=1e-3"]))
    assert [c.split(":")[0] for c in config_changes(saved, other)] == ["data.seq_len", "parallel.cp", "train.lr"]
    del same_run["model"]["offload_activations"]  # a field another flexcp version lacks is no difference
    assert config_changes(saved, same_run) == []
