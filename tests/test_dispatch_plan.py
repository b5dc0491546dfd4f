"""DispatchPlan and solvers: exact workloads, valid assignments, balance, determinism, errors."""

import logging

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from flexcp.bench.docdist import sample_pack
from flexcp.sharding import DEFAULT_CHUNK_SIZE, SOLVERS, DispatchPlan, build_plan, resolve_chunk_size
from flexcp.sharding.solver import contiguous, lpt, refine_swaps, zigzag
from flexcp.mask import AttnMaskSpec, block_causal, causal, prefix_tree, sliding_window, varlen
from strategies import valid_specs

self_attn_specs = valid_specs(max_len=40).filter(lambda s: s.total_seqlen == s.total_seqlen_k)


_ROWS: dict = {}


def dense_row_counts(spec: AttnMaskSpec) -> np.ndarray:
    """Keys per row from the materialized mask (independent of the vectorized geometry); cached per spec."""
    key = spec.fingerprint()
    if key not in _ROWS:
        _ROWS[key] = spec.to_dense().sum(dim=1).numpy()
    return _ROWS[key]


def check_plan(plan: DispatchPlan, spec: AttnMaskSpec) -> None:
    """Every invariant a plan promises, checked against the dense mask."""
    cp, cs = plan.cp_size, plan.chunk_size
    assert plan.total_seqlen == spec.total_seqlen
    assert plan.padded_seqlen % (cs * cp) == 0 and plan.padded_seqlen >= plan.total_seqlen
    assert plan.padded_seqlen - plan.total_seqlen < cs * cp  # no more padding than needed
    assert plan.num_chunks * cs == plan.padded_seqlen
    assert cs <= -(-plan.total_seqlen // cp)  # a chunk never exceeds a rank's share
    counts = {len(c) for c in plan.rank_chunks}
    assert counts == {plan.num_chunks // cp}
    assert all((np.diff(c) > 0).all() for c in plan.rank_chunks)
    assert np.array_equal(np.sort(np.concatenate(plan.rank_chunks)), np.arange(plan.num_chunks))
    rows = dense_row_counts(spec)
    rows = np.concatenate([rows, np.zeros(plan.padded_seqlen - len(rows), dtype=rows.dtype)])
    assert np.array_equal(plan.chunk_workloads, rows.reshape(-1, cs).sum(axis=1))
    assert plan.chunk_workloads.sum() == spec.area()
    loads = np.array([plan.chunk_workloads[c].sum() for c in plan.rank_chunks])
    expected = loads.max() / loads.mean() if loads.sum() else 1.0
    assert plan.imbalance == pytest.approx(expected, rel=1e-12)
    assert np.array_equal(plan.rank_workloads, loads)
    for r in range(cp):
        g = plan.global_indices(r)
        assert len(g) == plan.local_len
        assert (np.diff(g) > 0).all()
        assert plan.num_valid_local(r) == int((g < plan.total_seqlen).sum())
        chunks = g[::cs] // cs
        assert (plan.owner_of_chunk[chunks] == r).all()
        assert np.array_equal(plan.local_offset_of_chunk[chunks], np.arange(len(chunks)) * cs)


@settings(max_examples=150, deadline=None)
@given(
    spec=self_attn_specs,
    cp=st.integers(1, 4),
    chunk=st.integers(1, 9),
    solver=st.sampled_from(sorted(SOLVERS)),
)
def test_plan_invariants_on_random_masks(spec, cp, chunk, solver):
    if spec.total_seqlen < cp:
        with pytest.raises(ValueError, match="cp_size"):
            build_plan(spec, cp, chunk, solver)
        return
    check_plan(build_plan(spec, cp, chunk, solver), spec)


@pytest.mark.parametrize(
    "spec",
    [
        causal(1001),
        varlen([300, 500, 201]),
        varlen([40, 0, 333, 1, 627], causal=False),
        sliding_window([700, 301], 64),
        block_causal([100, 250, 651]),
        prefix_tree([200, 300, 150, 351], [[0, 1], [0, 2, 3]])[0],
    ],
    ids=["causal", "varlen", "varlen_full", "window", "block_causal", "prefix_tree"],
)
@pytest.mark.parametrize("cp,chunk", [(1, 512), (2, 100), (3, 64), (4, 37), (8, 16)])
def test_plan_invariants_on_mask_families(spec, cp, chunk):
    for solver in SOLVERS:
        check_plan(build_plan(spec, cp, chunk, solver), spec)


def test_lpt_known_assignment():
    # descending: c0(5)->r0, c2(4)->r1, c4(3)->r1, c3(2)->r0, c1(1)->r0 (tie at 7: lower rank), c5(0)->r1
    got = lpt(np.array([5, 1, 4, 2, 3, 0]), 2)
    assert got.tolist() == [[0, 1, 3], [2, 4, 5]]


def test_zigzag_and_contiguous_layouts():
    w = np.zeros(8, dtype=np.int64)
    assert zigzag(w, 2).tolist() == [[0, 1, 6, 7], [2, 3, 4, 5]]
    assert sorted(map(sorted, zigzag(np.zeros(6, dtype=np.int64), 2).tolist())) == [[0, 1, 5], [2, 3, 4]]
    assert contiguous(w, 4).tolist() == [[0, 1], [2, 3], [4, 5], [6, 7]]


def test_refine_swaps_fixes_a_bad_assignment_and_keeps_counts():
    w = np.array([10, 9, 8, 1, 1, 1], dtype=np.int64)
    bad = np.array([[0, 1, 2], [3, 4, 5]])
    better = refine_swaps(bad, w)
    loads = w[better].sum(axis=1)
    assert loads.max() < w[bad].sum(axis=1).max()
    assert better.shape == bad.shape and sorted(better.ravel()) == list(range(6))


@settings(max_examples=60, deadline=None)
@given(
    w=st.lists(st.integers(0, 10**6), min_size=1, max_size=12).map(np.array),
    cp=st.integers(1, 4),
)
def test_greedy_never_worse_than_lpt(w, cp):
    w = np.repeat(w, cp).astype(np.int64)  # length divisible by cp
    assert w[SOLVERS["greedy"](w, cp)].sum(axis=1).max() <= w[lpt(w, cp)].sum(axis=1).max()


@pytest.mark.parametrize("cp", [2, 4, 8])
def test_greedy_beats_zigzag_on_causal_and_packed(cp):
    for spec in (causal(64 * 1024), varlen(sample_pack(64 * 1024, rng=cp).tolist())):
        greedy = build_plan(spec, cp, 512, "greedy").imbalance
        assert greedy <= build_plan(spec, cp, 512, "zigzag").imbalance
        assert greedy <= build_plan(spec, cp, 512, "lpt").imbalance
        assert greedy < build_plan(spec, cp, 512, "contiguous").imbalance


def test_done_when_greedy_balances_real_packs_at_cp8_128k():
    for seed in range(5):
        spec = varlen(sample_pack(128 * 1024, rng=seed).tolist())
        greedy = build_plan(spec, 8, 512, "greedy").imbalance
        assert greedy <= 1.05
        assert greedy < build_plan(spec, 8, 512, "zigzag").imbalance


def test_all_zero_workload_has_imbalance_one():
    spec = AttnMaskSpec([], [], [], 100)
    plan = build_plan(spec, 4, 8)
    assert plan.imbalance == 1.0 and plan.chunk_workloads.sum() == 0


def test_deterministic_fingerprint_and_equality():
    spec = varlen([300, 500, 201])
    a, b = build_plan(spec, 3, 100), build_plan(varlen([300, 500, 201]), 3, 100)
    assert a.fingerprint() == b.fingerprint() and a == b and hash(a) == hash(b)
    assert a.fingerprint() != build_plan(spec, 3, 100, "zigzag").fingerprint()
    assert a.fingerprint() != build_plan(spec, 3, 50).fingerprint()
    assert a != build_plan(spec, 2, 100)


def test_plan_arrays_are_read_only():
    plan = build_plan(causal(64), 2, 8)
    with pytest.raises(ValueError):
        plan.rank_chunks[0][0] = 5
    with pytest.raises(ValueError):
        plan.chunk_workloads[0] = 5


def test_chunk_larger_than_share_is_reduced_and_logged(caplog):
    with caplog.at_level(logging.INFO, logger="flexcp"):
        plan = build_plan(causal(1000), 4, 512)
    assert plan.chunk_size == 250 and plan.padded_seqlen == 1000
    assert "chunk_size=512" in caplog.text and "using chunk_size=250" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="flexcp"):
        assert build_plan(causal(1001), 4, 512).chunk_size == 251
        assert build_plan(causal(4), 4, 512).chunk_size == 1
        assert build_plan(causal(4096), 4, 512).chunk_size == 512
    assert "using chunk_size=512" not in caplog.text


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(spec=causal(3), cp_size=4), "fewer than cp_size=4"),
        (dict(spec=AttnMaskSpec([], [], [], 0), cp_size=1), "fewer than cp_size=1"),
        (dict(spec=causal(64), cp_size=0), "cp_size"),
        (dict(spec=causal(64), cp_size=2.5), "cp_size"),
        (dict(spec=causal(64), cp_size=True), "cp_size"),
        (dict(spec=causal(64), cp_size=2, chunk_size=0), "chunk_size"),
        (dict(spec=causal(64), cp_size=2, solver="best"), "solver='best'"),
        (dict(spec=AttnMaskSpec([(0, 8)], [(0, 4)], ["full"], 8, 4), cp_size=2), "total_seqlen_k"),
        (dict(spec=AttnMaskSpec([(0, 8), (4, 8)], [(0, 8), (0, 8)], ["full", "full"], 8), cp_size=2), "same"),
        (dict(spec=[(0, 8)], cp_size=2), "AttnMaskSpec"),
    ],
)
def test_bad_input_raises_value_error(kwargs, match):
    with pytest.raises(ValueError, match=match):
        build_plan(**kwargs)


def test_rank_out_of_range():
    plan = build_plan(causal(64), 2, 8)
    with pytest.raises(ValueError, match="rank=2"):
        plan.global_indices(2)


@given(total=st.integers(1, 5000), cp=st.integers(1, 8), asked=st.one_of(st.none(), st.integers(1, 3000)))
def test_one_chunk_size_rule(total: int, cp: int, asked) -> None:
    share = -(-total // cp)
    got = resolve_chunk_size(total, cp, asked)
    if asked is not None:
        assert got == min(asked, share)  # a requested size, never more than one rank's share
    elif cp == 1:
        assert got == total  # no padding at cp = 1
    else:
        assert got == min(DEFAULT_CHUNK_SIZE, share)
    if total >= cp:
        plan = build_plan(AttnMaskSpec.causal(total), cp, asked if asked is not None else got)
        assert plan.chunk_size == got and plan.padded_seqlen % (got * cp) == 0
        assert plan.padded_seqlen - total < got * cp
