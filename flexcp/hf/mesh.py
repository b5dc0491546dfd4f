"""The (dp, cp) process mesh: consecutive ranks form one CP group (the Trainer, the recipe and the benchmarks)."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh


@dataclass(frozen=True)
class CPMesh:
    """Where this rank sits: ``dp`` CP groups of ``cp`` consecutive ranks each.

    ``cp_group`` is ``None`` at cp = 1 (local attention, no collectives). ``device_mesh`` is
    the ``("dp", "cp")`` DeviceMesh, ``None`` without torch.distributed (a world of one).
    """

    dp: int
    cp: int
    dp_rank: int
    cp_rank: int
    cp_group: "dist.ProcessGroup | None"
    device_mesh: DeviceMesh | None = None

    @property
    def dp_group(self) -> "dist.ProcessGroup | None":
        """The ranks holding this rank's place in the other CP groups (data parallel); None without a mesh."""
        return None if self.device_mesh is None else self.device_mesh["dp"].get_group()

    @cached_property
    def fsdp_mesh(self) -> DeviceMesh:
        """All dp x cp ranks as one dimension (FSDP shards over them); every rank must read it (collective)."""
        if self.device_mesh is None:
            raise ValueError("fsdp_mesh needs torch.distributed: initialize the default process group first")
        return self.device_mesh["dp", "cp"]._flatten("dp_cp")


def build_cp_mesh(cp_size: int, device_type: str = "cpu", *, dp: int | None = None) -> CPMesh:
    """Split the default process group into ``world // cp_size`` CP groups of ``cp_size`` consecutive ranks.

    ``device_type`` is the ranks' device (``"cuda"`` for NCCL). ``dp``, when given, must be
    ``world // cp_size`` (a config that names both is checked). Without torch.distributed
    this is a world of one with no mesh. Every rank must call this (it creates the groups
    collectively).
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
    if dp is not None and dp * cp_size != world:
        raise ValueError(f"dp ({dp}) x cp ({cp_size}) must equal the world size ({world})")
    if not initialized:
        return CPMesh(dp=1, cp=cp_size, dp_rank=0, cp_rank=0, cp_group=None)
    mesh = init_device_mesh(device_type, (world // cp_size, cp_size), mesh_dim_names=("dp", "cp"))
    return CPMesh(dp=world // cp_size, cp=cp_size, dp_rank=rank // cp_size, cp_rank=rank % cp_size,
                  cp_group=mesh["cp"].get_group() if cp_size > 1 else None, device_mesh=mesh)


__all__ = ["CPMesh", "build_cp_mesh"]
