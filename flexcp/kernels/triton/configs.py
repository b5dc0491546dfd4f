"""Tile configurations of the Triton kernels (tuned with ``flexcp bench kernel --sweep``)."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class KernelConfig:
    """Tile shape and launch parameters of one kernel: ``block`` owned rows, ``tile`` walked columns."""

    block: int
    tile: int
    warps: int
    stages: int


@dataclass(frozen=True)
class LaunchConfigs:
    fwd: KernelConfig
    dkdv: KernelConfig
    dq: KernelConfig


def default_configs(dtype: torch.dtype, head_dim: int) -> LaunchConfigs:
    """Tile shapes per dtype and head dim (Hopper: 16-bit tiles fit 228 KB of shared memory)."""
    if dtype == torch.float32:  # exact-precision test path: small tiles
        small = KernelConfig(32, 32, 4, 1)
        return LaunchConfigs(small, small, small)
    if head_dim <= 128:  # measured on H200 (docs/benchmarks.md): 8 warps, 3 stages, 128 x 64 tiles
        tiles = KernelConfig(128, 64, 8, 3)
        return LaunchConfigs(tiles, tiles, tiles)
    return LaunchConfigs(KernelConfig(64, 64, 4, 2), KernelConfig(64, 32, 8, 2), KernelConfig(64, 32, 8, 2))
