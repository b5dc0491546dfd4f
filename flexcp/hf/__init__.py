"""flexcp in Hugging Face ``transformers.Trainer`` and TRL: context parallelism as a ``cp_size`` argument.

- :class:`FlexCPTrainer` (``transformers.Trainer``) and :class:`FlexCPSFTTrainer`
  (``trl.SFTTrainer``, needs the ``trl`` extra) take ``cp_size=N``; :class:`FlexCPMixin`
  adds it to any other Trainer subclass.
- :func:`register_magi_attention` registers ``attn_implementation="magi"``; at cp = 1 a
  model with it runs anywhere without further setup (local attention honouring packed
  ``position_ids``, padding masks and sliding windows).

Layer: above ``magi_attn_utils`` (batch dispatch, attention), below ``train``. See docs/hf.md.
"""

from __future__ import annotations

from typing import Any

from ..magi_attn_utils import register_magi_attention
from .batch import check_same_batch, shard_batch, shifted_labels
from .data import share_batches_in_cp_groups
from .mesh import CPMesh, build_cp_mesh

_LAZY = {"FlexCPMixin": "trainer", "FlexCPTrainer": "trainer", "FlexCPSFTTrainer": "sft"}


def __getattr__(name: str) -> Any:
    """The trainer classes, imported on first use (they import transformers, and trl for the SFT one)."""
    if name not in _LAZY:
        raise AttributeError(f"module 'flexcp.hf' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)


__all__ = [
    "CPMesh",
    "FlexCPMixin",
    "FlexCPSFTTrainer",
    "FlexCPTrainer",
    "build_cp_mesh",
    "check_same_batch",
    "register_magi_attention",
    "shard_batch",
    "share_batches_in_cp_groups",
    "shifted_labels",
]
