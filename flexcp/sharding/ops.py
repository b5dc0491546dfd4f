"""Sharding ops: ``dispatch`` a global tensor to this rank's chunks, ``undispatch`` shards back.

Gradient semantics (both exact):

- ``dispatch(x, plan, rank)``: backward writes this rank's local gradient into the rows
  it took and zeros elsewhere, with no communication. ``x`` is replicated (the same
  global tensor on every rank), so its true gradient is the sum of these per-rank
  gradients over the group; that sum happens where it belongs, in the usual
  dp x cp gradient reduction of the parameters that produced ``x`` (an all-reduce in
  dispatch's backward would count every contribution ``cp_size`` times there).
- ``undispatch(x_local, plan, group)``: every rank gets the full global tensor and may
  build its own loss from it, so backward sums the incoming gradients over the group
  and hands each rank its slice (one reduce-scatter): with
  ``loss = sum_r f_r(undispatch(x))`` rank ``r``'s ``x_local.grad`` is its shard of
  ``sum_r grad f_r``.

Both work on any ``dim`` and dtype (gradients for floating/complex tensors only).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from .collectives import all_gather_single, reduce_scatter_single
from .plan import DispatchPlan

IGNORE_INDEX = -100
"""The label of a token without a target (PyTorch's ``cross_entropy`` default): pad dispatched labels with it."""


def _norm_dim(x: torch.Tensor, dim: int) -> int:
    if not -x.dim() <= dim < x.dim():
        raise ValueError(f"dim={dim} is out of range for a tensor with {x.dim()} dims; use -{x.dim()} <= dim < {x.dim()}")
    return dim % x.dim()


def _index(values, device: torch.device) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.long, device=device)


def _check_group(plan: DispatchPlan, group: dist.ProcessGroup | None) -> None:
    """The group must match the plan; ``group=None`` at ``cp_size == 1`` needs no torch.distributed."""
    if group is None and plan.cp_size == 1:
        return
    if not (dist.is_available() and dist.is_initialized()):
        raise ValueError(
            f"undispatch over cp_size={plan.cp_size} ranks needs an initialized torch.distributed; "
            "call torch.distributed.init_process_group and pass the CP group"
        )
    size = dist.get_world_size(group)
    if size != plan.cp_size:
        raise ValueError(
            f"group has {size} ranks but the plan was built for cp_size={plan.cp_size}; "
            "pass the CP group the plan was built for"
        )


class _Dispatch(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, plan: DispatchPlan, rank: int, dim: int, pad_value) -> torch.Tensor:
        n_valid = plan.num_valid_local(rank)
        idx = _index(plan.global_indices(rank)[:n_valid], x.device)
        ctx.save_for_backward(idx)
        ctx.dim, ctx.global_len = dim, x.shape[dim]
        local = x.index_select(dim, idx)
        n_pad = plan.local_len - n_valid
        if n_pad:
            shape = list(x.shape)
            shape[dim] = n_pad
            local = torch.cat([local, x.new_full(shape, pad_value)], dim=dim)
        return local

    @staticmethod
    def backward(ctx, grad_local: torch.Tensor):
        (idx,) = ctx.saved_tensors
        shape = list(grad_local.shape)
        shape[ctx.dim] = ctx.global_len
        grad = grad_local.new_zeros(shape)
        grad.index_copy_(ctx.dim, idx, grad_local.narrow(ctx.dim, 0, len(idx)))
        return grad, None, None, None, None


class _Undispatch(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_local: torch.Tensor, plan: DispatchPlan, group, dim: int) -> torch.Tensor:
        ctx.plan, ctx.group, ctx.dim = plan, group, dim
        local = x_local.movedim(dim, 0).contiguous()
        if plan.cp_size > 1:
            gathered = local.new_empty((plan.padded_seqlen, *local.shape[1:]))
            all_gather_single(gathered, local, group=group)
        else:
            gathered = local
        chunks = gathered.unflatten(0, (plan.num_chunks, plan.chunk_size))
        order = _index(plan.gathered_chunk_of_chunk, x_local.device)
        out = chunks.index_select(0, order).flatten(0, 1)[: plan.total_seqlen]
        return out.movedim(0, dim)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        plan = ctx.plan
        grad = grad_out.movedim(ctx.dim, 0)
        padded = grad.new_zeros((plan.padded_seqlen, *grad.shape[1:]))
        padded[: plan.total_seqlen] = grad
        chunks = padded.unflatten(0, (plan.num_chunks, plan.chunk_size))
        gathered = chunks.index_select(0, _index(plan.rank_order, grad.device)).flatten(0, 1)
        if plan.cp_size > 1:
            local = gathered.new_empty((plan.local_len, *gathered.shape[1:]))
            reduce_scatter_single(local, gathered, op=dist.ReduceOp.SUM, group=ctx.group)
        else:
            local = gathered
        return local.movedim(0, ctx.dim), None, None, None


def dispatch(x: torch.Tensor, plan: DispatchPlan, rank: int, dim: int = 0, pad_value=0) -> torch.Tensor:
    """This rank's shard of the global ``x`` (same on every rank): its chunks in order, padded with ``pad_value``.

    ``x.shape[dim]`` must be ``plan.total_seqlen``; the result has ``plan.local_len`` rows
    along ``dim``. Use ``pad_value=IGNORE_INDEX`` for labels (padding rows are ignored by the loss).
    Backward: see the module docstring (no communication).
    """
    dim = _norm_dim(x, dim)
    if x.shape[dim] != plan.total_seqlen:
        raise ValueError(
            f"x has {x.shape[dim]} rows along dim={dim} but the plan covers total_seqlen={plan.total_seqlen}; "
            "dispatch the global (unpadded) tensor the plan was built for"
        )
    plan._check_rank(rank)
    return _Dispatch.apply(x, plan, int(rank), dim, pad_value)


def undispatch(
    x_local: torch.Tensor, plan: DispatchPlan, group: dist.ProcessGroup | None = None, dim: int = 0
) -> torch.Tensor:
    """All-gather the shards of ``group`` and restore global order, dropping padding.

    ``x_local.shape[dim]`` must be ``plan.local_len``; the result has ``plan.total_seqlen``
    rows. With ``cp_size == 1`` no communication happens (torch.distributed need not be
    initialized). Backward: reduce-scatter of the gradient (see the module docstring).
    """
    dim = _norm_dim(x_local, dim)
    if x_local.shape[dim] != plan.local_len:
        raise ValueError(
            f"x_local has {x_local.shape[dim]} rows along dim={dim} but the plan's shards have "
            f"local_len={plan.local_len}; pass the output of dispatch() with the same plan"
        )
    _check_group(plan, group)
    return _Undispatch.apply(x_local, plan, group, dim)


def position_ids(plan: DispatchPlan, rank: int) -> torch.LongTensor:
    """Global row index of each of ``rank``'s local tokens (padding rows get indices >= total_seqlen)."""
    return torch.from_numpy(plan.global_indices(rank).copy())
