"""Norms recomputed in backward: keep a norm's 16-bit input, not the float32 copies HF's RMSNorm saves.

HF's RMSNorm (Llama, Qwen, Mistral, Gemma, ...) upcasts its input to float32 and saves that
copy and the normalized 16-bit output for backward: 6 bytes per hidden unit and token per
norm, beyond its 16-bit input (which the residual stream or the layer's checkpoint keeps anyway). :func:`recompute_norms` wraps each norm's ``forward`` in a
non-reentrant ``torch.utils.checkpoint`` (nested inside a layer's own checkpoint as torch
allows): the float32 internals then exist only while that norm's backward runs. Values are
bit for bit the same (the same elementwise operations, run again); the cost is one more
norm forward per norm, a few passes over ``[tokens, hidden]``.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from .modules import unwrap_model
from .tiled_mlp import decoder_layers_of

__all__ = ["recompute_module", "recompute_norms"]


def recompute_module(module: nn.Module) -> None:
    """Make ``module``'s forward (one tensor in, one out) keep only its input for backward (idempotent)."""
    if "_flexcp_recompute_forward" in module.__dict__:
        return
    plain = module._flexcp_recompute_forward = module.forward

    def forward(x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if not args and not kwargs and torch.is_grad_enabled() and x.requires_grad:
            return checkpoint(plain, x, use_reentrant=False)
        return plain(x, *args, **kwargs)

    module.forward = forward


def recompute_norms(model: nn.Module, layers: bool = True) -> int:
    """Recompute the decoder's final ``norm`` and (``layers``) every norm that is a direct child of a decoder layer.

    Returns the number of norms changed (0: the model has none where they were looked for).
    """
    base = unwrap_model(model)
    norms = []
    final = getattr(base.get_decoder(), "norm", None) if hasattr(base, "get_decoder") else None
    if isinstance(final, nn.Module):
        norms.append(final)
    if layers:
        for layer in decoder_layers_of(base):
            norms += [m for name, m in layer.named_children() if "norm" in name.lower()]
    for norm in norms:
        recompute_module(norm)
    return len(norms)
