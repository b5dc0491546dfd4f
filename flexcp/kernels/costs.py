"""Measured cost table of the GPU backends, read by the router (``backend="auto"``).

A group of slices costs ``launch_us + flops / rate(kind) + slices * heads * slice_us``
on a backend (fwd+bwd, fwd+bwd flops = 3.5 x 4 x area x heads x head_dim), where
``kind`` is the band shape (full, causal, band) and ``slice_us`` the per-slice, per-head
overhead of short slices (ragged tiles); a cuDNN launch whose rows another launch also
writes adds ``shared_row_ns`` per row and head (temporary buffers and the lse merge,
forward and backward). Numbers from ``flexcp bench kernel`` on one H200,
bf16, head dim 128 (docs/benchmarks.md, section "Kernel benchmark (cuDNN)"); re-measure
and update them with the benchmark when the kernels or the card change.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Cost:
    """One backend's fwd+bwd rates (TFLOP/s by band kind) and overheads (microseconds)."""

    tflops: dict
    launch_us: float
    slice_us: float
    shared_row_ns: float = 0.0
    gqa_rate: float = 1.0  # rate multiplier when q heads outnumber k/v heads

    def seconds(self, flops_by_kind: dict, slices: int, heads: int, launches: int = 1, gqa: bool = False) -> float:
        rate = self.gqa_rate if gqa else 1.0
        work = sum(f / (self.tflops[kind] * rate * 1e12) for kind, f in flops_by_kind.items() if f)
        return work + (launches * self.launch_us + slices * heads * self.slice_us) * 1e-6


COSTS: dict[str, Cost] = {
    "cudnn": Cost({"full": 530.0, "causal": 500.0, "band": 485.0}, 60.0, 0.19, shared_row_ns=4.5, gqa_rate=0.72),
    "triton": Cost({"full": 390.0, "causal": 395.0, "band": 365.0}, launch_us=40.0, slice_us=0.36),
    "torch_sdpa": Cost({"full": 555.0, "causal": 505.0, "band": 1e-3}, launch_us=30.0, slice_us=0.0),
}
"""H200, 2026-12-01, 16:16 heads (docs/benchmarks.md, "Kernel benchmark (cuDNN)"): fwd+bwd rates of
full / causal / sliding-window rows at 8k-32k; ``slice_us`` from 256 documents of 128 tokens;
``shared_row_ns`` from the prefix-tree rows (two launches sharing rows); ``gqa_rate`` from the
32:8 rows (cuDNN's native GQA ran at 0.66-0.76x of its 16:16 rate; torch_sdpa repeats k/v heads)."""

FLOPS_PER_CELL = 3.5 * 4.0
"""fwd+bwd flops per (cell x head x head_dim)."""
