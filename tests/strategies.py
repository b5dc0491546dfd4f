"""Hypothesis strategies for slice masks: random valid specs and raw (possibly overlapping) slice sets.

Valid specs come from two generators so both easy and awkward geometry shows up:
``partition`` cuts the q axis into row blocks and each block's k axis into disjoint
segments (overlapping q ranges, disjoint cells, empty rows, 1-token pieces);
``greedy`` draws slices whose endpoints reuse earlier ones (+-1) and keeps each one
whose cells are still free, which yields slices touching along diagonals.
``composed_specs`` (1-60 slices, for the property tests of every composition) tiles random
rectangles of a grid with one to three typed slices each (a band and the triangles beside
it), so slices share q ranges and k ranges and touch along diagonals while never sharing a
cell; it mixes in ``greedy`` masks, empty slices and one-token slices.
"""

from __future__ import annotations

import numpy as np
from hypothesis import strategies as st

from flexcp.mask import AttnMaskSpec, AttnMaskType
from reference_attention import coverage, slice_cells

TYPES = list(AttnMaskType)


def _cuts(draw, length: int, max_pieces: int) -> list[int]:
    """Sorted boundaries ``[0, ..., length]`` of a random partition of ``[0, length)``."""
    inner = draw(st.lists(st.integers(1, max(1, length - 1)), max_size=max_pieces - 1, unique=True))
    return [0] + sorted(x for x in inner if 0 < x < length) + [length]


def _sub_range(draw, lo: int, hi: int) -> tuple[int, int]:
    """A sub-range of ``[lo, hi)``: usually all of it, sometimes a part (possibly one token)."""
    if draw(st.booleans()):
        return lo, hi
    a = draw(st.integers(lo, hi - 1))
    return a, draw(st.integers(a + 1, hi))


@st.composite
def _partition_slices(draw, tq: int, tk: int, max_slices: int):
    slices = []
    q_cuts = _cuts(draw, tq, 5)
    for q0, q1 in zip(q_cuts[:-1], q_cuts[1:]):
        if draw(st.integers(0, 3)) == 0:
            continue  # rows with no slice at all
        k_cuts = _cuts(draw, tk, 4)
        for k0, k1 in zip(k_cuts[:-1], k_cuts[1:]):
            if len(slices) >= max_slices or not draw(st.booleans()):
                continue
            qr = _sub_range(draw, q0, q1)
            slices.append((qr, (k0, k1), draw(st.sampled_from(TYPES))))
    return slices


def _endpoint(draw, pool: list[int], limit: int) -> int:
    if pool and draw(st.booleans()):
        return min(max(draw(st.sampled_from(pool)) + draw(st.integers(-1, 1)), 0), limit)
    return draw(st.integers(0, limit))


@st.composite
def raw_slices(draw, tq: int, tk: int, max_slices: int):
    """Up to ``max_slices`` arbitrary in-bounds slices (they may overlap); endpoints often shared."""
    out, q_pool, k_pool = [], [0, tq], [0, tk]
    for _ in range(draw(st.integers(0, max_slices))):
        qa, qb = sorted((_endpoint(draw, q_pool, tq), _endpoint(draw, q_pool, tq)))
        ka, kb = sorted((_endpoint(draw, k_pool, tk), _endpoint(draw, k_pool, tk)))
        q_pool += [qa, qb]
        k_pool += [ka, kb]
        out.append(((qa, qb), (ka, kb), draw(st.sampled_from(TYPES))))
    return out


@st.composite
def _greedy_slices(draw, tq: int, tk: int, max_slices: int):
    used = np.zeros((tq, tk), dtype=bool)
    kept = []
    for (qa, qb), (ka, kb), kind in draw(raw_slices(tq, tk, 3 * max_slices)):
        cells = slice_cells(kind, qb - qa, kb - ka)
        if len(kept) < max_slices and not (used[qa:qb, ka:kb] & cells).any():
            used[qa:qb, ka:kb] |= cells
            kept.append(((qa, qb), (ka, kb), kind))
    return kept


def _spec(slices, tq: int, tk: int) -> AttnMaskSpec:
    return AttnMaskSpec([s[0] for s in slices], [s[1] for s in slices], [s[2] for s in slices], tq, tk)


@st.composite
def lengths(draw, max_len: int = 40) -> tuple[int, int]:
    """``(tq, tk)``: equal half of the time, else independent (q != k lengths)."""
    tq = draw(st.integers(1, max_len))
    tk = tq if draw(st.booleans()) else draw(st.integers(1, max_len))
    return tq, tk


@st.composite
def valid_specs(draw, max_len: int = 40, max_slices: int = 12) -> AttnMaskSpec:
    """A spec no cell of which is covered twice (checked independently of ``validate``)."""
    tq, tk = draw(lengths(max_len))
    gen = draw(st.sampled_from([_partition_slices, _greedy_slices]))
    spec = _spec(draw(gen(tq, tk, max_slices)), tq, tk)
    assert coverage(spec).max(initial=0) <= 1
    return spec


@st.composite
def any_specs(draw, max_len: int = 24, max_slices: int = 8) -> AttnMaskSpec:
    """In-bounds specs that may or may not have overlapping cells."""
    tq, tk = draw(lengths(max_len))
    return _spec(draw(raw_slices(tq, tk, max_slices)), tq, tk)


def _tiling(a: int, b: int, c: int, d: int, kind: int) -> list:
    """Typed slices tiling parts of the rectangle ``[a, b) x [c, d)`` (disjoint cells), by ``kind``:
    0: one slice of a random type drawn by the caller (not here); 1: the band ``0 <= j' - i' <= w``
    (BI_CAUSAL, ``w = sk - sq >= 0``) with the triangles below (CAUSAL) and above (INV_CAUSAL) it;
    2: the lower triangle only (CAUSAL); 3: the band and the upper triangle."""
    sq, sk = b - a, d - c
    w = sk - sq
    band = ((a, b), (c, d), "bi_causal")
    below = ((a + 1, b), (c, c + sq - 1), "causal")  # j' < i'
    above = ((a, b - 1), (c + w + 1, d), "inv_causal")  # j' - i' > w
    return {1: [band, below, above], 2: [below], 3: [band, above]}[kind]


@st.composite
def _grid_slices(draw, tq: int, tk: int, max_slices: int):
    """Random rectangles of a grid, each holding one slice of any type or a tiling by a band and its triangles."""
    out = []
    q_cuts, k_cuts = _cuts(draw, tq, 6), _cuts(draw, tk, 6)
    for q0, q1 in zip(q_cuts[:-1], q_cuts[1:]):
        for k0, k1 in zip(k_cuts[:-1], k_cuts[1:]):
            how = draw(st.integers(0, 5))
            if how >= 4:
                continue  # an empty rectangle
            if how == 0 or k1 - k0 < q1 - q0:  # bands need at least as many keys as rows
                qr = _sub_range(draw, q0, q1)
                out.append((qr, _sub_range(draw, k0, k1), draw(st.sampled_from(TYPES))))
            else:
                out.extend(s for s in _tiling(q0, q1, k0, k1, how) if s[0][0] <= s[0][1] and s[1][0] <= s[1][1])
    return out[:max_slices]


@st.composite
def composed_specs(draw, max_len: int = 64, max_slices: int = 60) -> AttnMaskSpec:
    """A valid spec of 1 to ``max_slices`` slices (see the module docstring); cells checked disjoint independently."""
    tq, tk = draw(lengths(max_len))
    gen = draw(st.sampled_from([_grid_slices, _grid_slices, _greedy_slices]))
    slices = draw(gen(tq, tk, max_slices))
    for _ in range(draw(st.integers(0, 2))):  # empty slices: no rows, or no keys
        at = draw(st.integers(0, min(tq, tk)))
        slices.append(((at, at), (0, tk), "full") if draw(st.booleans()) else ((0, tq), (at, at), "causal"))
    if not slices:
        slices = [((0, 1), (0, 1), "full")]
    spec = _spec(slices[:max_slices], tq, tk)
    assert coverage(spec).max(initial=0) <= 1
    return spec
