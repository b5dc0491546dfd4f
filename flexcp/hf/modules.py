"""What the magi paths read from a Hugging Face model: head config and its attention modules."""

from __future__ import annotations

from typing import Iterator

import torch

ATTN_NAME = "magi"
"""The name flexcp's attention is registered under in transformers (``attn_implementation="magi"``)."""


def unwrap_model(model):
    """The model inside DDP / FSDP / accelerate wrappers (``.module``, any depth) and PEFT (``get_base_model``).

    flexcp's one unwrap helper: what it reads from a model (config, attention modules) lives there.
    """
    while isinstance(getattr(model, "module", None), torch.nn.Module):
        model = model.module
    return model.get_base_model() if hasattr(model, "get_base_model") else model



Heads = tuple[int, int, int]
"""``(num_heads_q, num_heads_kv, head_dim)``."""


def _get_head_config(model) -> Heads:
    """Extract ``(num_heads_q, num_heads_kv, head_dim)`` from an HF model/config.

    For VLMs the text attention dims live under ``config.text_config``; that sub-config
    is used when the top-level config does not expose ``num_attention_heads``.
    """
    cfg = getattr(unwrap_model(model), "config", model)
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
    root = unwrap_model(model)
    lm = getattr(root, "language_model", None)
    if lm is None:
        lm = getattr(getattr(root, "model", None), "language_model", None)
    for module in (root if lm is None else lm).modules():
        if _is_attention(module):
            yield module


def check_flexcp_attention(model, caller: str) -> None:
    """Refuse a model whose language attention is not flexcp's ``"magi"`` (e.g. ``"eager"`` or ``"sdpa"``).

    Such a model would run on dispatched shards with its own attention: at cp > 1 each rank
    attends only its local tokens, at cp = 1 packed documents attend each other. Modules
    without an HF config (custom models) are not judged.
    """
    impls = {getattr(getattr(m, "config", None), "_attn_implementation", None) for m in _iter_language_model_attention(model)}
    wrong = sorted(str(i) for i in impls - {None, ATTN_NAME})
    if wrong:
        raise ValueError(
            f"{caller}: {type(unwrap_model(model)).__name__} attends with attn_implementation={', '.join(map(repr, wrong))}, "
            f"not flexcp's {ATTN_NAME!r}, so its attention would ignore the dispatched layout (at cp > 1 each rank "
            "attends only its own tokens; packed documents attend each other). Call "
            "flexcp.magi_attn_utils.register_magi_attention() and load the model with "
            f"attn_implementation={ATTN_NAME!r} (or switch a loaded one: model.set_attn_implementation({ATTN_NAME!r}))"
        )


def is_bidirectional(model) -> bool:
    """Whether the language model's attention layers are bidirectional (``is_causal=False``: an encoder).

    Layers without an ``is_causal`` attribute are not counted; a model with both kinds
    (an encoder-decoder) is refused: one step runs one mask.
    """
    flags = {bool(m.is_causal) for m in _iter_language_model_attention(model) if hasattr(m, "is_causal")}
    if len(flags) > 1:
        raise ValueError(
            f"{type(unwrap_model(model)).__name__} has both causal and bidirectional (is_causal=False) attention "
            "layers; flexcp's HF path runs one mask per step: use a decoder-only or an encoder-only model"
        )
    return flags == {False}


def _set_cp_group_on_attention(model, cp_group) -> None:
    """Stamp ``cp_group`` on every attention sub-module so the magi forward finds the step's key.

    A stamped ``None`` means cp = 1 without torch.distributed; modules with no ``cp_group``
    attribute at all fall back to SDPA.
    """
    for module in unwrap_model(model).modules():
        if _is_attention(module):
            module.cp_group = cp_group


def prepare_model(model, cp_group, caller: str) -> tuple[Heads, bool]:
    """What batch preparation needs from a model, in one visit: ``(heads, bidirectional)``.

    Refuses attention that is not ``"magi"`` (:func:`check_flexcp_attention`), stamps
    ``cp_group`` on the attention modules and reads the head config and whether the
    attention is bidirectional (:func:`is_bidirectional`).
    """
    check_flexcp_attention(model, caller)
    bidirectional = is_bidirectional(model)
    _set_cp_group_on_attention(model, cp_group)
    return _get_head_config(model), bidirectional


__all__ = ["ATTN_NAME", "Heads", "prepare_model", "_get_head_config", "_iter_language_model_attention", "_set_cp_group_on_attention",
           "check_flexcp_attention", "is_bidirectional", "unwrap_model"]
