"""One Trainer micro-batch, as the CP group's ranks see it: same global batch in, one dispatched shard out."""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from .prepare import magi_prepare_batch
from ..sharding import IGNORE_INDEX

VARLEN_FIELDS = ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k", "seq_idx")
"""Padding-free layout fields (TRL's collator) that describe the global token order; the key replaces them."""


def shifted_labels(labels: torch.Tensor) -> torch.Tensor:
    """``labels[..., i + 1]`` at position ``i`` (``IGNORE_INDEX`` at each row's end): HF causal-LM loss's own shift, done up front."""
    return torch.nn.functional.pad(labels, (0, 1), value=IGNORE_INDEX)[..., 1:].contiguous()


def _fingerprint(batch: dict, device: torch.device) -> torch.Tensor:
    """A few int64 sums over the integer tensor fields: equal batches give equal fingerprints."""
    parts = []
    for name in sorted(batch):
        value = batch[name]
        if isinstance(value, torch.Tensor) and not value.is_floating_point() and value.numel():
            flat = value.reshape(-1).long().to(device)
            weights = torch.arange(1, flat.numel() + 1, device=flat.device) % 65521
            parts += [torch.tensor(flat.numel(), device=flat.device), flat.sum(), (flat * weights).sum()]
    return torch.stack(parts) if parts else torch.zeros(1, dtype=torch.long, device=device)


def check_same_batch(batch: dict, cp_group) -> None:
    """Raise on every rank when the ranks of ``cp_group`` hold different batches (they must share one)."""
    ids = batch.get("input_ids")
    device = ids.device if isinstance(ids, torch.Tensor) else torch.device("cpu")
    mine = _fingerprint(batch, device)
    sizes = [torch.zeros(1, dtype=torch.long, device=device) for _ in range(dist.get_world_size(cp_group))]
    dist.all_gather(sizes, torch.tensor([mine.numel()], device=device), group=cp_group)
    width = int(max(s.item() for s in sizes))
    padded = torch.cat([mine, torch.full((width - mine.numel(),), -1, dtype=torch.long, device=device)])
    gathered = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(gathered, padded, group=cp_group)
    if any(not torch.equal(g, gathered[0]) for g in gathered):
        raise ValueError(
            "the ranks of a CP group received different batches; every rank of a CP group must get the same "
            "global batch (use the flexcp Trainer's own dataloaders, and the same data and seed on every rank)"
        )


def shard_batch(model: torch.nn.Module, inputs: dict[str, Any], cp_group, chunk_size: int) -> dict[str, Any]:
    """This rank's shard of a global HF batch, ready for ``model(**shard)``.

    Labels are shifted up front (or ``shift_labels`` taken as given) and dispatched with
    the tokens, so ``labels`` and ``shift_labels`` of the shard pair each local token
    with its own target; ``position_ids`` are the tokens' real positions; the mask
    (documents from rows, ``position_ids`` resets or ``cu_seq_lens_q``, padding from
    ``attention_mask``) lives in the key ``magi_key``.
    """
    batch = dict(inputs)
    labels = batch.pop("shift_labels", None)
    if labels is None and batch.get("labels") is not None:
        labels = shifted_labels(batch["labels"])
    batch.pop("labels", None)
    cu_seqlens = batch.get("cu_seq_lens_q")
    if cu_seqlens is not None and not torch.equal(torch.as_tensor(cu_seqlens), torch.as_tensor(batch.get("cu_seq_lens_k", cu_seqlens))):
        raise ValueError("cu_seq_lens_q and cu_seq_lens_k differ: flexcp's Trainer integration runs self-attention batches only")
    for name in VARLEN_FIELDS:
        batch.pop(name, None)
    if cu_seqlens is not None:
        batch["cu_seqlens"] = cu_seqlens
    if labels is not None:
        batch["labels"] = labels
    check_same_batch(batch, cp_group)
    shard, _ = magi_prepare_batch(model, batch, cp_group, chunk_size=chunk_size)
    local = shard.pop("shift_labels", None)
    local = shard.pop("labels", local)
    if local is not None:  # HF computes the loss only when labels is set; shift_labels says "already shifted"
        shard["labels"] = shard["shift_labels"] = local
    return shard


__all__ = ["check_same_batch", "shard_batch", "shifted_labels"]
