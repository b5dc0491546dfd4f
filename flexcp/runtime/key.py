"""DistAttnKey and the key cache: one plan per (mask, group, settings), built once.

The cache is the one owner of everything scoped to a key: the plan, its stage schedules
(``DistAttnState``) and what other layers attach to it (:func:`attach`; e.g. the HF
backend's layouts and window keys). One eviction rule: the least recently built/used keys
past :data:`MAX_KEYS` (never a group's latest) and :func:`clear`; what hangs off a key goes with it.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from ..comm import agree
from ..comm.agreement import check_setting
from ..sharding import DispatchPlan
from ..dist_attn.function import DistAttnState
from ..mask import AttnMaskSpec


@dataclass(frozen=True)
class DistAttnKey:
    """Hashable handle of one distributed-attention setup (what MagiAttention calls the runtime key)."""

    mask: tuple
    group_id: str
    cp_size: int
    rank: int
    chunk_size: int
    num_heads_q: int
    num_heads_kv: int
    head_dim: int
    solver: str
    num_stages: int
    layout: tuple = ()
    """Fingerprint of the mask the token layout was planned from, when not ``mask`` (see build_key)."""

    def __post_init__(self) -> None:
        # the key as a one-element int64 CPU tensor, what the custom ops (runtime/ops.py) carry: to
        # torch.compile a tensor attribute is a graph input, not a constant, so a new key does not recompile
        object.__setattr__(self, "handle", torch.tensor([self.digest()], dtype=torch.int64))

    def digest(self) -> int:
        """63-bit digest of every field (the rank included): the key's handle, equal for equal keys."""
        return _digest((self.agreement_hash(), self.rank))

    def agreement_hash(self) -> int:
        """63-bit digest of everything ranks must agree on (all fields but the rank)."""
        return _digest((self.mask, self.group_id, self.cp_size, self.chunk_size, self.num_heads_q,
                        self.num_heads_kv, self.head_dim, self.solver, self.num_stages, self.layout))


@dataclass(frozen=True, eq=False)
class KeyEntry:
    """What a key resolves to on this rank, and what other layers hang off the key (evicted with it)."""

    spec: AttnMaskSpec
    plan: DispatchPlan
    state: DistAttnState
    group: dist.ProcessGroup | None
    attachments: dict[str, Any] = field(default_factory=dict)
    """Name -> value set by :func:`attach`; the entry's one mutable part."""


MAX_KEYS = 64
"""Keys kept per process; the least recently built/used are dropped (each step of packed data is a new mask)."""

_ENTRIES: "OrderedDict[DistAttnKey, KeyEntry]" = OrderedDict()
_MOST_RECENT: dict[str, DistAttnKey] = {}
_BY_HANDLE: dict[int, DistAttnKey] = {}
_GROUPS: list = [None]
"""CP groups by slot (slot 0: no group, cp = 1); see :func:`group_slot`."""


def group_info(group: dist.ProcessGroup | None) -> tuple[int, int, str]:
    """``(cp_size, rank, group_id)``; ``None`` (or no initialized torch.distributed) is a group of one."""
    if group is None or not dist.is_available() or not dist.is_initialized():
        return 1, 0, "local"
    ranks = dist.get_process_group_ranks(group)
    name = getattr(group, "group_name", "") or str(id(group))
    return dist.get_world_size(group), dist.get_rank(group), f"{name}:{','.join(map(str, ranks))}"


def debug_checks() -> bool:
    """Whether ``FLEXCP_CHECK=1`` forces ``build_key``'s agreement check (``check=False`` notwithstanding)."""
    return check_setting() is True


def _digest(fields: tuple) -> int:
    return int.from_bytes(hashlib.blake2b(repr(fields).encode(), digest_size=8).digest(), "little") >> 1


def check_agreement(key: DistAttnKey, group: dist.ProcessGroup) -> None:
    """All ranks of ``group`` must build the same key; one 8-byte all_gather proves it or raises on every rank."""
    fields = {f: getattr(key, f) for f in ("mask", "group_id", "cp_size", "chunk_size", "num_heads_q",
                                          "num_heads_kv", "head_dim", "solver", "num_stages", "layout")}
    agree("build_key", fields, group, "every rank of a CP group must call build_key with the same spec, head "
          "counts, head_dim, chunk_size, solver and num_stages")


def remember(key: DistAttnKey, entry: KeyEntry) -> None:
    """Store (or refresh) a key; evict the least recently used beyond MAX_KEYS, never a group's latest."""
    _ENTRIES[key] = entry
    _ENTRIES.move_to_end(key)
    _BY_HANDLE[key.digest()] = key
    _MOST_RECENT[key.group_id] = key
    latest = set(_MOST_RECENT.values())
    for old in list(_ENTRIES):
        if len(_ENTRIES) <= MAX_KEYS:
            break
        if old not in latest:
            del _ENTRIES[old]
            _BY_HANDLE.pop(old.digest(), None)


def find(key: DistAttnKey) -> KeyEntry | None:
    """The entry of a key built on this process, or None if it was never built or was evicted."""
    return _ENTRIES.get(key)


def lookup(key: DistAttnKey) -> KeyEntry:
    """The entry of a key built on this process (a clear error if it was never built or was evicted)."""
    entry = find(key)
    if entry is None:
        raise ValueError("this DistAttnKey is not built on this process (or was evicted/cleared); call build_key again")
    return entry


def attach(key: DistAttnKey, name: str, value: Any) -> None:
    """Hang ``value`` off a built key under ``name`` (replacing any); it is evicted with the key.

    ``None`` removes the attachment. A clear error if the key is not built (or was evicted).
    """
    attachments = lookup(key).attachments
    if value is None:
        attachments.pop(name, None)
    else:
        attachments[name] = value


def attached(key: DistAttnKey, name: str) -> Any | None:
    """What :func:`attach` hung off ``key`` under ``name``; None if nothing, or the key is not built (evicted)."""
    entry = find(key)
    return None if entry is None else entry.attachments.get(name)


def key_of_handle(handle: torch.Tensor | int) -> DistAttnKey:
    """The built key whose ``handle`` (tensor, or its ``digest()``) this is; a clear error if evicted or never built here."""
    key = _BY_HANDLE.get(int(handle.reshape(-1)[0]) if isinstance(handle, torch.Tensor) else int(handle))
    if key is None:
        raise ValueError("this DistAttnKey handle names no key built on this process (evicted or cleared); "
                         "call build_key again")
    return key


def most_recent(group: dist.ProcessGroup | None) -> DistAttnKey | None:
    """The key most recently built or used for ``group``, while it is built."""
    return _MOST_RECENT.get(group_info(group)[2])


@torch._dynamo.assume_constant_result
def group_slot(group: dist.ProcessGroup | None) -> int:
    """A small int naming ``group`` (0 for ``None``), stable for the process: what the custom ops carry.

    torch.compile folds it to a constant (the group object is guarded where it is read),
    so compiled attention never traces into process-group code.
    """
    for slot, known in enumerate(_GROUPS):
        if known is group:
            return slot
    _GROUPS.append(group)
    return len(_GROUPS) - 1


def group_of_slot(slot: int) -> dist.ProcessGroup | None:
    """The group :func:`group_slot` named ``slot``."""
    return _GROUPS[int(slot)]


def clear() -> None:
    """Forget every key, and with them everything attached to them."""
    _ENTRIES.clear()
    _MOST_RECENT.clear()
    _BY_HANDLE.clear()


def forget_groups() -> None:
    """Drop the groups :func:`group_slot` holds (at exit: gloo groups must not outlive the interpreter)."""
    del _GROUPS[1:]
