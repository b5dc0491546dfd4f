"""TRL's ``SFTTrainer`` with flexcp context parallelism (packing, padding-free batches, completion-only loss)."""

from __future__ import annotations

from trl import SFTTrainer

from .trainer import FlexCPMixin


class FlexCPSFTTrainer(FlexCPMixin, SFTTrainer):
    """``trl.SFTTrainer`` with ``cp_size=N``: packed and padding-free batches keep their documents apart.

    TRL's collator output (``position_ids`` restarting per document, ``cu_seq_lens_q``,
    labels masked to the completion) becomes the key's mask and the shard's pre-shifted
    ``shift_labels``, which TRL's fused LM head scores without shifting.
    """


__all__ = ["FlexCPSFTTrainer"]
