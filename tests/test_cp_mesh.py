"""flexcp.hf.CPMesh, the one (dp, cp) mesh type of the Trainer, the recipe and the benchmarks (gloo, spawned ranks)."""

from __future__ import annotations

import pytest
import torch.distributed as dist

from flexcp.hf import build_cp_mesh
from multiproc import run_spawned


def _layout(rank: int, world: int, cp: int) -> dict:
    mesh = build_cp_mesh(cp, "cpu")
    fsdp = mesh.fsdp_mesh
    return {
        "dp": (mesh.dp, mesh.dp_rank), "cp": (mesh.cp, mesh.cp_rank),
        "cp_ranks": None if mesh.cp_group is None else dist.get_process_group_ranks(mesh.cp_group),
        "dp_ranks": dist.get_process_group_ranks(mesh.dp_group),
        "fsdp": (fsdp.size(), fsdp.get_local_rank()),
        "named_dp": _error(lambda: build_cp_mesh(cp, "cpu", dp=world)),
    }


def _error(fn) -> str:
    try:
        fn()
    except ValueError as e:
        return str(e)
    return ""


@pytest.mark.parametrize("cp", [1, 2, 4])
def test_cp_groups_are_consecutive_ranks_and_dp_groups_stride_over_them(cp: int) -> None:
    world = 4
    for rank, got in enumerate(run_spawned(_layout, world, cp)):
        assert got["dp"] == (world // cp, rank // cp) and got["cp"] == (cp, rank % cp)
        first = rank - rank % cp
        assert got["cp_ranks"] == (None if cp == 1 else list(range(first, first + cp)))
        assert got["dp_ranks"] == list(range(rank % cp, world, cp))
        assert got["fsdp"] == (world, rank)
        # a config naming dp must name world / cp
        assert ("must equal the world size" in got["named_dp"]) == (cp != 1)


def test_without_torch_distributed_a_world_of_one_has_no_mesh(monkeypatch) -> None:
    monkeypatch.setattr(dist, "is_initialized", lambda: False)  # whatever this pytest process joined before
    mesh = build_cp_mesh(1)
    assert (mesh.dp, mesh.cp, mesh.cp_group, mesh.device_mesh, mesh.dp_group) == (1, 1, None, None, None)
    with pytest.raises(ValueError, match="cp_size=2 must divide the number of processes"):
        build_cp_mesh(2)
    with pytest.raises(ValueError, match="fsdp_mesh needs torch.distributed"):
        mesh.fsdp_mesh
