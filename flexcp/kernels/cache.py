"""The cache of backend schedules (``prepare`` results) of keyless single-device calls.

``flexcp.attention`` has no key to hang its schedule off, so it goes through
:data:`SCHEDULES`: keyed by the backend *instance* (two instances of one class may tile
differently), the slice table's contents, the row counts and the device; the least
recently used entry is evicted past ``size``. Distributed stages keep their schedules on
their key's ``DistAttnState`` instead, evicted with the key (``flexcp.runtime.key``).
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

import torch

from ..mask.geometry import SliceTable
from .backend import AttnBackend


class ScheduleCache:
    """LRU of ``backend.prepare(table, tq, tk, device)`` results."""

    def __init__(self, size: int = 256) -> None:
        self.size = size
        self._entries: "OrderedDict[tuple, Any]" = OrderedDict()

    def get(self, backend: AttnBackend, table: SliceTable, tq: int, tk: int, device: torch.device) -> Any:
        key = (backend, table.digest, int(tq), int(tk), str(device))
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
