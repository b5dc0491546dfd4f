"""Say which rank stalled when a collective times out.

Every rank records the step it is starting in the process group's key-value store (one tiny
``set`` per step). When a collective raises a timeout, the rank that saw it reads every rank's
last record and raises an error naming the ranks that are behind, instead of torch's bare
"timed out" from inside a collective.
"""

from __future__ import annotations

import contextlib
import time
from typing import Iterator

import torch.distributed as dist

_PREFIX = "flexcp/progress/"


class StallTimeout(RuntimeError):
    """A collective timed out; the message names the ranks whose progress lags."""


def _store() -> dist.Store | None:
    try:
        from torch.distributed.distributed_c10d import _get_default_store

        return _get_default_store()
    except Exception:  # no default group, or a torch without the helper: no report, plain errors
        return None


def _is_timeout(exc: BaseException) -> bool:
    text = str(exc).lower()
    return isinstance(exc, (RuntimeError, TimeoutError)) and ("timed out" in text or "timeout" in text)


class StallWatch:
    """Records this rank's step and turns collective timeouts into a report of who is behind."""

    def __init__(self, timeout_minutes: float) -> None:
        self.timeout_minutes = timeout_minutes
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.store = _store() if self.world > 1 else None

    def mark(self, step: int, phase: str) -> None:
        if self.store is not None:
            self.store.set(f"{_PREFIX}{self.rank}", f"{step}|{phase}|{time.time():.0f}")

    def progress(self) -> dict[int, tuple[int, str]]:
        """Every rank's last recorded ``(step, phase)`` that the store can give without waiting."""
        seen: dict[int, tuple[int, str]] = {}
        if self.store is None:
            return seen
        for r in range(self.world):
            key = f"{_PREFIX}{r}"
            try:
                if self.store.check([key]):
                    step, phase, _ = self.store.get(key).decode().split("|")
                    seen[r] = (int(step), phase)
            except Exception:
                continue
        return seen

    def report(self, where: str) -> str:
        seen = self.progress()
        lines = ", ".join(f"rank {r}: step {s} ({p})" for r, (s, p) in sorted(seen.items())) or "none recorded"
        missing = [r for r in range(self.world) if r not in seen]
        behind: list[int] = missing
        if seen:
            newest = max(seen.values())
            behind = sorted(missing + [r for r, sp in seen.items() if sp < newest])
        who = (f"rank(s) {behind} are behind (stalled, crashed or skipped a step)" if behind
               else "every rank recorded the same step, so one is stuck inside it")
        return (f"rank {self.rank}: a collective timed out after parallel.timeout_minutes="
                f"{self.timeout_minutes:g} during {where}; {who}. Last progress: {lines}. Check those ranks' logs; "
                f"raise parallel.timeout_minutes if the step is just slow")

    @contextlib.contextmanager
    def step(self, step: int, phase: str = "train step") -> Iterator[None]:
        """Run one step, recorded as started; a collective timeout inside becomes a :class:`StallTimeout`."""
        self.mark(step, phase)
        try:
            yield
        except Exception as exc:
            if self.world > 1 and _is_timeout(exc):
                raise StallTimeout(f"{self.report(f'step {step} ({phase})')}\n(cause: {exc})") from exc
            raise
