"""Per-shard loss: the LM head and cross-entropy in chunks, summed (not averaged) over local tokens.

The recipe divides each rank's sum by the GLOBAL number of label tokens of the step (all
dp ranks, all micro-batches, all CP shards) and FSDP sums gradients over dp x cp, so the
loss and gradients of cp = N equal those of cp = 1. Labels arrive pre-shifted and are
dispatched with the inputs, so logits and labels stay paired whatever the permutation.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..sharding import IGNORE_INDEX


def _chunk_loss(
    hidden: torch.Tensor, labels: torch.Tensor, head: nn.Module, softcap: float = 0.0
) -> tuple[torch.Tensor, torch.Tensor]:
    logits = head(hidden).float()
    if softcap:
        logits = softcap * torch.tanh(logits / softcap)
    loss = F.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX, reduction="sum")
    correct = ((logits.detach().argmax(-1) == labels) & (labels != IGNORE_INDEX)).sum()
    return loss, correct


def chunked_cross_entropy(
    hidden: torch.Tensor, labels: torch.Tensor, head: nn.Module, chunk_tokens: int, softcap: float = 0.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(sum of token losses (float32), number of argmax hits)`` over ``labels != IGNORE_INDEX``.

    ``hidden`` is ``[T, H]``; each chunk's logits are recomputed in backward, so at most one
    chunk of ``[chunk_tokens, vocab]`` logits is alive at a time. ``softcap > 0`` caps the
    logits as ``softcap * tanh(logits / softcap)`` (Gemma 2's final logit softcapping).
    """
    if hidden.shape[0] <= chunk_tokens:
        return _chunk_loss(hidden, labels, head, softcap)
    loss = hidden.new_zeros((), dtype=torch.float32)
    correct = torch.zeros((), dtype=torch.long, device=hidden.device)
    for s in range(0, hidden.shape[0], chunk_tokens):
        part, hits = checkpoint(_chunk_loss, hidden[s : s + chunk_tokens], labels[s : s + chunk_tokens], head,
                                softcap, use_reentrant=False)
        loss, correct = loss + part, correct + hits
    return loss, correct


class CausalLMLoss(nn.Module):
    """An HF causal LM whose forward returns the local ``(loss_sum, correct)`` of one packed sequence.

    It owns the LM head call, so FSDP's root unit (embeddings, final norm, head) is
    gathered once around the whole step.
    """

    def __init__(self, lm: nn.Module, chunk_tokens: int = 8192) -> None:
        super().__init__()
        self.lm = lm
        self.chunk_tokens = chunk_tokens
        config = lm.config.get_text_config() if hasattr(lm.config, "get_text_config") else lm.config
        self.softcap = float(getattr(config, "final_logit_softcapping", None) or 0.0)
        for name in ("logit_scale", "logits_scaling"):  # other logit transforms this loss would skip
            value = getattr(config, name, None)
            if value not in (None, 1, 1.0):
                raise ValueError(
                    f"model config sets {name}={value}, which the recipe's loss does not apply; "
                    "use a model without logit scaling or extend flexcp.train.loss"
                )

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor, labels: torch.Tensor, **attn_kwargs):
        """``input_ids``, ``position_ids``, ``labels``: ``[1, T]`` local (dispatched) tensors.

        ``attn_kwargs`` (e.g. ``magi_key``) reach every attention layer.
        """
        out = self.lm.get_decoder()(input_ids=input_ids, position_ids=position_ids, use_cache=False, **attn_kwargs)
        hidden = out.last_hidden_state.reshape(-1, out.last_hidden_state.shape[-1])
        return chunked_cross_entropy(
            hidden, labels.reshape(-1), self.lm.get_output_embeddings(), self.chunk_tokens, self.softcap
        )
