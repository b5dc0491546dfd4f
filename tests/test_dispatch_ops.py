"""dispatch / undispatch / position_ids in one process: layouts, cp=1 round trips, gradients, errors.

Multi-rank behaviour over real collectives is in test_dispatch_dist.py; here the ranks'
shards are produced one after another and reassembled with the plan's own indices.
"""

import numpy as np
import pytest
import torch

from flexcp.sharding import build_plan, dispatch, position_ids, undispatch
from flexcp.mask import causal, sliding_window, varlen

PLANS = [
    (varlen([300, 500, 201]), 3, 100),
    (causal(37), 4, 8),
    (sliding_window([45, 30], 7), 2, 7),
    (varlen([5, 17, 3, 40]), 4, 512),  # chunk reduced to the share
    (causal(4), 4, 512),  # one token per rank
]


@pytest.mark.parametrize("spec,cp,chunk", PLANS)
def test_shards_hold_their_global_rows_and_padding(spec, cp, chunk):
    plan = build_plan(spec, cp, chunk)
    x = torch.arange(plan.total_seqlen * 2).reshape(2, plan.total_seqlen, 1)  # sequence on dim 1
    shards = [dispatch(x, plan, r, dim=1, pad_value=-1) for r in range(cp)]
    for r, shard in enumerate(shards):
        pos = position_ids(plan, r)
        assert pos.dtype == torch.long and shard.shape == (2, plan.local_len, 1)
        valid = pos < plan.total_seqlen
        assert torch.equal(shard[:, valid], x[:, pos[valid]])
        assert (shard[:, ~valid] == -1).all()
    # reassemble in all-gather order, as undispatch does over the group
    gathered = torch.cat(shards, dim=1).unflatten(1, (plan.num_chunks, plan.chunk_size))
    restored = gathered[:, torch.from_numpy(plan.gathered_chunk_of_chunk.copy())].flatten(1, 2)
    assert torch.equal(restored[:, : plan.total_seqlen], x)


@pytest.mark.parametrize("spec,cp,chunk", PLANS)
def test_dispatch_grads_sum_to_the_replicated_input_grad(spec, cp, chunk):
    plan = build_plan(spec, cp, chunk)
    x = torch.randn(plan.total_seqlen, 3, dtype=torch.float64, requires_grad=True)
    w = torch.randn(plan.total_seqlen, 3, dtype=torch.float64)
    # rank r's loss weights its rows by w; the sum of the per-rank grads is w (each row on one rank)
    for r in range(cp):
        (dispatch(x, plan, r) * dispatch(w, plan, r)).sum().backward()
    assert torch.equal(x.grad, w)


@pytest.mark.parametrize("dim", [0, 1, -1])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.int64, torch.bool])
def test_cp1_round_trip_without_torch_distributed(dim, dtype):
    plan = build_plan(varlen([10, 23]), 1, 8)
    assert plan.padded_seqlen == 40 and plan.local_len == 40
    shape = [3, 3, 3]
    shape[dim] = 33
    x = (torch.randn(shape) * 10).to(dtype)
    local = dispatch(x, plan, 0, dim=dim)
    assert local.shape[dim] == 40
    assert torch.equal(undispatch(local, plan, None, dim=dim), x)


def test_cp1_gradcheck():
    plan = build_plan(causal(19), 1, 8)
    x = torch.randn(19, 2, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: undispatch(dispatch(t, plan, 0) ** 2, plan), (x,))
    x_local = torch.randn(plan.local_len, 2, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: undispatch(t, plan).sin(), (x_local,))


def test_position_ids_match_global_indices():
    plan = build_plan(varlen([300, 500, 201]), 3, 100)
    for r in range(3):
        assert np.array_equal(position_ids(plan, r).numpy(), plan.global_indices(r))


def test_bad_arguments():
    plan = build_plan(causal(37), 4, 8)
    x = torch.zeros(37, 2)
    with pytest.raises(ValueError, match="total_seqlen=37"):
        dispatch(torch.zeros(36, 2), plan, 0)
    with pytest.raises(ValueError, match="dim=2"):
        dispatch(x, plan, 0, dim=2)
    with pytest.raises(ValueError, match="rank=4"):
        dispatch(x, plan, 4)
    with pytest.raises(ValueError, match="local_len"):
        undispatch(torch.zeros(7, 2), plan)
    with pytest.raises(ValueError, match="init_process_group"):
        undispatch(dispatch(x, plan, 0), plan)  # cp=4 needs a process group
