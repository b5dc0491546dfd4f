"""CastPlan: the transfer table of one rank for a GroupCast (and, transposed, a GroupReduce).

A plan says, for one rank of a group, which of its local rows go to each destination rank (in
order) and how many rows arrive from each source rank. It is plain host data (numpy), built on
every rank from information all ranks share, so building it needs no collective;
`validate_plan` is the optional debug check that the ranks' plans agree.

Receive-buffer layout (the contract `dist_attn` builds on): rows from source 0 first, then source 1,
..., each source's rows in the order that source listed them in its `send_rows[dst]`. Source `s`'s
rows start at `recv_offsets[s]`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch
import torch.distributed as dist


@dataclass(frozen=True)
class CommVolume:
    """Rows and bytes one rank moves over the network in one collective (rows to itself excluded)."""

    rows_sent: int
    rows_received: int
    bytes_sent: int
    bytes_received: int
    self_rows: int  # rows the rank sends to itself (a local copy, not network traffic)

    def transposed(self) -> "CommVolume":
        """The volume of the transposed collective (GroupReduce of a GroupCast's plan)."""
        return CommVolume(self.rows_received, self.rows_sent, self.bytes_received, self.bytes_sent, self.self_rows)


@dataclass(frozen=True, eq=False)
class CastPlan:
    """One rank's transfer table: `send_rows[dst]` local rows to send, `recv_counts[src]` rows to receive.

    Inputs may be numpy arrays, tensors or lists; they are stored as int64 numpy arrays and a tuple
    of ints. Rows may repeat (the same key sent twice to one rank is legal, just wasteful).
    """

    rank: int
    send_rows: tuple[np.ndarray, ...]
    recv_counts: tuple[int, ...]
    _device_index: dict = field(default_factory=dict, init=False, repr=False)

    def __post_init__(self) -> None:
        world_size = len(self.send_rows)
        if world_size < 1 or len(self.recv_counts) != world_size:
            raise ValueError(
                f"send_rows and recv_counts need one entry per rank of the group, got {world_size} and "
                f"{len(self.recv_counts)}"
            )
        if not 0 <= int(self.rank) < world_size:
            raise ValueError(f"rank must be in [0, {world_size}), got {self.rank}")
        rows = tuple(_as_index_array(r, dst) for dst, r in enumerate(self.send_rows))
        counts = tuple(int(c) for c in self.recv_counts)
        if min(counts) < 0:
            raise ValueError(f"recv_counts must be non-negative, got {counts}")
        object.__setattr__(self, "rank", int(self.rank))
        object.__setattr__(self, "send_rows", rows)
        object.__setattr__(self, "recv_counts", counts)

    @classmethod
    def from_requests(cls, rank: int, requests: Sequence[Sequence[np.ndarray]]) -> "CastPlan":
        """Plan from the global request table `requests[dst][src]` = rows (src-local) that dst needs from src.

        Every rank can compute the same table from shared data; each extracts its own plan, so send
        and receive counts agree by construction.
        """
        world_size = len(requests)
        if any(len(row) != world_size for row in requests):
            raise ValueError(f"requests must be a {world_size} x {world_size} table indexed [dst][src]")
        send_rows = tuple(requests[dst][rank] for dst in range(world_size))
        recv_counts = tuple(len(requests[rank][src]) for src in range(world_size))
        return cls(rank, send_rows, recv_counts)

    @property
    def world_size(self) -> int:
        return len(self.send_rows)

    @property
    def send_counts(self) -> tuple[int, ...]:
        return tuple(len(r) for r in self.send_rows)

    @property
    def num_send(self) -> int:
        """Rows in this rank's send buffer (all destinations, itself included)."""
        return sum(self.send_counts)

    @property
    def num_recv(self) -> int:
        """Rows in this rank's receive buffer (all sources, itself included)."""
        return sum(self.recv_counts)

    @property
    def recv_offsets(self) -> np.ndarray:
        """int64 [world_size + 1]: source s's rows occupy receive-buffer rows [off[s], off[s+1])."""
        return np.concatenate([[0], np.cumsum(self.recv_counts, dtype=np.int64)])

    @property
    def min_local_rows(self) -> int:
        """The smallest local tensor length the plan can index (largest sent row + 1)."""
        return max((int(r.max()) + 1 for r in self.send_rows if len(r)), default=0)

    def send_index(self, device: torch.device | str) -> torch.Tensor:
        """All send rows, destination-major, as an int64 tensor on `device` (cached per device)."""
        device = torch.device(device)
        index = self._device_index.get(device)
        if index is None:
            flat = np.concatenate(self.send_rows) if self.num_send else np.zeros(0, dtype=np.int64)
            index = self._device_index[device] = torch.from_numpy(flat).to(device)
        return index

    def volume(self, row_bytes: int = 1) -> CommVolume:
        """Network rows and bytes of this rank's GroupCast, for rows of `row_bytes` bytes (see `row_bytes`)."""
        self_rows = len(self.send_rows[self.rank])
        sent = self.num_send - self_rows
        received = self.num_recv - self.recv_counts[self.rank]
        return CommVolume(sent, received, sent * row_bytes, received * row_bytes, self_rows)


def row_bytes(tensors: Sequence[torch.Tensor]) -> int:
    """Bytes of one row of all `tensors` together (what one plan row moves in a packed collective)."""
    return sum(int(np.prod(t.shape[1:], dtype=np.int64)) * t.element_size() for t in tensors)


def validate_plan(plan: CastPlan, group: dist.ProcessGroup | None = None) -> None:
    """Debug check that all ranks' plans agree (one all_gather of counts); ValueError on every rank if not.

    Every rank sees the full count matrix, so all ranks raise together instead of some hanging later.
    """
    world_size, rank = dist.get_world_size(group), dist.get_rank(group)
    if plan.world_size != world_size or plan.rank != rank:
        raise ValueError(
            f"plan is for rank {plan.rank} of {plan.world_size}, but this is rank {rank} of a group of {world_size}"
        )
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend(group) == "nccl" else "cpu"
    mine = torch.tensor([*plan.send_counts, *plan.recv_counts], dtype=torch.int64, device=device)
    gathered = [torch.empty_like(mine) for _ in range(world_size)]
    dist.all_gather(gathered, mine, group=group)
    table = torch.stack(gathered).cpu().numpy()
    sends, recvs = table[:, :world_size], table[:, world_size:]  # sends[src, dst], recvs[dst, src]
    bad = np.argwhere(sends != recvs.T)
    if len(bad):
        src, dst = bad[0]
        raise ValueError(
            f"inconsistent CastPlans: rank {src} sends {sends[src, dst]} rows to rank {dst}, which expects "
            f"{recvs[dst, src]} ({len(bad)} mismatched pairs); build every rank's plan from the same table "
            f"(CastPlan.from_requests)"
        )


def _as_index_array(rows: np.ndarray | torch.Tensor | Sequence[int], dst: int) -> np.ndarray:
    if isinstance(rows, torch.Tensor):
        rows = rows.detach().cpu().numpy()
    array = np.asarray(rows)
    if array.size == 0:
        return np.zeros(0, dtype=np.int64)
    if array.ndim != 1 or not np.issubdtype(array.dtype, np.integer):
        raise ValueError(f"send_rows[{dst}] must be a 1-D integer array, got dtype {array.dtype} shape {array.shape}")
    if array.min() < 0:
        raise ValueError(f"send_rows[{dst}] has negative row indices (min {array.min()}); use local row numbers >= 0")
    return np.ascontiguousarray(array, dtype=np.int64)
