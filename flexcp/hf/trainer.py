"""flexcp context parallelism inside ``transformers.Trainer`` (and trainers built on it, e.g. TRL's).

:class:`FlexCPMixin` goes in front of a Trainer class. With ``cp_size=N`` the processes form
``dp = world / N`` CP groups of ``N`` consecutive ranks; the dataloaders hand every rank of
a group the same batch; each micro-batch is dispatched with its own key
(:func:`flexcp.hf.batch.shard_batch`: tokens, real positions, pre-shifted labels); the
model's loss on a shard is its token-loss sum over the *global* label-token count
(``num_items_in_batch``, which the Trainer sums over all ranks and
:meth:`get_batch_samples` divides by ``cp``). The Trainer's own scaling by the number of processes and the
gradient averaging of DDP / FSDP2 then give the loss and gradients of cp = 1, and the
logged loss is the global one. At cp = 1 the mixin changes nothing: the ``"magi"``
attention runs locally.

Everything else (optimizer, schedules, gradient accumulation and checkpointing, PEFT,
mixed precision, FSDP2, saving and resuming) is the Trainer's own code.
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from transformers import Trainer

from ..sharding import DEFAULT_CHUNK_SIZE, IGNORE_INDEX
from .attention import register_magi_attention
from .modules import check_flexcp_attention, unwrap_model
from .batch import shard_batch, shifted_labels
from .data import share_batches_in_cp_groups
from .levers import apply_levers
from .mesh import CPMesh, build_cp_mesh


class FlexCPMixin:
    """Adds ``cp_size`` (and ``cp_chunk_size``) to a ``transformers.Trainer`` subclass.

    Use as ``class MyTrainer(FlexCPMixin, Trainer)``; :class:`FlexCPTrainer` and
    :class:`flexcp.hf.FlexCPSFTTrainer` are the two ready-made ones. The model must use
    ``attn_implementation="magi"`` (registered when the trainer is built, or earlier by
    :func:`flexcp.hf.register_magi_attention`, which ``from_pretrained`` needs); another
    attention implementation is refused at every ``cp_size``.
    ``cp_chunk_size`` is the dispatch chunk of the load balancer (tokens).

    Long-sequence memory levers (off by default; see README "Longest sequences"): ``tiled_mlp=N``
    runs every decoder layer's MLP over N tokens at a time, ``tiled_loss=N`` computes the LM head
    and loss over N tokens at a time (``outputs.logits`` is then empty in training),
    ``offload_activations=True`` keeps what each training forward saves in pinned host memory.
    """

    def __init__(self, *args: Any, cp_size: int = 1, cp_chunk_size: int = DEFAULT_CHUNK_SIZE, tiled_mlp: int = 0,
                 tiled_loss: int = 0, offload_activations: bool = False, **kwargs: Any) -> None:
        if isinstance(cp_chunk_size, bool) or not isinstance(cp_chunk_size, int) or cp_chunk_size < 1:
            raise ValueError(f"cp_chunk_size must be a positive int (tokens); got {cp_chunk_size!r}")
        if isinstance(cp_size, bool) or not isinstance(cp_size, int) or cp_size < 1:
            raise ValueError(f"cp_size must be a positive int; got {cp_size!r}")
        register_magi_attention()
        self._flexcp_cp_size = cp_size
        self.cp_chunk_size = cp_chunk_size
        super().__init__(*args, **kwargs)
        check_flexcp_attention(self.model, type(self).__name__)
        self.activation_offload = apply_levers(self.model, tiled_mlp, tiled_loss, offload_activations,
                                               self.args.device)
        self.cp_mesh: CPMesh = build_cp_mesh(cp_size, self.args.device.type)
        if cp_size > 1:
            self._check_cp_setup()
            self.gather_function = self._gather_over_cp_groups

    def _check_cp_setup(self) -> None:
        """Refuse, on every rank and before training, what would silently give other losses than cp = 1."""
        world = self.cp_mesh.dp * self.cp_mesh.cp
        if self.accelerator.num_processes != world:
            raise ValueError(
                f"torch.distributed has {world} processes but accelerate sees {self.accelerator.num_processes}, so "
                "gradients would not be averaged across ranks; on CPU pass TrainingArguments(use_cpu=True) "
                "(accelerate treats a CPU torchrun launch as one process otherwise)"
            )
        model = unwrap_model(self.model)
        pc = getattr(self.accelerator, "parallelism_config", None)
        if pc is not None and (pc.cp_size > 1 or pc.sp_size > 1 or pc.tp_size > 1):
            raise ValueError(
                "flexcp runs its own context parallelism: leave accelerate's ParallelismConfig at cp_size=1, "
                "sp_size=1, tp_size=1 and pass cp_size to the trainer instead"
            )
        if not (self.model_accepts_loss_kwargs or self.compute_loss_func is not None):
            raise ValueError(
                f"{type(model).__name__}.forward takes no loss kwargs, so the Trainer cannot pass num_items_in_batch "
                "and each shard's loss would be normalized by its own token count; use a model whose forward "
                "accepts **kwargs (every HF causal LM does) or pass compute_loss_func"
            )
        if self.label_smoother is not None:
            raise ValueError("label_smoothing_factor is not supported at cp_size > 1 (the smoother shifts labels again); set it to 0")
        if self.args.n_gpu > 1:
            raise ValueError("cp_size > 1 needs one process per device (torchrun / accelerate launch), not DataParallel")

    def _gather_over_cp_groups(self, data: torch.Tensor, **_: Any) -> torch.Tensor:
        """``gather_for_metrics`` counting each CP group once: its ranks hold copies of one result."""
        if not isinstance(data, torch.Tensor):
            raise ValueError(f"at cp_size > 1 evaluation gathers loss tensors only; got {type(data).__name__}")
        full = self.accelerator.gather(data.reshape(-1))
        leaders = full.reshape(self.cp_mesh.dp * self.cp_mesh.cp, -1)[:: self.cp_mesh.cp].reshape(-1)
        state = self.accelerator.gradient_state
        if state.end_of_dataloader and state.remainder > 0:  # the padded samples of the last batch, as accelerate drops them
            leaders = leaders[: state.remainder]
        return leaders

    # ------------------------------------------------------------------ Trainer extension points
    def get_batch_samples(self, *args: Any, **kwargs: Any):
        """The parent's micro-batches and ``num_items_in_batch``, the latter divided by ``cp``.

        The parent counts label tokens on every rank and sums over all ranks; the ranks of
        a CP group hold one batch, so each group was counted ``cp`` times.
        """
        batches, num_items = super().get_batch_samples(*args, **kwargs)
        if num_items is not None and self.cp_mesh.cp > 1:
            num_items = num_items / self.cp_mesh.cp
        return batches, num_items

    def get_total_train_batch_size(self, args) -> int:
        """Samples per optimizer step: CP groups, not ranks, each draw a batch."""
        return super().get_total_train_batch_size(args) // self._flexcp_cp_size

    def get_train_dataloader(self):
        """The Trainer's train loader, sharded over CP groups instead of ranks."""
        return share_batches_in_cp_groups(super().get_train_dataloader(), self.cp_mesh)

    def get_eval_dataloader(self, eval_dataset=None):
        """The Trainer's eval loader, sharded over CP groups instead of ranks."""
        return share_batches_in_cp_groups(super().get_eval_dataloader(eval_dataset), self.cp_mesh)

    def get_test_dataloader(self, test_dataset):
        """The Trainer's test loader, sharded over CP groups instead of ranks."""
        return share_batches_in_cp_groups(super().get_test_dataloader(test_dataset), self.cp_mesh)

    def compute_loss(self, model: nn.Module, inputs: dict[str, Any], return_outputs: bool = False,
                     num_items_in_batch: torch.Tensor | int | None = None):
        """The parent's loss on this rank's shard of the micro-batch (outputs, if returned, are the shard's)."""
        if self.cp_mesh.cp > 1:
            inputs = shard_batch(model, inputs, self.cp_mesh.cp_group, self.cp_chunk_size)
        offload = self.activation_offload if model.training and self.activation_offload is not None else nullcontext
        with offload():
            return super().compute_loss(model, inputs, return_outputs=return_outputs,
                                        num_items_in_batch=num_items_in_batch)

    def prediction_step(self, model: nn.Module, inputs: dict[str, Any], prediction_loss_only: bool,
                        ignore_keys: list[str] | None = None):
        """At cp > 1: the micro-batch's loss over its label tokens, the same on every rank of the CP group.

        Logits are sharded across the CP group, so only the loss is returned; evaluation
        without ``compute_metrics`` needs nothing else.
        """
        if self.cp_mesh.cp == 1:
            return super().prediction_step(model, inputs, prediction_loss_only, ignore_keys=ignore_keys)
        if not prediction_loss_only:
            raise ValueError(
                f"at cp_size={self.cp_mesh.cp} evaluation computes the loss only (logits are sharded across the CP "
                "group): evaluate without compute_metrics, or with TrainingArguments(prediction_loss_only=True); "
                "for logits or generation, run predict at cp_size=1"
            )
        if inputs.get("labels") is None and inputs.get("shift_labels") is None:
            raise ValueError("at cp_size > 1 evaluation needs labels in the eval batches (the loss is all it returns)")
        inputs = self._prepare_inputs(inputs)
        targets = inputs.get("shift_labels")
        targets = shifted_labels(inputs["labels"]) if targets is None else targets
        count = targets.ne(IGNORE_INDEX).sum().clamp(min=1)
        scale = self.accelerator.num_processes // self.get_tp_size() if self.args.average_tokens_across_devices else 1
        with torch.no_grad(), self.compute_loss_context_manager():
            loss = self.compute_loss(model, inputs, num_items_in_batch=count).detach() / scale
        dist.all_reduce(loss, group=self.cp_mesh.cp_group)
        return loss, None, None


class FlexCPTrainer(FlexCPMixin, Trainer):
    """``transformers.Trainer`` with flexcp context parallelism: ``FlexCPTrainer(..., cp_size=N)``."""


__all__ = ["FlexCPMixin", "FlexCPTrainer"]
