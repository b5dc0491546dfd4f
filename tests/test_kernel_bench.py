"""The kernel benchmark's masks (CPU): FlexAttention's encoding equals the slice spec, sizes are as documented."""

from __future__ import annotations

import numpy as np
import pytest

from flexcp.bench.kernel_bench import MASKS, build_mask


@pytest.mark.parametrize("name", MASKS)
def test_flex_encoding_matches_spec(name: str) -> None:
    seqlen = 1024
    spec, fm = build_mask(name, seqlen)
    assert spec.total_seqlen == seqlen
    dense = spec.validate().to_dense().numpy()
    if fm is None:
        assert dense.all()
        return
    i, j = np.arange(seqlen)[:, None], np.arange(seqlen)[None, :]
    r = fm.rel[fm.node[i], fm.node[j]]
    flex = (r == 1) | ((r == 2) & (i >= j) & (i - j < fm.window))
    np.testing.assert_array_equal(flex, dense)


def test_prefix_and_window_shapes() -> None:
    spec, _ = build_mask("prefix_tree", 32768)
    assert spec.q_ranges[0] == (0, 8192) and len(spec) == 1 + 2 * 8  # prompt self + (self, prompt) per completion
    assert all(e - s == 3072 for s, e in spec.q_ranges[1:])
    spec, _ = build_mask("sliding_window", 8192)
    assert spec.row_key_counts().max() == 4096
