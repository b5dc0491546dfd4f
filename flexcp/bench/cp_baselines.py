"""Baseline context-parallel attention schemes for ``flexcp bench cp``: all-gather K/V and a ring.

Every scheme computes with the same single-device backend as flexcp, over slice tables cut
from the mask with ``mask.geometry.clip_band`` (a rank's rows x some ranks' keys), so a
benchmark compares communication schemes, not kernels:

- :class:`AllGatherScheme` (the scheme of torch's native CP): every rank all-gathers the
  whole K and V, computes its rows against all keys, and in the backward all-gathers K/V
  again and reduce-scatters dK/dV (float32). Nothing is overlapped.
- :class:`RingScheme` (ring attention): ``cp`` steps; at step ``s`` a rank holds the K/V
  shard of rank ``rank - s`` and passes it on to ``rank + 1`` while it computes; partial
  ``(out, lse)`` merge in float32. The backward passes K/V around again, with a float32
  dK/dV accumulator travelling beside each shard that arrives home after ``cp`` hops.
  Meant for causal masks with zigzag sharding (balanced only there).

Both shard with a :class:`DispatchPlan`; the benchmark gives the all-gather scheme the
same plan as flexcp, so only the communication differs. ``recv_bytes`` counts what a rank
receives over the network (its own shard excluded).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
import torch.distributed as dist

from ..sharding import DispatchPlan
from ..sharding import ops as dispatch_ops
from ..sharding.collectives import all_gather_single, reduce_scatter_single
from ..kernels.compose import merge_partials
from ..kernels.backend import AttnBackend
from ..mask.geometry import SliceTable, clip_band, slice_areas

GRAD_BYTES = 4
"""Bytes per element of dK/dV on the wire: every scheme reduces key/value gradients in float32."""


# ------------------------------------------------------------------------------------ slice tables


@dataclass(frozen=True)
class OwnerRuns:
    """Maximal runs of consecutive chunks of one owner: global rows ``[start, end)``, at ``local`` in its shard."""

    start: np.ndarray
    end: np.ndarray
    owner: np.ndarray
    local: np.ndarray


def owner_runs(plan: DispatchPlan) -> OwnerRuns:
    """The plan's chunks merged into runs (consecutive chunks of one rank are consecutive in its shard)."""
    owner = plan.owner_of_chunk
    first = np.nonzero(np.concatenate([[True], owner[1:] != owner[:-1]]))[0]
    last = np.concatenate([first[1:], [plan.num_chunks]])
    cs = plan.chunk_size
    return OwnerRuns(first * cs, last * cs, owner[first], plan.local_offset_of_chunk[first])


def _clip_to_intervals(
    table: SliceTable, start: np.ndarray, end: np.ndarray, axis: int
) -> tuple[SliceTable, np.ndarray, np.ndarray]:
    """Pieces of every slice inside sorted disjoint intervals along q (``axis=0``) or k (``axis=1``).

    Returns the pieces (global coordinates) and, per piece, its source slice and interval.
    """
    lo_edge, hi_edge = (table.qs, table.qe) if axis == 0 else (table.ks, table.ke)
    first = np.searchsorted(end, lo_edge, side="right")
    n = np.maximum(np.searchsorted(start, hi_edge, side="left") - first, 0)
    src = np.repeat(np.arange(len(table)), n)
    interval = np.repeat(first, n) + np.arange(n.sum()) - np.repeat(np.cumsum(n) - n, n)
    q0, q1, k0, k1 = table.qs[src], table.qe[src], table.ks[src], table.ke[src]
    if axis == 0:
        q0, q1 = np.maximum(q0, start[interval]), np.minimum(q1, end[interval])
    else:
        k0, k1 = np.maximum(k0, start[interval]), np.minimum(k1, end[interval])
    pieces, band = clip_band(q0, q1, k0, k1, table.lo[src], table.hi[src])
    return pieces, src[band], interval[band]


def block_table(
    table: SliceTable, plan: DispatchPlan, q_rank: int, k_ranks: Sequence[int], k_base: Sequence[int]
) -> SliceTable:
    """The mask restricted to ``q_rank``'s rows and the keys owned by ``k_ranks``.

    Rows are in ``q_rank``'s local coordinates; a key owned by rank ``o`` at local row ``j``
    of its shard sits at ``k_base[o] + j`` (``o * local_len`` for an all-gathered buffer,
    ``0`` for a single received shard). Empty pieces are dropped.
    """
    runs = owner_runs(plan)
    mine = runs.owner == q_rank
    rows, _, qi = _clip_to_intervals(table, runs.start[mine], runs.end[mine], axis=0)
    dq = (runs.local[mine] - runs.start[mine])[qi]
    theirs = np.isin(runs.owner, np.asarray(k_ranks, dtype=np.int64))
    pieces, src, ki = _clip_to_intervals(rows, runs.start[theirs], runs.end[theirs], axis=1)
    base = np.asarray(k_base, dtype=np.int64)[runs.owner[theirs]]
    dk = (base + runs.local[theirs] - runs.start[theirs])[ki]
    out = pieces.shifted(dq[src], dk)
    return out.take(np.nonzero(slice_areas(out) > 0)[0])


# ----------------------------------------------------------------------------------------- schemes


class CpScheme:
    """A way of running attention over one sequence sharded by ``plan`` on ``group``.

    ``group`` is ``None`` for a group of one (no communication). Subclasses implement
    :meth:`attn` (autograd-aware), :meth:`recv_bytes` and :meth:`kernel_slices`.
    """

    name = "?"

    def __init__(self, plan: DispatchPlan, group: dist.ProcessGroup | None, num_heads_kv: int, head_dim: int,
                 dtype: torch.dtype) -> None:
        self.plan, self.group = plan, group
        self.cp = plan.cp_size
        self.rank = dist.get_rank(group) if self.cp > 1 else 0
        width = 2 * num_heads_kv * head_dim  # one row of K and V together
        self.kv_row_bytes = width * torch.empty(0, dtype=dtype).element_size()
        self.grad_row_bytes = width * GRAD_BYTES

    def shard(self, x: torch.Tensor) -> torch.Tensor:
        """This rank's shard of a global tensor (same on every rank)."""
        return dispatch_ops.dispatch(x, self.plan, self.rank)

    def unshard(self, x: torch.Tensor) -> torch.Tensor:
        """The global tensor back from every rank's shard."""
        return dispatch_ops.undispatch(x, self.plan, self.group if self.cp > 1 else None)

    def attn(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def recv_bytes(self) -> tuple[int, int]:
        """Network bytes this rank receives in one forward and in one forward+backward."""
        raise NotImplementedError

    def kernel_slices(self) -> int:
        """Slices in the tables this rank's kernel calls get (fragmentation costs kernel time)."""
        raise NotImplementedError


class _KernelScheme(CpScheme):
    """A baseline scheme: drives the backend itself, with the default softmax scale."""

    def __init__(self, plan, group, backend: AttnBackend, num_heads_kv: int, head_dim: int, dtype: torch.dtype):
        super().__init__(plan, group, num_heads_kv, head_dim, dtype)
        self.backend = backend
        self.scale = head_dim ** -0.5

    def _global_rank(self, group_rank: int) -> int:
        return dist.get_global_rank(self.group, group_rank)


class AllGatherScheme(_KernelScheme):
    """All-gather full K/V, attend locally, reduce-scatter dK/dV (torch native CP's all-gather scheme)."""

    name = "allgather"

    def __init__(self, table: SliceTable, plan, group, backend, num_heads_kv, head_dim, dtype, device):
        super().__init__(plan, group, backend, num_heads_kv, head_dim, dtype)
        n = plan.local_len
        self.table = block_table(table, plan, self.rank, range(self.cp), np.arange(self.cp) * n)
        self.prep = backend.prepare(self.table, n, self.cp * n, torch.device(device))

    def attn(self, q, k, v):
        return _AllGatherAttn.apply(q.contiguous(), k.contiguous(), v.contiguous(), self)

    def kernel_slices(self) -> int:
        return len(self.table)

    def recv_bytes(self) -> tuple[int, int]:
        rows = (self.cp - 1) * self.plan.local_len
        return rows * self.kv_row_bytes, rows * (self.kv_row_bytes + self.grad_row_bytes)

    def gather(self, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        if self.cp == 1:
            return tensors
        outs = [t.new_empty((self.cp * t.shape[0], *t.shape[1:])) for t in tensors]
        works = [all_gather_single(o, t, group=self.group, async_op=True) for o, t in zip(outs, tensors)]
        for w in works:
            w.wait()
        return outs

    def reduce_scatter(self, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        if self.cp == 1:
            return tensors
        outs = [t.new_empty((t.shape[0] // self.cp, *t.shape[1:])) for t in tensors]
        works = [
            reduce_scatter_single(o, t, op=dist.ReduceOp.SUM, group=self.group, async_op=True)
            for o, t in zip(outs, tensors)
        ]
        for w in works:
            w.wait()
        return outs


class _AllGatherAttn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, scheme: AllGatherScheme):
        k_all, v_all = scheme.gather([k, v])
        out, lse = scheme.backend.forward(q, k_all, v_all, scheme.prep, scheme.scale, 0.0)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.scheme = scheme
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, dout, _dlse):
        q, k, v, out, lse = ctx.saved_tensors
        s = ctx.scheme
        k_all, v_all = s.gather([k, v])
        dq, dk_all, dv_all = s.backend.backward(dout.contiguous(), q, k_all, v_all, out, lse, s.prep, s.scale, 0.0)
        dk, dv = s.reduce_scatter([dk_all, dv_all])  # float32 partials from the backend
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None


class _Shift:
    """One in-flight ring hop: ``tensors`` go to the next rank, buffers like them arrive from the previous one."""

    def __init__(self, scheme: "RingScheme", tensors: list[torch.Tensor]) -> None:
        nxt = scheme._global_rank((scheme.rank + 1) % scheme.cp)
        prv = scheme._global_rank((scheme.rank - 1) % scheme.cp)
        self.sent = tensors  # must stay alive until the sends complete
        self.recv = [torch.empty_like(t) for t in tensors]
        ops = [dist.P2POp(dist.isend, t, nxt, scheme.group) for t in tensors]
        ops += [dist.P2POp(dist.irecv, b, prv, scheme.group) for b in self.recv]
        self.works = dist.batch_isend_irecv(ops)

    def wait(self) -> list[torch.Tensor]:
        for w in self.works:
            w.wait()
        self.works, self.sent = [], []
        return self.recv


class RingScheme(_KernelScheme):
    """Ring attention: K/V shards travel around the group, one hop per step, overlapped with compute."""

    name = "ring"

    def __init__(self, table: SliceTable, plan, group, backend, num_heads_kv, head_dim, dtype, device):
        super().__init__(plan, group, backend, num_heads_kv, head_dim, dtype)
        n, zero = plan.local_len, np.zeros(self.cp, dtype=np.int64)
        self.tables = [block_table(table, plan, self.rank, [(self.rank - s) % self.cp], zero) for s in range(self.cp)]
        self.preps = [backend.prepare(t, n, n, torch.device(device)) for t in self.tables]

    def attn(self, q, k, v):
        return _RingAttn.apply(q.contiguous(), k.contiguous(), v.contiguous(), self)

    def kernel_slices(self) -> int:
        return sum(len(t) for t in self.tables)

    def recv_bytes(self) -> tuple[int, int]:
        n, hops = self.plan.local_len, self.cp - 1
        kv = hops * n * self.kv_row_bytes
        grads = (self.cp * n * self.grad_row_bytes) if self.cp > 1 else 0  # the accumulator's last hop goes home
        return kv, kv + grads

    def steps(self, k: torch.Tensor, v: torch.Tensor):
        """Yield ``(step, k, v)`` for every step, the next shard already travelling while the caller computes."""
        for s in range(self.cp):
            hop = _Shift(self, [k, v]) if s < self.cp - 1 else None
            yield s, k, v
            if hop is not None:
                k, v = hop.wait()


class _RingAttn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, scheme: RingScheme):
        out = lse = None
        for s, k_s, v_s in scheme.steps(k, v):
            if len(scheme.tables[s]):
                o, l = scheme.backend.forward(q, k_s, v_s, scheme.preps[s], scheme.scale, 0.0, out_dtype=torch.float32)
                out, lse = (o, l) if out is None else merge_partials(out, lse, o, l)
        if out is None:  # no row of this rank attends to anything
            out = q.new_zeros(q.shape, dtype=torch.float32)
            lse = torch.full(q.shape[:2], float("-inf"), dtype=torch.float32, device=q.device)
        out = out.to(q.dtype)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.scheme = scheme
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, dout, _dlse):
        q, k, v, out, lse = ctx.saved_tensors
        s_ = ctx.scheme
        dout = dout.contiguous()
        dq = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
        acc = [torch.zeros(k.shape, dtype=torch.float32, device=k.device) for _ in range(2)]  # dK, dV of the held shard
        pending = None  # the accumulator of the shard held now, still arriving
        for s, k_s, v_s in s_.steps(k, v):
            grads = None
            if len(s_.tables[s]):
                grads = s_.backend.backward(dout, q, k_s, v_s, out, lse, s_.preps[s], s_.scale, 0.0)
                dq += grads[0]
            if pending is not None:
                acc = pending.wait()
            if grads is not None:
                acc[0] += grads[1]
                acc[1] += grads[2]
            pending = _Shift(s_, acc) if s_.cp > 1 else None
        dk, dv = pending.wait() if pending is not None else acc
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None
