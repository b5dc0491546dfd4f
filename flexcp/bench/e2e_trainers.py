"""Building and running the end-to-end benchmark's trainers: the recipe's Trainer per contender.

Shared by the table (``flexcp.bench.e2e_bench``) and the longest-sequence probe
(``flexcp.bench.e2e_memory``): recipe configs per contender, the initial-weights snapshot that
lets every point start from the same model, and failure handling that agrees over ranks.
"""

from __future__ import annotations

import gc
from typing import Callable

import torch
import torch.distributed as dist

from ..runtime import clear_cache
from ..train.config import from_dict
from ..train.data import PackedSequence
from ..train.loop import Trainer
from . import e2e_workloads as wl
from .native_cp import NativeCPTrainer


def preset_of(workload: str, tiny: bool) -> tuple[str, dict]:
    """``(preset, overrides)`` of a workload's model; ``tiny`` keeps the architecture on the tiny preset."""
    preset = wl.WORKLOAD_PRESET[workload]
    if not tiny:
        return preset, {}
    return "tiny", ({"model_type": "mistral", "sliding_window": 64} if preset == "mistral-1b" else {})


def recipe_config(impl: str, cp: int, preset: str, overrides: dict, seq_len: int, args, offload: bool = False) -> dict:
    """The recipe config of a contender (native CP is an sdpa cp = 1 config, sharded by NativeCPTrainer)."""
    return {
        "out_dir": str(args.out / "run"),
        "model": {"preset": preset, "overrides": overrides, "activation_checkpointing": True,
                  "attn_implementation": "sdpa" if impl == "native" else impl, "offload_activations": offload},
        "data": {"kind": "recall", "seq_len": seq_len},  # replaced by the workload's FixedSource
        "parallel": {"cp": 1 if impl == "native" else cp, "chunk_size": args.chunk_size},
        "train": {"steps": 1 << 30, "lr": 1e-4, "warmup_steps": 0, "dtype": "fp32" if args.cpu else "bf16"},
        "checkpoint": {"resume": False, "export_hf": False},
        "logging": {"progress": "none"},
    }


def build_trainer(impl: str, cp: int, preset: str, overrides: dict, args, offload: bool = False) -> Trainer:
    cfg = from_dict(recipe_config(impl, cp, preset, overrides, 2 * cp * args.chunk_size, args, offload))
    if impl == "native":
        return NativeCPTrainer(cfg, cp, packed_as_causal=True)
    return Trainer(cfg)


class InitialState:
    """The trainer's initial weights (host copy); :meth:`restore` also drops the optimizer's moments."""

    def __init__(self, trainer: Trainer) -> None:
        self.trainer = trainer
        pin = trainer.device.type == "cuda"  # pinned: the copy back at every point is fast
        self.weights = [torch.empty_like(_local(p), device="cpu", pin_memory=pin).copy_(_local(p))
                        for p in trainer.model.parameters()]

    @torch.no_grad()
    def restore(self) -> None:
        for p, w in zip(self.trainer.model.parameters(), self.weights):
            _local(p).copy_(w)
        self.trainer.optimizer.state.clear()
        self.trainer.optimizer.zero_grad(set_to_none=True)


def _local(p: torch.Tensor) -> torch.Tensor:
    return p.to_local() if hasattr(p, "to_local") else p


def use_sequence(trainer: Trainer, seq: PackedSequence) -> None:
    """Make ``seq`` the trainer's data: every micro-batch index returns it."""
    trainer.cfg.data.seq_len = seq.input_ids.numel()
    trainer.source = wl.FixedSource(seq)


def free_trainer() -> None:
    """Release a dropped trainer's memory (call after the last reference is gone)."""
    clear_cache()
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def all_max(values: list[float], device: torch.device) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.tolist()


def _failure(exc: BaseException) -> dict:
    if isinstance(exc, torch.OutOfMemoryError):
        return {"oom": True}
    return {"error": f"{type(exc).__name__}: {exc}"[:400]}


def run_guarded(fn: Callable[[], dict], device: torch.device) -> dict:
    """``fn()``, or ``{"oom": True}`` / ``{"error": ...}`` when it raises on any rank (agreed over ranks)."""
    try:
        res, bad = fn(), 0.0
    except Exception as exc:  # noqa: BLE001 - one failing point must not end the launch
        res, bad = _failure(exc), 1.0
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    (any_bad,) = all_max([bad], device)
    if any_bad and not bad:
        res = {"error": "failed on another rank"}
    return res
