"""The cuDNN backend's host plan on CPU: entries cover exactly the mask, launches never share rows, buckets."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings

from flexcp.bench.docdist import sample_pack
from flexcp.kernels.cudnn.plan import (
    UNBOUNDED,
    bucket,
    launch_bucket,
    plan_launches,
    to_entries,
)
from flexcp.mask import AttnMaskSpec, prefix_tree, sliding_window, varlen
from reference_attention import coverage
from mask_cases import HARD_CASES
from strategies import valid_specs


def entry_cells(sig, sq: int, sk: int) -> np.ndarray:
    """Cells of one entry straight from the band definition (TOP_LEFT: ``i' - L < j' <= i' + R``)."""
    left, right = sig
    i, j = np.arange(sq)[:, None], np.arange(sk)[None, :]
    keep = np.ones((sq, sk), dtype=bool)
    if left is not None:
        keep &= j > i - left
    if right is not None and right != UNBOUNDED:
        keep &= j <= i + right
    return keep


def launch_coverage(spec: AttnMaskSpec) -> np.ndarray:
    count = np.zeros((spec.total_seqlen, spec.total_seqlen_k), dtype=np.int64)
    for la in plan_launches(to_entries(spec.table), spec.total_seqlen_k):
        rows = np.zeros(spec.total_seqlen, dtype=np.int64)
        for qs, sq, ks, sk in zip(la.qs, la.sq, la.ks, la.sk):
            count[qs : qs + sq, ks : ks + sk] += entry_cells(la.sig, int(sq), int(sk))
            rows[qs : qs + sq] += 1
        assert rows.max(initial=0) <= 1, "a launch writes a row twice"
        assert la.area() == sum(entry_cells(la.sig, int(a), int(b)).sum() for a, b in zip(la.sq, la.sk))
    return count


def assert_exact(spec: AttnMaskSpec) -> None:
    assert np.array_equal(launch_coverage(spec), coverage(spec))


@pytest.mark.parametrize("name", sorted(HARD_CASES))
def test_hard_cases_covered_exactly(name):
    assert_exact(HARD_CASES[name])


@settings(max_examples=60, deadline=None)
@given(valid_specs(max_len=60, max_slices=10))
def test_random_masks_covered_exactly(spec):
    assert_exact(spec)


def test_causal_with_fewer_rows_than_keys_is_full_plus_square():
    e = to_entries(AttnMaskSpec([(0, 3)], [(0, 10)], ["causal"], 3, 10).table)
    assert sorted(zip(e.sigs, e.qs.tolist(), e.sq.tolist(), e.ks.tolist(), e.sk.tolist()), key=str) == [
        ((None, 0), 0, 3, 7, 3),
        ((None, None), 0, 3, 0, 7),
    ]


def test_sliding_window_fuses_to_one_band_per_document():
    e = to_entries(sliding_window([100, 20], 30).table)
    assert sorted(e.sigs, key=str) == [(30, 0), (None, 0)]  # the short document stays a causal square
    assert_exact(sliding_window([100, 20, 31, 30], 30))


def test_full_pieces_merge_and_shared_keys_get_private_rows():
    tree = prefix_tree([8, 3, 3], [[0, 1], [0, 2]])[0]  # the completions' FULL rows on the prompt merge into one entry
    assert sum(sig == (None, None) for sig in to_entries(tree.table).sigs) == 1
    spec = AttnMaskSpec([(0, 5), (7, 12), (12, 20)], [(0, 20), (0, 20), (20, 28)], ["full", "full", "causal"], 20, 28)
    launches = plan_launches(to_entries(spec.table), spec.total_seqlen_k)
    shared = [la for la in launches if la.private is not None]
    assert shared and all(la.private_rows == la.sk.sum() for la in shared)
    assert all(np.array_equal(la.private, np.cumsum(la.sk) - la.sk) for la in shared)


def test_private_rows_are_capped():
    """Many q chunks over one long key range: private dK/dV rows per launch stay O(tk)."""
    n, chunk, tk = 64, 16, 4096  # q chunks one row apart, so they do not merge into one entry
    spec = AttnMaskSpec([(i * (chunk + 1), i * (chunk + 1) + chunk) for i in range(n)], [(0, tk)] * n, ["full"] * n, n * (chunk + 1), tk)
    launches = plan_launches(to_entries(spec.table), tk)
    assert len(launches) > 1 and all(la.private_rows <= 2 * tk + 65536 for la in launches)
    assert_exact(spec)


def test_bucket():
    assert [bucket(n, 128) for n in (1, 128, 129, 1000, 4096)] == [128, 128, 256, 1024, 4096]
    assert [bucket(n) for n in (1, 2, 3, 27)] == [1, 2, 4, 32]


def test_corpus_packs_hit_the_graph_cache():
    """200 packs of 32k tokens from the corpus histogram need few distinct graphs (>= 95% hits)."""
    keys = [launch_bucket(la) + (la.sig,) for seed in range(200) for la in
            plan_launches(to_entries(varlen(sample_pack(32768, rng=seed).tolist()).table), 32768)]  # fmt: skip
    assert 1 - len(set(keys)) / len(keys) >= 0.95
