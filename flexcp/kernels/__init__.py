"""Single-device attention kernels over slice masks: ``(q, k, v, slices) -> (out, lse)``."""

from .api import attention, check_qkv, prepared, resolve_scale, select_backend
from .backend import AttnBackend, available_backends, get_backend, register_backend
from .reference import ReferenceBackend
from .sdpa_backend import SdpaBackend
from .triton_backend import TritonBackend

register_backend("reference", ReferenceBackend)
register_backend("triton", TritonBackend)
register_backend("sdpa", SdpaBackend)

__all__ = [
    "AttnBackend",
    "ReferenceBackend",
    "SdpaBackend",
    "TritonBackend",
    "attention",
    "available_backends",
    "check_qkv",
    "get_backend",
    "prepared",
    "register_backend",
    "resolve_scale",
    "select_backend",
]
