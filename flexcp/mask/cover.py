"""The conservation check: the parts of a route or plan hold exactly a mask's cells, each once.

Routes and plans cut a mask into parts that run separately (backends of a split, cuDNN
launches, distributed stages) and are merged by lse; a part that drops or repeats a cell
gives wrong attention with no error. :func:`check_cover` proves, once per mask where the
parts are built, that they do not: host-side, in exact integer arithmetic, without per-cell
memory. Cells per slice come in closed form (``slice_areas``); the parts must be pairwise
disjoint (``find_overlap``); and the cells the parts share with the mask, summed over
candidate slice pairs (the intersection of two slices is one diagonal band, whose cells
``clip_band`` counts), must be all of each. With the mask's own slices disjoint (validated
masks are), ``|parts| == |mask| == |parts & mask|`` means the parts hold exactly its cells.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from .geometry import SliceTable, candidate_pairs, clip_band, find_overlap, slice_areas


class CoverageError(RuntimeError):
    """An internal route or plan would compute other cells than its mask's: a bug in flexcp, never bad input."""


def cells(table: SliceTable) -> int:
    """Number of cells of ``table`` (its slices' areas summed)."""
    return int(slice_areas(table).sum())


def shared_cells(a: SliceTable, b: SliceTable) -> int:
    """Cells that a slice of ``a`` and a slice of ``b`` both cover, summed over all such pairs.

    Equals ``|a & b|`` when each table's slices are pairwise disjoint.
    """
    both = SliceTable.concat([a, b])
    lo, hi = both.lo, both.hi
    total = 0
    for i, j in candidate_pairs(both):
        cross = (i < len(a)) != (j < len(a))
        i, j = i[cross], j[cross]
        pieces, _ = clip_band(
            np.maximum(both.qs[i], both.qs[j]), np.minimum(both.qe[i], both.qe[j]),
            np.maximum(both.ks[i], both.ks[j]), np.minimum(both.ke[i], both.ke[j]),
            np.maximum(lo[i], lo[j]), np.minimum(hi[i], hi[j]),
        )  # fmt: skip
        total += cells(pieces)
    return total


def cover_error(mask: SliceTable, parts: Sequence[SliceTable]) -> str | None:
    """Why ``parts`` do not hold exactly ``mask``'s cells, each once (None when they do)."""
    joined = SliceTable.concat(list(parts)).nonempty()
    want, got = cells(mask), cells(joined)
    if got != want:
        return f"the parts hold {got} cells, the mask {want}"
    pair = find_overlap(joined)
    if pair is not None:
        return f"slices {pair[0]} and {pair[1]} of the joined parts cover a common cell"
    inside = shared_cells(mask.nonempty(), joined)
    if inside != want:
        return f"{want - inside} of the parts' {want} cells lie outside the mask"
    return None


def check_cover(mask: SliceTable, parts: Sequence[SliceTable], what: str) -> None:
    """Raise :class:`CoverageError` naming ``what`` unless ``parts`` hold exactly ``mask``'s cells, each once."""
    why = cover_error(mask, parts)
    if why is not None:
        raise CoverageError(
            f"internal error: {what} would not compute the mask's cells exactly once ({why}); "
            f"nothing was computed. This is a bug in flexcp: please report it with the mask."
        )
