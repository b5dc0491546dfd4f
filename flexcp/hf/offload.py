"""Activation offload: the tensors the forward saves for backward, in pinned host memory, copied asynchronously.

With activation checkpointing the forward keeps each decoder layer's input (and the
final norm's and the loss's inputs) until backward; at long lengths that is most of the GPU
memory (4 KiB per token and layer for a 2,048-wide bf16 model). :class:`ActivationOffload`
is a ``saved_tensors_hooks`` pair that moves every saved tensor of at least ``min_bytes``
to host memory and brings it back in backward:

- copies run on a side stream, overlapped with compute; the forward waits for a copy only
  when more than ``depth`` are in flight (the GPU memory they hold is then freed);
- backward prefetches: unpacking one tensor starts copying the previously saved one back
  (double buffering: the next layer's input arrives while this layer recomputes);
- host memory is one :class:`HostArena`: page-locked exactly to the bytes a step saves
  (``cudaHostRegister`` on an exact-size allocation, not torch's pinned caching
  allocator, which rounds every block up to a power of two), carved per tensor, reused by
  the next step; a tensor saved twice (the rotary tables every layer receives) is copied once.

On CPU (tests) the same code runs with synchronous copies into pageable memory.
"""

from __future__ import annotations

import weakref
from contextlib import contextmanager
from typing import Any, Iterator

import torch
from torch import nn

__all__ = ["ActivationOffload", "HostArena"]

_ALIGN = 512


def _register(buf: torch.Tensor) -> bool:
    """Page-lock ``buf`` in place (exact size); False when CUDA cannot (then it stays pageable)."""
    try:
        err = torch.cuda.cudart().cudaHostRegister(buf.data_ptr(), buf.numel(), 0)
    except (AttributeError, RuntimeError):
        return False
    return int(err) == 0


def _unregister(buf: torch.Tensor) -> None:
    torch.cuda.cudart().cudaHostUnregister(buf.data_ptr())


class _Block:
    """One host allocation of exactly ``nbytes`` (page-locked when ``pin``)."""

    def __init__(self, nbytes: int, pin: bool) -> None:
        self.buf = torch.empty(nbytes, dtype=torch.uint8)
        if pin and nbytes > 0:
            self.buf.zero_()  # fault the pages in on all CPU threads; registering then only pins them
        self.pinned = pin and nbytes > 0 and _register(self.buf)
        self.used = 0

    def unpin(self) -> None:
        """Unregister the page lock (before the memory is freed)."""
        if self.pinned:
            self.pinned = False
            _unregister(self.buf)

    def __del__(self) -> None:
        try:
            self.unpin()
        except Exception:  # noqa: BLE001 - interpreter shutdown: CUDA may be gone already
            pass


class HostArena:
    """Host memory for one step's offloaded tensors: carved in order, rewound per step, sized to the steps.

    :meth:`take` carves ``nbytes`` (aligned to 512) from the current block, moving on to the
    next block when it does not fit and opening a new block of exactly ``nbytes`` after the
    last; :meth:`reset` (between steps) rewinds, so a run whose steps save the same tensors
    reuses exactly the blocks its first step opened. When the blocks hold more than
    ``slack`` times what the last step used (the sizes changed), they are replaced by one
    block of that size.
    """

    def __init__(self, pin: bool, slack: float = 1.25) -> None:
        self.pin, self.slack = pin, slack
        self.blocks: list[_Block] = []
        self.current = 0
        self.high_water = 0

    @property
    def capacity_bytes(self) -> int:
        """Host bytes held now."""
        return sum(b.buf.numel() for b in self.blocks)

    @property
    def used_bytes(self) -> int:
        """Bytes carved since the last reset."""
        return sum(b.used for b in self.blocks)

    def take(self, nbytes: int) -> torch.Tensor:
        """``nbytes`` of host memory (uint8), valid until the next :meth:`reset`."""
        size = -(-nbytes // _ALIGN) * _ALIGN
        while self.current < len(self.blocks):
            b = self.blocks[self.current]
            if b.used + size <= b.buf.numel():
                out = b.buf[b.used : b.used + nbytes]
                b.used += size
                self.high_water = max(self.high_water, self.used_bytes)
                return out
            self.current += 1
        self.blocks.append(_Block(size, self.pin))
        return self.take(nbytes)

    def reset(self) -> None:
        """Rewind for the next step; blocks far larger than the last step's use become one block of that use."""
        used = self.used_bytes
        if len(self.blocks) > 1 and self.capacity_bytes > self.slack * used:
            self.release()
            self.blocks = [_Block(used, self.pin)] if used else []
        for b in self.blocks:
            b.used = 0
        self.current = 0

    def release(self) -> None:
        """Give all host memory back."""
        for b in self.blocks:
            b.unpin()
        self.blocks, self.current = [], 0


class _Saved:
    """One offloaded tensor: its host copy, and (while in flight) the device tensor or the copy's event."""

    __slots__ = ("host", "shape", "dtype", "device", "event", "source", "ready", "__weakref__")

    def __init__(self, host: torch.Tensor, t: torch.Tensor) -> None:
        self.host, self.shape, self.dtype, self.device = host, t.shape, t.dtype, t.device
        self.event: torch.cuda.Event | None = None
        self.source: torch.Tensor | None = t  # kept alive until the copy to the host is done
        self.ready: torch.Tensor | None = None  # a prefetched device copy


class ActivationOffload:
    """``saved_tensors_hooks`` that keep saved tensors of at least ``min_bytes`` in host memory.

    Use :meth:`__call__` around each forward (``with offload(): loss = model(...)``);
    backward may run after the block. Parameters and tensors on other devices stay where they
    are. ``depth``: copies to the host in flight before the forward waits for the oldest.
    """

    def __init__(self, device: torch.device | str, min_bytes: int = 1 << 20, depth: int = 2) -> None:
        device = torch.device(device)
        self.cuda = device.type == "cuda"
        if self.cuda and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        self.device = device
        if min_bytes < 0 or depth < 1:
            raise ValueError(f"min_bytes must be >= 0 and depth >= 1; got {min_bytes}, {depth}")
        self.min_bytes, self.depth = min_bytes, depth
        self.arena = HostArena(pin=self.cuda)
        self.stream = torch.cuda.Stream(self.device) if self.cuda else None
        self._order: list[weakref.ref[_Saved]] = []  # this step's entries in save order
        self._seen: dict[tuple, tuple[weakref.ref, _Saved]] = {}  # this forward's saves: (base tensor, entry)
        self._inflight: list[_Saved] = []
        self.saved_bytes = 0  # bytes offloaded by the last forward

    @contextmanager
    def __call__(self) -> Iterator[None]:
        """Offload what the forward run inside saves; the host arena is reused once no graph needs it."""
        if not any(r() is not None for r in self._order):
            self.arena.reset()
        self._order, self._seen, self.saved_bytes = [], {}, 0
        try:
            with torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack):
                yield
        finally:
            self._drain(0)
            self._seen = {}

    # ------------------------------------------------------------------ forward: to the host
    def _pack(self, t: torch.Tensor) -> Any:
        nbytes = t.numel() * t.element_size()
        if (nbytes < self.min_bytes or t.device != self.device or isinstance(t, nn.Parameter)
                or t.layout != torch.strided):
            return t
        # the same tensor saved again (not a new one that reuses a freed tensor's memory: the base must be alive)
        base = t if t._base is None else t._base
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride(), t.dtype, t._version)
        if (known := self._seen.get(key)) is not None and known[0]() is base:
            return known[1]
        host = self.arena.take(nbytes).view(t.dtype).view(t.shape)
        entry = _Saved(host, t)
        if self.cuda:
            self.stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(self.stream):
                host.copy_(t, non_blocking=True)
                entry.event = torch.cuda.Event()
                entry.event.record(self.stream)
            self._inflight.append(entry)
            self._drain(self.depth)
        else:
            host.copy_(t)
            entry.source = None
        self._seen[key] = (weakref.ref(base), entry)
        self._order.append(weakref.ref(entry))
        self.saved_bytes += nbytes
        return entry

    def _drain(self, keep: int) -> None:
        """Wait for all but the newest ``keep`` copies to the host and drop their device tensors."""
        while len(self._inflight) > keep:
            entry = self._inflight.pop(0)
            entry.event.synchronize()
            entry.source = entry.event = None

    # ------------------------------------------------------------------ backward: back to the device
    def _unpack(self, packed: Any) -> torch.Tensor:
        if not isinstance(packed, _Saved):
            return packed
        out = self._fetch(packed)
        self._prefetch_before(packed)
        return out

    def _fetch(self, entry: _Saved) -> torch.Tensor:
        if entry.source is not None:  # still on the device (its copy to the host may be in flight)
            return entry.source
        if entry.ready is None:
            self._start_copy_back(entry)
        out, entry.ready = entry.ready, None
        if self.cuda:
            torch.cuda.current_stream(self.device).wait_event(entry.event)
            entry.event = None
        return out

    def _start_copy_back(self, entry: _Saved) -> None:
        dev = torch.empty(entry.shape, dtype=entry.dtype, device=entry.device)
        if self.cuda:
            self.stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(self.stream):
                dev.copy_(entry.host, non_blocking=True)
                dev.record_stream(self.stream)  # not reused before the copy ends, even if never consumed
                entry.event = torch.cuda.Event()
                entry.event.record(self.stream)
        else:
            dev.copy_(entry.host)
        entry.ready = dev

    def _prefetch_before(self, entry: _Saved) -> None:
        """Start copying back the entry saved just before ``entry`` (the next one backward needs)."""
        order = [r() for r in self._order]
        try:
            i = order.index(entry)
        except ValueError:
            return
        for prev in reversed(order[:i]):
            if prev is None:
                continue
            if prev.ready is None and prev.source is None:
                self._start_copy_back(prev)
            return

    @property
    def host_bytes(self) -> int:
        """Host memory held for offloading (the arena's capacity)."""
        return self.arena.capacity_bytes
