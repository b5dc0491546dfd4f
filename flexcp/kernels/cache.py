"""The one cache of backend schedules (``prepare`` results), for single-device and distributed calls.

One rule: a schedule is keyed by the backend *instance* (two instances of one class may
tile differently), the slice table's contents, the row counts and the device; the least
recently used entry is evicted past ``size``. ``flexcp.attention`` and every
distributed stage (host and remote tables) go through it.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from typing import Any

import numpy as np
import torch

from ..mask.geometry import SliceTable
from .backend import AttnBackend


def table_digest(table: SliceTable) -> str:
    """A digest of the slice table's contents (equal tables, equal digests)."""
    h = hashlib.blake2b(digest_size=16)
    for arr in (table.qs, table.qe, table.ks, table.ke, table.types):
        h.update(np.ascontiguousarray(arr, dtype=np.int64).tobytes())
        h.update(b"|")
    return h.hexdigest()


class ScheduleCache:
    """LRU of ``backend.prepare(table, tq, tk, device)`` results."""

    def __init__(self, size: int = 256) -> None:
        self.size = size
        self._entries: "OrderedDict[tuple, Any]" = OrderedDict()

    def get(self, backend: AttnBackend, table: SliceTable, tq: int, tk: int, device: torch.device) -> Any:
        key = (backend, table_digest(table), int(tq), int(tk), str(device))
        if key in self._entries:
            self._entries.move_to_end(key)
            return self._entries[key]
        prep = backend.prepare(table, int(tq), int(tk), torch.device(device))
        self._entries[key] = prep
        if len(self._entries) > self.size:
            self._entries.popitem(last=False)
        return prep

    def clear(self) -> None:
        self._entries.clear()

    def __len__(self) -> int:
        return len(self._entries)


SCHEDULES = ScheduleCache()


def schedule_for(backend: AttnBackend, table: SliceTable, tq: int, tk: int, device: torch.device) -> Any:
    """``backend``'s schedule for ``table`` over ``tq`` x ``tk`` rows on ``device``, from :data:`SCHEDULES`."""
    return SCHEDULES.get(backend, table, tq, tk, device)
