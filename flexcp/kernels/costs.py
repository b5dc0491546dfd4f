"""Measured cost table of the GPU backends, read by the router (``backend="auto"``).

A group of slices costs ``launch_us + flops / rate(kind) + slices * heads * slice_us``
on a backend (fwd+bwd, fwd+bwd flops = 3.5 x 4 x area x heads x head_dim), where
``kind`` is the band shape (full, causal, band) and ``slice_us`` the per-slice, per-head
overhead of short slices (ragged tiles). Numbers from ``flexcp bench kernel`` on one H200,
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

    def seconds(self, flops_by_kind: dict, slices: int, heads: int, launches: int = 1) -> float:
        work = sum(f / (self.tflops[kind] * 1e12) for kind, f in flops_by_kind.items() if f)
        return work + (launches * self.launch_us + slices * heads * self.slice_us) * 1e-6


COSTS: dict[str, Cost] = {
    "cudnn": Cost({"full": 500.0, "causal": 522.0, "band": 481.0}, launch_us=60.0, slice_us=0.19),
    "triton": Cost({"full": 360.0, "causal": 400.0, "band": 350.0}, launch_us=40.0, slice_us=0.36),
    "torch_sdpa": Cost({"full": 549.0, "causal": 539.0, "band": 1e-3}, launch_us=30.0, slice_us=0.0),
}
"""H200, 2026-12-01 (issue 10's measurement; updated by the run recorded in docs/benchmarks.md)."""

FLOPS_PER_CELL = 3.5 * 4.0
"""fwd+bwd flops per (cell x head x head_dim)."""
