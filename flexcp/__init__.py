"""flexcp: context-parallel flexible attention for long-context fine-tuning.

Public API: the mask language (:class:`AttnMaskSpec`, :class:`AttnMaskType`),
single-device attention over any slice mask (:func:`attention`), and the distributed
runtime mirroring MagiAttention's names (:func:`build_key`, :func:`dispatch`,
:func:`calc_attn`, :func:`undispatch`, :func:`get_position_ids`, ...). The Hugging Face
backend lives in :mod:`flexcp.hf`, with NeMo Automodel's API as the facade :mod:`flexcp.magi_attn_utils`
(``attn_implementation="magi"`` is registered in transformers as soon as transformers loads, see
:mod:`flexcp.hf.autoregister`); the Trainer / TRL integration
(:class:`FlexCPTrainer`, :class:`FlexCPSFTTrainer`, :class:`FlexCPMixin`) and the long-sequence
levers (:func:`tile_mlp`, :func:`tile_loss`, :class:`ActivationOffload`) in :mod:`flexcp.hf`,
imported on first use.
"""

from .kernels import attention, available_backends
from .mask import AttnMaskSpec, AttnMaskType
from .sharding import IGNORE_INDEX
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

from .hf.autoregister import install as _install_magi_registration

__version__ = "0.1.0"

_install_magi_registration()  # attn_implementation="magi" works without register_magi_attention()

_HF_LAZY = ("ActivationOffload", "FlexCPMixin", "FlexCPSFTTrainer", "FlexCPTrainer", "tile_loss", "tile_mlp")


def __getattr__(name: str):
    """The Trainer integration and long-sequence levers of :mod:`flexcp.hf`, imported on first use."""
    if name in _HF_LAZY:
        from . import hf

        return getattr(hf, name)
    raise AttributeError(f"module 'flexcp' has no attribute {name!r}")


__all__ = [
    "ActivationOffload",
    "AttnMaskSpec",
    "AttnMaskType",
    "DistAttnKey",
    "FlexCPMixin",
    "FlexCPSFTTrainer",
    "FlexCPTrainer",
    "IGNORE_INDEX",
    "__version__",
    "attention",
    "available_backends",
    "build_key",
    "calc_attn",
    "clear_cache",
    "dispatch",
    "get_most_recent_key",
    "get_position_ids",
    "tile_loss",
    "tile_mlp",
    "undispatch",
]
