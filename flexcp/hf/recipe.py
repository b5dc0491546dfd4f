"""Recipe wiring: ``setup_magi`` reads the config, ``MagiState`` prepares each step's batch."""

from __future__ import annotations

import logging
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import torch.distributed as dist

from ..runtime import DistAttnKey
from .prepare import magi_prepare_batch, magi_prepare_packed_cp, magi_prepare_vlm, to_thd
from .attention import register_magi_attention
from .keys import DEFAULT_CHUNK_SIZE
from .registry import REGISTRY

_MISSING = object()


def get_cp_group(device_mesh) -> dist.ProcessGroup | None:
    """Return the CP process group from the device mesh (its ``"cp"`` dim; size-1 group is fine).

    ``None`` when there is no mesh or the mesh has no ``"cp"`` dimension.
    """
    if device_mesh is None:
        return None
    if "cp" not in (getattr(device_mesh, "mesh_dim_names", None) or ()):
        return None
    return device_mesh["cp"].get_group()


def _cfg_get(cfg: Any, dotted: str) -> Any:
    """``cfg[dotted]`` for a nested dict, an object with a dotted ``.get`` (e.g. a ConfigNode), or attributes."""
    if cfg is None:
        return None
    if not isinstance(cfg, dict) and callable(getattr(cfg, "get", None)):
        return cfg.get(dotted, None)
    node: Any = cfg
    if isinstance(node, dict) and dotted in node:
        return node[dotted]
    for part in dotted.split("."):
        node = node.get(part, _MISSING) if isinstance(node, dict) else getattr(node, part, _MISSING)
        if node is _MISSING or node is None:
            return None
    return node


def _group_size(cp_group) -> int:
    return dist.get_world_size(cp_group) if cp_group is not None else 1


@dataclass
class MagiState:
    """Resolved magi wiring for a recipe, produced by :func:`setup_magi`.

    When magi is not configured ``enabled`` is False; recipes check it (or
    ``hf_dispatch``) before calling the per-step methods, which assume ``enabled``.
    """

    enabled: bool = False
    custom: bool = False
    cp_group: dist.ProcessGroup | None = None
    cp_size: int = 1
    chunk_size: int = DEFAULT_CHUNK_SIZE
    """Dispatch chunk size for ``prepare_llm_batch`` (flexcp addition; config ``magi.chunk_size``)."""

    @property
    def hf_dispatch(self) -> bool:
        """HF path: dispatch the sequence (input + labels) across CP for a per-shard loss.

        Distinguishes the HF ``attn_implementation="magi"`` path (:func:`magi_prepare_batch`)
        from the custom-model factory path; both shard labels and compute a per-shard loss
        at cp > 1, so neither undispatches logits.
        """
        return self.enabled and not self.custom

    def prepare_llm_batch(self, model, batch, device_mesh, is_thd, pad_id, num_chunks):
        """Per-step batch prep for the LLM recipe (assumes ``enabled``); returns ``(train_ctx, batch)``.

        HF path: :func:`magi_prepare_batch` (packed documents from ``position_ids`` resets or
        ``cu_seqlens``, batch rows, padding, prefix trees via ``batch['attn_spec']``).
        Custom path with ``is_thd``: the batch as one global THD sequence, dispatched with
        :func:`magi_prepare_packed_cp` at cp > 1. flexcp does its own CP, so ``train_ctx`` is
        always ``nullcontext``; ``device_mesh``, ``pad_id`` and ``num_chunks`` (TE's THD
        padding and chunking) are accepted for the recipe's signature and not needed.
        """
        if self.hf_dispatch:
            batch, _ = self.prepare_hf_batch(model, batch)
        elif is_thd:
            batch = to_thd(batch)
            if self.cp_size > 1:
                batch, _ = magi_prepare_packed_cp(model, batch, self.cp_group)
        return nullcontext, batch

    def prepare_hf_batch(self, model, batch: dict) -> tuple[dict, DistAttnKey]:
        """The HF path's batch preparation: :func:`magi_prepare_batch` over this state's group and chunk size.

        The seed facade's ``MagiState`` overrides it with the facade's preparation (which adds
        the active spec), so a state and a direct call prepare a batch alike.
        """
        return magi_prepare_batch(model, batch, self.cp_group, chunk_size=self.chunk_size)

    def prepare_vlm_batch(self, model, batch):
        """Per-step batch prep for the VLM recipe (assumes ``enabled``); returns ``(train_ctx, batch)``.

        HF VLMs stamp the cp_group on the language-backbone attention
        (:func:`magi_prepare_vlm`); custom VLMs use the factory attn_func with the active CP
        group set in :func:`setup_magi`. The vision tower stays on SDPA either way.
        """
        if not self.custom:
            batch, _ = magi_prepare_vlm(model, batch, self.cp_group)
        return nullcontext, batch


def setup_magi(cfg, device_mesh, label: str = "") -> MagiState:
    """Resolve magi attention from config: register the backend and the CP group.

    Enabled when ``model.attn_implementation == "magi"`` (HF) or ``model.backend.attn``
    (or ``backend.attn``) ``== "magi"`` (custom models). ``cfg`` is a nested dict or an
    object with a dotted ``.get``. Returns ``MagiState(enabled=False)`` when magi is not
    configured. ``label`` is an optional suffix for the log line. flexcp also reads an
    optional ``magi.chunk_size`` (default ``DEFAULT_CHUNK_SIZE``) for the HF batch path.
    """
    backend_attn = _cfg_get(cfg, "model.backend.attn") or _cfg_get(cfg, "backend.attn")
    custom = str(backend_attn or "") == "magi"
    enabled = custom or str(_cfg_get(cfg, "model.attn_implementation") or "") == "magi"
    if not enabled:
        return MagiState()
    register_magi_attention()
    cp_group = get_cp_group(device_mesh)
    cp_size = _group_size(cp_group)
    if custom:
        REGISTRY.active_cp_group = cp_group
    logging.getLogger(__package__).info(
        "magi attention (flexcp) enabled%s (%s, cp_size=%d).",
        f" for {label}" if label else "",
        "custom-model factory" if custom else "HF backend",
        cp_size,
    )
    chunk_size = int(_cfg_get(cfg, "magi.chunk_size") or DEFAULT_CHUNK_SIZE)
    if chunk_size < 1:
        raise ValueError(f"magi.chunk_size must be a positive number of tokens; got {chunk_size}")
    return MagiState(enabled=True, custom=custom, cp_group=cp_group, cp_size=cp_size, chunk_size=chunk_size)


__all__ = ["MagiState", "get_cp_group", "setup_magi"]
