"""``flexcp.attention``: single-device attention over a slice mask, with autograd.

All shape/dtype/device checks happen here, at the boundary, with messages that name
the argument; backends receive clean THD tensors and a validated slice table.
"""

from __future__ import annotations

import math
import numbers
from typing import Any

import torch

from ..mask.spec import AttnMaskSpec, spec_of_handle
from .backend import AttnBackend, get_backend, stat_dtype
from .cache import schedule_for


def check_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    """Validate THD layout, GQA head counts, dtypes and devices; raise ValueError naming the fix."""
    for name, x in (("q", q), ("k", k), ("v", v)):
        if not isinstance(x, torch.Tensor) or x.dim() != 3:
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"{name} must be a 3-D THD tensor [tokens, heads, head_dim]; got {shape}")
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape; got k {tuple(k.shape)} and v {tuple(v.shape)}")
    if q.shape[1] == 0:
        raise ValueError("q has 0 heads; q must be [tokens, heads >= 1, head_dim] (check the head split of the "
                         "projection, e.g. num_attention_heads in the model config)")
    if q.shape[2] == 0:
        raise ValueError("q, k, v have head_dim 0; the last dimension must hold at least one feature")
    if q.shape[2] != k.shape[2]:
        raise ValueError(f"q and k must have the same head_dim; got {q.shape[2]} and {k.shape[2]}")
    hq, hkv = q.shape[1], k.shape[1]
    if hkv == 0 or hq % hkv != 0:
        raise ValueError(
            f"number of q heads ({hq}) must be a multiple of the number of k/v heads ({hkv}) (GQA); "
            f"fix the head counts or repeat k/v heads"
        )
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k, v must share one dtype; got {q.dtype}, {k.dtype}, {v.dtype}: cast them first")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v must be on one device; got {q.device}, {k.device}, {v.device}")
    if q.device.type == "meta":
        raise ValueError("q is on the meta device, as are k and v (shapes without data); materialize the model first "
                         "(e.g. model.to_empty(device=...) then load its weights) before running attention")
    if not q.dtype.is_floating_point:
        raise ValueError(f"q, k, v must be floating point; got {q.dtype}")


def resolve_scale(head_dim: int, softmax_scale: float | None, softcap: float) -> tuple[float, float]:
    """``(softmax_scale, softcap)`` as floats: scale defaults to ``head_dim ** -0.5``; softcap must be finite, >= 0."""
    if isinstance(softcap, bool) or not isinstance(softcap, numbers.Real) or not math.isfinite(softcap) or softcap < 0:
        raise ValueError(f"softcap must be >= 0 and a finite number (0 disables it); got {softcap!r}")
    if softmax_scale is not None and (isinstance(softmax_scale, bool) or not isinstance(softmax_scale, numbers.Real)
                                      or not math.isfinite(softmax_scale)):
        raise ValueError(f"softmax_scale must be a finite number or None (None: head_dim ** -0.5); got {softmax_scale!r}")
    if isinstance(head_dim, bool) or not isinstance(head_dim, numbers.Integral) or head_dim < 1:
        raise ValueError(f"head_dim must be a positive int; got {head_dim!r}")
    return (int(head_dim) ** -0.5 if softmax_scale is None else float(softmax_scale)), float(softcap)


def select_backend(name: str, q: torch.Tensor, k: torch.Tensor, softcap: float) -> AttnBackend:
    """Resolve ``backend=``: a named backend (checked against these inputs) or the cost router for 'auto'."""
    backend = get_backend(name)
    reason = backend.unsupported(q, k, softcap)
    if reason:
        raise ValueError(f"backend={name!r} cannot run these inputs: {reason}")
    return backend


def prepared(backend: AttnBackend, spec: AttnMaskSpec, device: torch.device) -> Any:
    """The backend's schedule for ``spec`` on ``device``, from the one schedule cache (cache.py)."""
    return schedule_for(backend, spec.table, spec.total_seqlen, spec.total_seqlen_k, device)


@torch.library.custom_op("flexcp::attention", mutates_args=())
def attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, spec: torch.Tensor, scale: float, softcap: float,
                 backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``(out, lse)`` under the spec whose ``handle`` is ``spec``: validation, backend choice and schedule inside the op."""
    impl, prep = _resolved(spec, q, k, softcap, backend)
    out, lse = impl.forward(q, k, v, prep, scale, softcap)
    return out.contiguous(), lse.contiguous()


def attention_fake(q: torch.Tensor, *_: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """Fake ``(out, lse)`` of an attention op: ``out`` like ``q``, ``lse [tokens, heads_q]`` in ``stat_dtype``."""
    return torch.empty_like(q, memory_format=torch.contiguous_format), q.new_empty(q.shape[:2], dtype=stat_dtype(q.dtype))


def attention_backward_fake(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                            *_: Any) -> tuple[torch.Tensor, ...]:
    """Fake ``(dq, dk, dv)`` of an attention backward op: like ``q``, ``k``, ``v``."""
    return tuple(torch.empty_like(x, memory_format=torch.contiguous_format) for x in (q, k, v))


attention_op.register_fake(attention_fake)


@torch.library.custom_op("flexcp::attention_backward", mutates_args=())
def attention_backward_op(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                          lse: torch.Tensor, spec: torch.Tensor, scale: float, softcap: float,
                          backend: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(dq, dk, dv)`` of :func:`attention_op`: one call covers the whole mask, gradients in the inputs' dtype."""
    impl, prep = _resolved(spec, q, k, softcap, backend)
    dq, dk, dv = impl.backward(dout, q, k, v, out, lse, prep, scale, softcap, q.dtype)
    return dq.to(q.dtype).contiguous(), dk.to(k.dtype).contiguous(), dv.to(v.dtype).contiguous()


attention_backward_op.register_fake(attention_backward_fake)


def _resolved(handle: torch.Tensor, q: torch.Tensor, k: torch.Tensor, softcap: float, backend: str) -> tuple[AttnBackend, Any]:
    """The validated spec of ``handle``, its backend and schedule (host work, inside the ops)."""
    spec = spec_of_handle(handle).validate()
    impl = select_backend(backend, q, k, softcap)
    return impl, prepared(impl, spec, q.device)


def register_attention_autograd(forward_op: Any, backward_op: Any) -> None:
    """Autograd of an attention op pair ``(q, k, v, handle, scale, softcap, backend) -> (out, lse)`` and
    ``(dout, q, k, v, out, lse, handle, scale, softcap, backend) -> (dq, dk, dv)``; ``lse`` is not differentiable."""

    def setup_context(ctx, inputs, output) -> None:
        q, k, v, handle, scale, softcap, backend = inputs
        ctx.save_for_backward(q, k, v, *output, handle)
        ctx.scale, ctx.softcap, ctx.backend = scale, softcap, backend
        ctx.mark_non_differentiable(output[1])

    def backward(ctx, dout, _dlse):
        q, k, v, out, lse, handle = ctx.saved_tensors
        dq, dk, dv = backward_op(dout.contiguous(), q, k, v, out, lse, handle, ctx.scale, ctx.softcap, ctx.backend)
        return dq, dk, dv, None, None, None, None

    forward_op.register_autograd(backward, setup_context=setup_context)


register_attention_autograd(attention_op, attention_backward_op)


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    spec: AttnMaskSpec,
    *,
    softmax_scale: float | None = None,
    softcap: float = 0.0,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of THD ``q [tq, hq, d]``, ``k, v [tk, hkv, d]`` under ``spec``; returns ``(out, lse)``.

    ``out`` has q's dtype; ``lse`` is ``[tq, hq]`` float32, float64 for float64 inputs (not differentiable). Rows with
    no keys give out 0, lse -inf and zero gradients. ``softmax_scale`` defaults to
    ``d ** -0.5``; ``softcap > 0`` applies ``cap * tanh(s / cap)`` to the scaled scores.
    It runs as the ``flexcp::attention`` custom op (the spec travels as its ``handle`` tensor;
    validation, backend choice and schedules happen inside), so ``torch.compile`` traces no host
    code and a new mask of the same length does not recompile.
    """
    if not isinstance(spec, AttnMaskSpec):
        raise ValueError(f"spec must be an AttnMaskSpec; got {type(spec).__name__}")
    check_qkv(q, k, v)
    if q.shape[0] != spec.total_seqlen or k.shape[0] != spec.total_seqlen_k:
        raise ValueError(
            f"q has {q.shape[0]} tokens and k {k.shape[0]}, but the spec covers total_seqlen={spec.total_seqlen} "
            f"and total_seqlen_k={spec.total_seqlen_k}; build the spec for these lengths"
        )
    scale, softcap = resolve_scale(q.shape[-1], softmax_scale, softcap)
    return attention_op(q.contiguous(), k.contiguous(), v.contiguous(), spec.handle, scale, softcap, backend)
