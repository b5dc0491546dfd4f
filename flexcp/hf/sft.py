"""TRL's ``SFTTrainer`` with flexcp context parallelism (packing, padding-free batches, completion-only loss)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from trl import SFTTrainer

from .trainer import FlexCPMixin


def _batch_tokens(inputs: dict[str, Any]) -> torch.Tensor:
    """The micro-batch's token count as TRL counts it: the attention mask's ones, or the packed row's length."""
    if inputs.get("attention_mask") is not None:
        return inputs["attention_mask"].sum()
    ids = inputs["position_ids"] if inputs.get("position_ids") is not None else inputs["input_ids"]
    return torch.tensor(ids.size(1), device=ids.device)


class FlexCPSFTTrainer(FlexCPMixin, SFTTrainer):
    """``trl.SFTTrainer`` with ``cp_size=N``: packed and padding-free batches keep their documents apart.

    TRL's collator output (``position_ids`` restarting per document, ``cu_seq_lens_q``,
    labels masked to the completion) becomes the key's mask and the shard's pre-shifted
    ``shift_labels``, which TRL's fused LM head scores without shifting.
    """

    def compute_loss(self, model: nn.Module, inputs: dict[str, Any], return_outputs: bool = False,
                     num_items_in_batch: torch.Tensor | int | None = None):
        """The loss of :class:`FlexCPMixin`; at cp > 1 TRL's ``num_tokens`` metric counts the global batch.

        TRL adds up the token counts of every rank's inputs, which at cp > 1 are shards padded
        to the dispatch chunk; the logged total is replaced by the CP groups' unpadded batches,
        so ``num_tokens`` equals cp = 1's. TRL 1.12 has no tensor-parallel divisor (``_tp_size``).
        """
        counting = self.cp_mesh.cp > 1 and model.training and hasattr(self, "_total_train_tokens")
        if counting:
            before = self._total_train_tokens
            groups_tokens = self.accelerator.gather(_batch_tokens(inputs).reshape(1)).sum() // self.cp_mesh.cp
        result = super().compute_loss(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)
        if counting:
            self._total_train_tokens = before + int(groups_tokens) // getattr(self, "_tp_size", 1)
            self._metrics["train"]["num_tokens"] = [self._total_train_tokens]
        return result


__all__ = ["FlexCPSFTTrainer"]
