"""The API of NeMo Automodel's ``magi_attn_utils``, as a facade over flexcp's HF backend (:mod:`flexcp.hf`).

Every name and behaviour of the seed document lives here by delegation; the work is done
by the backend modules (``flexcp/hf/``: ``attention``, ``prepare``, ``masks``, ``keys``,
``step_key``, ``modules``, ``registry``, ``recipe``, ``attn_func``), which never import this
package. What the facade itself adds are the seed's settings: :func:`set_active_attn_spec` /
:func:`set_active_cp_group` and their getters, and the seed's module-level state names
(``_ACTIVE_ATTN_SPEC``, ``_ACTIVE_CP_GROUP``, ``_MAGI_REGISTERED`` read and write the
backend's registry; ``_FLEX_KEY_CACHE``, ``_MAGI_SELF_KEY_LEN`` are read-only snapshots).

In short (the seed's walk): :func:`register_magi_attention` registers ``"magi"`` in
transformers; :func:`magi_prepare_batch` builds the step's mask and key, dispatches the
batch over the CP group and puts the key in the batch (``magi_key``); each rank runs the
model on its shard and the per-shard losses sum to the cp = 1 loss. See docs/hf.md.
"""

from __future__ import annotations

import logging
import sys
import types
from collections.abc import Mapping
from typing import Optional

import torch.distributed as dist

from ..hf import attention as hf_attention  # the seed's HF attention module, by its old name
from ..hf import prepare
from ..hf.attention import register_magi_attention
from ..hf.attn_func import make_magi_attn_func
from ..hf.keys import DEFAULT_CHUNK_SIZE, _flex_key_for, build_flex_key
from ..hf.masks import prefix_tree_position_ids
from ..hf.modules import _get_head_config, _iter_language_model_attention, _set_cp_group_on_attention
from ..hf.prepare import _packed_cp_doc_seqlens, magi_prepare_packed_cp, magi_prepare_vlm
from ..hf import recipe
from ..hf.recipe import get_cp_group
from ..hf.registry import REGISTRY, SeedView
from ..mask import AttnMaskSpec
from .seed import _build_self_key, _self_key_for, step_fallback

logger = logging.getLogger(__name__)

REGISTRY.fallback = step_fallback  # the seed's fallbacks (active spec, most recent key) exist with the facade


def magi_prepare_batch(model, batch: dict, cp_group, chunk_size: int = DEFAULT_CHUNK_SIZE):
    """Dispatch a batch for magi attention on the HF path; returns ``(new_batch, key)``.

    :func:`flexcp.hf.prepare.magi_prepare_batch` (see it for the fields), plus the seed's
    active spec (:func:`set_active_attn_spec`): the mask of a batch without its own ``attn_spec``.
    """
    active = REGISTRY.active_spec
    if active is not None and isinstance(batch, Mapping) and batch.get("attn_spec") is None:
        batch = {**batch, "attn_spec": active}
    return prepare.magi_prepare_batch(model, batch, cp_group, chunk_size)


class MagiState(recipe.MagiState):
    """The seed's ``MagiState``: :class:`flexcp.hf.recipe.MagiState` whose HF batch preparation is
    this facade's :func:`magi_prepare_batch` (the active spec included), as a direct call's is."""

    def prepare_hf_batch(self, model, batch: dict):
        return magi_prepare_batch(model, batch, self.cp_group, chunk_size=self.chunk_size)


def setup_magi(cfg, device_mesh, label: str = "") -> MagiState:
    """Resolve magi attention from config (:func:`flexcp.hf.recipe.setup_magi`) as the seed's :class:`MagiState`."""
    return MagiState(**vars(recipe.setup_magi(cfg, device_mesh, label)))


def set_active_attn_spec(spec: Optional[AttnMaskSpec]) -> None:
    """Set the mask spec the magi attention should apply this step (None clears it)."""
    if spec is not None and not isinstance(spec, AttnMaskSpec):
        raise ValueError(f"spec must be an AttnMaskSpec or None; got {type(spec).__name__}")
    REGISTRY.active_spec = spec


def get_active_attn_spec() -> Optional[AttnMaskSpec]:
    """Return the active mask spec (None -> plain causal / the batch's documents)."""
    return REGISTRY.active_spec


def set_active_cp_group(cp_group: Optional["dist.ProcessGroup"]) -> None:
    """Record the CP group the custom-model magi attn_func should use."""
    REGISTRY.active_cp_group = cp_group


def get_active_cp_group() -> Optional["dist.ProcessGroup"]:
    """Return the CP group set by :func:`set_active_cp_group` (may be None)."""
    return REGISTRY.active_cp_group


def is_magi_available() -> bool:
    """Return True: the magi backend ships with flexcp (no separate CUDA build)."""
    return True


class _SeedModule(types.ModuleType):
    """This package as a module whose seed state names delegate to the backend's :data:`flexcp.hf.registry.REGISTRY`.

    ``_ACTIVE_ATTN_SPEC``, ``_ACTIVE_CP_GROUP`` and ``_MAGI_REGISTERED`` read and write the
    registry's settings; ``_FLEX_KEY_CACHE`` (``id(cp_group) -> ((fingerprint, heads), key)``)
    and ``_MAGI_SELF_KEY_LEN`` (``id(cp_group) -> seqlen``) are read-only snapshots. A module
    class is the one way a module attribute can be a property: the seed's names are module
    globals that users read and assign, and a copy here would go stale beside the registry.
    """

    @property
    def _ACTIVE_ATTN_SPEC(self) -> Optional[AttnMaskSpec]:
        return REGISTRY.active_spec

    @_ACTIVE_ATTN_SPEC.setter
    def _ACTIVE_ATTN_SPEC(self, spec: Optional[AttnMaskSpec]) -> None:
        set_active_attn_spec(spec)

    @property
    def _ACTIVE_CP_GROUP(self) -> Optional["dist.ProcessGroup"]:
        return REGISTRY.active_cp_group

    @_ACTIVE_CP_GROUP.setter
    def _ACTIVE_CP_GROUP(self, cp_group: Optional["dist.ProcessGroup"]) -> None:
        REGISTRY.active_cp_group = cp_group

    @property
    def _MAGI_REGISTERED(self) -> bool:
        return REGISTRY.registered

    @_MAGI_REGISTERED.setter
    def _MAGI_REGISTERED(self, value: bool) -> None:
        REGISTRY.registered = bool(value)

    @property
    def _FLEX_KEY_CACHE(self) -> SeedView:
        return REGISTRY.seed_flex_keys()

    @property
    def _MAGI_SELF_KEY_LEN(self) -> SeedView:
        return REGISTRY.seed_self_key_lens()


sys.modules[__name__].__class__ = _SeedModule

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
