"""GroupCast and GroupReduce: zero-redundant row exchange over one all_to_all_single.

`group_cast` sends every destination exactly the rows its plan lists; `group_reduce` is its
transpose, summing the receivers' partial gradients back into the owners' rows. Several tensors
with the same leading dimension and dtype (K and V, dK and dV) are packed along the feature
dimension and travel in a single `all_to_all_single`.

Rows a rank sends to itself stay inside the collective: gloo and NCCL copy a rank's own split
locally, so they never touch the network (`CastPlan.volume` counts them apart).

Backends: uneven `all_to_all_single` works on gloo (CPU tensors; float64, float32, bfloat16, float16,
integer dtypes checked on torch 2.13) and NCCL (CUDA tensors). Communication is not autograd-aware:
everything runs under no_grad, and callers wrap it in their own autograd Function.
"""

from __future__ import annotations

from typing import Callable, Generic, Sequence, TypeVar

import torch
import torch.distributed as dist

from .transfer import CastPlan

T = TypeVar("T")


class CommHandle(Generic[T]):
    """An in-flight group collective; `wait()` finishes it and returns its result (idempotent)."""

    def __init__(self, work: dist.Work | None, finish: Callable[[], T], buffers: tuple[torch.Tensor, ...]) -> None:
        self._work, self._finish = work, finish
        self._buffers = buffers  # the collective reads/writes them until it completes
        self._done, self._result = False, None

    def wait(self) -> T:
        if not self._done:
            if self._work is not None:
                self._work.wait()
            with torch.no_grad():
                self._result = self._finish()
            self._done, self._work, self._finish, self._buffers = True, None, None, ()
        return self._result


def group_cast(
    tensors: Sequence[torch.Tensor],
    plan: CastPlan,
    group: dist.ProcessGroup | None,
    async_op: bool = False,
) -> list[torch.Tensor] | CommHandle[list[torch.Tensor]]:
    """Send `t[plan.send_rows[dst]]` to every dst; receive `[plan.num_recv, *t.shape[1:]]` per tensor.

    Received rows are ordered by source rank, then by the sender's order (see transfer.py). With
    several tensors the results are views into one receive buffer (last dim contiguous, rows
    strided); call `.contiguous()` if a kernel needs it. With `async_op` a CommHandle is returned
    whose `wait()` gives the list; `tensors` may change meanwhile (the rows were already gathered).
    """
    tensors = _check_tensors(tensors, "tensors")
    n = tensors[0].shape[0]
    if plan.min_local_rows > n:
        raise ValueError(f"plan sends row {plan.min_local_rows - 1} but tensors have only {n} rows; rebuild the plan")
    _check_group(plan, group)
    with torch.no_grad():
        index = plan.send_index(tensors[0].device)
        send = _pack([_flat_rows(t).index_select(0, index) for t in tensors])
        recv = send.new_empty((plan.num_recv, send.shape[1]))
        work = _all_to_all(recv, send, plan.recv_counts, plan.send_counts, group, async_op)
    handle = CommHandle(work, lambda: _unpack(recv, [t.shape[1:] for t in tensors]), buffers=(send, recv))
    return handle if async_op else handle.wait()


def group_reduce(
    partials: Sequence[torch.Tensor],
    plan: CastPlan,
    group: dist.ProcessGroup | None,
    out: Sequence[torch.Tensor],
    reduce_dtype: torch.dtype = torch.float32,
    async_op: bool = False,
) -> list[torch.Tensor] | CommHandle[list[torch.Tensor]]:
    """Transpose of `group_cast`: `out[i][send_rows[dst][j]] += partials[i]` row of dst's receive buffer.

    `partials[i]` is shaped like the cast's receive buffer `[plan.num_recv, ...]`; it travels in its
    own dtype (pass float32 partials for a float32 wire) and is summed into `out[i]` (in place) in
    `reduce_dtype`, rounded to `out[i].dtype` once. Returns `out`. With `async_op` a CommHandle is
    returned and `out` is updated by its `wait()`; until then leave `partials` unchanged (a single
    contiguous partial is sent without a copy) and do not read `out`.
    """
    partials = _check_tensors(partials, "partials")
    out = _check_tensors(out, "out", same_dtype=False)
    if len(out) != len(partials):
        raise ValueError(f"out needs one tensor per partial, got {len(out)} for {len(partials)} partials")
    if partials[0].shape[0] != plan.num_recv:
        raise ValueError(f"partials have {partials[0].shape[0]} rows; the plan's receive buffer has {plan.num_recv}")
    for i, (p, o) in enumerate(zip(partials, out)):
        if o.shape[1:] != p.shape[1:] or o.device != p.device:
            raise ValueError(f"out[{i}] {tuple(o.shape)} on {o.device} does not match partials[{i}] "
                             f"{tuple(p.shape)} on {p.device} beyond the leading dimension")
    if plan.min_local_rows > out[0].shape[0]:
        raise ValueError(f"plan sends row {plan.min_local_rows - 1} but out has only {out[0].shape[0]} rows")
    if not reduce_dtype.is_floating_point:
        raise ValueError(f"reduce_dtype must be a floating dtype, got {reduce_dtype}")
    _check_group(plan, group)
    with torch.no_grad():
        send = _pack([_flat_rows(p) for p in partials])
        recv = send.new_empty((plan.num_send, send.shape[1]))
        work = _all_to_all(recv, send, plan.send_counts, plan.recv_counts, group, async_op)

    def finish() -> list[torch.Tensor]:
        index = plan.send_index(out[0].device)
        for o, part in zip(out, _unpack(recv, [p.shape[1:] for p in partials])):
            if o.dtype == reduce_dtype:
                o.index_add_(0, index, part.to(reduce_dtype))
            else:
                o.copy_(o.to(reduce_dtype).index_add_(0, index, part.to(reduce_dtype)))
        return list(out)

    handle = CommHandle(work, finish, buffers=(send, recv))
    return handle if async_op else handle.wait()


def _all_to_all(
    recv: torch.Tensor,
    send: torch.Tensor,
    recv_splits: Sequence[int],
    send_splits: Sequence[int],
    group: dist.ProcessGroup | None,
    async_op: bool,
) -> dist.Work | None:
    """Uneven all_to_all_single over rows; a group of one is a plain copy (no process group needed)."""
    if len(send_splits) == 1:
        recv.copy_(send)
        return None
    return dist.all_to_all_single(recv, send, list(recv_splits), list(send_splits), group=group, async_op=async_op)


def _flat_rows(t: torch.Tensor) -> torch.Tensor:
    """[n, *row_shape] as [n, row_numel] (a view when possible; works for n == 0)."""
    return t.reshape(t.shape[0], t.shape[1:].numel())


def _pack(rows: list[torch.Tensor]) -> torch.Tensor:
    """[R, w_i] pieces side by side as one contiguous [R, sum w_i] buffer (no copy for one piece)."""
    return rows[0].contiguous() if len(rows) == 1 else torch.cat(rows, dim=1)


def _unpack(buffer: torch.Tensor, row_shapes: list[torch.Size]) -> list[torch.Tensor]:
    """Split a packed [R, sum w_i] buffer back into views [R, *row_shape_i]."""
    views, start = [], 0
    for shape in row_shapes:
        width = torch.Size(shape).numel()
        views.append(buffer[:, start : start + width].view(buffer.shape[0], *shape))
        start += width
    return views


def _check_tensors(tensors: Sequence[torch.Tensor], name: str, same_dtype: bool = True) -> list[torch.Tensor]:
    if isinstance(tensors, torch.Tensor) or not tensors:
        raise ValueError(f"{name} must be a non-empty list of tensors, e.g. [k, v]")
    tensors = list(tensors)
    first = tensors[0]
    for i, t in enumerate(tensors):
        if t.dim() < 1 or t.shape[0] != first.shape[0]:
            raise ValueError(f"{name}[{i}] has shape {tuple(t.shape)}; all need the leading dim {first.shape[0]}")
        if t.device != first.device or (same_dtype and t.dtype != first.dtype):
            raise ValueError(
                f"{name}[{i}] is {t.dtype} on {t.device} but {name}[0] is {first.dtype} on {first.device}; "
                f"tensors packed into one collective need one dtype and device (make separate calls otherwise)"
            )
    return tensors


def _check_group(plan: CastPlan, group: dist.ProcessGroup | None) -> None:
    if plan.world_size == 1 and not dist.is_initialized():
        return
    world_size, rank = dist.get_world_size(group), dist.get_rank(group)
    if plan.world_size != world_size or plan.rank != rank:
        raise ValueError(
            f"plan is for rank {plan.rank} of {plan.world_size}, but this is rank {rank} of a group of {world_size}; "
            f"build the plan for this group"
        )
