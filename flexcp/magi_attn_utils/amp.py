"""Mixed precision at the attention boundary: q/k/v in the autocast dtype."""

from __future__ import annotations

import torch


def autocast_qkv(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """``tensors`` in the autocast dtype of their device when autocast is on there, else unchanged.

    Under autocast, HF's RoPE promotes q and k to float32 while v stays in the autocast
    dtype; attention runs in the autocast dtype (as SDPA does), and the casts are
    differentiable, so every input's gradient comes back in that input's own dtype.
    """
    device = tensors[0].device.type
    if not torch.is_autocast_enabled(device):
        return tensors
    dtype = torch.get_autocast_dtype(device)
    return tuple(t.to(dtype) if t.is_floating_point() else t for t in tensors)


__all__ = ["autocast_qkv"]
