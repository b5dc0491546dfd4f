"""Resumable checkpoints with torch.distributed.checkpoint, and the final HF export.

A checkpoint ``<out_dir>/checkpoints/step_<N>/`` holds the sharded model and optimizer
(DTensors, written by every rank in parallel), the LR scheduler, the data position and
the RNG states; loading it gives bit-identical continuation. Directories are written
under a temporary name, get a ``manifest.json`` of checksums last (``manifest.py``) and
are renamed when complete. Resume verifies the manifest and falls back to the newest
intact checkpoint, warning about each one it skips; a failed save (disk full, no
permission) is a :class:`CheckpointError` naming the path and the fix.
"""

from __future__ import annotations

import os
import re
import shutil
import warnings
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_state_dict,
)
from torch.distributed.checkpoint.stateful import Stateful

from .manifest import CheckpointError, failure_causes, save_error, verify, write_manifest

_STEP_DIR = re.compile(r"^step_(\d+)$")


@dataclass
class TrainProgress:
    """Where training stands: optimizer steps done and the next global micro-batch index."""

    step: int = 0
    data_index: int = 0


class _RunState(Stateful):
    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any,
                 progress: TrainProgress) -> None:
        self.model, self.optimizer, self.scheduler, self.progress = model, optimizer, scheduler, progress

    def state_dict(self) -> dict[str, Any]:
        model_sd, optim_sd = get_state_dict(self.model, self.optimizer)
        rng = {"cpu": torch.get_rng_state()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state()
        return {"model": model_sd, "optim": optim_sd, "scheduler": self.scheduler.state_dict(),
                "progress": {"step": self.progress.step, "data_index": self.progress.data_index}, "rng": rng}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        set_state_dict(self.model, self.optimizer, model_state_dict=sd["model"], optim_state_dict=sd["optim"])
        self.scheduler.load_state_dict(sd["scheduler"])
        self.progress.step = int(sd["progress"]["step"])
        self.progress.data_index = int(sd["progress"]["data_index"])
        torch.set_rng_state(sd["rng"]["cpu"])
        if "cuda" in sd["rng"] and torch.cuda.is_available():
            torch.cuda.set_rng_state(sd["rng"]["cuda"])


def checkpoint_dir(out_dir: str) -> str:
    return os.path.join(out_dir, "checkpoints")


def latest_checkpoint(out_dir: str) -> str | None:
    """The newest intact ``step_<N>`` directory under ``out_dir/checkpoints``, or None when there is none (collective).

    Newer ones that fail verification are skipped with a warning naming each and why; if
    checkpoints exist but none is intact, a :class:`CheckpointError` says so.
    """
    root = checkpoint_dir(out_dir)
    if not os.path.isdir(root):
        return None
    steps = sorted(((int(m.group(1)), name) for name in os.listdir(root) if (m := _STEP_DIR.match(name))), reverse=True)
    skipped: list[str] = []
    for _, name in steps:
        path = os.path.join(root, name)
        reason = verify(path)
        if reason is None:
            if skipped and dist.get_rank() == 0:
                warnings.warn(f"resume: using {path}; skipped newer checkpoint(s) that are not intact: "
                              + "; ".join(skipped), RuntimeWarning, stacklevel=2)
            return path
        skipped.append(f"{path}: {reason}")
    if skipped:
        raise CheckpointError(f"no intact checkpoint to resume from under {root}: " + "; ".join(skipped)
                              + ". Delete the broken directories (or set checkpoint.resume=false) to start over")
    return None


def save_checkpoint(out_dir: str, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any,
                    progress: TrainProgress, keep: int) -> str:
    """Write ``step_<progress.step>`` (collective: every rank calls it); keep the newest ``keep``."""
    root = checkpoint_dir(out_dir)
    final = os.path.join(root, f"step_{progress.step:08d}")
    tmp = final + ".tmp"
    if dist.get_rank() == 0:
        shutil.rmtree(tmp, ignore_errors=True)
    dist.barrier()
    try:
        dcp.save({"run": _RunState(model, optimizer, scheduler, progress)}, checkpoint_id=tmp)
        dist.barrier()
        write_manifest(tmp, progress.step)
        dist.barrier()
    except (Exception, dcp.api.CheckpointException) as exc:
        if dist.get_rank() == 0:
            shutil.rmtree(tmp, ignore_errors=True)  # a partial save only takes space
        raise save_error(exc, tmp) from exc
    if dist.get_rank() == 0:
        shutil.rmtree(final, ignore_errors=True)
        os.rename(tmp, final)
        done = sorted(n for n in os.listdir(root) if _STEP_DIR.match(n))
        for old in done[:-keep]:
            shutil.rmtree(os.path.join(root, old), ignore_errors=True)
    dist.barrier()
    return final


def load_checkpoint(path: str, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any,
                    progress: TrainProgress) -> None:
    """Restore everything :func:`save_checkpoint` wrote (collective).

    A checkpoint whose tensors do not fit this model (another architecture or size) is a
    :class:`CheckpointError` saying so, not a raw size mismatch.
    """
    if not os.path.isdir(path):
        raise ValueError(f"checkpoint {path!r} does not exist")
    try:
        dcp.load({"run": _RunState(model, optimizer, scheduler, progress)}, checkpoint_id=path)
    except (Exception, dcp.api.CheckpointException) as exc:
        text = "; ".join(str(c) for c in failure_causes(exc))
        if "mismatch" in text.lower() or "missing key" in text.lower() or "unexpected key" in text.lower():
            first = text.splitlines()[0] if text else type(exc).__name__
            raise CheckpointError(
                f"cannot resume from {path}: this out_dir holds a run of another model ({first}); use a new "
                "out_dir for this model, or checkpoint.resume=false with checkpoint.overwrite=true to replace "
                "that run") from exc
        raise


def export_hf(model: nn.Module, lm: nn.Module, prefix: str, tokenizer: Any, out_dir: str) -> str | None:
    """Gather the full weights and write an HF safetensors directory (collective; rank 0 writes).

    ``prefix`` is where the HF model sits inside ``model`` (e.g. ``"lm."``). The result
    loads with ``AutoModelForCausalLM.from_pretrained(out_dir)``.
    """
    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if dist.get_rank() != 0:
        dist.barrier()
        return None
    sd = {k[len(prefix):]: v for k, v in full.items() if k.startswith(prefix)}
    os.makedirs(out_dir, exist_ok=True)
    lm.save_pretrained(out_dir, state_dict=sd, safe_serialization=True)
    tokenizer.save(out_dir)
    dist.barrier()
    return out_dir
