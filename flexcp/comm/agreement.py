"""Rank agreement: every rank of a group proves it passes the same settings before a sized transfer.

A collective whose byte counts differ between ranks (another key, dtype or trailing shape on one
rank) aborts gloo's process (SIGABRT) and hangs or corrupts NCCL; a setting that changes no size
(``softcap``, ``softmax_scale``) gives silently different results. :func:`agree` exchanges one
64-bit fingerprint of a call's settings per rank (8 bytes each, one small all-gather of a fixed
size, so it cannot itself mismatch) ahead of the call's first sized exchange. Only when the
fingerprints differ are the settings themselves gathered, and every rank raises
:class:`RankDisagreement` naming each setting that differs and what each rank passed.

On NCCL the fingerprints travel on a side stream, so reading them waits for nothing queued
on the compute stream after the group's previous collective. ``FLEXCP_CHECK=0`` turns the
per-call check off (for a measured cost that matters more than the clear error);
``FLEXCP_CHECK=1`` also forces ``build_key``'s check (``check=False``).
"""

from __future__ import annotations

import hashlib
import os
from typing import Mapping

import torch
import torch.distributed as dist

from ..sharding.collectives import all_gather_single

FINGERPRINT_BYTES = 8
"""Bytes each rank contributes per checked call."""

CHECK_ENV = "FLEXCP_CHECK"
"""Unset: every call is checked. ``0``/``off``: no per-call check. ``1``/``on``: also ``build_key(check=False)``."""


def check_setting() -> bool | None:
    """``FLEXCP_CHECK`` read: None when unset (the default: per-call checks on), else whether it is on."""
    raw = os.environ.get(CHECK_ENV, "").strip().lower()
    if raw == "":
        return None
    return raw not in ("0", "false", "no", "off")


class RankDisagreement(ValueError):
    """The ranks of a group passed different settings to one collective call; the message says which differ."""


def fingerprint(fields: Mapping[str, object]) -> int:
    """63-bit digest of ``fields`` (names and ``repr`` of values; order-independent)."""
    text = repr(sorted((k, repr(v)) for k, v in fields.items()))
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=FINGERPRINT_BYTES).digest(), "little") >> 1


def agree(op: str, fields: Mapping[str, object], group: dist.ProcessGroup | None, fix: str) -> None:
    """Return when every rank of ``group`` passed equal ``fields``; else raise on every rank.

    Collective over ``group`` (a group of one, or ``None``, is a no-op). ``op`` names the call and
    ``fix`` says what every rank must pass alike; both go into the error.
    """
    if group is None or not dist.is_initialized() or dist.get_world_size(group) == 1 or check_setting() is False:
        return
    values = _gather_fingerprint(fingerprint(fields), group)
    if len(set(values)) == 1:
        return
    described: list[object] = [None] * len(values)
    dist.all_gather_object(described, {k: repr(v) for k, v in fields.items()}, group=group)
    raise RankDisagreement(describe_disagreement(op, described, fix))


def describe_disagreement(op: str, described: list, fix: str) -> str:
    """The error text: each differing setting with every rank's value, then the fix."""
    names = sorted({name for d in described for name in d})
    differ = [n for n in names if len({d.get(n) for d in described}) > 1]
    lines = "; ".join(f"{n}: " + ", ".join(f"rank {r} {d.get(n, '<absent>')}" for r, d in enumerate(described))
                      for n in differ)
    return f"{op}: the ranks of the group disagree about {', '.join(differ)} ({lines}); {fix}"


def _gather_fingerprint(value: int, group: dist.ProcessGroup) -> list[int]:
    """All-gather one int64 per rank (on NCCL through a side stream, waiting only for itself)."""
    world = dist.get_world_size(group)
    if dist.get_backend(group) != "nccl":
        mine = torch.tensor([value], dtype=torch.int64)
        out = torch.empty(world, dtype=torch.int64)
        dist.all_gather(list(out.split(1)), mine, group=group)
        return out.tolist()
    device = torch.device("cuda", torch.cuda.current_device())
    stream = _side_stream(device)
    with torch.cuda.stream(stream):
        mine = torch.tensor([value], dtype=torch.int64).to(device, non_blocking=False)
        out = torch.empty(world, dtype=torch.int64, device=device)
        all_gather_single(out, mine, group=group)
        host = out.to("cpu")
    return host.tolist()


_STREAMS: dict[torch.device, "torch.cuda.Stream"] = {}


def _side_stream(device: torch.device) -> "torch.cuda.Stream":
    if device not in _STREAMS:
        _STREAMS[device] = torch.cuda.Stream(device)
    return _STREAMS[device]
