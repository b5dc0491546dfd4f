"""Dist-attn keys of the magi paths: the seed's builders and cached lookups, window keys, key lookup.

The keys, layouts and their eviction live in :data:`.registry.REGISTRY`; this module builds
keys and decides which one an attention call runs with. A *layout key* is the key tokens
were dispatched with (built by ``magi_prepare_*`` or here from a mask seen at cp = 1). Its
registry entry remembers the tokens' real positions and the window keys derived from it:
a sliding-window layer attends with a key whose mask is
the layout's mask restricted to the window (in real positions) and whose token layout is
the layout key's (``build_key(dispatch_spec=...)``), so every layer sees the same shard.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np

from ..sharding import DEFAULT_CHUNK_SIZE
from ..mask import AttnMaskSpec, causal
from ..runtime import DistAttnKey, build_key, get_most_recent_key
from ..runtime.key import find, group_info, lookup
from .masks import windowed
from .registry import REGISTRY, same_positions

Heads = tuple[int, int, int]
"""``(num_heads_q, num_heads_kv, head_dim)``."""


class LocalLayout(Protocol):
    """The mask an attention call can infer from its own (undispatched, cp = 1) inputs."""

    def spec(self) -> AttnMaskSpec: ...

    def positions(self) -> np.ndarray | None: ...


def _heads(key: DistAttnKey) -> Heads:
    return key.num_heads_q, key.num_heads_kv, key.head_dim


# ------------------------------------------------------------------ the seed's builders and caches
def build_flex_key(spec: AttnMaskSpec, num_heads_q: int, num_heads_kv: int, head_dim: int, cp_group) -> DistAttnKey:
    """Build a dist-attn key for an arbitrary AttnSlice mask (no extra padding at cp = 1).

    At cp = 1 the whole sequence is one chunk: dispatch is the identity and tokens stay
    in order (what the custom-model path runs on). At cp > 1 tokens are dispatched in
    ``DEFAULT_CHUNK_SIZE`` chunks, the sequence padded to a multiple of ``chunk_size * cp``.
    """
    if not isinstance(spec, AttnMaskSpec):
        raise ValueError(f"spec must be a flexcp AttnMaskSpec; got {type(spec).__name__}")
    return build_key(spec, cp_group, num_heads_q=int(num_heads_q), num_heads_kv=int(num_heads_kv),
                     head_dim=int(head_dim), chunk_size=flex_chunk_size(spec, cp_group))


def flex_chunk_size(spec: AttnMaskSpec, cp_group) -> int:
    """The chunk size of :func:`build_flex_key`: the whole sequence at cp = 1, else ``DEFAULT_CHUNK_SIZE``."""
    return max(spec.total_seqlen, 1) if group_info(cp_group)[0] == 1 else DEFAULT_CHUNK_SIZE


def _flex_key_for(cp_group, spec: AttnMaskSpec, num_heads_q: int, num_heads_kv: int, head_dim: int) -> DistAttnKey:
    """Return the flex key for ``spec``, rebuilding only when the mask (or head config) changes."""
    ident = (spec.fingerprint(), int(num_heads_q), int(num_heads_kv), int(head_dim))
    key = REGISTRY.flex_key(cp_group, ident)
    if key is None:
        key = build_flex_key(spec, num_heads_q, num_heads_kv, head_dim, cp_group)
        REGISTRY.set_flex_key(cp_group, ident, key)
    return key


def _build_self_key(cp_group, seqlen: int, num_heads_q: int, num_heads_kv: int, head_dim: int, device=None) -> DistAttnKey:
    """Build a cp = 1 causal key matching the actual q length (no dispatch).

    ``device`` is accepted for the seed's signature; flexcp keys are device-independent.
    """
    cp_size = group_info(cp_group)[0]
    if cp_size != 1:
        raise ValueError(
            f"_build_self_key builds an undispatched (cp = 1) key but cp_group has {cp_size} ranks; "
            "dispatch the sequence with magi_prepare_batch and use its key"
        )
    return build_flex_key(causal(int(seqlen)), num_heads_q, num_heads_kv, head_dim, cp_group)


def _self_key_for(cp_group, seqlen: int, num_heads_q: int, num_heads_kv: int, head_dim: int, device=None) -> DistAttnKey:
    """Return a causal self-key for ``seqlen``, (re)building only when it changes.

    All attention layers of one forward share the sequence length, so the first layer
    builds the key and the rest reuse it via ``get_most_recent_key`` (checked to be this
    very mask and head config, so another key built in between is never mistaken for it).
    """
    heads = (int(num_heads_q), int(num_heads_kv), int(head_dim))
    if REGISTRY.self_key_len(cp_group) == int(seqlen):
        key = get_most_recent_key(cp_group)
        if (key is not None and key.mask == causal(int(seqlen)).fingerprint() and _heads(key) == heads
                and find(key) is not None):
            return key
    key = _build_self_key(cp_group, seqlen, *heads, device)
    REGISTRY.set_self_key_len(cp_group, seqlen)
    return key


# ------------------------------------------------------------------------------------ windows
def window_key(key: DistAttnKey, window: int) -> DistAttnKey:
    """The key of ``key``'s mask restricted to a sliding ``window``, over ``key``'s token layout."""
    base = REGISTRY.layout_key(key)
    if base.layout != ():
        raise ValueError("cannot derive a sliding-window key from a key built with dispatch_spec; pass its layout key")
    info = REGISTRY.layout(base) or REGISTRY.register_layout(base, None, prepared=False)
    cached = REGISTRY.window(info, window)
    if cached is not None:
        return cached
    entry = lookup(base)
    spec = windowed(entry.spec, window, info.positions)
    if spec.fingerprint() == entry.spec.fingerprint():
        wkey = base
    else:
        wkey = build_key(spec, entry.group, num_heads_q=base.num_heads_q, num_heads_kv=base.num_heads_kv,
                         head_dim=base.head_dim, chunk_size=base.chunk_size, solver=base.solver,
                         num_stages=base.num_stages, dispatch_spec=entry.spec)
    REGISTRY.add_window(base, info, window, wkey)
    return wkey


# ---------------------------------------------------------------------------------- key lookup
def _fits(key: DistAttnKey, q_len: int, heads: Heads, what: str) -> DistAttnKey:
    if not isinstance(key, DistAttnKey):
        raise ValueError(f"{what} must be a DistAttnKey (from magi_prepare_batch or flexcp.build_key); got {type(key).__name__}")
    local_len = lookup(key).plan.local_len
    if local_len != q_len or _heads(key) != tuple(heads):
        raise ValueError(
            f"{what} was built for {local_len} local tokens and heads (q, kv, dim) = {_heads(key)}, but this "
            f"attention layer sees {q_len} tokens and heads {tuple(heads)}; run the model on the batch "
            "magi_prepare_batch returned for this key"
        )
    return key


def _prepared_recent(cp_group, q_len: int, local: LocalLayout | None) -> DistAttnKey | None:
    """The most recent key of ``cp_group`` if a ``magi_prepare_*`` call built it for this call's tokens.

    Window keys map back to their layout key. The call's tokens must be the prepared
    batch's: same local length and, when the call shows its positions, the same positions.
    """
    key = get_most_recent_key(cp_group)
    if key is None:
        return None
    base = REGISTRY.layout_key(key)
    info = REGISTRY.layout(base)
    if info is None or not info.prepared or lookup(base).plan.local_len != q_len:
        return None
    seen = local.positions() if local is not None and info.local_positions is not None else None
    return base if seen is None or same_positions(seen, info.local_positions) else None


def _check_active(key: DistAttnKey) -> DistAttnKey:
    active = REGISTRY.active_spec
    if active is not None and key.mask != active.fingerprint():
        raise ValueError(
            "the active spec (set_active_attn_spec) is not the mask of this step's key; call magi_prepare_batch "
            "after set_active_attn_spec, pass magi_key explicitly, or clear it with set_active_attn_spec(None)"
        )
    return key


def _local_key(cp_group, heads: Heads, spec: AttnMaskSpec, positions: np.ndarray | None) -> DistAttnKey:
    key = _flex_key_for(cp_group, spec, *heads)
    REGISTRY.register_layout(key, positions, prepared=False)
    return key


def resolve_key(
    cp_group,
    q_len: int,
    heads: Heads,
    *,
    explicit: DistAttnKey | None = None,
    local: LocalLayout | None = None,
    binding: bool = False,
) -> DistAttnKey:
    """The layout key an attention call runs with.

    ``explicit`` (the ``magi_key`` forwarded by the model) first, then the step's key:
    dispatched (cp > 1, :func:`_dispatched_key`) or local (cp = 1, :func:`_local_step_key`).
    ``binding`` says the call carries a mask that must be honoured (padding, a per-call spec).
    """
    if explicit is not None:
        if binding:
            raise ValueError(
                "this attention call carries its own mask (a padding attention_mask or a per-call spec) that the "
                "explicit magi_key would ignore; fold it into the key (magi_prepare_batch consumes attention_mask)"
            )
        return _fits(explicit, q_len, heads, "magi_key")
    if group_info(cp_group)[0] > 1:
        return _dispatched_key(cp_group, q_len, heads, local, binding)
    return _local_step_key(cp_group, q_len, heads, local, binding)


def _dispatched_key(cp_group, q_len: int, heads: Heads, local: LocalLayout | None, binding: bool) -> DistAttnKey:
    """At cp > 1: the key of the last ``magi_prepare_*`` call for this group (``get_most_recent_key``,
    as the seed does) when the call runs on that batch (length, and positions when shown)."""
    recent = None if binding else _prepared_recent(cp_group, q_len, local)
    if recent is None:
        raise ValueError(
            f"no dist-attn key for this step at cp = {group_info(cp_group)[0]} ({q_len} local tokens): dispatch the "
            "batch with magi_prepare_batch / magi_prepare_packed_cp and run the model on what it returns "
            "(pass magi_key=key); masks (padding, packing, trees) go into the key, not the model call"
        )
    return _check_active(_fits(recent, q_len, heads, "the step's key"))


def _local_step_key(cp_group, q_len: int, heads: Heads, local: LocalLayout | None, binding: bool) -> DistAttnKey:
    """At cp = 1, in order: a binding ``local`` mask; the active spec when it covers ``q_len``
    tokens; the prepared batch's key (as at cp > 1, with these heads); the mask ``local`` infers."""
    if binding:
        return _local_key(cp_group, heads, local.spec(), local.positions())
    active = REGISTRY.active_spec
    if active is not None and active.total_seqlen == q_len:
        return _local_key(cp_group, heads, active, local.positions() if local is not None else None)
    recent = _prepared_recent(cp_group, q_len, local)
    if recent is not None and _heads(recent) == tuple(heads):
        return _check_active(recent)
    if active is not None:
        raise ValueError(
            f"the active spec (set_active_attn_spec) covers {active.total_seqlen} tokens but this attention layer "
            f"sees {q_len}; set a spec for this batch or clear it with set_active_attn_spec(None)"
        )
    if local is None:
        raise ValueError("no dist-attn key for this attention call: pass magi_key or call magi_prepare_batch")
    return _local_key(cp_group, heads, local.spec(), local.positions())


__all__ = [
    "DEFAULT_CHUNK_SIZE",
    "LocalLayout",
    "_build_self_key",
    "_flex_key_for",
    "_self_key_for",
    "build_flex_key",
    "flex_chunk_size",
    "resolve_key",
    "window_key",
]
