"""The seed's fallbacks, which flexcp's HF backend does not have: the active spec and the most recent key.

The backend (:func:`flexcp.hf.keys.resolve_key`) runs a call with its explicit ``magi_key``,
else with the mask it infers from its own inputs (cp = 1). The seed also lets a call find
its key elsewhere; importing this facade installs :func:`step_fallback` as the backend's
``REGISTRY.fallback``:

- the active spec (``set_active_attn_spec``) is the mask of a cp = 1 call that covers as
  many tokens, and of a batch given to :func:`flexcp.magi_attn_utils.magi_prepare_batch`
  without its own ``attn_spec``;
- the most recent key of the CP group (``get_most_recent_key``) is the key of a call
  without ``magi_key`` when a ``magi_prepare_*`` call built it for that call's tokens.

Also the seed's causal self-key helpers, which reuse the most recent key across layers.
"""

from __future__ import annotations

from ..hf.keys import LocalLayout, build_flex_key, fits, key_heads, local_key
from ..hf.modules import Heads
from ..hf.registry import REGISTRY, same_positions
from ..mask import causal
from ..runtime import DistAttnKey, get_most_recent_key
from ..runtime.key import find, group_info, lookup


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
    """``key``, unless an active spec is set that is not its mask (the call would silently ignore the spec)."""
    active = REGISTRY.active_spec
    if active is not None and key.mask != active.fingerprint():
        raise ValueError(
            "the active spec (set_active_attn_spec) is not the mask of this step's key; call magi_prepare_batch "
            "after set_active_attn_spec, pass magi_key explicitly, or clear it with set_active_attn_spec(None)"
        )
    return key


def step_fallback(cp_group, q_len: int, heads: Heads, local: LocalLayout | None, binding: bool) -> DistAttnKey | None:
    """The key the seed finds for a call without ``magi_key`` (``flexcp.hf.keys.StepFallback``); None: none.

    At cp > 1: the prepared batch's key (``get_most_recent_key``). At cp = 1, in order: a
    call with a ``binding`` mask of its own gets none; the active spec when it covers
    ``q_len`` tokens; the prepared batch's key (with these heads); an active spec that
    covers another length is an error.
    """
    if binding:
        return None
    if group_info(cp_group)[0] > 1:
        recent = _prepared_recent(cp_group, q_len, local)
        return None if recent is None else _check_active(fits(recent, q_len, heads, "the step's key"))
    active = REGISTRY.active_spec
    if active is not None and active.total_seqlen == q_len:
        return local_key(cp_group, heads, active, local.positions() if local is not None else None)
    recent = _prepared_recent(cp_group, q_len, local)
    if recent is not None and key_heads(recent) == tuple(heads):
        return _check_active(recent)
    if active is not None:
        raise ValueError(
            f"the active spec (set_active_attn_spec) covers {active.total_seqlen} tokens but this attention layer "
            f"sees {q_len}; set a spec for this batch or clear it with set_active_attn_spec(None)"
        )
    return None


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
        if (key is not None and key.mask == causal(int(seqlen)).fingerprint() and key_heads(key) == heads
                and find(key) is not None):
            return key
    key = _build_self_key(cp_group, seqlen, *heads, device)
    REGISTRY.set_self_key_len(cp_group, seqlen)
    return key


__all__ = ["_build_self_key", "_self_key_for", "step_fallback"]
