"""Hypothesis strategies for slice masks: random valid specs and raw (possibly overlapping) slice sets.

Valid specs come from two generators so both easy and awkward geometry shows up:
``partition`` cuts the q axis into row blocks and each block's k axis into disjoint
segments (overlapping q ranges, disjoint cells, empty rows, 1-token pieces);
``greedy`` draws slices whose endpoints reuse earlier ones (+-1) and keeps each one
whose cells are still free, which yields slices touching along diagonals.
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
