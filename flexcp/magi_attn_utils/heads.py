"""What the magi paths read from a Hugging Face model: head config and its attention modules."""

from __future__ import annotations

from typing import Iterator

import torch


def _unwrap(model):
    """The model inside a DDP/FSDP-style wrapper (``.module``), else the model."""
    return getattr(model, "module", model)


def _get_head_config(model) -> tuple[int, int, int]:
    """Extract ``(num_heads_q, num_heads_kv, head_dim)`` from an HF model/config.

    For VLMs the text attention dims live under ``config.text_config``; that sub-config
    is used when the top-level config does not expose ``num_attention_heads``.
    """
    cfg = getattr(_unwrap(model), "config", model)
    if not hasattr(cfg, "num_attention_heads") and hasattr(cfg, "text_config"):
        cfg = cfg.text_config
    heads_q = getattr(cfg, "num_attention_heads", None)
    if not heads_q:
        raise ValueError(f"cannot read num_attention_heads from {type(cfg).__name__}; pass an HF causal LM or its config")
    heads_kv = getattr(cfg, "num_key_value_heads", None) or heads_q
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads_q
    return int(heads_q), int(heads_kv), int(head_dim)


def _is_attention(module: torch.nn.Module) -> bool:
    return "Attention" in type(module).__name__


def _iter_language_model_attention(model) -> Iterator[torch.nn.Module]:
    """Yield attention sub-modules belonging to the language backbone only.

    VLMs keep the vision tower on its own (bidirectional) attention: HF nests the text
    stack under ``language_model`` or ``model.language_model``, and only that subtree is
    walked. Plain LLMs (no ``language_model``) yield every attention module.
    """
    root = _unwrap(model)
    lm = getattr(root, "language_model", None)
    if lm is None:
        lm = getattr(getattr(root, "model", None), "language_model", None)
    for module in (root if lm is None else lm).modules():
        if _is_attention(module):
            yield module


def _set_cp_group_on_attention(model, cp_group) -> None:
    """Stamp ``cp_group`` on every attention sub-module so the magi forward finds the step's key.

    A stamped ``None`` means cp = 1 without torch.distributed; modules with no ``cp_group``
    attribute at all fall back to SDPA.
    """
    for module in _unwrap(model).modules():
        if _is_attention(module):
            module.cp_group = cp_group


__all__ = ["_get_head_config", "_iter_language_model_attention", "_set_cp_group_on_attention"]
