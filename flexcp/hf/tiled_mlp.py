"""Sequence-tiled MLP: the decoder layers' MLPs run over chunks of tokens, forward and backward.

An MLP maps every token on its own (``[.., T, hidden] -> [.., T, hidden]``), so running it
over ``chunk_tokens`` rows at a time gives the same rows as running it over all ``T``. What
tiling changes is memory: the untiled MLP keeps its ``intermediate_size``-wide activations
(gate, up, their product: 3-4 x 8,192 values per token for Llama-3.2-1B) for backward and
builds their gradients at once, the largest part of a long sequence's backward working set.
:class:`TiledMLPFunction` keeps only the MLP's input; its backward recomputes one chunk at a
time and backpropagates it, so those intermediates exist for one chunk only. The cost is one
more MLP forward per step, so by default a call whose intermediates easily fit the GPU's
free memory runs untiled (:func:`fits_untiled`).

:func:`tile_mlp` applies it to every decoder layer of an HF causal LM whose layer has an
``mlp`` module (Llama, Qwen2/3, Mistral, Gemma 2/3, Phi-3, ...) by wrapping the module's
``forward`` (its parameters are untouched, so FSDP2, PEFT and gradient checkpointing
keep working: the function's parameter inputs are whatever the module holds when it runs).
"""

from __future__ import annotations

from typing import Any, Callable, Literal, Sequence

import torch
from torch import nn

from .modules import unwrap_model

__all__ = ["TiledMLPFunction", "decoder_layers_of", "fits_untiled", "tile_mlp", "tiled_rows"]


def autocast_state(device_type: str) -> tuple[str, bool, torch.dtype]:
    """The autocast state of ``device_type`` now, for :func:`recompute_autocast` in a backward."""
    return device_type, torch.is_autocast_enabled(device_type), torch.get_autocast_dtype(device_type)


def recompute_autocast(state: tuple[str, bool, torch.dtype]) -> torch.autocast:
    """Autocast as it was in the forward (``autocast_state``): a recompute in backward runs the same kernels."""
    device_type, enabled, dtype = state
    return torch.autocast(device_type, dtype=dtype, enabled=enabled)


def _chunks(n: int, chunk: int) -> range:
    return range(0, n, chunk)


class TiledMLPFunction(torch.autograd.Function):
    """``fn(x)`` computed ``chunk`` rows (tokens) at a time; backward recomputes each chunk.

    ``fn`` maps ``[1, c, H] -> [1, c, H_out]`` row by row; ``params`` are the tensors it
    reads that need gradients (passed so autograd routes their gradients here). Only ``x``
    is kept for backward. Parameter gradients are summed over chunks in float32 when the
    parameter is 16-bit, in its own dtype otherwise. The autocast state of the forward is
    restored for the recompute.
    """

    @staticmethod
    def forward(ctx: Any, fn: Callable[[torch.Tensor], torch.Tensor], chunk: int, x: torch.Tensor,
                *params: torch.Tensor) -> torch.Tensor:
        ctx.fn, ctx.chunk, ctx.params = fn, chunk, params
        ctx.autocast = autocast_state(x.device.type)
        ctx.save_for_backward(x)
        with torch.no_grad():
            return tiled_rows(fn, x, chunk)

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor):
        (x,) = ctx.saved_tensors
        fn, chunk, params = ctx.fn, ctx.chunk, ctx.params
        rows = x.reshape(-1, x.shape[-1])
        grads = grad_out.reshape(rows.shape[0], -1)
        dx = torch.empty_like(rows) if ctx.needs_input_grad[2] else None
        wanted = [p for p, need in zip(params, ctx.needs_input_grad[3:]) if need]
        acc = [torch.zeros_like(p, dtype=torch.float32 if p.element_size() < 4 else p.dtype) for p in wanted]
        for s in _chunks(rows.shape[0], chunk):
            xc = rows[s : s + chunk].detach().requires_grad_(dx is not None)
            with torch.enable_grad(), recompute_autocast(ctx.autocast):
                out = fn(xc.unsqueeze(0))
            inputs = ([xc] if dx is not None else []) + wanted
            got = torch.autograd.grad(out, inputs, grads[s : s + chunk].unsqueeze(0), allow_unused=True)
            if dx is not None:
                dx[s : s + chunk] = got[0]
                got = got[1:]
            for a, g in zip(acc, got):
                if g is not None:
                    a.add_(g)
        it = iter(a.to(p.dtype) for a, p in zip(acc, wanted))
        pgrads = [next(it) if need else None for need in ctx.needs_input_grad[3:]]
        return (None, None, None if dx is None else dx.view_as(x), *pgrads)


def tiled_rows(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, chunk: int) -> torch.Tensor:
    """``fn`` over the rows of ``x`` (``[.., T, H]``, flattened to tokens) ``chunk`` at a time, into one output."""
    rows = x.reshape(-1, x.shape[-1])
    out = None
    for s in _chunks(rows.shape[0], chunk):
        part = fn(rows[s : s + chunk].unsqueeze(0))
        if not isinstance(part, torch.Tensor) or part.shape[:-1] != (1, min(chunk, rows.shape[0] - s)):
            raise TypeError(f"tiled MLP: the module must map [1, tokens, hidden] to one tensor [1, tokens, out]; "
                            f"got {type(part).__name__} {tuple(getattr(part, 'shape', ()))} (a mixture-of-experts "
                            "block returning router logits cannot be tiled; leave tiled_mlp off for it)")
        if out is None:
            out = part.new_empty(rows.shape[0], part.shape[-1])
        out[s : s + chunk] = part[0]
    return out.view(*x.shape[:-1], out.shape[-1])


def fits_untiled(module: nn.Module, x: torch.Tensor) -> bool:
    """Whether the untiled MLP on ``x`` fits easily: its intermediates and their gradients (about 6 x tokens x
    ``intermediate_size`` values) take at most half the memory the device can still give (CUDA only)."""
    if x.device.type != "cuda":
        return False
    widest = max((p.shape[0] for p in module.parameters() if p.ndim == 2), default=x.shape[-1])
    need = 6 * (x.numel() // x.shape[-1]) * max(widest, x.shape[-1]) * x.element_size()
    free, _ = torch.cuda.mem_get_info(x.device)
    spare = torch.cuda.memory_reserved(x.device) - torch.cuda.memory_allocated(x.device)
    return 2 * need <= free + spare


def _tiled_forward(module: nn.Module, plain: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    def forward(x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        chunk = module._flexcp_tiled_mlp_chunk
        if args or kwargs or x.numel() // max(x.shape[-1], 1) <= chunk:
            return plain(x, *args, **kwargs)
        if module._flexcp_tiled_mlp_when == "needed" and fits_untiled(module, x):
            return plain(x)
        params = tuple(p for p in module.parameters() if p.requires_grad)
        if not torch.is_grad_enabled() or not (x.requires_grad or params):
            with torch.no_grad():
                return tiled_rows(plain, x, chunk)
        return TiledMLPFunction.apply(plain, chunk, x, *params)

    return forward


def decoder_layers_of(model: nn.Module) -> Sequence[nn.Module]:
    """The decoder layers of an HF causal LM (``model.get_decoder().layers``), through wrappers."""
    base = unwrap_model(model)
    decoder = base.get_decoder() if hasattr(base, "get_decoder") else None
    layers = getattr(decoder, "layers", None)
    if layers is None:
        raise ValueError(f"{type(base).__name__}: cannot find the decoder layers (model.get_decoder().layers); "
                         "tiling needs an HF decoder-only model")
    return layers


def tile_mlp(model: nn.Module, chunk_tokens: int = 8192, when: Literal["needed", "always"] = "needed") -> int:
    """Run every decoder layer's ``mlp`` over ``chunk_tokens`` tokens at a time (forward and backward).

    Results are those of the untiled MLP (the same operations on every row); sequences of
    at most ``chunk_tokens`` tokens run untiled. ``when="needed"`` (default) runs a call
    untiled when its intermediates easily fit the GPU's free memory (:func:`fits_untiled`:
    tiling costs one more MLP forward per step, so it only runs where memory is short; on
    CPU it always tiles); ``"always"`` tiles every longer call. Call again to change the
    chunk or the policy; ``chunk_tokens=0`` restores the plain forward. Returns the number of
    MLPs changed.
    """
    if isinstance(chunk_tokens, bool) or not isinstance(chunk_tokens, int) or chunk_tokens < 0:
        raise ValueError(f"chunk_tokens must be an int >= 0 (tokens per MLP chunk; 0 turns tiling off); "
                         f"got {chunk_tokens!r}")
    if when not in ("needed", "always"):
        raise ValueError(f"when must be 'needed' or 'always'; got {when!r}")
    count = 0
    for i, layer in enumerate(decoder_layers_of(model)):
        mlp = getattr(layer, "mlp", None)
        if not isinstance(mlp, nn.Module):
            raise ValueError(f"decoder layer {i} ({type(layer).__name__}) has no `mlp` module to tile")
        plain = mlp.__dict__.get("_flexcp_plain_forward")
        if chunk_tokens == 0:
            if plain is not None:
                del mlp.forward, mlp._flexcp_plain_forward, mlp._flexcp_tiled_mlp_chunk, mlp._flexcp_tiled_mlp_when
                count += 1
            continue
        if plain is None:
            mlp._flexcp_plain_forward = mlp.forward
            mlp.forward = _tiled_forward(mlp, mlp._flexcp_plain_forward)
        mlp._flexcp_tiled_mlp_chunk, mlp._flexcp_tiled_mlp_when = chunk_tokens, when
        count += 1
    return count
