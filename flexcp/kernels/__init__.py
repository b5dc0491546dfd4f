"""Single-device attention kernels over slice masks: ``(q, k, v, slices) -> (out, lse)``."""

from .api import attention, check_qkv, prepared, resolve_scale, select_backend
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
    "resolve_scale",
    "select_backend",
]
