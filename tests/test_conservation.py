"""The conservation check (``mask.cover``) and where it runs: router splits, cuDNN plans, distributed plans.

The check itself is compared with dense cell counts on random tables; each place that builds
parts is shown to raise ``CoverageError`` (and compute nothing) when its parts are tampered with.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import flexcp.dist_attn.plan as dist_plan
import flexcp.kernels.cudnn.backend as cudnn_backend
from cudnn_emulator import EmulatedCudnn
from flexcp.dist_attn.plan import build_rank_plans
from flexcp.kernels import AutoBackend, ReferenceBackend, register_backend
from flexcp.kernels.backend import Offer
from flexcp.kernels.cudnn.plan import UNBOUNDED, plan_launches, to_entries
from flexcp.mask import AttnMaskSpec, SliceTable, clip_band, clip_slices
from flexcp.mask.types import BI_CAUSAL, CAUSAL, FULL, INV_CAUSAL
from flexcp.mask.cover import CoverageError, check_cover, cover_error, shared_cells
from flexcp.sharding.plan import build_plan
from reference_attention import coverage
from router_cases import BANDS_FAST, BANDS_SLOW
from strategies import any_specs, composed_specs

OFF_DIAGONAL = AttnMaskSpec([(0, 8), (7, 9), (9, 10), (3, 6)], [(5, 7), (8, 10), (8, 9), (8, 10)],
                            ["causal", "full", "bi_causal", "bi_causal"], 10)  # the repro's first mask


def _spec_of(table: SliceTable, tq: int, tk: int) -> AttnMaskSpec:
    return AttnMaskSpec(np.stack([table.qs, table.qe], 1).tolist(), np.stack([table.ks, table.ke], 1).tolist(),
                        table.types.tolist(), tq, tk)


@settings(max_examples=60, deadline=None)
@given(any_specs(max_len=24, max_slices=8), any_specs(max_len=24, max_slices=8))
def test_shared_cells_is_the_dense_product_of_coverages(a, b):
    tq, tk = max(a.total_seqlen, b.total_seqlen), max(a.total_seqlen_k, b.total_seqlen_k)
    dense_a = coverage(_spec_of(a.table, tq, tk))
    dense_b = coverage(_spec_of(b.table, tq, tk))
    assert shared_cells(a.table, b.table) == int((dense_a * dense_b).sum())


@settings(max_examples=60, deadline=None)
@given(composed_specs(max_len=30, max_slices=12), any_specs(max_len=30, max_slices=6))
def test_cover_check_agrees_with_dense_cells(mask, parts):
    """``cover_error`` is None exactly when the parts cover every cell of the mask once and nothing else."""
    tq, tk = max(mask.total_seqlen, parts.total_seqlen), max(mask.total_seqlen_k, parts.total_seqlen_k)
    want = coverage(_spec_of(mask.table, tq, tk))
    assert (cover_error(mask.table, [parts.table]) is None) == bool((coverage(_spec_of(parts.table, tq, tk)) == want).all())


@settings(max_examples=40, deadline=None)
@given(composed_specs(max_len=40, max_slices=30), st.data())
def test_cuts_of_a_mask_cover_it_and_mutations_do_not(spec, data):
    t = spec.table
    q_cut = data.draw(st.integers(0, spec.total_seqlen))
    k_cut = data.draw(st.integers(0, spec.total_seqlen_k))
    quads = [clip_slices(t, q0, q1, k0, k1)[0] for q0, q1 in ((0, q_cut), (q_cut, spec.total_seqlen))
             for k0, k1 in ((0, k_cut), (k_cut, spec.total_seqlen_k))]  # fmt: skip
    check_cover(t, quads, "quadrants")
    pieces = SliceTable.concat(quads).nonempty()
    if len(pieces) == 0:
        return
    i = data.draw(st.integers(0, len(pieces) - 1))
    keep = np.arange(len(pieces)) != i
    with pytest.raises(CoverageError, match="quadrants"):
        check_cover(t, [pieces.take(np.nonzero(keep)[0])], "quadrants")  # a piece dropped
    with pytest.raises(CoverageError):
        check_cover(t, [pieces, pieces.take([i])], "quadrants")  # a piece twice
    with pytest.raises(CoverageError):
        check_cover(t, [pieces.take(np.nonzero(keep)[0]), pieces.take([i]).shifted(0, 1)], "quadrants")  # moved


# ------------------------------------------------------------------ the router's split
class LossyGroup(EmulatedCudnn):
    """An emulated cuDNN backend whose offer loses one cell of its first part (like launch_table once did)."""

    name = "lossy_group"

    def offer(self, table, tq, tk, cost, **shape):
        o = super().offer(table, tq, tk, cost, **shape)
        first = o.parts[0]
        return Offer((first.take(np.arange(len(first) - 1)),) + o.parts[1:], o.seconds, o.call_s)


class Rest(ReferenceBackend):
    name = "cover_rest"


register_backend("lossy_group", LossyGroup)
register_backend("cover_rest", Rest)


def test_a_split_that_loses_cells_is_refused_before_computing():
    costs = {"lossy_group": BANDS_SLOW, "cover_rest": BANDS_FAST}
    auto = AutoBackend(costs, whole=tuple(costs), split=tuple(costs), device_types=("cpu",))
    spec = AttnMaskSpec([(0, 20), (0, 20), (20, 40)], [(0, 10), (10, 30), (0, 40)], ["full", "bi_causal", "causal"], 40)
    q, k = torch.zeros(40, 2, 4, dtype=torch.float64), torch.zeros(40, 1, 4, dtype=torch.float64)
    prep = auto.prepare(spec.table, 40, 40, q.device)
    with pytest.raises(CoverageError, match="backend='auto' route 'lossy_group\\+cover_rest'"):
        auto.route(prep, q, k, 0.0)


# ------------------------------------------------------------------ the cuDNN plan
def _signature_only_launch_table(la):
    """launch_table as it was before issue 20: every ``(L, 0)`` signature read as a window on the diagonal."""
    left, right = la.sig
    qe, ke = la.qs + la.sq, la.ks + la.sk
    if left is not None and right == 0:
        return clip_band(la.qs, qe, la.ks, ke, np.full_like(la.qs, 1 - left), np.zeros_like(la.qs))[0]
    kind = {(None, None): FULL, (None, 0): CAUSAL}.get(la.sig, INV_CAUSAL if right == UNBOUNDED else BI_CAUSAL)
    return SliceTable(la.qs.copy(), qe, la.ks.copy(), ke, np.full_like(la.qs, kind))


def test_cudnn_plan_check_catches_the_old_launch_table(monkeypatch):
    EmulatedCudnn().prepare(OFF_DIAGONAL.table, 10, 10, torch.device("cpu"))  # the fixed translation passes
    monkeypatch.setattr(cudnn_backend, "launch_table", _signature_only_launch_table)
    with pytest.raises(CoverageError, match="cuDNN launch"):
        EmulatedCudnn().prepare(OFF_DIAGONAL.table, 10, 10, torch.device("cpu"))


def test_cudnn_plan_check_catches_a_missing_launch():
    spec = AttnMaskSpec([(0, 20), (0, 20), (20, 40)], [(0, 10), (10, 30), (0, 40)], ["full", "bi_causal", "causal"], 40)
    launches = plan_launches(to_entries(spec.table), 40)
    assert len(launches) > 1
    with pytest.raises(CoverageError, match="cuDNN plan's launches"):
        cudnn_backend.check_launches(spec.table, launches[1:])


# ------------------------------------------------------------------ the distributed plan
SPEC = AttnMaskSpec.varlen([7, 30, 1, 22, 40])


def test_distributed_plan_check_catches_a_dropped_stage_slice(monkeypatch):
    build_rank_plans(SPEC.table, build_plan(SPEC, 3, 8), 2)
    real = dist_plan._stage

    def lossy(*args):
        s = real(*args)
        t = s.table.nonempty()
        return type(s)(s.distances, s.recv_counts, s.send_rows, t.take(np.arange(len(t) - 1)), s.recv_len) if len(t) else s

    monkeypatch.setattr(dist_plan, "_stage", lossy)
    with pytest.raises(CoverageError, match="distributed plan"):
        build_rank_plans(SPEC.table, build_plan(SPEC, 3, 8), 2)


def test_distributed_plan_check_catches_rows_sent_wrong(monkeypatch):
    """The check maps receive buffers back through what the sources send: a shifted send list is caught."""
    real = dist_plan._send_rows

    def shifted(*args):
        return tuple(np.where(rows > 0, rows - 1, rows) for rows in real(*args))

    monkeypatch.setattr(dist_plan, "_send_rows", shifted)
    with pytest.raises(CoverageError):
        build_rank_plans(SPEC.table, build_plan(SPEC, 2, 8), 1)
