"""Per-shard loss: the LM head and cross-entropy in chunks, summed (not averaged) over local tokens.

The recipe divides each rank's sum by the GLOBAL number of label tokens of the step (all
dp ranks, all micro-batches, all CP shards) and FSDP sums gradients over dp x cp, so the
loss and gradients of cp = N equal those of cp = 1. Labels arrive pre-shifted and are
dispatched with the inputs, so logits and labels stay paired whatever the permutation.
The head and loss run through :func:`flexcp.hf.tiled_loss.linear_cross_entropy`: one chunk
of full-vocabulary logits exists at a time, recomputed in backward.
"""

from __future__ import annotations

import torch
from torch import nn

from ..hf.tiled_loss import linear_cross_entropy, logit_softcap
from ..sharding import IGNORE_INDEX


class CausalLMLoss(nn.Module):
    """An HF causal LM whose forward returns the local ``(loss_sum, correct)`` of one packed sequence.

    It owns the LM head call, so FSDP's root unit (embeddings, final norm, head) is
    gathered once around the whole step. ``chunk_tokens``: tokens per loss chunk.
    """

    def __init__(self, lm: nn.Module, chunk_tokens: int = 8192) -> None:
        super().__init__()
        self.lm = lm
        self.chunk_tokens = chunk_tokens
        self.softcap = logit_softcap(lm.config)
        if not isinstance(lm.get_output_embeddings(), nn.Linear):
            raise ValueError(f"{type(lm).__name__}: the recipe's loss needs an nn.Linear LM head")

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor, labels: torch.Tensor, **attn_kwargs):
        """``input_ids``, ``position_ids``, ``labels``: ``[1, T]`` local (dispatched) tensors.

        ``attn_kwargs`` (e.g. ``magi_key``) reach every attention layer. Returns ``(sum of
        token losses (float32), argmax hits)`` over ``labels != IGNORE_INDEX``.
        """
        out = self.lm.get_decoder()(input_ids=input_ids, position_ids=position_ids, use_cache=False, **attn_kwargs)
        head = self.lm.get_output_embeddings()
        return linear_cross_entropy(out.last_hidden_state, head.weight, labels, self.chunk_tokens, head.bias,
                                    self.softcap, IGNORE_INDEX)
