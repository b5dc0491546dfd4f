"""The cuDNN backend: slice masks on cuDNN's ragged SDPA (optional extra ``flexcp[cudnn]``)."""

from .backend import CudnnBackend, CudnnPrep
from .graphs import GraphCache, why_unavailable

__all__ = ["CudnnBackend", "CudnnPrep", "GraphCache", "why_unavailable"]
