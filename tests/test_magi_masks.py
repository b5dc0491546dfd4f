"""Masks the HF path derives (documents, cu_seqlens layouts, prefix-tree positions, windows) vs dense truth."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from flexcp.hf.keys import windowed
from flexcp.hf.masks import cu_seqlens_layout, documents, prefix_tree_position_ids
from flexcp.mask import AttnMaskSpec, causal, sliding_window, varlen


def _dense_documents(doc_of: np.ndarray) -> np.ndarray:
    """Token i sees j iff both belong to the same document (-1: none) and j <= i."""
    same = (doc_of[:, None] == doc_of[None, :]) & (doc_of[:, None] >= 0)
    return same & np.tril(np.ones_like(same))


def test_documents_from_rows_resets_and_padding() -> None:
    pos = torch.tensor([[0, 1, 2, 0, 1, 2], [5, 6, 7, 8, 9, 0]])
    mask = torch.tensor([[1, 1, 1, 1, 1, 0], [0, 1, 1, 1, 1, 1]])
    spec = documents(2, 6, pos, mask)
    doc_of = np.array([0, 0, 0, 1, 1, -1, -1, 2, 2, 2, 2, 3])
    assert np.array_equal(spec.to_dense().numpy(), _dense_documents(doc_of))
    assert documents(2, 6).fingerprint() == varlen([6, 6]).fingerprint()
    assert documents(1, 9).fingerprint() == causal(9).fingerprint()
    assert documents(1, 4, attention_mask=torch.zeros(1, 4)).area() == 0


def test_padding_inside_a_document_does_not_split_it() -> None:
    pad = torch.tensor([[1, 1, 0, 1, 1, 1, 0, 0, 1]])
    doc_of = np.array([0, 0, -1, 0, 0, 0, -1, -1, 0])
    for pos in (torch.arange(9)[None], pad.cumsum(-1) - 1, None):  # positions through or around the padding
        spec = documents(1, 9, pos, pad)
        assert np.array_equal(spec.to_dense().numpy(), _dense_documents(doc_of)), pos
    spec = documents(1, 5, torch.tensor([[0, 1, 9, 0, 1]]), torch.tensor([[1, 1, 0, 1, 1]]))  # a reset: two
    assert spec.q_ranges == ((0, 2), (3, 5))
    with pytest.raises(ValueError, match="position_ids must be"):
        documents(2, 5, torch.arange(4)[None])


def test_cu_seqlens_layout_drops_sentinels_and_honours_padding() -> None:
    spec, pos = cu_seqlens_layout(torch.tensor([0, 3, 5, -1000, -1000]), torch.tensor([0, 4, 8, -1000]), 8)
    assert spec.q_ranges == ((0, 3), (4, 6))
    assert pos.tolist() == [0, 1, 2, 3, 0, 1, 2, 3]
    spec, pos = cu_seqlens_layout([0, 2, 7], None, 7)
    assert spec.fingerprint() == varlen([2, 5]).fingerprint() and pos.tolist() == [0, 1, 0, 1, 2, 3, 4]
    with pytest.raises(ValueError, match="spans 7 tokens but the flat input has 9"):
        cu_seqlens_layout([0, 2, 7], None, 9)


def test_prefix_tree_positions_continue_from_ancestors() -> None:
    pos = prefix_tree_position_ids([3, 2, 4, 1], [[0, 1], [0, 2, 3]])
    assert pos.tolist() == [0, 1, 2, 3, 4, 3, 4, 5, 6, 7]
    with pytest.raises(ValueError, match="on no sample path"):
        prefix_tree_position_ids([3, 2], [[0]])


@pytest.mark.parametrize("window", [1, 3, 5, 100])
def test_windowed_matches_dense_window_over_real_positions(window: int) -> None:
    nodes, paths = [6, 4, 5, 3], [[0, 1], [0, 2, 3]]
    spec, _ = AttnMaskSpec.prefix_tree(nodes, paths)
    pos = prefix_tree_position_ids(nodes, paths).numpy()
    got = windowed(spec, window, pos)
    got.validate()
    want = spec.to_dense().numpy() & ((pos[:, None] - pos[None, :]) < window)
    assert np.array_equal(got.to_dense().numpy(), want)


def test_windowed_with_flat_positions_is_the_sliding_window_constructor() -> None:
    spec = varlen([7, 9, 4])
    got = windowed(spec, 3)
    assert np.array_equal(got.to_dense().numpy(), sliding_window([7, 9, 4], 3).to_dense().numpy())
    with pytest.raises(ValueError, match="window must be >= 1"):
        windowed(spec, 0)
