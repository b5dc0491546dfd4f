"""Vectorized geometry of slice masks: the one place that knows what a slice covers.

Every slice is a rectangle ``[qs, qe) x [ks, ke)`` cut by at most two diagonals:
row ``i`` keeps keys ``j`` with ``lo <= j - i <= hi`` (``lo``/``hi`` are +-BIG when
the type has no such bound). So a row's keys in one slice are one interval,
``[max(ks, i + lo), min(ke, i + hi + 1))``, and areas, overlaps and clipping
have closed forms that need no per-token loops.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from functools import cached_property

import numpy as np

from .types import BI_CAUSAL, CAUSAL, FULL, INV_CAUSAL

BIG = np.int64(1) << np.int64(40)
"""Stands for an absent diagonal bound; far beyond any sequence length."""


@dataclass(frozen=True, eq=False)
class SliceTable:
    """Slices as parallel int64 arrays (``types`` holds AttnMaskType codes)."""

    qs: np.ndarray
    qe: np.ndarray
    ks: np.ndarray
    ke: np.ndarray
    types: np.ndarray

    @staticmethod
    def from_arrays(q_ranges, k_ranges, types) -> "SliceTable":
        q = np.asarray(q_ranges, dtype=np.int64).reshape(-1, 2)
        k = np.asarray(k_ranges, dtype=np.int64).reshape(-1, 2)
        t = np.asarray(types, dtype=np.int64).reshape(-1)
        return SliceTable(q[:, 0].copy(), q[:, 1].copy(), k[:, 0].copy(), k[:, 1].copy(), t)

    def __len__(self) -> int:
        return int(self.qs.shape[0])

    @cached_property
    def digest(self) -> str:
        """A digest of the contents (equal tables, equal digests); computed once, as tables are never mutated.

        It keys the kernels' schedule cache, which every attention call (and CP stage) consults."""
        h = hashlib.blake2b(digest_size=16)
        for arr in (self.qs, self.qe, self.ks, self.ke, self.types):
            h.update(np.ascontiguousarray(arr, dtype=np.int64).tobytes())
            h.update(b"|")
        return h.hexdigest()

    @property
    def lo(self) -> np.ndarray:
        """Lower diagonal bound of ``j - i`` per slice (INV_CAUSAL and BI_CAUSAL)."""
        has = (self.types == INV_CAUSAL) | (self.types == BI_CAUSAL)
        return np.where(has, self.ks - self.qs, -BIG)

    @property
    def hi(self) -> np.ndarray:
        """Upper diagonal bound of ``j - i`` per slice (CAUSAL and BI_CAUSAL)."""
        has = (self.types == CAUSAL) | (self.types == BI_CAUSAL)
        return np.where(has, self.ke - self.qe, BIG)

    def take(self, idx: np.ndarray) -> "SliceTable":
        return SliceTable(self.qs[idx], self.qe[idx], self.ks[idx], self.ke[idx], self.types[idx])

    def shifted(self, dq: int, dk: int) -> "SliceTable":
        """The same slices with q coordinates moved by ``dq`` and k by ``dk``."""
        return SliceTable(self.qs + dq, self.qe + dq, self.ks + dk, self.ke + dk, self.types)

    def nonempty(self) -> "SliceTable":
        """Drop slices that cover no cell."""
        return self.take(np.nonzero(slice_areas(self) > 0)[0])

    @staticmethod
    def concat(tables: "list[SliceTable]") -> "SliceTable":
        if not tables:
            return SliceTable.from_arrays(np.zeros((0, 2)), np.zeros((0, 2)), np.zeros(0))
        return SliceTable(*(np.concatenate([getattr(t, f) for t in tables]) for f in ("qs", "qe", "ks", "ke", "types")))


def _row_len_params(table: SliceTable) -> tuple[np.ndarray, np.ndarray]:
    """Row ``t`` (counted from ``qs``) of a slice keeps ``max(0, c + b * t)`` keys."""
    sq = table.qe - table.qs
    sk = table.ke - table.ks
    t = table.types
    c = np.where((t == CAUSAL) | (t == BI_CAUSAL), 1 + sk - sq, sk)
    b = np.where(t == CAUSAL, 1, np.where(t == INV_CAUSAL, -1, 0))
    return c, b


def _sum_clamped_linear(c: np.ndarray, b: np.ndarray, n: np.ndarray) -> np.ndarray:
    """``sum_{t=0}^{n-1} max(0, c + b*t)`` for ``b`` in {-1, 0, 1}, elementwise."""
    n = np.maximum(n, 0)
    flat = n * np.maximum(c, 0)
    t0 = np.clip(1 - c, 0, n)  # b = +1: positive from t0 on
    up = (n - t0) * c + (t0 + n - 1) * (n - t0) // 2
    t1 = np.clip(c, 0, n)  # b = -1: positive before t1
    down = t1 * c - t1 * (t1 - 1) // 2
    return np.where(b == 0, flat, np.where(b > 0, up, down))


def slice_areas(table: SliceTable) -> np.ndarray:
    """Exact number of cells each slice covers."""
    c, b = _row_len_params(table)
    return _sum_clamped_linear(c, b, table.qe - table.qs)


def slice_rows_area(table: SliceTable, idx: np.ndarray, r0: np.ndarray, r1: np.ndarray) -> np.ndarray:
    """Cells of slice ``idx[p]`` inside rows ``[r0[p], r1[p])``, for every pair ``p``."""
    qs, qe = table.qs[idx], table.qe[idx]
    c, b = _row_len_params(table.take(idx))
    a = np.clip(r0, qs, qe) - qs
    e = np.clip(r1, qs, qe) - qs
    # rows [a, e) of the slice: shift the linear form to start at a
    return _sum_clamped_linear(c + b * a, b, e - a)


def block_areas(table: SliceTable, bounds: np.ndarray) -> np.ndarray:
    """Cells in each row block ``[bounds[m], bounds[m+1])``; blocks ascending and contiguous."""
    bounds = np.asarray(bounds, dtype=np.int64)
    nblk = len(bounds) - 1
    out = np.zeros(max(nblk, 0), dtype=np.int64)
    if nblk <= 0 or len(table) == 0:
        return out
    first = np.searchsorted(bounds, table.qs, side="right") - 1
    last = np.searchsorted(bounds, table.qe, side="left") - 1
    first = np.clip(first, 0, nblk - 1)
    last = np.clip(last, 0, nblk - 1)
    counts = np.maximum(last - first + 1, 0)
    sl = np.repeat(np.arange(len(table)), counts)
    starts = np.repeat(first, counts)
    offs = np.arange(counts.sum()) - np.repeat(np.cumsum(counts) - counts, counts)
    blk = starts + offs
    areas = slice_rows_area(table, sl, bounds[blk], bounds[blk + 1])
    np.add.at(out, blk, areas)
    return out


def row_key_counts(table: SliceTable, num_rows: int) -> np.ndarray:
    """Number of keys each row attends to (the union over its slices; cells never overlap)."""
    return block_areas(table, np.arange(num_rows + 1, dtype=np.int64))


def clip_band(q0, q1, k0, k1, lo, hi) -> tuple[SliceTable, np.ndarray]:
    """Express bands ``{(i, j): q0<=i<q1, k0<=j<k1, lo <= j-i <= hi}`` as typed slices.

    Arguments are equal-length integer arrays, one band per element (use +-BIG for an
    absent bound). Rows are cut where a diagonal bound starts or stops binding, so each
    band becomes at most 3 non-empty pieces (1 when it is already a typed slice), each exactly FULL, CAUSAL (bottom-right),
    INV_CAUSAL (top-left) or BI_CAUSAL. Returns the pieces (ordered by band, then row)
    and the band index of each piece. This is how masks are restricted to chunks,
    windows and receive buffers.
    """
    q0, q1, k0, k1, lo, hi = (np.asarray(x, dtype=np.int64).reshape(-1) for x in (q0, q1, k0, k1, lo, hi))
    r0 = np.maximum(q0, k0 - hi)
    r1 = np.maximum(r0, np.minimum(q1, k1 - lo))
    r1 = np.where((k0 < k1) & (lo <= hi), r1, r0)  # empty key range or crossed diagonals: no rows
    # A row whose diagonal bound lands exactly on the rectangle's edge may join either side;
    # it joins the diagonal piece, so a whole causal square stays one CAUSAL slice.
    lower_from = k0 - lo  # rows >= this start at i + lo (>= k0)
    upper_until = k1 - hi  # rows < this end at i + hi (<= k1 - 1)
    c1 = np.clip(np.minimum(lower_from, upper_until), r0, r1)
    c2 = np.clip(np.maximum(lower_from, upper_until), c1, r1)
    band = np.tile(np.arange(len(q0)), 3)
    a = np.concatenate([r0, c1, c2])
    b = np.concatenate([c1, c2, r1])
    keep = a < b
    band, a, b = band[keep], a[keep], b[keep]
    order = np.lexsort((a, band))
    band, a, b = band[order], a[order], b[order]
    lower = a >= lower_from[band]
    upper = a < upper_until[band]
    ks = np.where(lower, a + lo[band], k0[band])
    ke = np.where(upper, b + hi[band], k1[band])
    types = np.where(lower & upper, BI_CAUSAL, np.where(lower, INV_CAUSAL, np.where(upper, CAUSAL, FULL)))
    return SliceTable(a, b, ks, ke, types), band


def clip_slices(table: SliceTable, q0: int, q1: int, k0: int, k1: int) -> tuple[SliceTable, np.ndarray]:
    """Restrict every slice to the rectangle ``[q0, q1) x [k0, k1)``; pieces and their source slice."""
    return clip_band(
        np.maximum(table.qs, q0),
        np.minimum(table.qe, q1),
        np.maximum(table.ks, k0),
        np.minimum(table.ke, k1),
        table.lo,
        table.hi,
    )


def find_overlap(table: SliceTable, max_pairs_per_batch: int = 1 << 22) -> tuple[int, int] | None:
    """Return a pair of slice indices that cover a common cell, or None.

    Candidate pairs are those whose row (or key) ranges intersect (:func:`candidate_pairs`);
    each is tested exactly: on shared rows the overlap width ``min(upper) - max(lower)`` is a
    concave piecewise-linear function of the row, so its maximum sits at a range end
    or a breakpoint. 10,000 slices take milliseconds for typical masks.
    """
    lo, hi = table.lo, table.hi
    for a, b in candidate_pairs(table, max_pairs_per_batch):
        hit = _pairs_overlap(table, lo, hi, a, b)
        if hit.any():
            k = int(np.argmax(hit))
            return int(min(a[k], b[k])), int(max(a[k], b[k]))
    return None


def candidate_pairs(table: SliceTable, max_pairs_per_batch: int = 1 << 22):
    """Batches ``(a, b)`` of index pairs of non-empty slices whose row ranges (or key ranges,
    whichever axis yields fewer pairs) intersect: every pair sharing a cell is among them.

    A sorted sweep along the axis; each batch holds at most about ``max_pairs_per_batch`` pairs.
    """
    live = np.nonzero(slice_areas(table) > 0)[0]
    if len(live) < 2:
        return
    best = None
    for start_arr, end_arr in ((table.qs, table.qe), (table.ks, table.ke)):
        order = live[np.argsort(start_arr[live], kind="stable")]
        ends = np.searchsorted(start_arr[order], end_arr[order], side="left")
        counts = np.maximum(ends - np.arange(len(order)) - 1, 0)
        if best is None or counts.sum() < best[1].sum():
            best = (order, counts)
    order, counts = best
    cum = np.cumsum(counts)
    start = 0
    while start < len(order):
        # take a run of slices whose candidate pairs fit one batch
        stop = int(np.searchsorted(cum, (cum[start - 1] if start else 0) + max_pairs_per_batch, side="right"))
        stop = max(stop, start + 1)
        c = counts[start:stop]
        i_pos = np.repeat(np.arange(start, stop), c)
        j_pos = i_pos + 1 + (np.arange(c.sum()) - np.repeat(np.cumsum(c) - c, c))
        yield order[i_pos], order[j_pos]
        start = stop


def _pairs_overlap(table: SliceTable, lo: np.ndarray, hi: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    r0 = np.maximum(table.qs[a], table.qs[b])
    r1 = np.minimum(table.qe[a], table.qe[b])
    kmin = np.maximum(table.ks[a], table.ks[b])
    kmax = np.minimum(table.ke[a], table.ke[b])
    dlo = np.maximum(lo[a], lo[b])
    dhi = np.minimum(hi[a], hi[b]) + 1
    ok = (r0 < r1) & (kmin < kmax)
    best = np.full(len(a), -1, dtype=np.int64)
    last = np.maximum(r1 - 1, r0)
    for cand in (r0, last, kmax - dhi, kmin - dlo):
        i = np.clip(cand, r0, last)
        width = np.minimum(kmax, i + dhi) - np.maximum(kmin, i + dlo)
        best = np.maximum(best, width)
    return ok & (best > 0)
