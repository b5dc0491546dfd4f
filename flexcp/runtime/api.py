"""The runtime API, mirroring MagiAttention's: build a key, dispatch, attend, undispatch.

A ``DistAttnKey`` is deterministic from its inputs, so every rank computes the same
plan locally; the only collective at build time is a tiny fingerprint agreement check.
A CP group of size one (or ``None``) is the identity plus chunk padding.
"""

from __future__ import annotations

import atexit
import gc
import numbers

import torch
import torch.distributed as dist

from ..comm import agree
from ..sharding import DEFAULT_CHUNK_SIZE
from ..sharding import ops as _ops
from ..dist_attn.function import DistAttnState
from ..dist_attn.plan import build_rank_plans
from ..kernels import SCHEDULES, check_qkv, resolve_scale
from ..mask import AttnMaskSpec
from ..mask.ints import as_int
from .key import (
    DistAttnKey,
    KeyEntry,
    check_agreement,
    clear,
    debug_checks,
    forget_groups,
    group_info,
    lookup,
    most_recent,
    remember,
)
from .ops import calc_attn_op
from .placement import choose_plan

DEFAULT_NUM_STAGES = 2
"""Remote stages per attention call (overlap degree); casts for all stages start at once."""


def build_key(
    spec: AttnMaskSpec,
    cp_group: dist.ProcessGroup | None,
    *,
    num_heads_q: int,
    num_heads_kv: int,
    head_dim: int,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    solver: str = "auto",
    num_stages: int = DEFAULT_NUM_STAGES,
    check: bool = True,
    dispatch_spec: AttnMaskSpec | None = None,
) -> DistAttnKey:
    """Plan distributed attention of ``spec`` over ``cp_group``; cached by mask fingerprint and settings.

    ``solver`` is a dispatch solver name or ``"auto"`` (default): balance work (greedy) or
    keep neighbours together (contiguous), whichever a time model of compute and
    communication finds faster for this mask. With ``check`` (default) the ranks verify with
    one small all_gather that they built the same key, and raise a clear error on every rank if not
    (``FLEXCP_CHECK=1`` forces the check even with ``check=False``). ``dispatch_spec`` (same
    length) plans the token layout from another mask, so layers with different masks
    (e.g. sliding-window layers) attend over tokens dispatched once with its key.
    """
    if not isinstance(spec, AttnMaskSpec):
        raise ValueError(f"spec must be an AttnMaskSpec; got {type(spec).__name__}")
    if spec.total_seqlen_k != spec.total_seqlen:
        raise ValueError(
            f"distributed attention shards one sequence for q and k; spec has total_seqlen={spec.total_seqlen} "
            f"but total_seqlen_k={spec.total_seqlen_k}. Use flexcp.attention for cross-attention"
        )
    if spec.total_seqlen == 0:
        raise ValueError("build_key: the spec covers 0 tokens, so there is nothing to distribute; "
                         "skip attention for an empty batch or build the spec from the batch's tokens")
    for name, value in (("num_heads_q", num_heads_q), ("num_heads_kv", num_heads_kv), ("head_dim", head_dim)):
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
            raise ValueError(f"build_key: {name} must be a positive int; got {value!r}")
    if num_heads_q % num_heads_kv:
        raise ValueError(f"num_heads_q ({num_heads_q}) must be a multiple of num_heads_kv ({num_heads_kv})")
    num_stages, chunk_size = as_int("num_stages", num_stages), as_int("chunk_size", chunk_size)
    if num_stages < 1:
        raise ValueError(f"num_stages must be >= 1; got {num_stages}")
    # without torch.distributed every group object is a group of one (the seed's contract); a name or a
    # number is never a group
    if cp_group is not None and not isinstance(cp_group, dist.ProcessGroup) and (
            dist.is_initialized() or isinstance(cp_group, (str, bytes, numbers.Number, list, tuple, dict))):
        raise ValueError(f"build_key: cp_group must be a torch.distributed ProcessGroup (e.g. dist.group.WORLD, or "
                         f"device_mesh['cp'].get_group()) or None for no CP; got {cp_group!r} ({type(cp_group).__name__})")
    spec.validate()
    layout = spec if dispatch_spec is None else dispatch_spec
    if not isinstance(layout, AttnMaskSpec) or layout.total_seqlen != spec.total_seqlen:
        raise ValueError(
            f"dispatch_spec must be an AttnMaskSpec with spec's total_seqlen ({spec.total_seqlen}); "
            f"got {layout if not isinstance(layout, AttnMaskSpec) else layout.total_seqlen}"
        )
    layout_print = () if layout.fingerprint() == spec.fingerprint() else layout.fingerprint()
    cp_size, rank, gid = group_info(cp_group)
    key = DistAttnKey(spec.fingerprint(), gid, cp_size, rank, int(chunk_size), int(num_heads_q),
                      int(num_heads_kv), int(head_dim), solver, int(num_stages), layout_print)
    if cp_size > 1 and (check or debug_checks()):
        check_agreement(key, cp_group)
    try:
        lookup(key)
    except ValueError:
        plan, rank_plans = choose_plan(layout, cp_size, chunk_size, solver, num_stages, num_heads_q, num_heads_kv)
        if layout is not spec:
            rank_plans = build_rank_plans(spec.table, plan, num_stages)
        rank_plan = rank_plans[rank]
        group = cp_group if cp_size > 1 else None
        remember(key, KeyEntry(spec, plan, DistAttnState(rank_plan, group, key.agreement_hash()), group))
    else:
        remember(key, lookup(key))
    return key


def dispatch(x: torch.Tensor, key: DistAttnKey, pad_value: float = 0, dim: int = 0) -> torch.Tensor:
    """This rank's shard of a global tensor (identical on every rank), padded with ``pad_value``."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"dispatch: x must be a torch.Tensor (the global tensor, tokens along dim={dim}); got "
                        f"{type(x).__name__}: convert it first, e.g. torch.as_tensor(x)")
    return _ops.dispatch(x, lookup(key).plan, key.rank, dim=dim, pad_value=pad_value)


def undispatch(x: torch.Tensor, key: DistAttnKey, dim: int = 0) -> torch.Tensor:
    """Gather the shards of the group back into the global tensor (global order, padding dropped).

    The ranks first prove that they pass the same key, dtype, shape and grad mode (8 bytes per rank;
    a mismatch raises on every rank, naming what differs).
    """
    entry = lookup(key)
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"undispatch: x must be a torch.Tensor (a dispatched shard); got {type(x).__name__}")
    agree("undispatch", {"key": key.agreement_hash(), "dtype": x.dtype, "shape": tuple(x.shape),
                         "dim": dim % x.dim() if x.dim() else dim, "grad": torch.is_grad_enabled() and x.requires_grad},
          entry.group,
          "every rank must pass its shard of the same tensor (same key, dtype, shape and dim) with the same grad mode")
    return _ops.undispatch(x, entry.plan, entry.group, dim=dim)


def get_position_ids(key: DistAttnKey, device: torch.device | str | None = None) -> torch.Tensor:
    """Global flat index of every local token (padding rows continue past total_seqlen)."""
    ids = _ops.position_ids(lookup(key).plan, key.rank)
    return ids if device is None else ids.to(device)


def get_most_recent_key(cp_group: dist.ProcessGroup | None) -> DistAttnKey | None:
    """The key most recently built for ``cp_group`` (the fallback when a layer is not given one)."""
    return most_recent(cp_group)


def clear_cache() -> None:
    """Forget every built key (their plans) and the kernels' schedules."""
    clear()
    SCHEDULES.clear()


def _release_at_exit() -> None:
    """Drop the cached keys and collect while the interpreter is still whole.

    The keys' states hold process groups and communication buffers; gloo objects freed
    during interpreter teardown instead can abort a process that finished cleanly
    ("terminate called without an active exception": 1 in 10 two-rank torchrun runs of
    the README's HF snippet on a loaded 2-core machine, none in 40 with this release).
    """
    clear_cache()
    forget_groups()
    gc.collect()


atexit.register(_release_at_exit)


def calc_attn(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key: DistAttnKey | torch.Tensor,
    *,
    softmax_scale: float | None = None,
    softcap: float = 0.0,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of the local shard (dispatched with ``key``) over the whole sequence; ``(out, lse)``.

    ``key`` is a :class:`DistAttnKey` or its ``handle`` (what compiled code and custom ops carry).

    Every rank of the key's group must call it with the same key, dtype, ``softmax_scale``, ``softcap``
    and grad mode; every call proves it (an 8-byte fingerprint per rank before the first transfer)
    and a mismatch raises on every rank, naming what differs. It runs as the ``flexcp::calc_attn``
    custom op (runtime/ops.py): under ``torch.compile`` the key travels as a tensor, so nothing here
    breaks the graph or recompiles for a new key.
    """
    check_qkv(q, k, v)
    if isinstance(key, DistAttnKey):
        key = key.handle
    elif not (isinstance(key, torch.Tensor) and key.dtype == torch.int64 and key.numel() == 1):
        raise ValueError(f"key must be a DistAttnKey (from build_key) or its handle; got {type(key).__name__}")
    scale, softcap = resolve_scale(q.shape[-1], softmax_scale, softcap)
    return calc_attn_op(q.contiguous(), k.contiguous(), v.contiguous(), key, scale, softcap, backend)
