"""The run's folder, checked before anything is built: one run per ``out_dir``, never two mixed.

``out_dir`` holds one run: ``config.yaml`` (its resolved config), ``metrics.jsonl``, ``tb/``,
``hf/`` and ``checkpoints/step_<N>/``. Before the model is built, :func:`prepare_out_dir`
(collective: rank 0 looks, every rank gets the same verdict) makes sure the folder and its
checkpoint folder can be written, and decides what an existing run there means:

- ``checkpoint.resume=true`` resumes it, but only if the config differs from the saved one in
  settings that do not change the run (:data:`FREE_KEYS`: more steps, logging, checkpointing,
  memory levers); otherwise it refuses, naming each difference, unless
  ``checkpoint.allow_config_change=true``;
- ``checkpoint.resume=false`` refuses to start a second run beside the first one's checkpoints
  (a later resume would pick the newest step of either), unless ``checkpoint.overwrite=true``,
  which deletes the old run's outputs first.
"""

from __future__ import annotations

import errno
import os
import shutil
from typing import Any

import torch.distributed as dist
import yaml

from .errors import RunError
from .schema import FinetuneConfig

CONFIG_FILE = "config.yaml"
OUTPUTS = ("checkpoints", "metrics.jsonl", "tb", "hf", CONFIG_FILE)
"""What a run writes under out_dir (``checkpoint.overwrite=true`` deletes these, nothing else)."""

FREE_KEYS = ("out_dir", "train.steps", "train.loss_chunk_tokens", "checkpoint.", "logging.", "eval.",
             "parallel.timeout_minutes", "parallel.chunk_size", "model.activation_checkpointing",
             "model.offload_activations")
"""Config keys (prefixes with a dot) a resumed run may change: they change how it runs, not what it computes."""


def _flat(tree: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(tree, dict) or (prefix and prefix.rstrip(".").endswith("overrides")):
        return {prefix.rstrip("."): tree}
    out: dict[str, Any] = {}
    for key, value in tree.items():
        out.update(_flat(value, f"{prefix}{key}."))
    return out


def _free(key: str) -> bool:
    return any(key == f or (f.endswith(".") and key.startswith(f)) for f in FREE_KEYS)


def config_changes(saved: dict[str, Any], now: dict[str, Any]) -> list[str]:
    """``"key: saved -> now"`` for every run-changing difference between two config dicts.

    Keys only one side has (a field added or removed by another flexcp version) are not differences.
    """
    old, new = _flat(saved), _flat(now)
    return [f"{k}: {old[k]!r} -> {new[k]!r}" for k in sorted(old.keys() & new.keys())
            if old[k] != new[k] and not _free(k)]


def step_dirs(out_dir: str) -> list[str]:
    """The checkpoint step folders (finished or not) under ``out_dir/checkpoints``."""
    root = os.path.join(out_dir, "checkpoints")
    return sorted(n for n in os.listdir(root) if n.startswith("step_")) if os.path.isdir(root) else []


def _writable_problem(folder: str) -> str | None:
    """Why ``folder`` cannot be created and written (a probe file), or None."""
    probe = os.path.join(folder, ".flexcp_write_probe")
    try:
        os.makedirs(folder, exist_ok=True)
        with open(probe, "w") as f:
            f.write("ok")
        os.remove(probe)
    except OSError as exc:
        if exc.errno == errno.EROFS:
            return f"{folder!r} is on a read-only file system ({exc}); set out_dir to a directory on a writable disk"
        if exc.errno in (errno.EACCES, errno.EPERM):
            return f"no permission to write in {folder!r} ({exc}); make it writable or set out_dir to a directory you can write"
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            return f"the disk holding {folder!r} is full ({exc}); free space or set out_dir to a larger disk"
        return f"cannot write in {folder!r} ({type(exc).__name__}: {exc}); set out_dir to a directory you can write"
    return None


def _saved_config(out_dir: str) -> dict[str, Any] | None:
    path = os.path.join(out_dir, CONFIG_FILE)
    try:
        with open(path) as f:
            saved = yaml.safe_load(f)
    except (OSError, yaml.YAMLError):
        return None
    return saved if isinstance(saved, dict) else None


def out_dir_problem(cfg: FinetuneConfig, now: dict[str, Any]) -> str | None:
    """What stops a run of ``cfg`` (resolved, as ``now``) in its out_dir, or None; may clear old outputs (overwrite)."""
    out, ck = cfg.out_dir, cfg.checkpoint
    if os.path.exists(out) and not os.path.isdir(out):
        return f"out_dir={out!r} is a file, not a directory; set out_dir to a new or existing directory"
    previous = step_dirs(out)
    if previous and not ck.resume:
        if not ck.overwrite:
            return (f"out_dir={out!r} holds another run's checkpoints ({', '.join(previous[-3:])}) and "
                    "checkpoint.resume=false: a second run there would mix with the first. Use a new out_dir, "
                    "set checkpoint.resume=true to continue that run, or checkpoint.overwrite=true to delete its "
                    f"outputs ({', '.join(OUTPUTS)}) and start over")
        for name in OUTPUTS:
            path = os.path.join(out, name)
            if os.path.isdir(path):
                shutil.rmtree(path)
            elif os.path.exists(path):
                os.remove(path)
    elif previous and (saved := _saved_config(out)) is not None and not ck.allow_config_change:
        changes = config_changes(saved, now)
        if changes:
            other = any(c.startswith("model.") for c in changes)
            what = "a run of another model" if other else "a run with another config"
            return (f"out_dir={out!r} holds {what}; resuming it would change the run: {'; '.join(changes)}. "
                    "Use a new out_dir, checkpoint.resume=false with checkpoint.overwrite=true to start over, or "
                    "checkpoint.allow_config_change=true to resume with the new settings anyway")
    return _writable_problem(os.path.join(out, "checkpoints"))


def prepare_out_dir(cfg: FinetuneConfig, now: dict[str, Any]) -> None:
    """Check (and with ``checkpoint.overwrite`` clear) ``cfg.out_dir`` on rank 0; every rank raises alike (collective)."""
    verdict = [out_dir_problem(cfg, now) if dist.get_rank() == 0 else None]
    if dist.get_world_size() > 1:
        dist.broadcast_object_list(verdict, src=0)
    if verdict[0] is not None:
        raise RunError(verdict[0])
