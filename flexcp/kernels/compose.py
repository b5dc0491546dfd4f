"""Combining partial results: outputs merged by lse, gradients summed.

Used wherever one mask runs as several pieces (cuDNN launches, slice groups on different
backends, the stages of a distributed call): each piece covers some rows over some keys,
and pieces that share rows are combined exactly, never overwritten. The one lse merge.
"""

from __future__ import annotations

import torch

from .backend import stat_dtype


def _lse_weights(lse: torch.Tensor, lse_part: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(merged lse, weight of out, weight of out_part)``; rows empty in both get weights 0 and lse -inf."""
    new = torch.logaddexp(lse, lse_part.to(lse.dtype))
    safe = torch.where(torch.isinf(new), torch.zeros_like(new), new)
    return new, torch.exp(lse - safe).unsqueeze(-1), torch.exp(lse_part - safe).unsqueeze(-1)


def merge_into(out: torch.Tensor, lse: torch.Tensor, out_part: torch.Tensor, lse_part: torch.Tensor) -> None:
    """``(out, lse) <- merge((out, lse), (out_part, lse_part))`` in place, in ``out``'s dtype; empty rows stay 0 / -inf."""
    new, w, w_part = _lse_weights(lse, lse_part)
    out.mul_(w.to(out.dtype)).add_(out_part.to(out.dtype) * w_part.to(out.dtype))
    lse.copy_(new)


def merge_partials(
    out: torch.Tensor, lse: torch.Tensor, out_part: torch.Tensor, lse_part: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``merge((out, lse), (out_part, lse_part))`` as new tensors (autograd-friendly); empty rows stay 0 / -inf.

    ``out*`` are ``[t, h, d]``, ``lse*`` ``[t, h]``, all float32 (or all float64 for float64 inputs).
    """
    new, w, w_part = _lse_weights(lse, lse_part)
    return out * w + out_part * w_part, new


class GradSum:
    """A gradient in ``stat_dtype(input dtype)`` built from pieces added to row ranges or scattered rows."""

    def __init__(self, shape: torch.Size, device: torch.device, input_dtype: torch.dtype = torch.float32) -> None:
        self.shape, self.device = tuple(shape), device
        self.dtype = stat_dtype(input_dtype)
        self.total: torch.Tensor | None = None

    def _zeros(self) -> torch.Tensor:
        if self.total is None:
            self.total = torch.zeros(self.shape, dtype=self.dtype, device=self.device)
        return self.total

    def add_rows(self, start: int, part: torch.Tensor) -> None:
        """Add ``part`` to rows ``[start, start + len(part))``."""
        if self.total is None and start == 0 and tuple(part.shape) == self.shape:
            self.total = part.to(self.dtype)  # callers hand over fresh tensors
            return
        self._zeros()[start : start + part.shape[0]] += part

    def add_index(self, index: torch.Tensor, part: torch.Tensor) -> None:
        """Add row ``n`` of ``part`` to row ``index[n]`` (repeated indices accumulate)."""
        self._zeros().index_add_(0, index, part.to(self.dtype))

    def add(self, part: torch.Tensor) -> None:
        self.add_rows(0, part)

    def result(self) -> torch.Tensor:
        return self._zeros()
