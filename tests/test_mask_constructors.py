"""Every mask constructor against hand-computed rectangles and an independent dense construction.

The dense oracles below are written straight from each constructor's definition
(documents, windows, blocks, tree ancestry), not from slices, and compared with the
spec's cells via ``reference_attention.dense_mask`` (itself checked against
``spec.to_dense`` in test_mask_spec.py).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from flexcp.mask import (
    AttnMaskSpec,
    block_causal,
    causal,
    from_cu_seqlens,
    from_position_ids,
    prefix_tree,
    sliding_window,
    varlen,
)
from reference_attention import coverage, dense_mask


def slices_of(spec: AttnMaskSpec) -> list[tuple[tuple[int, int], tuple[int, int], str]]:
    return [(q, k, t.value) for q, k, t in zip(spec.q_ranges, spec.k_ranges, spec.mask_types)]


def assert_cells(spec: AttnMaskSpec, expected: np.ndarray) -> None:
    """The spec is valid and covers exactly ``expected`` (each cell once)."""
    spec.validate()
    assert coverage(spec).max(initial=0) <= 1
    assert expected.shape == (spec.total_seqlen, spec.total_seqlen_k)
    np.testing.assert_array_equal(dense_mask(spec), expected)


# ------------------------------------------------------------------ dense oracles
def _docs(lens) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Doc id per token and the row/col index grids."""
    doc = np.repeat(np.arange(len(lens)), lens)
    n = len(doc)
    return doc, np.arange(n)[:, None], np.arange(n)[None, :]


def dense_varlen(lens, is_causal=True) -> np.ndarray:
    doc, i, j = _docs(lens)
    same = doc[:, None] == doc[None, :]
    return same & (j <= i) if is_causal else same


def dense_window(lens, window, is_causal=True) -> np.ndarray:
    doc, i, j = _docs(lens)
    same = doc[:, None] == doc[None, :]
    if is_causal:
        return same & (j <= i) & (j > i - window)
    return same & (np.abs(i - j) < window)


def dense_block_causal(sizes) -> np.ndarray:
    block = np.repeat(np.arange(len(sizes)), sizes)
    return block[None, :] <= block[:, None]


def dense_prefix_tree(lens, paths) -> np.ndarray:
    """Token of node a sees a token of node b iff b is a strict ancestor of a, or a == b and it is not later."""
    offs = np.concatenate([[0], np.cumsum(lens)])
    node = np.repeat(np.arange(len(lens)), lens)
    ancestors = {n: set(p[:d]) for p in paths for d, n in enumerate(p)}
    n_tok = int(offs[-1])
    out = np.zeros((n_tok, n_tok), dtype=bool)
    for i in range(n_tok):
        a = node[i]
        if a not in ancestors:
            continue
        for j in range(n_tok):
            out[i, j] = node[j] in ancestors[a] or (node[j] == a and j <= i)
    return out


# ------------------------------------------------------------------ causal / varlen
def test_causal_rectangles():
    assert slices_of(causal(5)) == [((0, 5), (0, 5), "causal")]
    assert causal(5).total_seqlen == 5 and causal(5).total_seqlen_k == 5
    assert len(causal(0)) == 0 and causal(0).total_seqlen == 0
    assert_cells(causal(7), np.tril(np.ones((7, 7), dtype=bool)))
    assert AttnMaskSpec.causal(4) == causal(4)
    with pytest.raises(ValueError, match="seqlen must be >= 0"):
        causal(-1)


def test_varlen_rectangles():
    spec = varlen([3, 0, 1, 4])
    assert slices_of(spec) == [((0, 3), (0, 3), "causal"), ((3, 4), (3, 4), "causal"), ((4, 8), (4, 8), "causal")]
    assert spec.total_seqlen == 8
    full = varlen([2, 3], causal=False)
    assert slices_of(full) == [((0, 2), (0, 2), "full"), ((2, 5), (2, 5), "full")]
    assert varlen([]).total_seqlen == 0 and len(varlen([0, 0])) == 0 and varlen([0, 0]).total_seqlen == 0
    assert AttnMaskSpec.varlen([3, 0, 1, 4]) == spec
    with pytest.raises(ValueError, match="seqlens must be non-negative"):
        varlen([2, -1])


@settings(max_examples=30, deadline=None)
@given(lens=st.lists(st.integers(0, 9), max_size=6), is_causal=st.booleans())
def test_varlen_matches_dense(lens, is_causal):
    assert_cells(varlen(lens, causal=is_causal), dense_varlen(lens, is_causal))


# ------------------------------------------------------------------ sliding window
def test_sliding_window_causal_rectangles():
    # rows 0-1 see the doc start (causal); from row 2 on every row sees a full band of 3
    spec = sliding_window([6], 3)
    assert slices_of(spec) == [((0, 2), (0, 2), "causal"), ((2, 6), (0, 6), "bi_causal")]
    assert_cells(spec, dense_window([6], 3))


def test_sliding_window_two_sided_rectangles():
    spec = sliding_window([6, 2], 3, causal=False)
    assert slices_of(spec) == [
        ((0, 2), (0, 4), "causal"),
        ((2, 4), (0, 6), "bi_causal"),
        ((4, 6), (2, 6), "inv_causal"),
        ((6, 8), (6, 8), "full"),
    ]
    assert_cells(spec, dense_window([6, 2], 3, is_causal=False))


def test_sliding_window_of_one_is_the_diagonal():
    for is_causal in (True, False):
        spec = sliding_window([4, 1], 1, causal=is_causal)
        assert_cells(spec, np.eye(5, dtype=bool))
        assert spec.area() == 5
    assert slices_of(sliding_window([4], 1)) == [((0, 4), (0, 4), "bi_causal")]


@pytest.mark.parametrize("window", [5, 6, 100])
def test_sliding_window_at_least_doc_length(window):
    lens = [5, 1, 3]
    assert_cells(sliding_window(lens, window), dense_varlen(lens, True))
    assert_cells(sliding_window(lens, window, causal=False), dense_varlen(lens, False))


def test_sliding_window_errors_and_classmethod():
    with pytest.raises(ValueError, match="window must be >= 1"):
        sliding_window([4], 0)
    with pytest.raises(ValueError, match="seqlens must be non-negative"):
        sliding_window([-4], 2)
    assert AttnMaskSpec.sliding_window([6, 2], 3, causal=False) == sliding_window([6, 2], 3, causal=False)
    assert len(sliding_window([], 3)) == 0


@settings(max_examples=40, deadline=None)
@given(lens=st.lists(st.integers(0, 14), max_size=5), window=st.integers(1, 16), is_causal=st.booleans())
def test_sliding_window_matches_dense(lens, window, is_causal):
    spec = sliding_window(lens, window, causal=is_causal)
    assert_cells(spec, dense_window(lens, window, is_causal))
    assert len(spec) <= 3 * len(lens), "at most three slices per document"


# ------------------------------------------------------------------ block causal
def test_block_causal_rectangles():
    spec = block_causal([2, 3, 0, 1])
    assert slices_of(spec) == [((0, 2), (0, 2), "full"), ((2, 5), (0, 5), "full"), ((5, 6), (0, 6), "full")]
    assert_cells(spec, dense_block_causal([2, 3, 0, 1]))
    assert AttnMaskSpec.block_causal([2, 3, 0, 1]) == spec
    assert_cells(block_causal([1, 1, 1]), np.tril(np.ones((3, 3), dtype=bool)))
    with pytest.raises(ValueError, match="block_sizes must be non-negative"):
        block_causal([1, -2])


@settings(max_examples=25, deadline=None)
@given(sizes=st.lists(st.integers(0, 8), max_size=6))
def test_block_causal_matches_dense(sizes):
    assert_cells(block_causal(sizes), dense_block_causal(sizes))


# ------------------------------------------------------------------ prefix tree
def test_prefix_tree_rectangles_dedup_and_order():
    # node 0 is the shared root; sample 0 appears twice (its rectangles once)
    spec, ranges = prefix_tree([2, 3, 1, 2], [[0, 1], [0, 2, 3], [0, 1]])
    assert slices_of(spec) == [
        ((0, 2), (0, 2), "causal"),  # node 0 self
        ((2, 5), (2, 5), "causal"),  # node 1 self, then its ancestor 0
        ((2, 5), (0, 2), "full"),
        ((5, 6), (5, 6), "causal"),  # node 2 self, ancestor 0
        ((5, 6), (0, 2), "full"),
        ((6, 8), (6, 8), "causal"),  # node 3 self, ancestors root first: 0 then 2
        ((6, 8), (0, 2), "full"),
        ((6, 8), (5, 6), "full"),
    ]
    assert ranges == [[(0, 2), (2, 5)], [(0, 2), (5, 6), (6, 8)], [(0, 2), (2, 5)]]
    assert spec.total_seqlen == 8
    assert_cells(spec, dense_prefix_tree([2, 3, 1, 2], [[0, 1], [0, 2, 3]]))
    assert AttnMaskSpec.prefix_tree([2, 3, 1, 2], [[0, 1], [0, 2, 3], [0, 1]]) == (spec, ranges)


def test_prefix_tree_child_before_parent_in_layout_and_empty_nodes():
    # layout [child(2) | root(3) | empty node | unused node(4)]: only the tree's nodes get rectangles
    spec, ranges = prefix_tree([2, 3, 0, 4], [[1, 0], [1, 2]])
    assert slices_of(spec) == [((2, 5), (2, 5), "causal"), ((0, 2), (0, 2), "causal"), ((0, 2), (2, 5), "full")]
    assert ranges == [[(2, 5), (0, 2)], [(2, 5), (5, 5)]]
    assert spec.total_seqlen == 9
    assert (spec.row_key_counts()[5:] == 0).all(), "tokens of an unused node attend to nothing"
    assert_cells(spec, dense_prefix_tree([2, 3, 0, 4], [[1, 0], [1, 2]]))


def test_prefix_tree_edge_inputs():
    spec, ranges = prefix_tree([3], [])
    assert len(spec) == 0 and spec.total_seqlen == 3 and ranges == []
    spec, ranges = prefix_tree([3], [[]])
    assert len(spec) == 0 and ranges == [[]]
    spec, ranges = prefix_tree([1], [[0]])
    assert slices_of(spec) == [((0, 1), (0, 1), "causal")] and ranges == [[(0, 1)]]


def test_prefix_tree_errors():
    with pytest.raises(ValueError, match=r"visits a node twice"):
        prefix_tree([2, 2], [[0, 1, 0]])
    with pytest.raises(ValueError, match=r"names node 5; valid nodes are 0..1"):
        prefix_tree([2, 2], [[0, 5]])
    with pytest.raises(ValueError, match=r"names node -1"):
        prefix_tree([2, 2], [[-1]])
    with pytest.raises(ValueError, match=r"gives node 2 the parent 1, another path gave 0"):
        prefix_tree([2, 2, 2], [[0, 2], [0, 1, 2]])
    with pytest.raises(ValueError, match=r"node_lengths must be non-negative"):
        prefix_tree([2, -2], [[0, 1]])


@st.composite
def trees(draw):
    """Random node lengths (0 allowed), a random tree in a shuffled layout, and root-to-node sample paths."""
    n = draw(st.integers(1, 7))
    lens = draw(st.lists(st.integers(0, 4), min_size=n, max_size=n))
    parent = [None] + [draw(st.integers(0, m - 1)) for m in range(1, n)]  # in tree order
    label = draw(st.permutations(range(n)))  # tree node m is layout node label[m]
    ends = draw(st.lists(st.integers(0, n - 1), max_size=4))
    paths = []
    for m in ends:
        path = [m]
        while parent[path[-1]] is not None:
            path.append(parent[path[-1]])
        paths.append([label[x] for x in reversed(path)])
    return lens, paths


@settings(max_examples=40, deadline=None)
@given(tree=trees())
def test_prefix_tree_matches_dense_and_samples_are_causal(tree):
    lens, paths = tree
    spec, ranges = prefix_tree(lens, paths)
    assert_cells(spec, dense_prefix_tree(lens, paths))
    offs = np.concatenate([[0], np.cumsum(lens)])
    assert ranges == [[(int(offs[n]), int(offs[n + 1])) for n in p] for p in paths]
    assert len(set(zip(spec.q_ranges, spec.k_ranges))) == len(spec), "shared rectangles are emitted once"
    mask = dense_mask(spec)
    for sample in ranges:
        # each sample, read as the concatenation of its nodes, is exactly one causal sequence
        idx = np.concatenate([np.arange(a, b) for a, b in sample] + [np.zeros(0, dtype=np.int64)])
        others = np.setdiff1d(np.arange(spec.total_seqlen), idx)
        np.testing.assert_array_equal(mask[np.ix_(idx, idx)], np.tril(np.ones((len(idx), len(idx)), dtype=bool)))
        assert not mask[np.ix_(idx, others)].any()


# ------------------------------------------------------------------ cu_seqlens
def test_from_cu_seqlens_unpadded():
    spec = from_cu_seqlens([0, 3, 3, 7])
    assert slices_of(spec) == [((0, 3), (0, 3), "causal"), ((3, 7), (3, 7), "causal")]
    assert spec == varlen([3, 0, 4])
    assert from_cu_seqlens(torch.tensor([0, 3, 3, 7], dtype=torch.int32)) == spec
    assert from_cu_seqlens([0]).total_seqlen == 0


def test_from_cu_seqlens_padded():
    # docs of 3, 0 and 2 real tokens, padded to 4, 2 and 3
    spec = from_cu_seqlens([0, 3, 3, 5], [0, 4, 6, 9])
    assert slices_of(spec) == [((0, 3), (0, 3), "causal"), ((6, 8), (6, 8), "causal")]
    assert spec.total_seqlen == 9
    np.testing.assert_array_equal(spec.row_key_counts(), [1, 2, 3, 0, 0, 0, 1, 2, 0])
    expected = np.zeros((9, 9), dtype=bool)
    expected[0:3, 0:3] = np.tril(np.ones((3, 3), dtype=bool))
    expected[6:8, 6:8] = np.tril(np.ones((2, 2), dtype=bool))
    assert_cells(spec, expected)
    assert AttnMaskSpec.from_cu_seqlens(torch.tensor([0, 3, 3, 5]), torch.tensor([0, 4, 6, 9])) == spec


def test_from_cu_seqlens_errors():
    with pytest.raises(ValueError, match=r"cu_seqlens must start at 0 and never decrease"):
        from_cu_seqlens([1, 3])
    with pytest.raises(ValueError, match=r"cu_seqlens must start at 0 and never decrease"):
        from_cu_seqlens([0, 3, 2])
    with pytest.raises(ValueError, match=r"cu_seqlens must start at 0 and never decrease"):
        from_cu_seqlens([])
    with pytest.raises(ValueError, match=r"cu_seqlens_padded must have one entry per cu_seqlens entry"):
        from_cu_seqlens([0, 3, 5], [0, 4])
    with pytest.raises(ValueError, match=r"at least its real length"):
        from_cu_seqlens([0, 3, 5], [0, 2, 6])
    with pytest.raises(ValueError, match=r"start at 0"):
        from_cu_seqlens([0, 3], [1, 4])


@settings(max_examples=30, deadline=None)
@given(docs=st.lists(st.tuples(st.integers(0, 6), st.integers(0, 3)), max_size=5))
def test_from_cu_seqlens_matches_dense(docs):
    real = [r for r, _ in docs]
    padded = [r + p for r, p in docs]
    cu, cup = np.cumsum([0] + real), np.cumsum([0] + padded)
    spec = from_cu_seqlens(cu, cup)
    tokens = int(cup[-1])
    doc = np.full(tokens, -1)  # -1: padding
    for n, (r, _) in enumerate(docs):
        doc[cup[n] : cup[n] + r] = n
    i, j = np.arange(tokens)[:, None], np.arange(tokens)[None, :]
    assert_cells(spec, (doc[:, None] == doc[None, :]) & (doc[:, None] >= 0) & (j <= i))
    assert from_cu_seqlens(cu) == varlen(real)


# ------------------------------------------------------------------ position ids
def test_from_position_ids_1d():
    spec = from_position_ids([0, 1, 2, 0, 0, 1])
    assert slices_of(spec) == [((0, 3), (0, 3), "causal"), ((3, 4), (3, 4), "causal"), ((4, 6), (4, 6), "causal")]
    assert from_position_ids(torch.tensor([0, 1, 2, 0, 0, 1])) == spec
    # a row that does not start at position 0 still starts a document
    assert from_position_ids([5, 6, 0, 1]) == varlen([2, 2])


def test_from_position_ids_batch():
    pos = torch.tensor([[0, 1, 2, 0], [3, 4, 0, 1]])
    spec = from_position_ids(pos)
    assert slices_of(spec) == [
        ((0, 3), (0, 3), "causal"),
        ((3, 4), (3, 4), "causal"),
        ((4, 6), (4, 6), "causal"),  # the second row starts a document mid-sequence
        ((6, 8), (6, 8), "causal"),
    ]
    assert AttnMaskSpec.from_position_ids(pos) == spec
    with pytest.raises(ValueError, match=r"position_ids must be \[S\] or \[B, S\]"):
        from_position_ids(np.zeros((2, 2, 2), dtype=np.int64))


def test_from_position_ids_empty():
    assert from_position_ids([]).total_seqlen == 0
    assert from_position_ids(torch.zeros(2, 0, dtype=torch.long)).total_seqlen == 0


@settings(max_examples=30, deadline=None)
@given(
    rows=st.lists(st.lists(st.integers(1, 5), min_size=1, max_size=4), min_size=1, max_size=3), offset=st.integers(0, 3)
)
def test_from_position_ids_matches_dense(rows, offset):
    """Rows of documents (lengths); the first document of each row may start at position ``offset``."""
    width = max(sum(r) for r in rows) + 1
    pos, lens = [], []
    for r in rows:
        ids = [offset + t for t in range(r[0])] + [t for n in r[1:] for t in range(n)]
        tail = width - len(ids)  # pad the row with one last document (positions 0..tail-1)
        pos.append(ids + list(range(tail)))
        lens += list(r) + [tail]
    spec = from_position_ids(np.array(pos))
    assert_cells(spec, dense_varlen(lens, True))
    if len(rows) == 1:
        assert from_position_ids(pos[0]) == spec
