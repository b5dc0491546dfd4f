"""The long-sequence memory levers as Trainer arguments: tiled MLP, tiled loss, activation offload.

:func:`apply_levers` checks the three arguments :class:`flexcp.hf.FlexCPMixin` takes and applies
them to the model (:func:`~flexcp.hf.tiled_mlp.tile_mlp`, :func:`~flexcp.hf.tiled_loss.tile_loss`);
the offload, a context around each training forward, is returned for the trainer to use.
"""

from __future__ import annotations

import torch
from torch import nn

from .offload import ActivationOffload
from .recompute import recompute_norms
from .tiled_loss import tile_loss
from .tiled_mlp import tile_mlp

__all__ = ["apply_levers"]


def _tokens(name: str, value: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{name} must be an int >= 0 (tokens per chunk; 0 leaves it off); got {value!r}")
    return value


def apply_levers(model: nn.Module, tiled_mlp: int, tiled_loss: int, offload_activations: bool,
                 device: torch.device) -> ActivationOffload | None:
    """Tile the model's MLPs (``tiled_mlp`` tokens per chunk; its norms are then recomputed too) and loss
    (``tiled_loss``); 0 leaves one off.

    Returns the :class:`ActivationOffload` for ``device`` when ``offload_activations``, else None.
    """
    _tokens("tiled_mlp", tiled_mlp)
    _tokens("tiled_loss", tiled_loss)
    if not isinstance(offload_activations, bool):
        raise ValueError(f"offload_activations must be True or False; got {offload_activations!r}")
    if tiled_mlp:
        tile_mlp(model, tiled_mlp)
        recompute_norms(model)  # the other float32 copies in a layer's backward working set
    if tiled_loss:
        tile_loss(model, tiled_loss)
    return ActivationOffload(device) if offload_activations else None
