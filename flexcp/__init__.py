"""flexcp: context-parallel flexible attention for long-context fine-tuning.

Public API: the mask language (:class:`AttnMaskSpec`, :class:`AttnMaskType`),
single-device attention over any slice mask (:func:`attention`), and the distributed
runtime mirroring MagiAttention's names (:func:`build_key`, :func:`dispatch`,
:func:`calc_attn`, :func:`undispatch`, :func:`get_position_ids`, ...). The Hugging Face
backend lives in :mod:`flexcp.magi_attn_utils`.
"""

from .kernels import attention, available_backends
from .mask import AttnMaskSpec, AttnMaskType
from .runtime import (
    DistAttnKey,
    build_key,
    calc_attn,
    clear_cache,
    dispatch,
    get_most_recent_key,
    get_position_ids,
    undispatch,
)

__version__ = "0.1.0"

__all__ = [
    "AttnMaskSpec",
    "AttnMaskType",
    "DistAttnKey",
    "__version__",
    "attention",
    "available_backends",
    "build_key",
    "calc_attn",
    "clear_cache",
    "dispatch",
    "get_most_recent_key",
    "get_position_ids",
    "undispatch",
]
