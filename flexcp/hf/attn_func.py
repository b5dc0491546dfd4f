"""The attention callable of the custom-model path (``make_magi_attn_func``): THD or BSHD q/k/v in, out."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F

from ..mask import AttnMaskSpec
from ..runtime import calc_attn
from ..runtime.key import group_info
from .amp import attend_in_autocast_dtype
from .keys import resolve_key, window_key
from .masks import as_numpy, documents, step_mask
from .registry import REGISTRY


@dataclass(frozen=True)
class _Fixed:
    """A mask known up front (LocalLayout)."""

    mask: AttnMaskSpec
    pos: np.ndarray | None

    def spec(self) -> AttnMaskSpec:
        return self.mask

    def positions(self) -> np.ndarray | None:
        return self.pos


def _window(window_size: Any) -> int | None:
    """flash-attn's ``window_size=(left, right)`` as HF's window (``left + 1`` keys); ``-1`` is unbounded."""
    if window_size is None:
        return None
    left, right = (window_size, 0) if isinstance(window_size, int) else (tuple(window_size) + (0,))[:2]
    if right is not None and right > 0:
        raise ValueError(f"window_size={window_size}: magi attention windows are causal (right must be 0 or -1)")
    return None if left is None or left < 0 else int(left) + 1


def _call_layout(b: int, s: int, cp_size: int, kwargs: dict) -> tuple[_Fixed, bool]:
    """The call's mask and whether it binds: ``magi_attn_spec``, else ``cu_seqlens`` (cp = 1), through
    :func:`.masks.step_mask`; else the rows as documents (positions are not read: they do not bind here)."""
    spec = kwargs.get("magi_attn_spec")
    cu = kwargs.get("cu_seqlens", kwargs.get("cu_seqlens_q"))
    if cu is not None and not (cp_size == 1 and int(cu.numel()) > 2):
        cu = None
    if spec is None and cu is None:
        return _Fixed(documents(b, s), None), False
    pos = kwargs.get("position_ids")
    mask, positions = step_mask(1, b * s, spec=spec, cu_seqlens=cu,
                                position_ids=None if pos is None else as_numpy(pos).reshape(-1))
    return _Fixed(mask, positions), True


def _sdpa_causal(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None) -> torch.Tensor:
    """Causal SDPA in the caller's layout (BSHD rows are separate sequences; THD is one sequence)."""
    swap = (1, 2) if q.dim() == 4 else (0, 1)
    out = F.scaled_dot_product_attention(*(x.transpose(*swap) for x in (q, k, v)), is_causal=True, scale=scale,
                                         enable_gqa=True)
    return out.transpose(*swap)


def make_magi_attn_func(softmax_scale: float | None = None) -> Callable[..., torch.Tensor]:
    """Build the attn_func used by the custom-model attention factory.

    The callable takes q/k/v in THD ``[t, h, d]`` or BSHD ``[b, s, h, d]`` layout (BSHD
    rows become documents) and returns the output in the same layout. Mask selection:
    an explicit ``magi_key`` kwarg; at cp > 1 the key of the last ``magi_prepare_*`` call;
    at cp = 1 a per-call ``magi_attn_spec`` or ``cu_seqlens``/``cu_seqlens_q`` (packed
    documents), else the active spec (``set_active_attn_spec``), else a causal key from
    the q length. ``window_size=(left, 0)`` adds a sliding window and ``softcap`` a logit
    cap. With no active CP group it falls back to causal SDPA, so non-magi modules (e.g.
    a vision tower routed through the same factory) keep working. ``softmax_scale``
    defaults to ``head_dim ** -0.5``.
    """

    def magi_attn_func(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, **call_kwargs: Any) -> torch.Tensor:
        cp_group = REGISTRY.active_cp_group
        if cp_group is None:
            return _sdpa_causal(q, k, v, softmax_scale)
        if q.dim() not in (3, 4) or k.dim() != q.dim() or v.dim() != q.dim():
            raise ValueError(f"q/k/v must all be THD [t, h, d] or BSHD [b, s, h, d]; got {q.dim()}-D, {k.dim()}-D, {v.dim()}-D")
        b, s = q.shape[:2] if q.dim() == 4 else (1, q.shape[0])
        qf, kf, vf = (x.reshape(b * s, x.shape[-2], x.shape[-1]) for x in (q, k, v))
        layout, binding = _call_layout(b, s, group_info(cp_group)[0], call_kwargs)
        heads = (qf.shape[1], kf.shape[1], qf.shape[2])
        key = resolve_key(cp_group, b * s, heads, explicit=call_kwargs.get("magi_key"), local=layout, binding=binding)
        window = _window(call_kwargs.get("window_size"))
        if window is not None:
            key = window_key(key, window)
        out, _ = attend_in_autocast_dtype(calc_attn, qf, kf, vf, key=key, softmax_scale=softmax_scale,
                                          softcap=float(call_kwargs.get("softcap") or 0.0))
        return out.view(q.shape[:-2] + out.shape[1:])

    return magi_attn_func


__all__ = ["make_magi_attn_func"]
