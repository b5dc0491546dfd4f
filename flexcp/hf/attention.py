"""The ``"magi"`` backend of Hugging Face transformers: an attention function and a mask function.

The attention function receives HF's ``query [b, hq, s, d]``, ``key``/``value [b, hkv, s, d]``,
flattens the batch rows into one THD sequence, finds the step's key (the ``flexcp::hf_step_key``
op of step_key.py: :func:`.keys.resolve_key`, then the layer's sliding-window
key when the layer has one, once per step) and runs :func:`flexcp.calc_attn` (the ``flexcp::calc_attn`` op) with the
layer's scaling and logit softcap. Both are custom ops, so ``torch.compile`` of the model
traces no host code here: no graph break, and a new batch does not recompile. The mask function makes transformers skip its dense 4-D masks: it returns
``None``, or the ``[b, s]`` padding mask when some token is padding (O(tokens)).
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from ..runtime import DistAttnKey, calc_attn
from ..runtime.key import group_slot
from .amp import attend_in_autocast_dtype
from .modules import ATTN_NAME
from .registry import REGISTRY
from .step_key import hf_step_key

SUPPORTED_LAYER_TYPES = ("full_attention", "sliding_attention")


def magi_mask_function(
    batch_size: int,
    q_length: int | None = None,
    kv_length: int | None = None,
    q_offset: int = 0,
    kv_offset: int = 0,
    mask_function: Any = None,
    attention_mask: torch.Tensor | None = None,
    **kwargs: Any,
) -> torch.Tensor | None:
    """Never materializes a 4-D mask: ``None``, or the 2-D ``[b, kv]`` padding mask when a token is padding.

    The mask itself lives in the dist-attn key (documents, trees, windows); a padding
    mask is handed on so the attention function can honour it (or refuse it). Only
    ``attention_mask`` is read, so the lengths are optional (early transformers 5 releases pass
    ``cache_position`` instead of ``q_length``).
    """
    if attention_mask is None:
        return None
    if torch.compiler.is_compiling():  # the all-ones test is data-dependent: hf_step_key makes it, in its op
        return attention_mask
    return None if bool(attention_mask.all()) else attention_mask


def _sliding_window(module: torch.nn.Module, kwargs: dict) -> int | None:
    """The layer's sliding window: the ``sliding_window`` kwarg, else the module, else config.layer_types."""
    config = getattr(module, "config", None)
    layer_types = getattr(config, "layer_types", None)
    layer_idx = getattr(module, "layer_idx", None)
    layer_type = layer_types[layer_idx] if layer_types is not None and layer_idx is not None else None
    if layer_type is not None and layer_type not in SUPPORTED_LAYER_TYPES:
        raise ValueError(
            f"layer {layer_idx} has layer type {layer_type!r}; the magi backend supports {SUPPORTED_LAYER_TYPES}"
        )
    if "sliding_window" in kwargs:
        window = kwargs["sliding_window"]
    else:
        window = getattr(module, "sliding_window", None)
        if window is None and layer_type == "sliding_attention":
            window = getattr(config, "sliding_window", None)
    return int(window) if window is not None and int(window) > 0 else None


def _softcap(module: torch.nn.Module, kwargs: dict) -> float:
    if "softcap" in kwargs:
        cap = kwargs["softcap"]
    else:
        cap = getattr(getattr(module, "config", None), "attn_logit_softcapping", None)
    return float(cap) if cap else 0.0


def _check_call(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, attention_mask, dropout: float,
                kwargs: dict) -> None:
    """Refuse what the magi path cannot honour, instead of silently computing something else."""
    if dropout:
        raise ValueError(f"magi attention has no attention dropout (got dropout={dropout}); set config.attention_dropout=0")
    if key.shape[2] != query.shape[2]:
        raise ValueError(
            f"magi attention attends the step's tokens only ({query.shape[2]} queries, {key.shape[2]} keys): "
            "it does not run with a KV cache; call the model with use_cache=False"
        )
    if attention_mask is not None and (not isinstance(attention_mask, torch.Tensor) or attention_mask.dim() != 2):
        shape = tuple(attention_mask.shape) if hasattr(attention_mask, "shape") else type(attention_mask).__name__
        raise ValueError(
            f"magi attention cannot honour a dense attention mask of shape {shape}: describe the mask with an "
            "AttnMaskSpec (magi_prepare_batch(batch={'attn_spec': ...}) or set_active_attn_spec) instead"
        )
    if kwargs.get("s_aux") is not None:
        raise ValueError("magi attention does not support attention sinks (s_aux)")
    if not getattr(module, "is_causal", True) and kwargs.get("magi_key") is None:
        raise ValueError(
            f"{type(module).__name__} is bidirectional; the magi backend builds causal masks. Pass magi_key with "
            "the mask you need, or leave this module without a cp_group (SDPA)"
        )


def _sdpa_fallback(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None, **kwargs):
    """SDPA for bidirectional modules without ``cp_group`` (e.g. a VLM vision tower); a padding mask becomes a key mask."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if isinstance(attention_mask, torch.Tensor) and attention_mask.dim() == 2:
        attention_mask = attention_mask[:, None, None, :].to(torch.bool)
    kwargs.pop("magi_key", None)
    return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                  is_causal=is_causal, **kwargs)


def magi_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """HF attention interface: ``[b, h, s, d]`` in, ``([b, s, hq, d], None)`` out, through ``calc_attn``."""
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    if not hasattr(module, "cp_group") and not causal:
        return _sdpa_fallback(module, query, key, value, attention_mask, dropout, scaling, is_causal, **kwargs)
    _check_call(module, query, key, attention_mask, dropout, kwargs)
    b, hq, s, d = query.shape
    explicit = kwargs.get("magi_key")
    if explicit is not None and not isinstance(explicit, DistAttnKey):
        raise ValueError(f"magi_key must be a DistAttnKey (from magi_prepare_batch or flexcp.build_key); "
                         f"got {type(explicit).__name__}")
    handle = hf_step_key(None if explicit is None else explicit.handle, kwargs.get("position_ids"), attention_mask,
                         b, s, hq, key.shape[1], d, _sliding_window(module, kwargs) or 0,
                         group_slot(getattr(module, "cp_group", None)),  # none stamped: cp = 1, local attention
                         bool(getattr(module, "_magi_self_key", False)))
    if scaling is None:
        scaling = getattr(module, "scaling", None)
    q, k, v = (x.transpose(1, 2).reshape(b * s, x.shape[1], d) for x in (query, key, value))
    out, _ = attend_in_autocast_dtype(calc_attn, q, k, v, key=handle, softmax_scale=scaling,
                                      softcap=_softcap(module, kwargs))
    return out.view(b, s, hq, d), None


def register_magi_attention() -> None:
    """Register the ``"magi"`` attention backend in HF transformers (idempotent).

    Registers :func:`magi_attention_forward` in ``AttentionInterface`` (HF's
    ``ALL_ATTENTION_FUNCTIONS``) and :func:`magi_mask_function` in
    ``AttentionMaskInterface``, so ``attn_implementation="magi"`` never builds a 4-D mask.
    """
    if REGISTRY.registered:
        return
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(ATTN_NAME, magi_attention_forward)
    AttentionMaskInterface.register(ATTN_NAME, magi_mask_function)
    REGISTRY.registered = True
    logging.getLogger(__package__).info("Registered the 'magi' attention backend (flexcp) in transformers.")


__all__ = ["magi_attention_forward", "magi_mask_function", "register_magi_attention"]
