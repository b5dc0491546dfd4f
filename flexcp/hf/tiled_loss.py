"""The LM head and cross-entropy over chunks of tokens: full-vocabulary logits never exist for the whole sequence.

At 1M tokens and a 32k vocabulary the logits alone are 64 GB in bf16 (and twice that once
the loss upcasts them to float32). :class:`LinearCrossEntropy` computes the head and the
token losses ``chunk_tokens`` rows at a time, keeps only the hidden states, the weight and
the labels, and recomputes each chunk's logits in backward, so one chunk of
``[chunk_tokens, vocab]`` logits is alive at a time. Per chunk it runs exactly the
operations of the plain loss (``F.linear`` in the head's dtype, ``.float()`` (float64 stays), the optional
softcap, ``F.cross_entropy(reduction="sum")``), so only the order of the final sum differs.

:func:`tile_loss` makes an HF causal LM (Llama, Qwen, Mistral, Gemma 2, ...) use it whenever
it is called with ``labels`` (or pre-shifted ``shift_labels``) in training mode: its LM head
then returns an empty ``[.., T, 0]`` "logits" tensor and its ``loss_function`` computes the
loss from the hidden states, with the model's own semantics (labels shifted unless
``shift_labels`` is given, ``ignore_index``, the sum over ``num_items_in_batch`` or the mean).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .modules import unwrap_model
from ..sharding import IGNORE_INDEX
from .recompute import recompute_norms
from .tiled_mlp import autocast_state, recompute_autocast

__all__ = ["LinearCrossEntropy", "linear_cross_entropy", "logit_softcap", "tile_loss"]


def _chunk_loss(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, labels: torch.Tensor,
                softcap: float, ignore_index: int) -> tuple[torch.Tensor, torch.Tensor]:
    logits = F.linear(hidden, weight, bias)
    logits = logits if logits.dtype == torch.float64 else logits.float()
    if softcap:
        logits = softcap * torch.tanh(logits / softcap)
    loss = F.cross_entropy(logits, labels, ignore_index=ignore_index, reduction="sum")
    hits = ((logits.detach().argmax(-1) == labels) & (labels != ignore_index)).sum()
    return loss, hits


class LinearCrossEntropy(torch.autograd.Function):
    """``(sum of token losses (float32; float64 for float64 inputs), argmax hits)`` of ``linear(hidden, weight, bias)``.

    ``hidden`` ``[N, H]``, ``weight`` ``[V, H]``, ``labels`` ``[N]`` (``ignore_index`` skipped).
    Forward and backward go ``chunk`` rows at a time; backward recomputes each chunk's
    logits (under the forward's autocast state). The weight (and bias) gradient is summed over
    chunks in float32 when it is 16-bit.
    """

    @staticmethod
    def forward(ctx: Any, hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                labels: torch.Tensor, chunk: int, softcap: float, ignore_index: int):
        ctx.chunk, ctx.softcap, ctx.ignore_index = chunk, softcap, ignore_index
        ctx.autocast = autocast_state(hidden.device.type)
        ctx.save_for_backward(hidden, weight, bias, labels)
        loss = torch.zeros((), dtype=torch.promote_types(hidden.dtype, torch.float32), device=hidden.device)
        hits = torch.zeros((), dtype=torch.long, device=hidden.device)
        for s in range(0, hidden.shape[0], chunk):
            part, h = _chunk_loss(hidden[s : s + chunk], weight, bias, labels[s : s + chunk], softcap, ignore_index)
            loss, hits = loss + part, hits + h
        ctx.mark_non_differentiable(hits)
        return loss, hits

    @staticmethod
    def backward(ctx: Any, grad_loss: torch.Tensor, _grad_hits: Any):
        hidden, weight, bias, labels = ctx.saved_tensors
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        dh = torch.empty_like(hidden) if need_h else None
        acc = lambda t: torch.zeros_like(t, dtype=torch.float32 if t.element_size() < 4 else t.dtype)  # noqa: E731
        dw = acc(weight) if need_w else None
        db = acc(bias) if need_b else None
        for s in range(0, hidden.shape[0], ctx.chunk):
            h = hidden[s : s + ctx.chunk].detach().requires_grad_(need_h)
            w = weight.detach().requires_grad_(need_w)
            b = None if bias is None else bias.detach().requires_grad_(need_b)
            with torch.enable_grad(), recompute_autocast(ctx.autocast):
                part, _ = _chunk_loss(h, w, b, labels[s : s + ctx.chunk], ctx.softcap, ctx.ignore_index)
            inputs = [t for t, need in ((h, need_h), (w, need_w), (b, need_b)) if need]
            got = iter(torch.autograd.grad(part, inputs, grad_loss))
            if need_h:
                dh[s : s + ctx.chunk] = next(got)
            if need_w:
                dw.add_(next(got))
            if need_b:
                db.add_(next(got))
        return (dh, None if dw is None else dw.to(weight.dtype), None if db is None else db.to(bias.dtype),
                None, None, None, None)


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, chunk_tokens: int = 8192,
                         bias: torch.Tensor | None = None, softcap: float = 0.0,
                         ignore_index: int = IGNORE_INDEX) -> tuple[torch.Tensor, torch.Tensor]:
    """``(loss sum (float32), argmax hits)`` over ``labels != ignore_index`` without full logits.

    ``hidden`` ``[..., H]`` and ``labels`` ``[...]`` (flattened together; labels already
    aligned with the hidden state that predicts them); ``softcap > 0`` applies
    ``softcap * tanh(logits / softcap)`` (Gemma 2's final logit softcapping).
    """
    if isinstance(chunk_tokens, bool) or not isinstance(chunk_tokens, int) or chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be a positive int; got {chunk_tokens!r}")
    h = hidden.reshape(-1, hidden.shape[-1])
    y = labels.reshape(-1).to(h.device)
    if y.shape[0] != h.shape[0]:
        raise ValueError(f"labels hold {y.shape[0]} tokens but hidden {h.shape[0]}; pass labels aligned with hidden")
    return LinearCrossEntropy.apply(h, weight, bias, y, chunk_tokens, float(softcap), ignore_index)


def logit_softcap(config: Any) -> float:
    """The config's final logit softcap (0: none); logit scalings the tiled loss does not apply are refused."""
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    for name in ("logit_scale", "logits_scaling", "output_multiplier_scale"):
        value = getattr(config, name, None)
        if value not in (None, 1, 1.0):
            raise ValueError(f"model config sets {name}={value}, which the tiled loss does not apply; "
                             "leave the tiled loss off for this model")
    return float(getattr(config, "final_logit_softcapping", None) or 0.0)


class _TiledLossState:
    """Per-model state of :func:`tile_loss`: whether this forward defers its logits, and the hidden states it kept."""

    def __init__(self, model: nn.Module, chunk: int, softcap: float) -> None:
        self.chunk, self.softcap = chunk, softcap
        self.plain_loss = type(model).loss_function.fget(model)
        self.defer, self.hidden = False, None

    def pre_forward(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        wants_loss = kwargs.get("labels") is not None or kwargs.get("shift_labels") is not None
        self.defer = module.training and wants_loss and not kwargs.get("logits_to_keep")
        self.hidden = None

    def post_forward(self, *_: Any) -> None:
        self.defer, self.hidden = False, None

    def head_forward(self, plain: Any) -> Any:
        def forward(hidden: torch.Tensor) -> torch.Tensor:
            if not self.defer:
                return plain(hidden)
            self.hidden = hidden
            return hidden.new_zeros(*hidden.shape[:-1], 0)

        return forward

    def loss(self, logits: torch.Tensor, labels: torch.Tensor | None, vocab_size: int | None = None,
             num_items_in_batch: torch.Tensor | int | None = None, ignore_index: int = IGNORE_INDEX,
             shift_labels: torch.Tensor | None = None, *, head: nn.Linear, **kwargs: Any) -> torch.Tensor:
        if self.hidden is None:
            return self.plain_loss(logits, labels, vocab_size, num_items_in_batch=num_items_in_batch,
                                   ignore_index=ignore_index, shift_labels=shift_labels, **kwargs)
        if shift_labels is None:
            shift_labels = F.pad(labels, (0, 1), value=ignore_index)[..., 1:]
        loss, _ = linear_cross_entropy(self.hidden, head.weight, shift_labels, self.chunk, head.bias,
                                       self.softcap, ignore_index)
        self.hidden = None
        if num_items_in_batch is None:  # the plain loss's mean (NaN without label tokens, like it)
            return loss / shift_labels.ne(ignore_index).sum()
        if torch.is_tensor(num_items_in_batch):
            num_items_in_batch = num_items_in_batch.to(loss.device)
        return loss / num_items_in_batch


def tile_loss(model: nn.Module, chunk_tokens: int = 8192) -> None:
    """Make an HF causal LM compute its training loss with :class:`LinearCrossEntropy` (no full logits).

    Applies when the model is called in training mode with ``labels`` or ``shift_labels``
    (and no ``logits_to_keep``): the loss is the model's own (same shifting, ``ignore_index``
    and ``num_items_in_batch`` normalization), ``outputs.logits`` is then an empty
    ``[.., T, 0]`` tensor. Evaluation and calls without labels build logits as before.
    Also recomputes the final norm (:func:`flexcp.hf.recompute.recompute_norms`, ``layers=False``):
    its float32 copies would otherwise be the largest thing the loss keeps. Call again to change the
    chunk. The LM head must be an ``nn.Linear``.
    """
    if isinstance(chunk_tokens, bool) or not isinstance(chunk_tokens, int) or chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be a positive int (tokens per loss chunk); got {chunk_tokens!r}")
    base = unwrap_model(model)
    head = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
    if not isinstance(head, nn.Linear):
        raise ValueError(f"{type(base).__name__}: the tiled loss needs an nn.Linear LM head "
                         f"(get_output_embeddings()); got {type(head).__name__}")
    state = base.__dict__.get("_flexcp_tiled_loss")
    if state is not None:
        state.chunk = chunk_tokens
        return
    state = base._flexcp_tiled_loss = _TiledLossState(base, chunk_tokens, logit_softcap(base.config))
    base.register_forward_pre_hook(state.pre_forward, with_kwargs=True)
    base.register_forward_hook(state.post_forward)
    head._flexcp_plain_forward = head.forward
    head.forward = state.head_forward(head._flexcp_plain_forward)
    base.loss_function = lambda *a, **k: state.loss(*a, head=head, **k)
    recompute_norms(base, layers=False)
