"""Mixed precision at the attention boundary: q/k/v in the autocast dtype, the kernel outside autocast."""

from __future__ import annotations

from typing import Any, Callable

import torch


def attend_in_autocast_dtype(fn: Callable[..., Any], q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                             **kwargs: Any) -> Any:
    """``fn(q, k, v, **kwargs)``; under autocast, with q/k/v cast to the autocast dtype and autocast off inside.

    Under autocast, HF's RoPE promotes q and k to float32 while v stays in the autocast
    dtype. Attention then runs in the autocast dtype (as SDPA does) and exactly as it
    would on inputs of that dtype (autocast does not reach into the kernel's float32
    softmax statistics); the casts are differentiable, so each input's gradient comes
    back in that input's own dtype. Without autocast the inputs pass unchanged.
    """
    device = q.device.type
    if not torch.is_autocast_enabled(device):
        return fn(q, k, v, **kwargs)
    dtype = torch.get_autocast_dtype(device)
    with torch.autocast(device, enabled=False):
        return fn(q.to(dtype), k.to(dtype), v.to(dtype), **kwargs)


__all__ = ["attend_in_autocast_dtype"]
