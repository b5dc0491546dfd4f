"""AttnMaskType / AttnMaskSpec: types, fields, fingerprints, dense materialization and geometry vs dense."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from flexcp.mask import AttnMaskSpec, AttnMaskType, block_areas, clip_band, clip_slices, slice_areas, varlen
from flexcp.mask.geometry import BIG
from reference_attention import dense_mask, slice_cells
from strategies import valid_specs


# ------------------------------------------------------------------ AttnMaskType
def test_mask_type_values_compare_equal_to_seed_strings():
    assert [m.value for m in AttnMaskType] == ["full", "causal", "inv_causal", "bi_causal"]
    assert AttnMaskType.CAUSAL == "causal" and "bi_causal" == AttnMaskType.BI_CAUSAL
    assert str(AttnMaskType.INV_CAUSAL) == "inv_causal"
    assert [m.code for m in AttnMaskType] == [0, 1, 2, 3]


@pytest.mark.parametrize("value", ["causal", "CAUSAL", "Causal", AttnMaskType.CAUSAL, 1])
def test_mask_type_parse(value):
    assert AttnMaskType.parse(value) is AttnMaskType.CAUSAL


@pytest.mark.parametrize("value", ["diagonal", 4, -1, True, 1.0, None])
def test_mask_type_parse_rejects(value):
    with pytest.raises(
        ValueError, match=r"unknown mask type .* use one of \['full', 'causal', 'inv_causal', 'bi_causal'\]"
    ):
        AttnMaskType.parse(value)


# ------------------------------------------------------------------ fields
def test_spec_normalizes_fields():
    spec = AttnMaskSpec(np.array([[0, 2], [2, 4]]), torch.tensor([[0, 2], [0, 4]]), ["full", AttnMaskType.CAUSAL], 4)
    assert spec.q_ranges == ((0, 2), (2, 4)) and spec.k_ranges == ((0, 2), (0, 4))
    assert spec.mask_types == (AttnMaskType.FULL, AttnMaskType.CAUSAL)
    assert spec.mask_types == ("full", "causal"), "types compare equal to the seed's strings"
    assert spec.total_seqlen == 4 and spec.total_seqlen_k == 4, "total_seqlen_k defaults to total_seqlen"
    assert len(spec) == 2
    assert AttnMaskSpec([(0, 1)], [(0, 3)], ["full"], 1, 3).total_seqlen_k == 3
    t = spec.table
    np.testing.assert_array_equal(np.stack([t.qs, t.qe, t.ks, t.ke, t.types], 1), [[0, 2, 0, 2, 0], [2, 4, 0, 4, 1]])


def test_spec_equality_and_hash():
    a = AttnMaskSpec([(0, 2), (2, 4)], [(0, 2), (0, 4)], ["full", "causal"], 4)
    b = AttnMaskSpec(((0, 2), (2, 4)), ((0, 2), (0, 4)), [AttnMaskType.FULL, 1], 4, 4)
    assert a == b and hash(a) == hash(b)
    assert a != AttnMaskSpec([(0, 2), (2, 4)], [(0, 2), (0, 4)], ["full", "causal"], 4, 5)


# ------------------------------------------------------------------ fingerprint
def test_fingerprint_equal_for_equal_specs():
    a = AttnMaskSpec([(0, 2), (2, 4)], [(0, 2), (0, 4)], ["full", "causal"], 4)
    b = AttnMaskSpec(np.array([[0, 2], [2, 4]]), [(0, 2), (0, 4)], [AttnMaskType.FULL, "CAUSAL"], 4, 4)
    assert a.fingerprint() == b.fingerprint()
    assert hash(a.fingerprint()) == hash(b.fingerprint())
    assert varlen([3, 4]).fingerprint() == varlen([3, 0, 4]).fingerprint()


@pytest.mark.parametrize(
    "other",
    [
        AttnMaskSpec([(0, 2), (2, 4)], [(0, 2), (0, 4)], ["full", "full"], 4),  # type
        AttnMaskSpec([(0, 2), (2, 4)], [(0, 2), (0, 3)], ["full", "causal"], 4),  # k range
        AttnMaskSpec([(0, 2), (2, 3)], [(0, 2), (0, 4)], ["full", "causal"], 4),  # q range
        AttnMaskSpec([(0, 2), (2, 4)], [(0, 2), (0, 4)], ["full", "causal"], 5),  # total_seqlen
        AttnMaskSpec([(0, 2), (2, 4)], [(0, 2), (0, 4)], ["full", "causal"], 4, 6),  # total_seqlen_k
        AttnMaskSpec([(2, 4), (0, 2)], [(0, 4), (0, 2)], ["causal", "full"], 4),  # order
        AttnMaskSpec([(0, 2)], [(0, 2)], ["full"], 4),  # fewer slices
    ],
)
def test_fingerprint_differs(other):
    base = AttnMaskSpec([(0, 2), (2, 4)], [(0, 2), (0, 4)], ["full", "causal"], 4)
    assert base.fingerprint() != other.fingerprint()


def test_fingerprint_does_not_collide_across_slice_boundaries():
    """Same flattened numbers, different slice count: the print must still differ."""
    a = AttnMaskSpec([(0, 1), (1, 2)], [(0, 1), (1, 2)], ["full", "full"], 4)
    b = AttnMaskSpec([(0, 1)], [(0, 1)], ["full"], 4)
    assert len({a.fingerprint(), b.fingerprint(), varlen([1, 1, 2]).fingerprint()}) == 3


# ------------------------------------------------------------------ dense and geometry
def test_slice_cells_by_hand():
    """The oracle itself, on the four types with sq=3, sk=4 (causal bottom-right, inv_causal top-left)."""
    causal = [[1, 1, 0, 0], [1, 1, 1, 0], [1, 1, 1, 1]]
    inv = [[1, 1, 1, 1], [0, 1, 1, 1], [0, 0, 1, 1]]
    bi = [[1, 1, 0, 0], [0, 1, 1, 0], [0, 0, 1, 1]]
    np.testing.assert_array_equal(slice_cells("full", 3, 4), np.ones((3, 4)))
    np.testing.assert_array_equal(slice_cells("causal", 3, 4), causal)
    np.testing.assert_array_equal(slice_cells("inv_causal", 3, 4), inv)
    np.testing.assert_array_equal(slice_cells("bi_causal", 3, 4), bi)
    # q longer than k: causal hides the first rows, bi_causal is empty
    np.testing.assert_array_equal(slice_cells("causal", 3, 2), [[0, 0], [1, 0], [1, 1]])
    assert not slice_cells("bi_causal", 3, 2).any()


def test_to_dense_by_hand():
    spec = AttnMaskSpec([(0, 3), (1, 2)], [(1, 5), (0, 1)], ["causal", "inv_causal"], 4, 6)
    expected = np.zeros((4, 6), dtype=bool)
    expected[0:3, 1:5] = slice_cells("causal", 3, 4)
    expected[1, 0] = True
    mask = spec.to_dense()
    assert mask.dtype == torch.bool and mask.shape == (4, 6)
    np.testing.assert_array_equal(mask.numpy(), expected)
    np.testing.assert_array_equal(spec.row_key_counts(), [2, 4, 4, 0])
    assert spec.area() == 10


@settings(max_examples=40, deadline=None)
@given(spec=valid_specs(max_len=40, max_slices=14))
def test_dense_area_and_row_counts_match_independent_dense(spec):
    dense = dense_mask(spec)
    np.testing.assert_array_equal(spec.to_dense().numpy(), dense)
    assert spec.area() == int(dense.sum())
    counts = spec.row_key_counts()
    assert counts.shape == (spec.total_seqlen,)
    np.testing.assert_array_equal(counts, dense.sum(axis=1))
    np.testing.assert_array_equal(
        slice_areas(spec.table),
        [
            slice_cells(t, qe - qs, ke - ks).sum()
            for (qs, qe), (ks, ke), t in zip(spec.q_ranges, spec.k_ranges, spec.mask_types)
        ],
    )
    spec.validate()


@settings(max_examples=30, deadline=None)
@given(spec=valid_specs(max_len=40), data=st.data())
def test_block_areas_match_dense(spec, data):
    cuts = data.draw(st.lists(st.integers(0, spec.total_seqlen), max_size=5))
    bounds = np.array(sorted({0, spec.total_seqlen, *cuts}))
    dense = dense_mask(spec)
    expected = [dense[a:b].sum() for a, b in zip(bounds[:-1], bounds[1:])]
    np.testing.assert_array_equal(block_areas(spec.table, bounds), expected)


@settings(max_examples=30, deadline=None)
@given(spec=valid_specs(max_len=40), data=st.data())
def test_clip_slices_match_dense(spec, data):
    q0, q1 = sorted(data.draw(st.tuples(st.integers(0, spec.total_seqlen), st.integers(0, spec.total_seqlen))))
    k0, k1 = sorted(data.draw(st.tuples(st.integers(0, spec.total_seqlen_k), st.integers(0, spec.total_seqlen_k))))
    pieces, src = clip_slices(spec.table, q0, q1, k0, k1)
    assert (pieces.qs < pieces.qe).all() and (pieces.ks < pieces.ke).all() and (slice_areas(pieces) > 0).all()
    assert np.bincount(src, minlength=len(spec)).max(initial=0) <= 3
    clipped = AttnMaskSpec.from_table(pieces, spec.total_seqlen, spec.total_seqlen_k)
    expected = np.zeros_like(dense_mask(spec))
    expected[q0:q1, k0:k1] = dense_mask(spec)[q0:q1, k0:k1]
    np.testing.assert_array_equal(dense_mask(clipped), expected)
    for n, s in enumerate(src.tolist()):  # each piece lies inside the slice it came from
        one = AttnMaskSpec(
            [spec.q_ranges[s]], [spec.k_ranges[s]], [spec.mask_types[s]], spec.total_seqlen, spec.total_seqlen_k
        )
        piece = AttnMaskSpec(
            [clipped.q_ranges[n]],
            [clipped.k_ranges[n]],
            [clipped.mask_types[n]],
            spec.total_seqlen,
            spec.total_seqlen_k,
        )
        assert not (dense_mask(piece) & ~dense_mask(one)).any()
    clipped.validate()


@settings(max_examples=40, deadline=None)
@given(
    bands=st.lists(
        st.tuples(
            *[st.integers(0, 20)] * 4,
            st.one_of(st.integers(-20, 20), st.just(-BIG)),
            st.one_of(st.integers(-20, 20), st.just(BIG)),
        ),
        max_size=4,
    )
)
def test_clip_band_matches_definition(bands):
    """Each band {q0<=i<q1, k0<=j<k1, lo<=j-i<=hi} (empty bands too) becomes <= 3 exact, non-empty slices."""
    arrays = [np.array([b[n] for b in bands], dtype=np.int64) for n in range(6)]
    pieces, band = clip_band(*arrays)
    assert (pieces.qs < pieces.qe).all() and (pieces.ks < pieces.ke).all() and (slice_areas(pieces) > 0).all()
    i, j = np.arange(20)[:, None], np.arange(20)[None, :]
    for n, (q0, q1, k0, k1, lo, hi) in enumerate(bands):
        mine = AttnMaskSpec.from_table(pieces.take(np.nonzero(band == n)[0]), 20, 20)
        assert len(mine) <= 3
        expected = (i >= q0) & (i < q1) & (j >= k0) & (j < k1) & (j - i >= lo) & (j - i <= hi)
        np.testing.assert_array_equal(dense_mask(mine), expected)
        mine.validate()


def test_from_table_round_trip():
    spec = AttnMaskSpec([(0, 3), (1, 2)], [(1, 5), (0, 1)], ["causal", "inv_causal"], 4, 6)
    assert AttnMaskSpec.from_table(spec.table, 4, 6) == spec


def test_to_dense_on_meta_device_keeps_shape():
    """to_dense honours ``device`` (meta: no data, just shape and dtype)."""
    mask = varlen([2, 3]).to_dense(device="meta")
    assert mask.device.type == "meta" and mask.shape == (5, 5) and mask.dtype == torch.bool
