"""PyTorch's native context parallelism as a baseline for the end-to-end benchmark.

``torch.distributed.tensor.experimental.context_parallel`` shards a step's buffers along
the sequence (head-tail round-robin load balancing: rank ``r`` of ``cp`` keeps chunks ``r``
and ``2 cp - 1 - r``) and swaps ``F.scaled_dot_product_attention`` for ring attention over
the flash / efficient / cuDNN SDPA kernels (causal, no mask). :class:`NativeCPTrainer` is
the recipe's :class:`~flexcp.train.loop.Trainer` (same model, FSDP2 over all ranks, loss,
data and metrics) whose micro-batches run inside that context, backward included.

The model uses :func:`causal_sdpa_forward` (registered in HF as ``"sdpa_causal"``) rather
than HF ``"sdpa"``: HF reads the non-contiguous sharded ``position_ids`` as packed
documents and would build a dense mask, which ring attention does not take.
"""

from __future__ import annotations

from contextlib import ExitStack

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.tensor.experimental import context_parallel

from ..train.config import FinetuneConfig
from ..train.data import PackedSequence
from ..train.loop import EVAL_INDEX_BASE, Trainer
from ..train.metrics import StepMetrics
from ..hf.mesh import build_cp_mesh

ATTN_NAME = "sdpa_causal"


def causal_sdpa_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                        attention_mask: torch.Tensor | None = None, dropout: float = 0.0,
                        scaling: float | None = None, **kwargs) -> tuple[torch.Tensor, None]:
    """HF attention interface: ``[b, h, s, d]`` in, ``([b, s, hq, d], None)`` out; causal SDPA, no mask.

    K/V heads are repeated for GQA (ring attention gets plain multi-head inputs). ``F`` is
    looked up at call time, so ``context_parallel``'s patched SDPA is the one called.
    """
    if attention_mask is not None or dropout:
        raise ValueError("causal_sdpa_forward takes no attention_mask and no dropout (one causal sequence)")
    groups = query.shape[1] // key.shape[1]
    key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
    out = F.scaled_dot_product_attention(query, key, value, is_causal=True, scale=scaling)
    return out.transpose(1, 2).contiguous(), None


def _no_mask(*args, **kwargs) -> None:
    """HF mask interface: no mask tensor (attention is causal over one sequence)."""
    return None


def register_causal_sdpa() -> None:
    """Register ``"sdpa_causal"`` in HF's attention and mask interfaces (idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(ATTN_NAME, causal_sdpa_forward)
    AttentionMaskInterface.register(ATTN_NAME, _no_mask)


class NativeCPTrainer(Trainer):
    """The recipe's Trainer with each sequence sharded over ``cp`` ranks by torch's ``context_parallel``.

    ``cfg`` is an ``attn_implementation="sdpa"``, ``parallel.cp=1`` config (the recipe ties
    cp > 1 to magi); the model, built and FSDP-sharded over all ranks as usual, is switched
    to :func:`causal_sdpa_forward`, and the ``(dp, cp)`` mesh replaces the ``(world, 1)`` one
    so data indices, label counts and tokens follow dp = world / cp.

    Native CP has no mask language: ``packed_as_causal=True`` trains a pack of documents as
    one causal sequence (tokens attend across document boundaries: not the same training,
    and the full causal triangle of work), which is what a user of native CP must do;
    otherwise a sequence that is not one causal document is refused.
    """

    def __init__(self, cfg: FinetuneConfig, cp: int, packed_as_causal: bool = False) -> None:
        if cfg.model.attn_implementation != "sdpa" or cfg.parallel.cp != 1:
            raise ValueError("NativeCPTrainer: build cfg with model.attn_implementation='sdpa' and parallel.cp=1; "
                             "pass the CP size as cp")
        super().__init__(cfg)
        world = dist.get_world_size()
        if cp < 1 or world % cp:
            raise ValueError(f"cp={cp} must divide the world size {world}")
        register_causal_sdpa()
        self.lm.set_attn_implementation(ATTN_NAME)
        self.dims = build_cp_mesh(cp, self.device.type)
        self.packed_as_causal = packed_as_causal
        self._contexts = ExitStack()

    def train_step(self) -> StepMetrics:
        """The recipe's step; each micro-batch's context stays open through its backward."""
        with self._contexts:
            return super().train_step()

    def evaluate(self, num_batches: int, start: int = EVAL_INDEX_BASE) -> tuple[float, float]:
        """The recipe's evaluation, with the last micro-batch's context closed afterwards."""
        with self._contexts:
            return super().evaluate(num_batches, start)

    def _run(self, seq: PackedSequence) -> tuple[torch.Tensor, torch.Tensor]:
        """Shard ``input_ids``, ``position_ids``, pre-shifted ``labels`` in place; run the model under CP."""
        cp = self.dims.cp
        if self.cfg.data.seq_len % (2 * cp):
            raise ValueError(f"data.seq_len={self.cfg.data.seq_len} must be a multiple of 2 x cp = {2 * cp} "
                             "(head-tail load balancing)")
        n = seq.input_ids.numel()
        if not self.packed_as_causal and seq.spec.area() != n * (n + 1) // 2:
            raise ValueError("native CP runs plain causal attention: every sequence must be one causal document "
                             "(data.kind='recall' with one document per sequence), or pass packed_as_causal=True")
        self._contexts.close()  # the previous micro-batch's backward is done
        batch = self._local_batch(seq)  # context_parallel resizes these in place: own copies, not views of seq
        bufs = [batch[k].clone() for k in ("input_ids", "position_ids", "labels")]
        self._contexts.enter_context(context_parallel(
            self.dims.device_mesh["cp"], buffers=bufs, buffer_seq_dims=[1, 1, 1], no_restore_buffers=set(bufs)))
        return self.model(*bufs)
