"""Single-device attention kernels over slice masks: ``(q, k, v, slices) -> (out, lse)``.

Backends, one module or package each: ``reference`` (tiled PyTorch, the oracle; CPU and
CUDA), ``triton`` (any slice mask on CUDA), ``cudnn`` (cuDNN's ragged SDPA through
nvidia-cudnn-frontend), ``torch_sdpa`` (torch's cuDNN SDPA op for one full/causal
rectangle) and ``auto`` (router.py: slice groups to the fastest by a measured cost
table). The contract they share is backend.py; the one schedule cache is cache.py.
"""

from .api import attention, check_qkv, prepared, resolve_scale, select_backend
from .backend import AttnBackend, available_backends, get_backend, register_backend
from .cache import SCHEDULES, schedule_for
from .cudnn import CudnnBackend
from .reference import ReferenceBackend
from .router import AutoBackend
from .torch_sdpa import TorchSdpaBackend
from .triton import TritonBackend

register_backend("reference", ReferenceBackend)
register_backend("triton", TritonBackend)
register_backend("torch_sdpa", TorchSdpaBackend)
register_backend("cudnn", CudnnBackend)
register_backend("auto", AutoBackend)

__all__ = [
    "AttnBackend",
    "AutoBackend",
    "CudnnBackend",
    "ReferenceBackend",
    "SCHEDULES",
    "TorchSdpaBackend",
    "TritonBackend",
    "attention",
    "available_backends",
    "check_qkv",
    "get_backend",
    "prepared",
    "register_backend",
    "resolve_scale",
    "schedule_for",
    "select_backend",
]
