"""The (dp, cp) process mesh of a Trainer run: consecutive ranks form one CP group."""

from __future__ import annotations

from dataclasses import dataclass

import torch.distributed as dist


@dataclass(frozen=True)
class CPMesh:
    """Where this rank sits: ``dp`` CP groups of ``cp`` consecutive ranks each.

    ``cp_group`` is ``None`` at cp = 1 (local attention, no collectives).
    """

    dp: int
    cp: int
    dp_rank: int
    cp_rank: int
    cp_group: "dist.ProcessGroup | None"


def build_cp_mesh(cp_size: int, device_type: str = "cpu") -> CPMesh:
    """Split the default process group into ``world // cp_size`` CP groups of ``cp_size`` consecutive ranks.

    ``device_type`` is the ranks' device (``"cuda"`` for NCCL). At ``cp_size == 1`` no
    process group is needed. Every rank must call this (it creates the CP groups collectively).
    """
    if isinstance(cp_size, bool) or not isinstance(cp_size, int) or cp_size < 1:
        raise ValueError(f"cp_size must be a positive int; got {cp_size!r}")
    initialized = dist.is_available() and dist.is_initialized()
    world = dist.get_world_size() if initialized else 1
    rank = dist.get_rank() if initialized else 0
    if world % cp_size:
        raise ValueError(
            f"cp_size={cp_size} must divide the number of processes ({world}); launch "
            f"a multiple of {cp_size} processes (torchrun --nproc-per-node N / accelerate launch --num_processes N)"
        )
    if cp_size == 1:
        return CPMesh(dp=world, cp=1, dp_rank=rank, cp_rank=0, cp_group=None)
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh(device_type, (world // cp_size, cp_size), mesh_dim_names=("dp", "cp"))
    return CPMesh(dp=world // cp_size, cp=cp_size, dp_rank=rank // cp_size, cp_rank=rank % cp_size,
                  cp_group=mesh["cp"].get_group())


__all__ = ["CPMesh", "build_cp_mesh"]
