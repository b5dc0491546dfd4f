"""Merging partial attention results computed over disjoint key sets (log-sum-exp in the partials' dtype)."""

from __future__ import annotations

import torch


def merge_partials(
    out: torch.Tensor, lse: torch.Tensor, out_part: torch.Tensor, lse_part: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Combine ``(out, lse)`` with another partial over other keys; rows empty in both stay 0 / -inf.

    ``out*`` are ``[t, h, d]``, ``lse*`` ``[t, h]``, all float32 (or all float64 for float64 inputs).
    """
    new_lse = torch.logaddexp(lse, lse_part)
    safe = torch.where(torch.isinf(new_lse), torch.zeros_like(new_lse), new_lse)
    w = torch.exp(lse - safe).unsqueeze(-1)
    w_part = torch.exp(lse_part - safe).unsqueeze(-1)
    return out * w + out_part * w_part, new_lse
