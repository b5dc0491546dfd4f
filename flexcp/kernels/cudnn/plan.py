"""Host-side plan of the cuDNN backend: slices -> cuDNN entries -> launches -> shape buckets.

cuDNN's ragged SDPA runs a batch of *entries*: entry ``b`` attends query rows
``[qs, qs + sq)`` to keys ``[ks, ks + sk)``, both located by ragged offsets into the THD
tensors, under one diagonal band that is the same for every entry of the graph:
TOP_LEFT alignment (row ``i'`` and key ``j'`` counted from the entry's start) keeps
``i' - L < j' <= i' + R`` for a left bound ``L`` and right bound ``R`` (absent = none).

A slice becomes entries of one *signature* ``(L, R)``:

* FULL -> ``(None, None)``;
* CAUSAL (bottom-right) -> the square causal ``(None, 0)`` on its last ``min(sq, sk)``
  rows and keys, plus, when it has fewer rows than keys, a FULL entry on the keys left of
  that square. (Measured on cuDNN 9.19: BOTTOM_RIGHT alignment with a right bound of 0 is
  exact on such rectangles, but ran 7% slower than the two entries on an 8k x 32k
  rectangle, and 30% slower than TOP_LEFT on squares; docs/benchmarks.md);
* BI_CAUSAL (``j' - i'`` in ``[0, sk - sq]``) -> ``(1, sk - sq)``;
* INV_CAUSAL (``j' >= i'``) -> ``(1, UNBOUNDED)`` (the right bound becomes the graph's key
  length, so it never binds);
* a per-document sliding window (a square CAUSAL slice followed by its BI_CAUSAL band,
  as ``mask.sliding_window`` builds it) fuses into one square entry ``(W, 0)``;
* FULL entries with one query range and touching key ranges (or one key range and
  touching query ranges) merge into one: the distributed plans cut rectangles at chunk
  boundaries, and fewer entries sharing rows means fewer launches.

Entries of one signature are packed into *launches* whose query ranges are pairwise
disjoint, so each launch writes every output row at most once; rows shared between
launches are merged by lse afterwards, and gradients are accumulated. Inside a launch
key ranges may overlap (shared keys): dK/dV then go to *private* rows, one run per
entry, added into place afterwards (``index_add``), never overwritten.

A launch runs on a graph built for its shape *bucket*: entry count and maximum lengths
rounded up (see :func:`bucket`); unused entries have length 0 and cost nothing.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ...mask.geometry import SliceTable, slice_areas
from ...mask.types import BI_CAUSAL, CAUSAL, FULL, INV_CAUSAL

UNBOUNDED = -1
"""Right bound meaning "no right bound" on a band with a left bound (INV_CAUSAL)."""

Signature = tuple  # (left_bound | None, right_bound | None | UNBOUNDED)


@dataclass(frozen=True)
class Entries:
    """cuDNN entries as parallel int64 arrays, with the signature of each."""

    qs: np.ndarray
    sq: np.ndarray
    ks: np.ndarray
    sk: np.ndarray
    sigs: list

    def __len__(self) -> int:
        return int(self.qs.shape[0])


@dataclass(frozen=True)
class Launch:
    """Entries of one signature with pairwise disjoint query rows (sorted by ``qs``).

    ``private`` is None when the key ranges are pairwise disjoint too (dK/dV rows are
    written in place); otherwise each entry's dK/dV go to ``sk`` private rows starting at
    ``private[b]``, and ``private_rows`` in all.
    """

    sig: Signature
    qs: np.ndarray
    sq: np.ndarray
    ks: np.ndarray
    sk: np.ndarray
    private: np.ndarray | None
    private_rows: int

    def __len__(self) -> int:
        return int(self.qs.shape[0])

    @property
    def row_span(self) -> tuple[int, int]:
        return int(self.qs.min()), int((self.qs + self.sq).max())

    @property
    def key_span(self) -> tuple[int, int]:
        return int(self.ks.min()), int((self.ks + self.sk).max())

    def area(self) -> int:
        """Cells this launch computes."""
        return int(_entry_areas(self.sig, self.sq, self.sk).sum())


def to_entries(table: SliceTable) -> Entries:
    """Entries covering exactly the cells of ``table``'s non-empty slices."""
    t = table.nonempty()
    qs, qe, ks, ke, ty = t.qs, t.qe, t.ks, t.ke, t.types
    fused, used = _fuse_windows(t)
    out_qs, out_sq, out_ks, out_sk, sigs = [], [], [], [], []

    def add(a, b, c, d, sig):
        keep = (b > 0) & (d > 0)
        out_qs.append(a[keep]), out_sq.append(b[keep]), out_ks.append(c[keep]), out_sk.append(d[keep])
        sigs.extend([sig(i) if callable(sig) else sig for i in np.nonzero(keep)[0]])

    free = ~used
    sq, sk = qe - qs, ke - ks
    m = free & (ty == FULL)
    add(qs[m], sq[m], ks[m], sk[m], (None, None))
    m = free & (ty == CAUSAL)
    side = np.minimum(sq[m], sk[m])
    add(qe[m] - side, side, ke[m] - side, side, (None, 0))  # the square on the diagonal
    add(qs[m], sq[m], ks[m], sk[m] - side, (None, None))  # keys left of it (sq < sk only)
    m = free & (ty == INV_CAUSAL)
    side = np.minimum(sq[m], sk[m])  # rows past sk have no keys
    add(qs[m], side, ks[m], sk[m], (1, UNBOUNDED))
    m = free & (ty == BI_CAUSAL)
    width = sk[m] - sq[m]
    add(qs[m], sq[m], ks[m], sk[m], lambda i, w=width: (1, int(w[i])))
    if len(fused[0]):
        a, e, L = fused
        add(a, e - a, a, e - a, lambda i, L=L: (int(L[i]), 0))
    cat = lambda xs: np.concatenate(xs).astype(np.int64) if xs else np.zeros(0, dtype=np.int64)  # noqa: E731
    return _merge_full(Entries(cat(out_qs), cat(out_sq), cat(out_ks), cat(out_sk), sigs))


def _merge_touching(a: np.ndarray, n: np.ndarray, c: np.ndarray, m: np.ndarray) -> tuple[np.ndarray, ...]:
    """Rectangles ``[a, a+n) x [c, c+m)``: those with equal ``(a, n)`` and touching ``[c, c+m)`` become one."""
    order = np.lexsort((c, n, a))
    a, n, c, m = a[order], n[order], c[order], m[order]
    start = np.ones(len(a), dtype=bool)
    start[1:] = (a[1:] != a[:-1]) | (n[1:] != n[:-1]) | (c[1:] != c[:-1] + m[:-1])
    group = np.cumsum(start) - 1
    end = np.zeros(int(start.sum()), dtype=np.int64)
    np.maximum.at(end, group, c + m)
    return a[start], n[start], c[start], end - c[start]


def _merge_full(e: Entries) -> Entries:
    """Merge FULL entries along keys (same rows), then along rows (same keys); cells are unchanged."""
    full = np.array([sig == (None, None) for sig in e.sigs], dtype=bool)
    if full.sum() < 2:
        return e
    qs, sq, ks, sk = (x[full] for x in (e.qs, e.sq, e.ks, e.sk))
    qs, sq, ks, sk = _merge_touching(qs, sq, ks, sk)
    ks, sk, qs, sq = _merge_touching(ks, sk, qs, sq)
    rest = ~full
    cat = lambda x, y: np.concatenate([x, y[rest]])  # noqa: E731
    sigs = [(None, None)] * len(qs) + [sig for sig, r in zip(e.sigs, rest) if r]
    return Entries(cat(qs, e.qs), cat(sq, e.sq), cat(ks, e.ks), cat(sk, e.sk), sigs)


def _fuse_windows(t: SliceTable) -> tuple[tuple[np.ndarray, np.ndarray, np.ndarray], np.ndarray]:
    """Sliding-window pairs (square CAUSAL ``[a, m)^2`` + BI_CAUSAL ``[m, e) x [a, e)``) as ``(a, e, L)``."""
    used = np.zeros(len(t), dtype=bool)
    causal = np.nonzero((t.types == CAUSAL) & (t.qs == t.ks) & (t.qe == t.ke))[0]
    by_end = {int(t.qe[i]): int(i) for i in causal}
    a, e, L = [], [], []
    for j in np.nonzero((t.types == BI_CAUSAL) & (t.ke == t.qe))[0]:
        i = by_end.get(int(t.qs[j]))
        if i is None or used[i] or t.ks[j] != t.qs[i]:
            continue
        used[i] = used[j] = True
        a.append(int(t.qs[i])), e.append(int(t.qe[j]))
        L.append(int((t.ke[j] - t.ks[j]) - (t.qe[j] - t.qs[j]) + 1))
    arr = lambda x: np.asarray(x, dtype=np.int64)  # noqa: E731
    return (arr(a), arr(e), arr(L)), used


def _entry_areas(sig: Signature, sq: np.ndarray, sk: np.ndarray) -> np.ndarray:
    """Cells per entry under ``sig``, in closed form (entries of a signature share one shape of band)."""
    left, right = sig
    if left is None:
        types = FULL if right is None else CAUSAL
    elif right == 0:  # fused window: row i keeps min(i + 1, L) keys of a square
        n, L = sq, np.int64(left)
        return np.where(n <= L, n * (n + 1) // 2, L * (L + 1) // 2 + (n - L) * L)
    else:
        types = INV_CAUSAL if right == UNBOUNDED else BI_CAUSAL
    z = np.zeros_like(sq)
    t = SliceTable(z, sq, z, sk, np.full_like(sq, types))
    return slice_areas(t)


def plan_launches(entries: Entries, tk: int) -> list[Launch]:
    """Pack entries into launches: one signature each, query rows pairwise disjoint.

    First fit in ``qs`` order. A launch whose key ranges overlap gets private dK/dV rows;
    their total is capped at ``2 * tk + 65536`` per launch (no O(S^2) buffers), beyond
    which entries open a new launch.
    """
    cap = 2 * int(tk) + 65536
    launches: list[Launch] = []
    by_sig: dict = {}
    for i, sig in enumerate(entries.sigs):
        by_sig.setdefault(sig, []).append(i)
    for sig, idx in by_sig.items():
        idx = np.asarray(idx, dtype=np.int64)
        idx = idx[np.lexsort((entries.ks[idx], entries.qs[idx]))]
        qs, qe, sk = entries.qs[idx], entries.qs[idx] + entries.sq[idx], entries.sk[idx]
        if len(idx) and np.all(qs[1:] >= np.maximum.accumulate(qe)[:-1]) and sk.sum() <= cap:
            groups = [idx]
        else:
            groups = _first_fit(idx, qs, qe, sk, cap)
        launches.extend(_launch(sig, entries, g) for g in groups)
    return launches


def _first_fit(idx, qs, qe, sk, cap) -> list[np.ndarray]:
    last_end: list[int] = []
    rows: list[int] = []
    members: list[list[int]] = []
    for n in range(len(idx)):
        for g in range(len(members)):
            if qs[n] >= last_end[g] and rows[g] + sk[n] <= cap:
                break
        else:
            g = len(members)
            members.append([]), last_end.append(0), rows.append(0)
        members[g].append(int(idx[n]))
        last_end[g] = int(qe[n])
        rows[g] += int(sk[n])
    return [np.asarray(m, dtype=np.int64) for m in members]


def _launch(sig: Signature, e: Entries, idx: np.ndarray) -> Launch:
    qs, sq, ks, sk = e.qs[idx], e.sq[idx], e.ks[idx], e.sk[idx]
    order = np.argsort(ks, kind="stable")
    disjoint = bool(np.all(ks[order][1:] >= np.maximum.accumulate(ks[order] + sk[order])[:-1]))
    if disjoint:
        return Launch(sig, qs, sq, ks, sk, None, 0)
    private = np.cumsum(sk) - sk
    return Launch(sig, qs, sq, ks, sk, private.astype(np.int64), int(sk.sum()))


def bucket(n: int, floor: int = 1) -> int:
    """Round ``n`` up to the next of ``floor * {1, 2, 4, ...}`` (graphs are built per bucket)."""
    b = max(int(floor), 1)
    while b < n:
        b *= 2
    return b


LEN_FLOOR = 128
"""Smallest bucketed max length: short entries share one graph."""


def launch_bucket(launch: Launch) -> tuple[int, int, int]:
    """``(entries, max q rows, max keys)`` of the graph this launch runs on."""
    return bucket(len(launch)), bucket(int(launch.sq.max()), LEN_FLOOR), bucket(int(launch.sk.max()), LEN_FLOOR)


def launch_rows_overlap(launches: list[Launch], tq: int) -> list[bool]:
    """Per launch: whether another launch writes one of its rows (then it is merged by lse)."""
    cover = np.zeros(tq + 1, dtype=np.int64)
    for la in launches:
        np.add.at(cover, la.qs, 1)
        np.add.at(cover, la.qs + la.sq, -1)
    depth = np.cumsum(cover)[:tq]
    out = []
    for la in launches:
        shared = False
        for a, n in zip(la.qs.tolist(), la.sq.tolist()):
            if n and depth[a : a + n].max() > 1:
                shared = True
                break
        out.append(shared)
    return out


def row_depth(launches: list[Launch], n: int, keys: bool = False) -> np.ndarray:
    """Per row of ``n`` (query rows, or key rows with ``keys=True``): how many entries touch it."""
    mark = np.zeros(n + 1, dtype=np.int64)
    for la in launches:
        s, c = (la.ks, la.sk) if keys else (la.qs, la.sq)
        np.add.at(mark, s, 1)
        np.add.at(mark, s + c, -1)
    return np.cumsum(mark)[:n]


def covered_rows(launches: list[Launch], n: int, keys: bool = False) -> int:
    """How many of ``n`` rows (query rows, or key rows with ``keys=True``) some launch touches."""
    return int((row_depth(launches, n, keys) > 0).sum())
