"""Single-device attention kernels over slice masks: ``(q, k, v, slices) -> (out, lse)``."""

from .api import attention, check_qkv, prepared, select_backend
from .backend import AttnBackend, available_backends, get_backend, register_backend
from .reference import ReferenceBackend

register_backend("reference", ReferenceBackend)

__all__ = [
    "AttnBackend",
    "ReferenceBackend",
    "attention",
    "available_backends",
    "check_qkv",
    "get_backend",
    "prepared",
    "register_backend",
    "select_backend",
]
