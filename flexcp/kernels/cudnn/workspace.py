"""cuDNN's backward workspace: sized by tokens where that is known to be right, its size, its safe limit.

cuDNN's SDPA backward keeps float32 accumulators in its workspace: dQ (and, with GQA, dK/dV
at full query-head count) plus one float per query row and head. By default they are sized
by the graph's *padded* shape, entries x maximum length (bucketed), which is quadratic in
the worst case: 49 GiB for a 256k pack with one 200k document (16 heads, d128), and
cuDNN 9.19 then computes a silently wrong dQ (rel. error 0.83 vs Triton; dK/dV right),
likely a 32-bit index overflowing. ``sdpa_backward(max_total_seq_len_q=, max_total_seq_len_kv=)``
(frontend >= 1.8, cuDNN >= 9.6, ragged layout) sizes them by the rows the ragged offsets
address instead: 2.4 GiB there, same time, right gradients (measured on one H200,
cuDNN 9.19, docs/benchmarks.md).

Everything here is host-side arithmetic on version numbers and shapes (no cuDNN needed):

* :func:`padded_reason` -- the version policy: None when the backward may size its
  workspace by tokens, else why not (then it runs padded, within :data:`INDEX_LIMIT`);
* :func:`token_bucket` -- the totals the graphs are built for (part of the graph key);
* :func:`backward_workspace` -- the workspace model, exact on the measured packs;
* :func:`too_large` -- whether a backward graph's accumulator exceeds :data:`INDEX_LIMIT`.
"""

from __future__ import annotations

from dataclasses import dataclass

MIN_BACKEND = 90600
"""cuDNN below 9.6 ignores ``max_total_seq_len_*`` (the frontend drops it with a log line)."""

MIN_FRONTEND = (1, 8)
"""Frontends below 1.8 have no ``max_total_seq_len_*`` argument."""

KNOWN_BAD = ((92200, 92700),)
"""``[first, end)`` cuDNN backend versions reported to give all-zero gradients, with no error,
when ``max_total_seq_len_*`` is set (with head-major stats; flexcp's stats are token-major,
untested there, so the attribute is not used on these versions at all)."""

INDEX_LIMIT = 2**31
"""Largest float32 accumulator (elements) a backward graph may have.

Measured on cuDNN 9.19 (16 heads, d128): padded dQ accumulators of 2.2e9 and 3.3e9 elements
gave right gradients, 1.3e10 a wrong dQ; sized by tokens, 5.4e8 were right (the largest
tried). 2**31 is where a signed 32-bit element index overflows, below every failure seen;
a launch over it runs on the fallback (Triton) instead.
"""

TOKEN_STEPS = 4
"""Token buckets per octave (from 512 rows on): totals are rounded up to ``{4, 5, 6, 7} * 2**k``."""


@dataclass(frozen=True)
class Versions:
    """What the workspace policy depends on: cuDNN's backend version (e.g. 91900),
    the frontend's ``(major, minor)``, and the GPU's compute capability major."""

    backend: int
    frontend: tuple[int, int]
    sm_major: int


def parse_frontend(version: str) -> tuple[int, int]:
    """``"1.32.0"`` -> ``(1, 32)``; an unparsable version reads as ``(0, 0)`` (too old)."""
    parts = version.split(".")
    try:
        return int(parts[0]), int(parts[1])
    except (IndexError, ValueError):
        return 0, 0


def padded_reason(v: Versions, head_dim: int) -> str | None:
    """None when the backward may pass ``max_total_seq_len_*``, else why it runs padded.

    The frontend itself drops the attribute (log line only) for head dims not a multiple of
    16 and on SM 8.x / 12.x ("ampere style kernels have a known functional issue"), so those
    are padded too: the key must describe the graph that is really built.
    """
    if v.frontend < MIN_FRONTEND:
        return f"cuDNN frontend {v.frontend[0]}.{v.frontend[1]} has no max_total_seq_len (needs >= 1.8)"
    if v.backend < MIN_BACKEND:
        return f"cuDNN {_dotted(v.backend)} ignores max_total_seq_len (needs >= 9.6)"
    for first, end in KNOWN_BAD:
        if first <= v.backend < end:
            return (f"cuDNN {_dotted(v.backend)} is reported to give all-zero gradients with max_total_seq_len "
                    f"(bad: {_dotted(first)} up to, not including, {_dotted(end)}); use cuDNN 9.6-9.21 or >= {_dotted(end)}")
    if head_dim % 16:
        return f"head_dim {head_dim} is not a multiple of 16 (the frontend drops max_total_seq_len)"
    if v.sm_major in (8, 12):
        return f"SM {v.sm_major}.x (the frontend drops max_total_seq_len there)"
    return None


def _dotted(backend: int) -> str:
    return f"{backend // 10000}.{backend // 100 % 100}.{backend % 100}"


def token_bucket(n: int, floor: int = 128) -> int:
    """``n`` rounded up to a multiple of 64 and to ``{4, 5, 6, 7} * 2**k`` from 512 on (never below
    ``n`` or ``floor``): the totals a backward graph is built for, so launches of similar extent
    share graphs, with at most 25% spare workspace from 512 rows on (a power-of-two bucket would
    waste up to 50%). Multiples of 64 as the frontend's own THD helper rounds."""
    n = max(int(n), int(floor))
    step = 64
    while step * 2 * TOKEN_STEPS <= n:
        step *= 2
    return -(-n // step) * step


@dataclass(frozen=True)
class Shape:
    """A backward graph's shape as the workspace sees it; ``total_q = total_k = 0`` means padded."""

    batch: int
    max_q: int
    max_k: int
    hq: int
    hkv: int
    head_dim: int
    total_q: int = 0
    total_k: int = 0


def accumulator_elements(s: Shape) -> int:
    """Elements of the largest float32 accumulator cuDNN indexes (dQ, or dK/dV at full heads)."""
    if s.total_q:
        return s.hq * s.head_dim * max(s.total_q, s.total_k if s.hq != s.hkv else 0)
    return s.batch * s.hq * max(s.max_q, s.max_k if s.hq != s.hkv else 0) * s.head_dim


def too_large(s: Shape) -> bool:
    """Whether the graph's accumulator exceeds :data:`INDEX_LIMIT` (then it runs on the fallback)."""
    return accumulator_elements(s) > INDEX_LIMIT


def backward_workspace(s: Shape, io_bytes: int = 2) -> int:
    """Predicted workspace bytes of one backward graph (the frontend's own sizing rules).

    Sized by tokens: ``4 * hq * (d + 1) * total_q`` (float32 dQ accumulator and one float per
    row and head) ``+ 8 * hq * d * total_k`` with GQA (dK and dV at full heads).
    Padded: ``4 * b * hq * (d + 1) * max_q + 2 * io_bytes * b * hq * d * max_k`` with GQA.
    Fit (one H200, cuDNN 9.19, 16 heads, d128, the four packs of docs/benchmarks.md): the padded
    MHA term matches 1.076 / 3.806 / 12.30 / 49.21 GiB to 0.1%; by tokens the dQ term plus the
    scout's padded ``4 * b * hq * max_len`` stats term matches 0.258 / 0.530 / 1.095 / 2.381 GiB
    to 0.1% (flexcp's stats are ragged, so the frontend sizes that term by tokens too). The
    padded GQA term matches the 257 GiB allocation that failed on the 256k pack (32:8 heads)
    and 32.1 of the 33.4 GiB extra measured on the 64k pack.
    The engine's own few MiB are not modelled (below 0.5% of every measured size).
    """
    h, d = s.hq, s.head_dim
    gqa = s.hq != s.hkv
    if s.total_q:
        return 4 * h * (d + 1) * s.total_q + (8 * h * d * s.total_k if gqa else 0)
    return 4 * s.batch * h * (d + 1) * s.max_q + (2 * io_bytes * s.batch * h * d * s.max_k if gqa else 0)
