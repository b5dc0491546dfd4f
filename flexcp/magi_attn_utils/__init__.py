"""flexcp's Hugging Face backend, with the API of NeMo Automodel's ``magi_attn_utils``.

MagiAttention-style context parallelism for HF causal LMs, running on flexcp's own
kernels and runtime (``is_magi_available()`` is always True):

1. :func:`register_magi_attention` registers ``"magi"`` in transformers' attention
   functions and mask functions, so ``attn_implementation="magi"`` routes attention
   through :func:`flexcp.calc_attn` and never builds a dense 4-D mask.
2. :func:`magi_prepare_batch` builds the step's mask (packed documents, batch rows,
   padding, prefix trees) and its dist-attn key, dispatches ``input_ids``, real
   ``position_ids`` and pre-shifted ``labels`` over the CP group, stamps ``cp_group`` on the
   attention modules, and puts the key in the batch (``magi_key``), which the model
   forwards to every attention layer. Sliding-window layers derive their own key.
3. Each rank runs the model on its shard and computes a per-shard loss; summed over
   the CP group (sum or globally normalized reduction) it equals the cp = 1 loss.

At cp = 1 dispatch is the identity (plus chunk padding), and a model called directly
with packed ``position_ids`` or a padding ``attention_mask`` gets the matching mask.
See docs/hf.md for every name.
"""

from __future__ import annotations

import logging
from typing import Optional

import torch.distributed as dist

from ..mask import AttnMaskSpec

logger = logging.getLogger(__name__)

DEFAULT_CHUNK_SIZE = 512
"""Dispatch chunk size of the load-balancing solver (MagiAttention's default)."""

_ACTIVE_ATTN_SPEC: Optional[AttnMaskSpec] = None
"""Mask spec set by :func:`set_active_attn_spec` (None -> the batch's own documents)."""
_ACTIVE_CP_GROUP: Optional["dist.ProcessGroup"] = None
"""CP group of the custom-model attn_func (a closure with no module to read it from)."""
_FLEX_KEY_CACHE: dict = {}
"""id(cp_group) -> ((spec fingerprint, heads), key): one flex key per group, rebuilt when the mask changes."""
_MAGI_REGISTERED = False
"""Whether :func:`register_magi_attention` has run."""
_MAGI_SELF_KEY_LEN: dict = {}
"""id(cp_group) -> the sequence length of the last causal self-key."""


def set_active_attn_spec(spec: Optional[AttnMaskSpec]) -> None:
    """Set the mask spec the magi attention should apply this step (None clears it)."""
    global _ACTIVE_ATTN_SPEC
    if spec is not None and not isinstance(spec, AttnMaskSpec):
        raise ValueError(f"spec must be an AttnMaskSpec or None; got {type(spec).__name__}")
    _ACTIVE_ATTN_SPEC = spec


def get_active_attn_spec() -> Optional[AttnMaskSpec]:
    """Return the active mask spec (None -> plain causal / the batch's documents)."""
    return _ACTIVE_ATTN_SPEC


def set_active_cp_group(cp_group: Optional["dist.ProcessGroup"]) -> None:
    """Record the CP group the custom-model magi attn_func should use."""
    global _ACTIVE_CP_GROUP
    _ACTIVE_CP_GROUP = cp_group


def get_active_cp_group() -> Optional["dist.ProcessGroup"]:
    """Return the CP group set by :func:`set_active_cp_group` (may be None)."""
    return _ACTIVE_CP_GROUP


def is_magi_available() -> bool:
    """Return True: the magi backend ships with flexcp (no separate CUDA build)."""
    return True


from .attn_func import make_magi_attn_func  # noqa: E402
from .batch import _packed_cp_doc_seqlens, magi_prepare_batch, magi_prepare_packed_cp, magi_prepare_vlm  # noqa: E402
from .heads import _get_head_config, _iter_language_model_attention, _set_cp_group_on_attention  # noqa: E402
from .hf_attention import register_magi_attention  # noqa: E402
from .keys import _build_self_key, _flex_key_for, _self_key_for, build_flex_key  # noqa: E402
from .masks import prefix_tree_position_ids  # noqa: E402
from .state import MagiState, get_cp_group, setup_magi  # noqa: E402

__all__ = [
    "DEFAULT_CHUNK_SIZE",
    "AttnMaskSpec",
    "MagiState",
    "build_flex_key",
    "get_active_attn_spec",
    "get_active_cp_group",
    "get_cp_group",
    "is_magi_available",
    "logger",
    "magi_prepare_batch",
    "magi_prepare_packed_cp",
    "magi_prepare_vlm",
    "make_magi_attn_func",
    "prefix_tree_position_ids",
    "register_magi_attention",
    "set_active_attn_spec",
    "set_active_cp_group",
    "setup_magi",
]
