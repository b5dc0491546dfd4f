"""Dist-attn keys of the HF backend: key builders, window keys, and the one precedence of a step's key.

The keys, layouts and their eviction live in :data:`.registry.REGISTRY`; this module builds
keys and decides which one an attention call runs with. A *layout key* is the key tokens
were dispatched with (built by ``magi_prepare_*`` or here from a mask seen at cp = 1). Its
registry entry remembers the tokens' real positions and the window keys derived from it:
a sliding-window layer attends with a key whose mask is
the layout's mask restricted to the window (in real positions) and whose token layout is
the layout key's (``build_key(dispatch_spec=...)``), so every layer sees the same shard;
:func:`windowed` measures the window in real positions, so prefix-tree completions and
packed documents window like separate samples.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np

from ..sharding import DEFAULT_CHUNK_SIZE, resolve_chunk_size
from ..mask import AttnMaskSpec, clip_band
from ..mask.geometry import slice_areas
from ..runtime import DistAttnKey, build_key
from ..runtime.key import group_info, lookup
from .modules import Heads
from .registry import REGISTRY


class LocalLayout(Protocol):
    """The mask an attention call can infer from its own (undispatched, cp = 1) inputs."""

    def spec(self) -> AttnMaskSpec: ...

    def positions(self) -> np.ndarray | None: ...


def key_heads(key: DistAttnKey) -> Heads:
    """A key's ``(num_heads_q, num_heads_kv, head_dim)``."""
    return key.num_heads_q, key.num_heads_kv, key.head_dim


# ----------------------------------------------------------------------------- key builders
def build_flex_key(spec: AttnMaskSpec, num_heads_q: int, num_heads_kv: int, head_dim: int, cp_group) -> DistAttnKey:
    """Build a dist-attn key for an arbitrary AttnSlice mask (no extra padding at cp = 1).

    At cp = 1 the whole sequence is one chunk: dispatch is the identity and tokens stay
    in order (what the custom-model path runs on). At cp > 1 tokens are dispatched in
    ``DEFAULT_CHUNK_SIZE`` chunks, the sequence padded to a multiple of ``chunk_size * cp``.
    """
    if not isinstance(spec, AttnMaskSpec):
        raise ValueError(f"spec must be a flexcp AttnMaskSpec; got {type(spec).__name__}")
    return build_key(spec, cp_group, num_heads_q=int(num_heads_q), num_heads_kv=int(num_heads_kv),
                     head_dim=int(head_dim), chunk_size=resolve_chunk_size(spec.total_seqlen, group_info(cp_group)[0]))


def _flex_key_for(cp_group, spec: AttnMaskSpec, num_heads_q: int, num_heads_kv: int, head_dim: int) -> DistAttnKey:
    """Return the flex key for ``spec``, rebuilding only when the mask (or head config) changes."""
    ident = (spec.fingerprint(), int(num_heads_q), int(num_heads_kv), int(head_dim))
    key = REGISTRY.flex_key(cp_group, ident)
    if key is None:
        key = build_flex_key(spec, num_heads_q, num_heads_kv, head_dim, cp_group)
        REGISTRY.set_flex_key(cp_group, ident, key)
    return key


# ------------------------------------------------------------------------------------ windows
def windowed(spec: AttnMaskSpec, window: int, positions: np.ndarray | None = None) -> AttnMaskSpec:
    """``spec`` restricted to keys with ``q_pos - k_pos < window`` (HF's sliding window, self included).

    ``positions`` are the tokens' real positions (flat indices when None). Slices are cut
    where positions jump, so within a piece positions are flat indices plus a constant and
    the window is one more diagonal bound; pieces are typed slices from ``clip_band``.
    """
    window = int(window)
    if window < 1:
        raise ValueError(f"sliding window must be >= 1 (keys per row, self included); got {window}")
    if spec.total_seqlen_k != spec.total_seqlen:
        raise ValueError("windowed needs a self-attention spec (total_seqlen_k == total_seqlen)")
    n = spec.total_seqlen
    pos = np.arange(n, dtype=np.int64) if positions is None else np.asarray(positions, dtype=np.int64).reshape(-1)
    if len(pos) != n:
        raise ValueError(f"positions has {len(pos)} entries but the spec covers {n} tokens")
    t = spec.table
    t = t.take(np.nonzero(slice_areas(t) > 0)[0])
    breaks = np.nonzero(np.diff(pos) != 1)[0] + 1
    run_start = np.concatenate([[0], breaks]).astype(np.int64)
    run_end = np.concatenate([breaks, [n]]).astype(np.int64)

    def run_of(x: np.ndarray) -> np.ndarray:
        return np.searchsorted(run_start, x, side="right") - 1

    rq0, rq1, rk0, rk1 = run_of(t.qs), run_of(t.qe - 1), run_of(t.ks), run_of(t.ke - 1)
    nk = rk1 - rk0 + 1
    count = (rq1 - rq0 + 1) * nk
    sl = np.repeat(np.arange(len(t)), count)
    local = np.arange(int(count.sum())) - np.repeat(np.cumsum(count) - count, count)
    rq, rk = rq0[sl] + local // nk[sl], rk0[sl] + local % nk[sl]
    q0, q1 = np.maximum(t.qs[sl], run_start[rq]), np.minimum(t.qe[sl], run_end[rq])
    k0, k1 = np.maximum(t.ks[sl], run_start[rk]), np.minimum(t.ke[sl], run_end[rk])
    # row i, key j of this piece: q_pos - k_pos = (i - j) + (pos[q0] - q0) - (pos[k0] - k0) < window
    lo = np.maximum(t.lo[sl], (pos[q0] - q0) - (pos[k0] - k0) - window + 1)
    pieces, _ = clip_band(q0, q1, k0, k1, lo, t.hi[sl])
    return AttnMaskSpec.from_table(pieces.nonempty(), n)


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
def fits(key: DistAttnKey, q_len: int, heads: Heads, what: str) -> DistAttnKey:
    """``key`` if it was built for this call's local tokens and heads, else a clear error."""
    if not isinstance(key, DistAttnKey):
        raise ValueError(f"{what} must be a DistAttnKey (from magi_prepare_batch or flexcp.build_key); got {type(key).__name__}")
    local_len = lookup(key).plan.local_len
    if local_len != q_len or key_heads(key) != tuple(heads):
        raise ValueError(
            f"{what} was built for {local_len} local tokens and heads (q, kv, dim) = {key_heads(key)}, but this "
            f"attention layer sees {q_len} tokens and heads {tuple(heads)}; run the model on the batch "
            "magi_prepare_batch returned for this key"
        )
    return key


def local_key(cp_group, heads: Heads, spec: AttnMaskSpec, positions: np.ndarray | None) -> DistAttnKey:
    """The cp = 1 key of ``spec`` (cached per group), registered as a layout with the tokens' real ``positions``."""
    key = _flex_key_for(cp_group, spec, *heads)
    REGISTRY.register_layout(key, positions, prepared=False)
    return key


class StepFallback(Protocol):
    """Where a call without its own key may find one (the seed facade's: the active spec, the most recent key)."""

    def __call__(self, cp_group, q_len: int, heads: Heads, local: LocalLayout | None, binding: bool) -> DistAttnKey | None: ...


def resolve_key(
    cp_group,
    q_len: int,
    heads: Heads,
    *,
    explicit: DistAttnKey | None = None,
    local: LocalLayout | None = None,
    binding: bool = False,
) -> DistAttnKey:
    """The layout key an attention call runs with: the one precedence of the step's key.

    1. ``explicit``, the ``magi_key`` the model forwards (refused when the call also carries
       a ``binding`` mask: padding, a per-call spec, which the key would ignore);
    2. ``REGISTRY.fallback`` when installed (only ``flexcp.magi_attn_utils`` installs one: the
       seed's active spec and most recent key);
    3. at cp = 1 the mask the call infers from its own inputs (``local``, :func:`.masks.step_mask`);
       at cp > 1 there is no other key: the batch must be dispatched with its key first.
    """
    if explicit is not None:
        if binding:
            raise ValueError(
                "this attention call carries its own mask (a padding attention_mask or a per-call spec) that the "
                "explicit magi_key would ignore; fold it into the key (magi_prepare_batch consumes attention_mask)"
            )
        return fits(explicit, q_len, heads, "magi_key")
    fallback = REGISTRY.fallback
    key = None if fallback is None else fallback(cp_group, q_len, heads, local, binding)
    if key is not None:
        return key
    if group_info(cp_group)[0] > 1:
        raise ValueError(
            f"no dist-attn key for this step at cp = {group_info(cp_group)[0]} ({q_len} local tokens): dispatch the "
            "batch with magi_prepare_batch / magi_prepare_packed_cp and run the model on what it returns "
            "(pass magi_key=key); masks (padding, packing, trees) go into the key, not the model call"
        )
    if local is None:
        raise ValueError("no dist-attn key for this attention call: pass magi_key or call magi_prepare_batch")
    return local_key(cp_group, heads, local.spec(), local.positions())


__all__ = [
    "DEFAULT_CHUNK_SIZE",
    "LocalLayout",
    "StepFallback",
    "_flex_key_for",
    "build_flex_key",
    "fits",
    "key_heads",
    "local_key",
    "resolve_key",
    "window_key",
    "windowed",
]
