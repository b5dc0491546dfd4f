"""Per-rank distributed attention plans, checked in one process by simulating the transfers.

For every rank the receive buffers are assembled from the owners' send lists, attention
is computed stage by stage and merged; the result must equal global attention on the
rank's rows, and the rows received must be exactly the distinct remote keys needed.
"""

import numpy as np
import pytest
import torch

from flexcp.sharding.plan import build_plan
from flexcp.kernels.compose import merge_partials
from flexcp.dist_attn.plan import build_rank_plans
from flexcp.kernels import ReferenceBackend, attention
from flexcp.mask import AttnMaskSpec

BACKEND = ReferenceBackend(block_q=32, block_k=32)


def _specs():
    rng = np.random.default_rng(0)
    docs = [int(x) for x in rng.integers(1, 40, size=12)]
    yield "causal", AttnMaskSpec.causal(150)
    yield "varlen", AttnMaskSpec.varlen(docs + [1, 1, 3])
    yield "prefix_tree", AttnMaskSpec.prefix_tree([40, 25, 30, 1, 17], [[0, 1], [0, 2, 3], [0, 2, 4]])[0]
    yield "sliding", AttnMaskSpec.sliding_window([90, 50], 13)
    yield "two_sided", AttnMaskSpec.sliding_window([120], 9, causal=False)
    yield "mixed", AttnMaskSpec(
        [(0, 30), (10, 60), (60, 100), (70, 110)],
        [(0, 45), (50, 90), (0, 50), (100, 130)],
        ["bi_causal", "inv_causal", "full", "causal"],
        130,
    )


def _simulate(spec, cp, chunk, num_stages, q, k, v):
    dplan = build_plan(spec, cp, chunk)
    plans = build_rank_plans(spec.table, dplan, num_stages)
    pad = dplan.padded_seqlen - spec.total_seqlen
    kp = torch.cat([k, k.new_zeros(pad, *k.shape[1:])])
    vp = torch.cat([v, v.new_zeros(pad, *v.shape[1:])])
    qp = torch.cat([q, q.new_zeros(pad, *q.shape[1:])])
    idx = [torch.as_tensor(dplan.global_indices(r)) for r in range(cp)]
    results = []
    for r, p in enumerate(plans):
        ql, kl, vl = qp[idx[r]], kp[idx[r]], vp[idx[r]]
        prep = BACKEND.prepare(p.host_table, p.local_len, p.local_len, q.device)
        out, lse = BACKEND.forward(ql, kl, vl, prep, 0.3, 0.0, out_dtype=torch.float64)
        received = 0
        for s, stage in enumerate(p.stages):
            parts_k, parts_v = [], []
            for src in range(cp):
                rows = torch.as_tensor(plans[src].stages[s].send_rows[r], dtype=torch.long)
                assert len(rows) == stage.recv_counts[src]
                parts_k.append(kp[idx[src]][rows])
                parts_v.append(vp[idx[src]][rows])
            kr, vr = torch.cat(parts_k), torch.cat(parts_v)
            received += len(kr)
            sp = BACKEND.prepare(stage.table, p.local_len, stage.recv_len, q.device)
            o, l = BACKEND.forward(ql, kr, vr, sp, 0.3, 0.0, out_dtype=torch.float64)
            out, lse = merge_partials(out, lse, o, l)
        results.append((idx[r], out, lse, received, dplan))
    return results


@pytest.mark.parametrize("cp, num_stages", [(1, 1), (2, 1), (2, 2), (3, 2), (4, 1), (4, 3)])
def test_simulated_ranks_match_global_attention(cp, num_stages):
    torch.manual_seed(cp)
    for name, spec in _specs():
        n = spec.total_seqlen
        q = torch.randn(n, 4, 8, dtype=torch.float64)
        k = torch.randn(n, 2, 8, dtype=torch.float64)
        v = torch.randn(n, 2, 8, dtype=torch.float64)
        ref_out, ref_lse = attention(q, k, v, spec, softmax_scale=0.3)
        dense = spec.to_dense()
        for rows, out, lse, received, dplan in _simulate(spec, cp, 8, num_stages, q, k, v):
            real = rows < n
            torch.testing.assert_close(out[real], ref_out[rows[real]], rtol=1e-6, atol=1e-6, msg=name)
            torch.testing.assert_close(lse[real], ref_lse[rows[real]], msg=name)  # float64 in: float64 lse
            assert (out[~real] == 0).all() and torch.isinf(lse[~real]).all()
            # zero redundancy: exactly the distinct remote keys this rank's rows need
            needed = dense[rows[real]].any(dim=0).nonzero().flatten()
            mine = set(rows.tolist())
            assert received == sum(1 for j in needed.tolist() if j not in mine), name
