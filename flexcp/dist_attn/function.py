"""Distributed attention, forward and backward: GroupCast K/V, compute per stage, merge; the reverse in backward.

The two functions are the bodies of the ``flexcp::calc_attn`` custom ops (runtime/ops.py).

Forward: all remote stages' K/V casts are issued at once (async, one all-to-all each,
K and V together), the host stage is computed while they travel, then each remote
stage as its data arrives; partial ``(out, lse)`` merge in float32 (float64 for float64
inputs). Backward re-casts K/V (nothing remote is kept between passes), computes the
host stage's gradients as float32 accumulators (float64 for float64 inputs; in the
inputs' dtype when there is no remote stage: they are then final) and each remote
stage's partials in the inputs' dtype (what cuDNN's kernels write; they travel at that
width), GroupReduced into the owners' accumulators while the next stage computes; a
stage with no work still sends zeros of that dtype, so every rank's all-to-all has the
same byte sizes.

Before its first transfer the forward proves that every rank passes the same key, dtypes,
shapes, ``scale``, ``softcap`` and whether q/k/v need gradients (:func:`flexcp.comm.agree`: one 8-byte fingerprint
per rank); the backward's sizes follow from what the forward agreed.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from ..comm import CastPlan, agree, group_cast, group_reduce
from ..kernels.backend import AttnBackend, stat_dtype
from ..kernels.compose import merge_partials
from .plan import RankAttnPlan


class DistAttnState:
    """A rank's plan bound to its process group, with its comm plans and its backends' schedules.

    The runtime's key cache holds one state per key, so the schedules (``schedules``) are
    evicted with the key. ``tag`` identifies the plan's key across ranks (equal on every rank
    that built the same key); it goes into each call's agreement fingerprint.
    """

    def __init__(self, plan: RankAttnPlan, group: dist.ProcessGroup | None, tag: int = 0) -> None:
        self.plan = plan
        self.group = group
        self.tag = tag
        self.cast_plans = [
            CastPlan(plan.rank, s.send_rows, s.recv_counts) for s in plan.stages
        ]
        self.schedules: dict[tuple[AttnBackend, str], tuple[Any, list[Any]]] = {}
        """(backend instance, device) -> what :meth:`preps` returned: built once per key and backend."""

    def preps(self, backend: AttnBackend, device: torch.device) -> tuple[Any, list[Any]]:
        """Host and per-stage schedules for ``backend`` on ``device``, prepared on first use and kept with the state."""
        slot = (backend, str(device))
        if slot not in self.schedules:
            p, dev = self.plan, torch.device(device)
            host = backend.prepare(p.host_table, p.local_len, p.local_len, dev)
            self.schedules[slot] = host, [backend.prepare(s.table, p.local_len, s.recv_len, dev) for s in p.stages]
        return self.schedules[slot]

    def agree(self, q: torch.Tensor, k: torch.Tensor, scale: float, softcap: float, grad: bool) -> None:
        """Every rank of the group passes the same key and call settings, or every rank raises naming what differs."""
        agree("calc_attn", {"key": self.tag, "dtype": q.dtype, "kv_dtype": k.dtype, "q_shape": tuple(q.shape),
                            "kv_shape": tuple(k.shape), "softmax_scale": scale, "softcap": softcap, "grad": grad},
              self.group, "every rank must pass the same key (the same build_key result), q/k/v dtype, "
              "softmax_scale, softcap and grad mode")

    def cast_kv(self, k: torch.Tensor, v: torch.Tensor) -> list:
        """Start every remote stage's K/V transfer; returns one handle per stage."""
        return [group_cast([k, v], cp, self.group, async_op=True) for cp in self.cast_plans]


def dist_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, state: DistAttnState, backend: AttnBackend,
                 scale: float, softcap: float, grad: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """``(out, lse)`` of the local shard over the whole sequence: host stage while the casts travel, then each remote stage.

    ``grad`` (whether q/k/v need gradients) goes into the ranks' agreement fingerprint.
    """
    state.agree(q, k, scale, softcap, grad=grad)
    host, stage_preps = state.preps(backend, q.device)
    handles = state.cast_kv(k, v)
    # partials merge in float32 (float64 inputs: float64); with no remote stage the host result is final
    partial_dtype = stat_dtype(q.dtype) if state.plan.stages else None
    out, lse = backend.forward(q, k, v, host, scale, softcap, out_dtype=partial_dtype)
    for stage, prep, handle in zip(state.plan.stages, stage_preps, handles):
        k_r, v_r = (t.contiguous() for t in handle.wait())
        if len(stage.table):
            o, l = backend.forward(q, k_r, v_r, prep, scale, softcap, out_dtype=stat_dtype(q.dtype))
            out, lse = merge_partials(out, lse, o, l)
    return out.to(q.dtype), lse


def dist_backward(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                  lse: torch.Tensor, state: DistAttnState, backend: AttnBackend, scale: float,
                  softcap: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(dq, dk, dv)`` of the local shard: host stage, then each remote stage GroupReduced to its owners."""
    host, stage_preps = state.preps(backend, q.device)
    dout = dout.contiguous()
    handles = state.cast_kv(k, v)
    # with remote stages the host's gradients are the float32 accumulators; alone they are final
    final_dtype = None if state.plan.stages else q.dtype
    dq, dk, dv = backend.backward(dout, q, k, v, out, lse, host, scale, softcap, final_dtype)
    reductions = []
    for stage, prep, cast_plan, handle in zip(state.plan.stages, stage_preps, state.cast_plans, handles):
        k_r, v_r = (t.contiguous() for t in handle.wait())
        # a remote stage's partials come in the inputs' dtype (cuDNN writes them so; they travel
        # at that width) and are summed into the float32 accumulators; an empty stage sends the same
        if len(stage.table):
            dq_s, dk_s, dv_s = backend.backward(dout, q, k_r, v_r, out, lse, prep, scale, softcap, q.dtype)
            dq += dq_s
        else:
            dk_s, dv_s = torch.zeros_like(k_r), torch.zeros_like(v_r)
        reductions.append(group_reduce([dk_s, dv_s], cast_plan, state.group, out=[dk, dv],
                                       reduce_dtype=dk.dtype, async_op=True))
    for r in reductions:
        r.wait()
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)
