"""Host-side work lists for the Triton kernels, computed from the slices' geometry.

A kernel program owns a block of rows on one axis (query rows for the forward and dQ,
key rows for dK/dV) and walks tiles along the other axis. The owned axis is cut at every
slice boundary into *segments*, and each segment into blocks of ``block`` rows that start
at the segment start: every slice then covers all rows of a block or none of them, so
no row ever needs a slice lookup. For each (block, slice) pair the columns the block
meets form one interval (row ``r`` keeps ``lo <= c - r <= hi``); it is cut into

* one *full run*: whole ``tile``-wide tiles where every (row, column) is inside the
  slice, so the kernel skips masking there, and
* at most two *masked runs* along the diagonal edges, where the kernel compares an
  iota against the run's ``[c0, c1)`` and ``lo``/``hi``; every tile of a masked run
  holds at least one kept cell, so fully masked tiles are never visited.

Several slices may meet one block (overlapping row ranges): the kernel iterates all
runs of the block, so its online softmax merges them and writes each row once.
The dK/dV lists are the same construction on the transposed table
(rows = keys, ``lo, hi -> -hi, -lo``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ...mask.geometry import SliceTable, slice_areas

BOUND_CLIP = 1 << 30
"""Absent diagonal bounds (+-BIG) are clipped to this so they fit int32 in the kernels."""

BLOCK_FIELDS = 6
"""Columns of ``Schedule.blocks``: row0, row1, first/last+1 full run, first/last+1 masked run."""


@dataclass(frozen=True)
class Schedule:
    """Work lists of one kernel launch, as int32 numpy arrays (CSR by block).

    ``blocks[b] = (row0, row1, f0, f1, m0, m1)``: rows ``[row0, row1)``, full runs
    ``full[f0:f1]`` (``(c0, c1)``, ``c1 - c0`` a multiple of the tile) and masked runs
    ``masked[m0:m1]`` (``(c0, c1, lo, hi)``). ``order`` lists blocks heaviest first
    (longest-processing-time order for the grid). Every row of ``[0, n_rows)`` is in
    exactly one block, so kernels write every output row (zeros where nothing is met).
    """

    blocks: np.ndarray
    full: np.ndarray
    masked: np.ndarray
    order: np.ndarray
    block: int
    tile: int

    @property
    def num_blocks(self) -> int:
        return int(self.blocks.shape[0])

    def tile_counts(self) -> tuple[int, int]:
        """Number of (full, masked) tiles one head visits."""
        full = int(((self.full[:, 1] - self.full[:, 0]) // self.tile).sum())
        masked = int((-(-(self.masked[:, 1] - self.masked[:, 0]) // self.tile)).sum())
        return full, masked


def _expand(starts: np.ndarray, counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For each ``n`` the values ``starts[n] + 0 .. counts[n]-1``; returns (owner n, value)."""
    counts = np.maximum(counts, 0)
    owner = np.repeat(np.arange(len(counts)), counts)
    offs = np.arange(int(counts.sum())) - np.repeat(np.cumsum(counts) - counts, counts)
    return owner, starts[owner] + offs


def _csr(owner: np.ndarray, rows: np.ndarray, n_owners: int) -> tuple[np.ndarray, np.ndarray]:
    """Rows sorted by owner (stable) and the ``[n_owners + 1]`` offsets into them."""
    order = np.argsort(owner, kind="stable")
    ptr = np.zeros(n_owners + 1, dtype=np.int64)
    np.cumsum(np.bincount(owner, minlength=n_owners), out=ptr[1:])
    return rows[order], ptr


def build_schedule(
    rs: np.ndarray,
    re: np.ndarray,
    cs: np.ndarray,
    ce: np.ndarray,
    lo: np.ndarray,
    hi: np.ndarray,
    n_rows: int,
    block: int,
    tile: int,
) -> Schedule:
    """Work lists for slices ``[rs, re) x [cs, ce)`` keeping ``lo <= c - r <= hi`` (slices non-empty)."""
    if block <= 0 or tile <= 0:
        raise ValueError(f"block={block} and tile={tile} must be positive")
    bounds = np.unique(np.concatenate([[0, n_rows], rs, re]).astype(np.int64))
    seg_start, seg_end = bounds[:-1], bounds[1:]
    seg_nblk = -(-(seg_end - seg_start) // block)
    seg_blk0 = np.cumsum(seg_nblk) - seg_nblk
    blk_seg, blk_local = _expand(np.zeros(len(seg_nblk), dtype=np.int64), seg_nblk)
    row0 = seg_start[blk_seg] + blk_local * block
    row1 = np.minimum(row0 + block, seg_end[blk_seg])
    n_blk = len(row0)

    # (slice, block) pairs: a slice covers segments [sa, sb) entirely.
    sa = np.searchsorted(bounds, rs)
    sb = np.searchsorted(bounds, re)
    sl, seg = _expand(sa, sb - sa)
    pair_of, blk = _expand(seg_blk0[seg], seg_nblk[seg])
    sl = sl[pair_of]
    r0, r1 = row0[blk], row1[blk]
    c_s, c_e, d_lo, d_hi = cs[sl], ce[sl], lo[sl], hi[sl]

    c_a = np.maximum(c_s, r0 + d_lo)  # first column any row meets
    c_d = np.minimum(c_e, r1 + d_hi)  # one past the last
    c_b = np.maximum(c_s, r1 - 1 + d_lo)  # columns [c_b, c_c) are met by every row
    c_c = np.minimum(c_e, r0 + d_hi + 1)
    n_full = np.where(c_b < c_c, (c_c - c_b) // tile, 0)
    full_s = np.where(n_full > 0, c_b, c_d)
    full_e = np.where(n_full > 0, c_b + n_full * tile, c_d)
    live = c_a < c_d

    has_full = live & (n_full > 0)
    full_runs, f_ptr = _csr(blk[has_full], np.stack([full_s, full_e], 1)[has_full], n_blk)
    lo32 = np.clip(d_lo, -BOUND_CLIP, BOUND_CLIP)
    hi32 = np.clip(d_hi, -BOUND_CLIP, BOUND_CLIP)
    pre = np.stack([c_a, np.minimum(full_s, c_d), lo32, hi32], 1)
    post = np.stack([full_e, c_d, lo32, hi32], 1)
    m_rows = np.concatenate([pre, post])
    m_blk = np.concatenate([blk, blk])
    keep = np.concatenate([live, live]) & (m_rows[:, 0] < m_rows[:, 1])
    masked_runs, m_ptr = _csr(m_blk[keep], m_rows[keep], n_blk)

    blocks = np.stack([row0, row1, f_ptr[:-1], f_ptr[1:], m_ptr[:-1], m_ptr[1:]], 1)
    full_tiles = np.bincount(blk[has_full], weights=n_full[has_full], minlength=n_blk)
    m_tiles = -(-(m_rows[keep, 1] - m_rows[keep, 0]) // tile)
    masked_tiles = np.bincount(m_blk[keep], weights=m_tiles, minlength=n_blk)
    order = np.argsort(-(2 * full_tiles + 3 * masked_tiles), kind="stable")
    as32 = lambda a, w: np.ascontiguousarray(a, dtype=np.int32).reshape(-1, w)
    return Schedule(
        blocks=as32(blocks, BLOCK_FIELDS),
        full=as32(full_runs, 2),
        masked=as32(masked_runs, 4),
        order=np.ascontiguousarray(order, dtype=np.int32),
        block=block,
        tile=tile,
    )


def forward_schedule(table: SliceTable, tq: int, block: int, tile: int) -> Schedule:
    """Per query block, the key runs it meets (forward and dQ)."""
    t = table.take(np.nonzero(slice_areas(table) > 0)[0])
    return build_schedule(t.qs, t.qe, t.ks, t.ke, t.lo, t.hi, tq, block, tile)


def transposed_schedule(table: SliceTable, tk: int, block: int, tile: int) -> Schedule:
    """Per key block, the query runs that meet it (dK/dV)."""
    t = table.take(np.nonzero(slice_areas(table) > 0)[0])
    return build_schedule(t.ks, t.ke, t.qs, t.qe, -t.hi, -t.lo, tk, block, tile)
