"""The Triton kernels' work lists (CPU): replaying them visits every mask cell exactly once.

The replay does what the kernels do: full runs are whole tiles taken without a mask,
masked runs are tiles filtered by ``c < c1`` and ``lo <= c - r <= hi``. It must reproduce
the dense mask (forward lists) and its transpose (dK/dV lists), give every row one block,
keep full runs tile-aligned and never visit a tile with no kept cell.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from flexcp.kernels.triton.schedule import Schedule, forward_schedule, transposed_schedule
from flexcp.mask import AttnMaskSpec, prefix_tree, sliding_window, varlen
from reference_attention import dense_mask
from strategies import valid_specs


def replay(s: Schedule, n_rows: int, n_cols: int) -> np.ndarray:
    """How often the kernels would count each (row, col) cell; asserts the list invariants on the way."""
    count = np.zeros((n_rows, n_cols), dtype=np.int64)
    owner = np.zeros(n_rows, dtype=np.int64)
    assert sorted(s.order.tolist()) == list(range(s.num_blocks))
    for row0, row1, f0, f1, m0, m1 in s.blocks.tolist():
        assert 0 < row1 - row0 <= s.block
        owner[row0:row1] += 1
        rows = np.arange(row0, row1)[:, None]
        for c0, c1 in s.full[f0:f1].tolist():
            assert c1 > c0 and (c1 - c0) % s.tile == 0
            count[row0:row1, c0:c1] += 1
        for c0, c1, lo, hi in s.masked[m0:m1].tolist():
            assert c1 > c0
            for n0 in range(c0, c1, s.tile):
                cols = np.arange(n0, min(n0 + s.tile, c1))[None, :]
                keep = (cols - rows >= lo) & (cols - rows <= hi)
                assert keep.any(), "a fully masked tile was scheduled"
                count[row0:row1, n0 : n0 + cols.shape[1]] += keep
    assert (owner == 1).all()
    return count


def check(spec: AttnMaskSpec, block: int, tile: int) -> None:
    mask = dense_mask(spec).astype(np.int64)
    tq, tk = spec.total_seqlen, spec.total_seqlen_k
    np.testing.assert_array_equal(replay(forward_schedule(spec.table, tq, block, tile), tq, tk), mask)
    np.testing.assert_array_equal(replay(transposed_schedule(spec.table, tk, block, tile), tk, tq), mask.T)


NAMED = {
    "causal": AttnMaskSpec.causal(300),
    "varlen": varlen([70, 1, 130, 99]),
    "window": sliding_window([150, 90], 33),
    "prefix_tree": prefix_tree([64, 40, 23, 50], [[0, 1], [0, 2], [0, 3]])[0],
    "all_types_sq_ne_sk": AttnMaskSpec(
        [(0, 60), (10, 80), (80, 150), (90, 200)],
        [(0, 40), (40, 120), (0, 90), (100, 130)],
        ["causal", "inv_causal", "bi_causal", "full"],
        220,
        140,
    ),
}


@pytest.mark.parametrize("name", sorted(NAMED))
@pytest.mark.parametrize("block,tile", [(16, 16), (32, 8), (8, 32), (128, 64)])
def test_named_masks_replay_exactly(name: str, block: int, tile: int) -> None:
    check(NAMED[name], block, tile)


@settings(max_examples=60, deadline=None)
@given(spec=valid_specs(max_len=70), block=st.sampled_from([4, 16, 32]), tile=st.sampled_from([4, 8, 32]))
def test_random_masks_replay_exactly(spec: AttnMaskSpec, block: int, tile: int) -> None:
    check(spec, block, tile)


def test_causal_visits_one_masked_tile_per_block() -> None:
    """Aligned causal: each block has whole tiles below the diagonal and one masked tile on it."""
    s = forward_schedule(AttnMaskSpec.causal(1024).table, 1024, 128, 128)
    full, masked = s.tile_counts()
    assert masked == 8 and full == 8 * 7 // 2
    assert s.blocks[s.order[0], 0] == 896  # the heaviest block goes first


def test_uncovered_rows_get_blocks_without_work() -> None:
    spec = AttnMaskSpec([(10, 20)], [(0, 5)], ["full"], 40, 5)
    s = forward_schedule(spec.table, 40, 16, 16)
    assert s.blocks[:, :2].tolist() == [[0, 10], [10, 20], [20, 36], [36, 40]]
    assert (s.blocks[:, 3] - s.blocks[:, 2] + s.blocks[:, 5] - s.blocks[:, 4]).tolist() == [0, 1, 0, 0]
