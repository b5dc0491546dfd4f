"""flexcp in Hugging Face ``transformers.Trainer`` and TRL: context parallelism as a ``cp_size`` argument.

- :class:`FlexCPTrainer` (``transformers.Trainer``) and :class:`FlexCPSFTTrainer`
  (``trl.SFTTrainer``, needs the ``trl`` extra) take ``cp_size=N``; :class:`FlexCPMixin`
  adds it to any other Trainer subclass.
- Long sequences on one GPU: :func:`tile_mlp` (decoder MLPs over chunks of tokens),
  :func:`tile_loss` (LM head + loss over chunks: no full logits), :class:`ActivationOffload`
  (saved activations in pinned host memory, asynchronous copies); the trainers take them as
  ``tiled_mlp=``, ``tiled_loss=``, ``offload_activations=``.
- :func:`register_magi_attention` registers ``attn_implementation="magi"``; at cp = 1 a
  model with it runs anywhere without further setup (local attention honouring packed
  ``position_ids``, padding masks and sliding windows).

The HF backend lives here too: ``attention`` (the ``"magi"`` attention and mask functions), ``prepare``
(batch preparation), ``masks``, ``keys``, ``step_key``, ``modules``, ``registry``, ``recipe``, ``attn_func``.
Layer: above ``runtime``, below ``train`` and the seed facade ``magi_attn_utils``. See docs/hf.md.
"""

from __future__ import annotations

from typing import Any

from .attention import register_magi_attention
from .batch import check_same_batch, shard_batch, shifted_labels
from .data import share_batches_in_cp_groups
from .mesh import CPMesh, build_cp_mesh
from .offload import ActivationOffload, HostArena
from .recompute import recompute_norms
from .tiled_loss import linear_cross_entropy, tile_loss
from .tiled_mlp import tile_mlp

_LAZY = {"FlexCPMixin": "trainer", "FlexCPTrainer": "trainer", "FlexCPSFTTrainer": "sft"}


def __getattr__(name: str) -> Any:
    """The trainer classes, imported on first use (they import transformers, and trl for the SFT one)."""
    if name not in _LAZY:
        raise AttributeError(f"module 'flexcp.hf' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)


__all__ = [
    "ActivationOffload",
    "CPMesh",
    "FlexCPMixin",
    "FlexCPSFTTrainer",
    "FlexCPTrainer",
    "HostArena",
    "build_cp_mesh",
    "check_same_batch",
    "linear_cross_entropy",
    "recompute_norms",
    "register_magi_attention",
    "shard_batch",
    "share_batches_in_cp_groups",
    "shifted_labels",
    "tile_loss",
    "tile_mlp",
]
