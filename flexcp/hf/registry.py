"""The HF backend's state: the active settings, per CP group its slots, and the layouts it attaches to keys.

Per-group slots (one flex key, one self-key length, replaced on write) are keyed by the
group's identity as the runtime names it (the ``group_id`` of ``group_info``: group name and
ranks, which every ``DistAttnKey`` carries), never by ``id()``; a flex key the runtime no
longer holds (evicted, or ``clear_cache``) reads as absent. Per-key state lives on the key
itself, in the runtime's key cache (``runtime.key.attach``): a layout key's :class:`Layout`
(with its window keys) and a window key's layout key. So the runtime's one eviction rule
(``MAX_KEYS``, ``clear_cache``) is theirs: an evicted key's layout and windows go with it.

Only this module's :data:`REGISTRY` holds the state and only the backend modules (and the facade's
setters) write it, through its methods. The seed's module-level names in ``flexcp.magi_attn_utils``
delegate to it: ``_ACTIVE_ATTN_SPEC``, ``_ACTIVE_CP_GROUP`` and ``_MAGI_REGISTERED`` read and
write its settings; ``_FLEX_KEY_CACHE`` and ``_MAGI_SELF_KEY_LEN`` are read-only snapshots in
the seed's shape (``id(cp_group) -> ...``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, NoReturn

import numpy as np

from ..mask import AttnMaskSpec
from ..runtime import DistAttnKey
from ..runtime.key import MAX_KEYS, attach, attached, find, group_info

if TYPE_CHECKING:
    from .keys import StepFallback

MAX_LAYOUTS = MAX_KEYS
"""Layouts live as long as their keys: the runtime's key cache bound (``runtime.key.MAX_KEYS``)."""

_LAYOUT = "hf.layout"
"""Attachment name of a layout key's :class:`Layout`."""
_PARENT = "hf.parent"
"""Attachment name of a window key's layout key."""


@dataclass
class Layout:
    """What the registry knows about a layout key (a key tokens were dispatched with); attached to the key."""

    positions: np.ndarray | None  # real position of each global token; None -> flat index
    prepared: bool  # built by magi_prepare_*: the step's key for the get_most_recent_key fallback
    local_positions: np.ndarray | None = None  # this rank's dispatched positions (what the model is called with)
    windows: dict[int, DistAttnKey] = field(default_factory=dict)


@dataclass
class _Group:
    """One CP group's entries."""

    group: Any = None  # the group object last seen with this identity (the seed's views are keyed by its id())
    flex: tuple[tuple, DistAttnKey] | None = None  # (spec fingerprint + heads, key) of _flex_key_for
    self_len: int | None = None  # sequence length of the last causal self-key


def same_positions(a: np.ndarray | None, b: np.ndarray | None) -> bool:
    """Whether two position arrays (or ``None``) are equal."""
    if a is None or b is None:
        return a is b
    return a.shape == b.shape and bool(np.array_equal(a, b))


class SeedView(dict):
    """A read-only snapshot in the shape of one of the seed's module-level caches."""

    def _read_only(self, *args: Any, **kwargs: Any) -> NoReturn:
        raise TypeError("this seed cache is a read-only view of flexcp.hf.registry.REGISTRY, "
                        "which owns the keys; build keys with build_flex_key / _flex_key_for instead")

    __setitem__ = __delitem__ = clear = pop = popitem = setdefault = update = __ior__ = _read_only


class MagiRegistry:
    """The active settings of the magi backend, per CP group its slots, and the layouts on its keys."""

    def __init__(self) -> None:
        self.active_spec: AttnMaskSpec | None = None
        """Mask spec set by ``set_active_attn_spec`` (None -> the batch's own documents)."""
        self.active_cp_group: Any = None
        """CP group of the custom-model attn_func (a closure with no module to read it from)."""
        self.registered = False
        """Whether ``register_magi_attention`` has run."""
        self.generation = 0
        """Counts prepared layouts registered: a step key resolved before a ``magi_prepare_*`` call is stale after it."""
        self.fallback: StepFallback | None = None
        """Where a call without ``magi_key`` may find its key; only the seed facade,
        ``flexcp.magi_attn_utils``, installs one (the active spec, the most recent key)."""
        self._groups: dict[str, _Group] = {}

    # ------------------------------------------------------------------------------ groups
    def _record(self, group_id: str) -> _Group:
        record = self._groups.get(group_id)
        if record is None:
            record = self._groups[group_id] = _Group()
        return record

    def _group(self, cp_group: Any) -> _Group:
        record = self._record(group_info(cp_group)[2])
        record.group = cp_group
        return record

    # ------------------------------------------------------------------- the seed's slots
    def flex_key(self, cp_group: Any, ident: tuple) -> DistAttnKey | None:
        """The group's flex key if it was built for ``ident`` and is still built."""
        cached = self._group(cp_group).flex
        return cached[1] if cached is not None and cached[0] == ident and find(cached[1]) is not None else None

    def set_flex_key(self, cp_group: Any, ident: tuple, key: DistAttnKey) -> None:
        self._group(cp_group).flex = (ident, key)

    def self_key_len(self, cp_group: Any) -> int | None:
        """The sequence length of the group's last causal self-key."""
        return self._group(cp_group).self_len

    def set_self_key_len(self, cp_group: Any, seqlen: int) -> None:
        self._group(cp_group).self_len = int(seqlen)

    def seed_flex_keys(self) -> SeedView:
        """``_FLEX_KEY_CACHE``: ``id(cp_group) -> ((fingerprint, heads), key)``."""
        return SeedView({id(g.group): g.flex for g in self._groups.values() if g.flex is not None})

    def seed_self_key_lens(self) -> SeedView:
        """``_MAGI_SELF_KEY_LEN``: ``id(cp_group) -> seqlen``."""
        return SeedView({id(g.group): g.self_len for g in self._groups.values() if g.self_len is not None})

    # ---------------------------------------------------------------- layouts and windows
    def register_layout(self, key: DistAttnKey, positions: np.ndarray | None, prepared: bool,
                        local_positions: np.ndarray | None = None) -> Layout:
        """Remember (or refresh) a built layout key's real token positions, on the key; returns its entry.

        ``prepared`` marks a ``magi_prepare_*`` key, whose ``local_positions`` (the dispatched
        position ids) later tell whether a model call without ``magi_key`` runs on its batch.
        A refresh without positions keeps the known ones, and a prepared entry stays
        prepared; window keys survive only if the positions did not change.
        """
        self.generation += int(prepared)
        old = self.layout(key)
        if old is not None and positions is None:
            positions = old.positions
        if old is not None and old.prepared and not prepared:
            prepared, local_positions = True, old.local_positions
        info = Layout(positions, prepared, local_positions)
        if old is not None and same_positions(old.positions, positions):
            info.windows = old.windows
        elif old is not None:
            self._forget_windows(old)
        attach(key, _LAYOUT, info)
        return info

    @staticmethod
    def _forget_windows(info: Layout) -> None:
        """Unlink a replaced layout's window keys from it (they stay built, as keys of their own)."""
        for wkey in info.windows.values():
            if find(wkey) is not None:
                attach(wkey, _PARENT, None)

    @staticmethod
    def layout_key(key: DistAttnKey) -> DistAttnKey:
        """The layout key a (window) key belongs to."""
        return attached(key, _PARENT) or key

    @staticmethod
    def layout(key: DistAttnKey) -> Layout | None:
        """The entry of a layout key, if registered and the key is still built."""
        return attached(key, _LAYOUT)

    @staticmethod
    def window(info: Layout, window: int) -> DistAttnKey | None:
        """The layout's window key for ``window``, if derived and still built."""
        wkey = info.windows.get(int(window))
        return wkey if wkey is not None and find(wkey) is not None else None

    @staticmethod
    def add_window(base: DistAttnKey, info: Layout, window: int, wkey: DistAttnKey) -> None:
        """Record ``wkey`` as the key of ``base``'s layout ``info`` for ``window``; it is forgotten with ``info``."""
        info.windows[int(window)] = wkey
        if wkey != base:
            attach(wkey, _PARENT, base)


REGISTRY = MagiRegistry()
"""The one registry of the HF backend."""

__all__ = ["MAX_LAYOUTS", "REGISTRY", "Layout", "MagiRegistry", "SeedView", "same_positions"]
