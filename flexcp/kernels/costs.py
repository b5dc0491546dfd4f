"""Measured cost table of the GPU backends, read by the router (``backend="auto"``).

A group of slices costs ``launch_us + flops / rate(kind) + slices * heads * slice_us``
on a backend (fwd+bwd, fwd+bwd flops = 3.5 x 4 x area x heads x head_dim), where
``kind`` is the band shape (full, causal, band) and ``slice_us`` the per-slice, per-head
overhead of short slices (ragged tiles); a cuDNN launch whose rows another launch also
writes adds ``shared_row_ns`` per row and head of its span (temporary buffers and the lse
merge, forward and backward). Numbers from ``flexcp bench kernel`` on one H200, bf16,
head dim 128 (docs/benchmarks.md, section "Kernel benchmark (cuDNN)"); re-measure and
update them with the benchmark when the kernels or the card change.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..mask.geometry import SliceTable, slice_areas
from ..mask.types import CAUSAL, FULL


@dataclass(frozen=True)
class Cost:
    """One backend's fwd+bwd rates (TFLOP/s by band kind) and overheads (microseconds)."""

    tflops: dict
    launch_us: float
    slice_us: float
    shared_row_ns: float = 0.0
    gqa_rate: float = 1.0  # rate multiplier when q heads outnumber k/v heads

    def seconds(self, flops_by_kind: dict, slices: int, heads: int, launches: int = 1, gqa: bool = False) -> float:
        """Modeled fwd+bwd seconds of a slice group."""
        rate = self.gqa_rate if gqa else 1.0
        work = sum(f / (self.tflops[kind] * rate * 1e12) for kind, f in flops_by_kind.items() if f)
        return work + (launches * self.launch_us + slices * heads * self.slice_us) * 1e-6


COSTS: dict[str, Cost] = {
    "cudnn": Cost({"full": 521.0, "causal": 489.0, "band": 451.0}, 60.0, 0.1, shared_row_ns=4.0),
    "triton": Cost({"full": 403.0, "causal": 389.0, "band": 358.0}, 40.0, 1.0),
    "torch_sdpa": Cost({"full": 552.0, "causal": 511.0, "band": 1e-3}, 30.0, 0.0, gqa_rate=0.957),
}
"""One H200, 2026-12-01, second run (docs/benchmarks.md, "Kernel benchmark (cuDNN)", gradients in
the inputs' dtype): rates are the means of the full / causal / sliding-window rows at 8k and
32k, 16:16 and 32:8 heads; Triton's ``slice_us`` fitted to the varlen rows, cuDNN's
``shared_row_ns`` to the prefix-tree rows; torch_sdpa's ``gqa_rate`` is the mean ratio of
its 32:8 to its 16:16 rows (it repeats k/v heads)."""

FLOPS_PER_CELL = 3.5 * 4.0
"""fwd+bwd flops per (cell x head x head_dim)."""


def flops_by_kind(table: SliceTable, head_dim: int, heads: int) -> dict:
    """fwd+bwd flops of ``table`` by band kind (full / causal / band), over ``heads`` heads."""
    area = slice_areas(table).astype(np.float64) * FLOPS_PER_CELL * head_dim * heads
    kinds = np.where(table.types == FULL, 0, np.where(table.types == CAUSAL, 1, 2))
    return {name: float(area[kinds == i].sum()) for i, name in enumerate(("full", "causal", "band"))}
