"""AttnMaskSpec construction errors and validate(): bounds, types, lengths, and cells covered twice."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings

from flexcp.mask import AttnMaskSpec, prefix_tree, sliding_window, varlen
from reference_attention import coverage, slice_cells
from strategies import any_specs, valid_specs


def _spec(slices, tq, tk=None):
    return AttnMaskSpec([s[0] for s in slices], [s[1] for s in slices], [s[2] for s in slices], tq, tk)


# ------------------------------------------------------------------ construction errors
def test_unknown_type():
    with pytest.raises(ValueError, match=r"mask_types: unknown mask type 'diagonal'; use one of"):
        _spec([((0, 2), (0, 2), "diagonal")], 2)
    with pytest.raises(ValueError, match=r"unknown mask type 7"):
        _spec([((0, 2), (0, 2), 7)], 2)


def test_list_lengths_differ():
    with pytest.raises(ValueError, match=r"one entry per slice; got 2, 1 and 2"):
        AttnMaskSpec([(0, 1), (1, 2)], [(0, 2)], ["full", "full"], 2)
    with pytest.raises(ValueError, match=r"one entry per slice; got 1, 1 and 0"):
        AttnMaskSpec([(0, 1)], [(0, 2)], [], 2)


@pytest.mark.parametrize("bad", [[(0, 1, 2)], [(0,)], [5], [("a", "b")]])
def test_range_is_not_a_pair(bad):
    with pytest.raises(ValueError, match=r"q_ranges\[0\] = .* is not a \(start, end\) pair of ints"):
        AttnMaskSpec(bad, [(0, 1)], ["full"], 4)


def test_negative_totals():
    with pytest.raises(ValueError, match=r"total_seqlen=-1 and total_seqlen_k=-1 must be >= 0"):
        AttnMaskSpec([], [], [], -1)
    with pytest.raises(ValueError, match=r"total_seqlen_k=-3 must be >= 0"):
        AttnMaskSpec([], [], [], 4, -3)


# ------------------------------------------------------------------ bounds
@pytest.mark.parametrize(
    "q,k,message",
    [
        ((0, 5), (0, 2), r"q_ranges\[1\] = \(0, 5\) is invalid: .* 0 <= start <= end <= 4 \(total_seqlen\)"),
        ((0, 2), (3, 7), r"k_ranges\[1\] = \(3, 7\) is invalid: .* <= 6 \(total_seqlen_k\)"),
        ((-1, 2), (0, 2), r"q_ranges\[1\] = \(-1, 2\) is invalid"),
        ((0, 2), (-2, -1), r"k_ranges\[1\] = \(-2, -1\) is invalid"),
        ((3, 2), (0, 2), r"q_ranges\[1\] = \(3, 2\) is invalid: ranges are \[start, end\)"),
        ((0, 2), (2, 1), r"k_ranges\[1\] = \(2, 1\) is invalid"),
    ],
)
def test_bounds(q, k, message):
    spec = _spec([((2, 4), (0, 6), "full"), (q, k, "causal")], 4, 6)
    with pytest.raises(ValueError, match=message):
        spec.validate()


def test_empty_ranges_at_the_ends_are_valid():
    _spec([((4, 4), (0, 6), "full"), ((0, 4), (6, 6), "causal"), ((0, 0), (0, 0), "bi_causal")], 4, 6).validate()
    AttnMaskSpec([], [], [], 0).validate()


# ------------------------------------------------------------------ overlaps
OVERLAPPING = {
    "same_rectangle": [((0, 4), (0, 4), "full"), ((0, 4), (0, 4), "full")],
    "one_corner_cell": [((0, 3), (0, 3), "full"), ((2, 5), (2, 6), "causal")],
    "diagonal_causal_inv": [((0, 4), (0, 4), "causal"), ((0, 4), (0, 4), "inv_causal")],
    "offset_diagonal": [((0, 4), (0, 6), "causal"), ((0, 4), (2, 6), "inv_causal")],  # share j = i + 2 only
    "diagonal_bi_in_causal": [((0, 6), (0, 6), "causal"), ((2, 4), (2, 4), "bi_causal")],
    "diagonal_crosses_rectangle_interior": [
        ((0, 10), (0, 10), "bi_causal"),
        ((0, 10), (3, 6), "full"),
    ],  # not at rows 0 or 9
    "one_cell_of_inv": [((5, 9), (1, 9), "full"), ((0, 6), (3, 9), "inv_causal")],  # only cell (5, 8)
    "staircase_and_causal_column": [
        ((0, 1), (0, 1), "full"),
        ((1, 2), (0, 2), "full"),
        ((2, 3), (0, 3), "full"),
        ((0, 3), (2, 3), "causal"),
    ],
}


@pytest.mark.parametrize("name", sorted(OVERLAPPING))
def test_overlapping_cells_are_rejected(name):
    spec = _spec(OVERLAPPING[name], 16)
    assert coverage(spec).max() == 2, "the case really overlaps"
    with pytest.raises(
        ValueError,
        match=r"slices \d+ and \d+ cover the same \(q, k\) cells: slice \d+ = q\(.*\) x k\(.*\) \w+, .*split them",
    ):
        spec.validate()


def test_overlap_message_names_the_two_slices():
    spec = _spec([((0, 2), (0, 2), "full"), ((4, 8), (0, 8), "causal"), ((6, 7), (3, 4), "full")], 8)
    with pytest.raises(ValueError) as err:
        spec.validate()
    assert str(err.value).startswith(
        "slices 1 and 2 cover the same (q, k) cells: slice 1 = q(4, 8) x k(0, 8) causal, slice 2 = q(6, 7) x k(3, 4) full"
    )


TOUCHING = {
    "diagonal_complement": [((0, 4), (0, 4), "causal"), ((0, 4), (1, 4), "inv_causal")],
    "bi_between_causal_and_inv": [
        ((0, 6), (0, 4), "causal"),
        ((0, 6), (3, 7), "bi_causal"),
        ((0, 6), (6, 12), "inv_causal"),
    ],
    "adjacent_rectangles": [((0, 4), (0, 3), "full"), ((0, 4), (3, 6), "full"), ((4, 8), (0, 6), "full")],
    "zero_area_slice_inside_another": [
        ((0, 6), (0, 6), "full"),
        ((0, 6), (0, 3), "bi_causal"),
        ((2, 4), (0, 0), "full"),
    ],
    "causal_rows_above_other_slice": [
        ((0, 6), (0, 2), "causal"),
        ((0, 4), (0, 2), "full"),
    ],  # causal sees nothing on rows 0-3
}


@pytest.mark.parametrize("name", sorted(TOUCHING))
def test_touching_but_disjoint_is_valid(name):
    spec = _spec(TOUCHING[name], 16)
    assert coverage(spec).max() == 1
    assert spec.validate() is spec


@settings(max_examples=80, deadline=None)
@given(spec=any_specs(max_len=24, max_slices=8))
def test_validate_rejects_exactly_the_overlapping_specs(spec):
    counts = coverage(spec)
    if counts.max(initial=0) <= 1:
        spec.validate()
        return
    with pytest.raises(ValueError, match="cover the same") as err:
        spec.validate()
    a, b = (int(x) for x in str(err.value).split(" cover")[0].removeprefix("slices ").split(" and "))
    cells = []
    for n in (a, b):
        (qs, qe), (ks, ke), kind = spec.q_ranges[n], spec.k_ranges[n], spec.mask_types[n]
        m = np.zeros(counts.shape, dtype=bool)
        m[qs:qe, ks:ke] = slice_cells(kind, qe - qs, ke - ks)
        cells.append(m)
    assert (cells[0] & cells[1]).any(), "the two named slices really share a cell"


@settings(max_examples=30, deadline=None)
@given(spec=valid_specs(max_len=40))
def test_generated_valid_specs_validate(spec):
    assert spec.validate() is spec


def test_validate_is_cached_and_chains():
    spec = varlen([3, 4])
    assert spec.validate() is spec and spec.validate() is spec


# ------------------------------------------------------------------ 10,000 slices (must complete; no timing assert)
def _grid(n_blocks: int, block: int):
    cells = [
        ((i * block, (i + 1) * block), (j * block, (j + 1) * block), "full")
        for i in range(n_blocks)
        for j in range(n_blocks)
    ]
    return _spec(cells, n_blocks * block)


@pytest.mark.parametrize(
    "make",
    [
        lambda: varlen([7] * 10_000),
        lambda: sliding_window([50] * 5_000, 10),  # 2 slices per document
        lambda: _grid(100, 10),  # every q range shared by 100 slices, every k range too
        lambda: _spec([((0, 20_000), (2 * n, 2 * n + 2), "full") for n in range(10_000)], 20_000),
        lambda: prefix_tree(
            [8] + [4] * 100 + [2] * 3200, [[0, 1 + c, 101 + 32 * c + g] for c in range(100) for g in range(32)]
        )[0],
    ],
    ids=["varlen", "sliding_window", "grid", "shared_q_range", "prefix_tree"],
)
def test_validate_10k_slices(make):
    spec = make()
    assert len(spec) >= 9_800
    assert spec.validate() is spec


def test_validate_10k_slices_finds_one_overlap():
    cells = _grid(100, 10)
    bad = _spec(
        [(q, k, t) for q, k, t in zip(cells.q_ranges, cells.k_ranges, cells.mask_types)]
        + [((995, 996), (5, 6), "full")],
        1000,
    )
    with pytest.raises(ValueError, match=r"slices 9900 and 10000 cover the same"):
        bad.validate()
