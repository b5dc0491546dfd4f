"""Distributed attention as ``torch.library`` custom ops, so ``torch.compile`` sees one opaque op per layer.

``flexcp::calc_attn(q, k, v, handle, scale, softcap, backend) -> (out, lse)`` and its
backward op take the key as its ``handle`` (``DistAttnKey.handle``, a one-element int64 CPU
tensor): every host step (key lookup, shape checks against the key's plan, the
ranks' per-call agreement, backend choice, schedules, collectives) runs inside the
op, where torch.compile does not trace. Their fake implementations give the output shapes
(``out`` like ``q``, ``lse [tokens, heads_q]`` in ``stat_dtype``), so a compiled model has no
graph break in attention, and a new key (a new batch) is a new tensor value, not a recompile.
"""

from __future__ import annotations

import torch

from ..dist_attn.function import dist_backward, dist_forward
from ..kernels import select_backend
from ..kernels.api import attention_backward_fake, attention_fake, register_attention_autograd
from .key import DistAttnKey, KeyEntry, key_of_handle, lookup


def _entry(handle: torch.Tensor, q: torch.Tensor, k: torch.Tensor) -> tuple[DistAttnKey, KeyEntry]:
    """The key and entry of ``handle``, checked against the local q/k/v shapes."""
    key = key_of_handle(handle)
    entry = lookup(key)
    n = entry.plan.local_len
    want_q, want_kv = (n, key.num_heads_q, key.head_dim), (n, key.num_heads_kv, key.head_dim)
    if tuple(q.shape) != want_q or tuple(k.shape) != want_kv:
        raise ValueError(
            f"calc_attn: the key expects local q {want_q} and k/v {want_kv} (dispatched shards), got q "
            f"{tuple(q.shape)} and k/v {tuple(k.shape)}; dispatch q/k/v with this key and match its head counts"
        )
    return key, entry


@torch.library.custom_op("flexcp::calc_attn", mutates_args=())
def calc_attn_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, handle: torch.Tensor, scale: float,
                 softcap: float, backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``(out, lse)`` of the local shard under the key named by ``handle`` (see the module docstring)."""
    _, entry = _entry(handle, q, k)
    impl = select_backend(backend, q, k, softcap)
    out, lse = dist_forward(q, k, v, entry.state, impl, scale, softcap,
                            grad=any(x.requires_grad for x in (q, k, v)))
    return out.contiguous(), lse.contiguous()


calc_attn_op.register_fake(attention_fake)


@torch.library.custom_op("flexcp::calc_attn_backward", mutates_args=())
def calc_attn_backward_op(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                          lse: torch.Tensor, handle: torch.Tensor, scale: float, softcap: float,
                          backend: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(dq, dk, dv)`` of :func:`calc_attn_op` (K/V are cast again; nothing remote is kept between passes)."""
    _, entry = _entry(handle, q, k)
    impl = select_backend(backend, q, k, softcap)
    dq, dk, dv = dist_backward(dout, q, k, v, out, lse, entry.state, impl, scale, softcap)
    return dq.contiguous(), dk.contiguous(), dv.contiguous()


calc_attn_backward_op.register_fake(attention_backward_fake)


register_attention_autograd(calc_attn_op, calc_attn_backward_op)

__all__ = ["calc_attn_backward_op", "calc_attn_op"]
