"""Dist-attn keys of the magi paths: the seed's builders and caches, layouts, window keys, key lookup.

A *layout key* is the key tokens were dispatched with (built by ``magi_prepare_*`` or here
from a mask seen at cp = 1). Its registry entry remembers the tokens' real positions and
the window keys derived from it: a sliding-window layer attends with a key whose mask is
the layout's mask restricted to the window (in real positions) and whose token layout is
the layout key's (``build_key(dispatch_spec=...)``), so every layer sees the same shard.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

import flexcp.magi_attn_utils as _state

from ..mask import AttnMaskSpec, causal
from ..runtime import DistAttnKey, build_key, get_most_recent_key
from ..runtime.key import group_info, lookup
from .masks import windowed

Heads = tuple[int, int, int]
"""``(num_heads_q, num_heads_kv, head_dim)``."""

MAX_LAYOUTS = 64
"""Layout keys remembered (with their positions and window keys); older ones are forgotten."""


@dataclass
class _Layout:
    positions: np.ndarray | None  # real position of each global token; None -> flat index
    prepared: bool  # built by magi_prepare_*: the step's key for the get_most_recent_key fallback
    local_positions: np.ndarray | None = None  # this rank's dispatched positions (what the model is called with)
    windows: dict[int, DistAttnKey] = field(default_factory=dict)


_LAYOUTS: "OrderedDict[DistAttnKey, _Layout]" = OrderedDict()
_PARENT: dict[DistAttnKey, DistAttnKey] = {}  # window key -> its layout key


class LocalLayout(Protocol):
    """The mask an attention call can infer from its own (undispatched, cp = 1) inputs."""

    def spec(self) -> AttnMaskSpec: ...

    def positions(self) -> np.ndarray | None: ...


def _alive(key: DistAttnKey) -> bool:
    try:
        lookup(key)
    except ValueError:  # the runtime cache was cleared
        return False
    return True


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
    chunk = max(spec.total_seqlen, 1) if group_info(cp_group)[0] == 1 else _state.DEFAULT_CHUNK_SIZE
    return build_key(spec, cp_group, num_heads_q=int(num_heads_q), num_heads_kv=int(num_heads_kv),
                     head_dim=int(head_dim), chunk_size=chunk)


def _flex_key_for(cp_group, spec: AttnMaskSpec, num_heads_q: int, num_heads_kv: int, head_dim: int) -> DistAttnKey:
    """Return the flex key for ``spec``, rebuilding only when the mask (or head config) changes."""
    ident = (spec.fingerprint(), int(num_heads_q), int(num_heads_kv), int(head_dim))
    cached = _state._FLEX_KEY_CACHE.get(id(cp_group))
    if cached is not None and cached[0] == ident and _alive(cached[1]):
        return cached[1]
    key = build_flex_key(spec, num_heads_q, num_heads_kv, head_dim, cp_group)
    _state._FLEX_KEY_CACHE[id(cp_group)] = (ident, key)
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
    if _state._MAGI_SELF_KEY_LEN.get(id(cp_group)) == int(seqlen):
        key = get_most_recent_key(cp_group)
        if key is not None and key.mask == causal(int(seqlen)).fingerprint() and _heads(key) == heads and _alive(key):
            return key
    key = _build_self_key(cp_group, seqlen, *heads, device)
    _state._MAGI_SELF_KEY_LEN[id(cp_group)] = int(seqlen)
    return key


# ------------------------------------------------------------------------- layouts and windows
def register_layout(
    key: DistAttnKey, positions: np.ndarray | None, prepared: bool, local_positions: np.ndarray | None = None
) -> None:
    """Remember a layout key's real token positions.

    ``prepared`` marks a ``magi_prepare_*`` key, whose ``local_positions`` (the dispatched
    position ids) later tell whether a model call without ``magi_key`` runs on its batch.
    """
    old = _LAYOUTS.pop(key, None)
    if old is not None and positions is None:
        positions = old.positions
    if old is not None and old.prepared and not prepared:
        prepared, local_positions = True, old.local_positions
    info = _Layout(positions, prepared, local_positions)
    if old is not None and _same_positions(old.positions, positions):
        info.windows = old.windows
    elif old is not None:
        _forget_windows(old)
    _LAYOUTS[key] = info
    while len(_LAYOUTS) > MAX_LAYOUTS:
        _forget_windows(_LAYOUTS.popitem(last=False)[1])


def _same_positions(a: np.ndarray | None, b: np.ndarray | None) -> bool:
    if a is None or b is None:
        return a is b
    return a.shape == b.shape and bool(np.array_equal(a, b))


def _forget_windows(info: _Layout) -> None:
    for wkey in info.windows.values():
        _PARENT.pop(wkey, None)


def layout_key(key: DistAttnKey) -> DistAttnKey:
    """The layout key a (window) key belongs to."""
    return _PARENT.get(key, key)


def window_key(key: DistAttnKey, window: int) -> DistAttnKey:
    """The key of ``key``'s mask restricted to a sliding ``window``, over ``key``'s token layout."""
    base = layout_key(key)
    if base.layout != ():
        raise ValueError("cannot derive a sliding-window key from a key built with dispatch_spec; pass its layout key")
    info = _LAYOUTS.get(base)
    if info is None:
        register_layout(base, None, prepared=False)
        info = _LAYOUTS[base]
    cached = info.windows.get(int(window))
    if cached is not None and _alive(cached):
        return cached
    entry = lookup(base)
    spec = windowed(entry.spec, window, info.positions)
    if spec.fingerprint() == entry.spec.fingerprint():
        wkey = base
    else:
        wkey = build_key(spec, entry.group, num_heads_q=base.num_heads_q, num_heads_kv=base.num_heads_kv,
                         head_dim=base.head_dim, chunk_size=base.chunk_size, solver=base.solver,
                         num_stages=base.num_stages, dispatch_spec=entry.spec)
        _PARENT[wkey] = base
    info.windows[int(window)] = wkey
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
    base = layout_key(key)
    info = _LAYOUTS.get(base)
    if info is None or not info.prepared or not _alive(base) or lookup(base).plan.local_len != q_len:
        return None
    seen = local.positions() if local is not None and info.local_positions is not None else None
    return base if seen is None or _same_positions(seen, info.local_positions) else None


def _check_active(key: DistAttnKey) -> DistAttnKey:
    active = _state._ACTIVE_ATTN_SPEC
    if active is not None and key.mask != active.fingerprint():
        raise ValueError(
            "the active spec (set_active_attn_spec) is not the mask of this step's key; call magi_prepare_batch "
            "after set_active_attn_spec, pass magi_key explicitly, or clear it with set_active_attn_spec(None)"
        )
    return key


def _local_key(cp_group, heads: Heads, spec: AttnMaskSpec, positions: np.ndarray | None) -> DistAttnKey:
    key = _flex_key_for(cp_group, spec, *heads)
    register_layout(key, positions, prepared=False)
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

    In order: (1) ``explicit`` (the ``magi_key`` forwarded by the model); at cp = 1 with
    ``binding`` (the call carries a mask that must be honoured: padding, a per-call spec)
    (2) ``local``'s mask; (3) the active spec when it covers ``q_len`` tokens; (4) the key of
    the last ``magi_prepare_*`` call for this group (``get_most_recent_key``, as the seed
    does) when the call runs on that batch (length, and positions when shown); at cp = 1
    (5) the mask ``local`` infers. Anything else raises.
    """
    if explicit is not None:
        if binding:
            raise ValueError(
                "this attention call carries its own mask (a padding attention_mask or a per-call spec) that the "
                "explicit magi_key would ignore; fold it into the key (magi_prepare_batch consumes attention_mask)"
            )
        return _fits(explicit, q_len, heads, "magi_key")
    cp_size = group_info(cp_group)[0]
    if cp_size > 1:
        recent = None if binding else _prepared_recent(cp_group, q_len, local)
        if recent is None:
            raise ValueError(
                f"no dist-attn key for this step at cp = {cp_size} ({q_len} local tokens): dispatch the batch with "
                "magi_prepare_batch / magi_prepare_packed_cp and run the model on what it returns "
                "(pass magi_key=key); masks (padding, packing, trees) go into the key, not the model call"
            )
        return _check_active(_fits(recent, q_len, heads, "the step's key"))
    if binding:
        return _local_key(cp_group, heads, local.spec(), local.positions())
    active = _state._ACTIVE_ATTN_SPEC
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
    "LocalLayout",
    "_build_self_key",
    "_flex_key_for",
    "_self_key_for",
    "build_flex_key",
    "layout_key",
    "register_layout",
    "resolve_key",
    "window_key",
]
