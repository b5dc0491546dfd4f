"""Tile schedule from slice geometry: which (q tile, k tile) pairs hold work, and from which slices.

Used by the pure-PyTorch backend: only tiles that meet a slice are visited, and a tile
lying wholly inside one slice's band needs no mask at all.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..mask.geometry import SliceTable


@dataclass(frozen=True)
class TilePair:
    """One (q tile, k tile) with work: rows ``[r0, r1)``, keys ``[c0, c1)``.

    ``bands`` is ``[n, 6]`` int64 ``(qs, qe, ks, ke, lo, hi)`` of the slices meeting the
    tile, or None when one slice covers every cell of the tile (no masking needed).
    """

    r0: int
    r1: int
    c0: int
    c1: int
    bands: np.ndarray | None


@dataclass(frozen=True)
class TileSchedule:
    """Tile pairs grouped by q tile, in ascending (q tile, k tile) order."""

    tq: int
    tk: int
    block_q: int
    block_k: int
    rows: tuple[tuple[TilePair, ...], ...]  # one entry per q tile that has work


def build_tile_schedule(table: SliceTable, tq: int, tk: int, block_q: int, block_k: int) -> TileSchedule:
    """Enumerate the tiles each slice touches (vectorized) and group them by tile."""
    lo_all, hi_all = table.lo, table.hi
    live = np.nonzero((table.qe > table.qs) & (table.ke > table.ks))[0]
    qs, qe, ks, ke = table.qs[live], table.qe[live], table.ks[live], table.ke[live]
    lo, hi = lo_all[live], hi_all[live]
    # (slice, q tile) pairs
    qt0, qt1 = qs // block_q, (qe - 1) // block_q
    n_qt = np.maximum(qt1 - qt0 + 1, 0)
    s1 = np.repeat(np.arange(len(live)), n_qt)
    qt = np.repeat(qt0, n_qt) + _ramp(n_qt)
    r0 = np.maximum(qs[s1], qt * block_q)
    r1 = np.minimum(qe[s1], (qt + 1) * block_q)
    kmin = np.maximum(ks[s1], r0 + lo[s1])
    kmax = np.minimum(ke[s1], r1 - 1 + hi[s1] + 1)
    ok = kmin < kmax
    s1, qt, r0, r1, kmin, kmax = s1[ok], qt[ok], r0[ok], r1[ok], kmin[ok], kmax[ok]
    # (slice, q tile, k tile) triples
    kt0, kt1 = kmin // block_k, (kmax - 1) // block_k
    n_kt = kt1 - kt0 + 1
    s2 = np.repeat(s1, n_kt)
    qt2 = np.repeat(qt, n_kt)
    kt2 = np.repeat(kt0, n_kt) + _ramp(n_kt)
    order = np.lexsort((s2, kt2, qt2))
    s2, qt2, kt2 = s2[order], qt2[order], kt2[order]
    bands = np.stack([qs, qe, ks, ke, lo, hi], axis=1)[s2]
    rows: list[tuple[TilePair, ...]] = []
    if len(s2):
        key = qt2 * (tk // block_k + 2) + kt2
        cuts = np.nonzero(np.diff(key))[0] + 1
        starts = np.concatenate([[0], cuts])
        stops = np.concatenate([cuts, [len(s2)]])
        current: list[TilePair] = []
        for a, b in zip(starts.tolist(), stops.tolist()):
            q_tile, k_tile = int(qt2[a]), int(kt2[a])
            pair = _tile_pair(q_tile, k_tile, bands[a:b], tq, tk, block_q, block_k)
            if current and current[-1].r0 != pair.r0:
                rows.append(tuple(current))
                current = []
            current.append(pair)
        rows.append(tuple(current))
    return TileSchedule(tq, tk, block_q, block_k, tuple(rows))


def _ramp(counts: np.ndarray) -> np.ndarray:
    """``[0..c0-1, 0..c1-1, ...]`` for the given counts."""
    return np.arange(counts.sum()) - np.repeat(np.cumsum(counts) - counts, counts)


def _tile_pair(q_tile: int, k_tile: int, bands: np.ndarray, tq: int, tk: int, bq: int, bk: int) -> TilePair:
    r0, r1 = q_tile * bq, min(tq, (q_tile + 1) * bq)
    c0, c1 = k_tile * bk, min(tk, (k_tile + 1) * bk)
    if len(bands) == 1:
        qs, qe, ks, ke, lo, hi = bands[0].tolist()
        if qs <= r0 and r1 <= qe and ks <= c0 and c1 <= ke and c0 - (r1 - 1) >= lo and (c1 - 1) - r0 <= hi:
            return TilePair(r0, r1, c0, c1, None)
    return TilePair(r0, r1, c0, c1, bands)
