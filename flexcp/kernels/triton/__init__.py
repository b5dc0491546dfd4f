"""The Triton backend: any slice mask on CUDA, forward and backward (kernels, schedules, tile configs)."""

from .backend import TritonBackend, TritonPrep
from .configs import KernelConfig, LaunchConfigs, default_configs

__all__ = ["KernelConfig", "LaunchConfigs", "TritonBackend", "TritonPrep", "default_configs"]
