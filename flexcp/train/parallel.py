"""The process group, and FSDP2 over all dp x cp ranks of the (dp, cp) mesh (``flexcp.hf.mesh``)."""

from __future__ import annotations

import datetime
import os
import socket

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

from ..hf.mesh import CPMesh
from .model import decoder_layers


def free_port() -> int:
    """A TCP port free on this host right now (for a local rendezvous)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed(timeout_minutes: float = 10.0) -> torch.device:
    """Join (or create) the default process group: NCCL with one GPU per rank, else gloo.

    Under torchrun the env:// variables are used; a plain ``python`` launch becomes a
    world of one. A collective that waits longer than ``timeout_minutes`` raises instead of
    blocking (torch's default is 30 minutes). Returns this rank's device.
    """
    if not timeout_minutes > 0:
        raise ValueError(f"parallel.timeout_minutes must be > 0; got {timeout_minutes}")
    timeout = datetime.timedelta(minutes=timeout_minutes)
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        extra = {"device_id": device} if device.type == "cuda" else {}
        if "RANK" not in os.environ:
            # a world of one rendezvous in memory: no TCP port to pick (a picked-then-bound port races
            # with other processes on a busy machine: EADDRINUSE), and no RANK/WORLD_SIZE written to
            # os.environ (child processes would inherit a half env:// setup without MASTER_ADDR)
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout, **extra)
        else:
            dist.init_process_group(backend, timeout=timeout, **extra)
    return device


def apply_fsdp(model: nn.Module, lm: nn.Module, dims: CPMesh, bf16: bool) -> nn.Module:
    """FSDP2 ``fully_shard`` per decoder layer, then the root, sharded over all dp x cp ranks.

    Gradients are SUMMED over the ranks (divide factor 1): the per-rank losses are
    already normalized by the global label count, and dispatched inputs need the sum over
    the CP group.
    """
    dtypes = {"param_dtype": torch.bfloat16, "reduce_dtype": torch.float32} if bf16 else {}
    mp = MixedPrecisionPolicy(**dtypes)
    for layer in decoder_layers(lm):
        fully_shard(layer, mesh=dims.fsdp_mesh, mp_policy=mp)
    fully_shard(model, mesh=dims.fsdp_mesh, mp_policy=mp)
    for module in model.modules():
        if hasattr(module, "set_gradient_divide_factor"):
            module.set_gradient_divide_factor(1.0)
            module.set_force_sum_reduction_for_comms(True)  # plain SUM (gloo has no PREMUL_SUM)
    return model
