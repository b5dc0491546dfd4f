"""The step's key for an HF attention layer, as a custom op: resolved once per step, invisible to torch.compile.

``flexcp::hf_step_key`` takes what a layer sees (the forwarded ``magi_key``'s handle, the
``position_ids`` and the 2-D padding ``attention_mask``, the layer's sizes, sliding window,
CP group slot) and returns the handle of the key the layer attends with
(:func:`.keys.resolve_key`, then :func:`.keys.window_key`). All host work (copying
positions off the device, inferring documents, planning) happens inside the op, so dynamo
never traces numpy or data-dependent code, and a new batch is new tensor values, not a recompile.

Every layer of a forward passes the same tensors, so the op remembers its answers by
the *identity* of those tensors (the live object, or the base of a view, its offset,
shape, strides and version counter) together with the registry's state: the first layer
of a step infers the mask, the others reuse it (also the backward's recompute under
gradient checkpointing). A tensor written in place has a new version; a new batch is a new
object; a key evicted meanwhile is rebuilt.
"""

from __future__ import annotations

import weakref
from collections import OrderedDict
from typing import Optional

import torch

from ..runtime.key import find, group_of_slot, key_of_handle
from .keys import resolve_key, window_key
from .masks import CallMask
from .registry import REGISTRY


class _Ident:
    """A tensor's identity without holding it: a weak reference to its storage owner plus its view and version."""

    __slots__ = ("ref", "view")

    def __init__(self, t: torch.Tensor) -> None:
        base = t._base if t._base is not None else t
        self.ref = weakref.ref(base)
        self.view = (t.storage_offset(), tuple(t.shape), t.stride(), t._version, t.dtype, t.device)

    def matches(self, t: torch.Tensor) -> bool:
        base = t._base if t._base is not None else t
        return self.ref() is base and self.view == (t.storage_offset(), tuple(t.shape), t.stride(), t._version,
                                                    t.dtype, t.device)


class StepKeyCache:
    """The last keys :func:`hf_step_key` resolved, by the call's sizes, tensor identities and registry state."""

    def __init__(self, size: int = 16) -> None:
        self.size = size
        self.resolutions = 0
        """How many calls resolved a key (cache misses); tests read it to count mask inferences."""
        self._entries: "OrderedDict[tuple, tuple[list, tuple, int]]" = OrderedDict()

    @staticmethod
    def _state() -> tuple:
        return REGISTRY.active_spec, REGISTRY.generation

    def get(self, sizes: tuple, tensors: list[torch.Tensor | None]) -> int | None:
        """The handle stored for this call, if its tensors are the same objects, unchanged, and its key still built."""
        hit = self._entries.get(sizes)
        if hit is None:
            return None
        idents, state, handle = hit
        if len(idents) != len(tensors) or any(
            (i is None) != (t is None) or (t is not None and not i.matches(t)) for i, t in zip(idents, tensors)
        ):
            return None
        if state[0] is not self._state()[0] or state[1] != self._state()[1]:
            return None
        try:
            if find(key_of_handle(handle)) is None:
                return None
        except ValueError:
            return None
        self._entries.move_to_end(sizes)
        return handle

    def put(self, sizes: tuple, tensors: list[torch.Tensor | None], handle: int) -> None:
        self._entries[sizes] = ([None if t is None else _Ident(t) for t in tensors], self._state(), handle)
        self._entries.move_to_end(sizes)
        while len(self._entries) > self.size:
            self._entries.popitem(last=False)

    def clear(self) -> None:
        self._entries.clear()


STEP_KEYS = StepKeyCache()
"""The one cache of :func:`hf_step_key`."""


@torch.library.custom_op("flexcp::hf_step_key", mutates_args=())
def hf_step_key(explicit: Optional[torch.Tensor], position_ids: Optional[torch.Tensor],
                attention_mask: Optional[torch.Tensor], batch: int, seqlen: int, heads_q: int, heads_kv: int,
                head_dim: int, window: int, group: int, self_key: bool) -> torch.Tensor:
    """The handle (int64 CPU ``[1]``) of the key an HF attention layer attends with.

    ``explicit`` is the forwarded ``magi_key``'s handle; ``attention_mask`` a 2-D padding
    mask (all ones counts as none); ``window`` the layer's sliding window (0: none);
    ``group`` the CP group's slot (``runtime.key.group_slot``); ``self_key`` marks VLM
    language layers (a causal key from the layer's own length, positions ignored).
    """
    tensors = [explicit, position_ids, attention_mask]
    sizes = (batch, seqlen, heads_q, heads_kv, head_dim, window, group, self_key)
    handle = STEP_KEYS.get(sizes, tensors)
    if handle is None:
        STEP_KEYS.resolutions += 1
        padding = attention_mask if attention_mask is not None and not bool(attention_mask.all()) else None
        local = CallMask(batch, seqlen, position_ids, padding, use_positions=not self_key)
        key = resolve_key(group_of_slot(group), batch * seqlen, (heads_q, heads_kv, head_dim),
                          explicit=None if explicit is None else key_of_handle(explicit), local=local,
                          binding=padding is not None or self_key)
        if window:
            key = window_key(key, window)
        handle = key.digest()
        STEP_KEYS.put(sizes, tensors, handle)
    return torch.tensor([handle], dtype=torch.int64)


@hf_step_key.register_fake
def _hf_step_key_fake(explicit, position_ids, attention_mask, batch, seqlen, heads_q, heads_kv, head_dim, window,
                      group, self_key):
    return torch.empty(1, dtype=torch.int64)


__all__ = ["STEP_KEYS", "StepKeyCache", "hf_step_key"]
