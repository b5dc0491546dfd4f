"""dispatch / undispatch over real gloo process groups at cp = 1..4: round trips and exact gradients.

One spawn per world size runs every case (spawning costs seconds). Values are small
integers stored in float64, so sums are exact whatever the reduction order and every
comparison is ``torch.equal``.
"""

import warnings

import pytest
import torch
import torch.distributed as dist

from flexcp.sharding import build_plan, dispatch, undispatch
from flexcp.mask import block_causal, causal, sliding_window, varlen
from multiproc import run_spawned


def _cases(world_size):
    """(spec, chunk_size, solver): uneven totals, chunks that do not divide, reduced chunks, all solvers."""
    return [
        (varlen([300, 500, 201]), 100, "greedy"),
        (causal(37), 8, "zigzag"),
        (sliding_window([45, 30], 7), 7, "contiguous"),
        (block_causal([13, 29, 6]), 5, "lpt"),
        (varlen([5, 17, 3, 40]), 512, "greedy"),  # chunk reduced to the rank share
        (causal(world_size), 512, "greedy"),  # one token per rank
    ]


def _ints(shape, seed, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(-4, 5, shape, generator=g).to(dtype)


def _check_all(rank, world_size):
    """Every case, and no FutureWarning on the way (torch 2.13 deprecates the old collective names)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        prints = _check_cases(rank, world_size)
    deprecated = [str(w.message) for w in caught if issubclass(w.category, FutureWarning)]
    assert not deprecated, deprecated
    return prints


def _check_cases(rank, world_size):
    prints = []
    for n, (spec, chunk, solver) in enumerate(_cases(world_size)):
        plan = build_plan(spec, world_size, chunk, solver)
        prints.append(plan.fingerprint())
        S = plan.total_seqlen
        # round trips on several dims and dtypes
        for shape, dim in (((S, 3), 0), ((2, S, 4), 1), ((2, 3, S), -1)):
            for dtype in (torch.float32, torch.bfloat16, torch.int64, torch.bool):
                x = _ints(shape, seed=n).to(dtype)
                local = dispatch(x, plan, rank, dim=dim)
                assert local.shape[dim] == plan.local_len
                assert torch.equal(undispatch(local, plan, None, dim=dim), x), (n, shape, dtype)

        # undispatch backward: loss = sum_r f_r(undispatch(x)), f_r = <W_r, .>; grad = shard of sum_r W_r
        weights = [_ints((2, S, 3), seed=100 + r) for r in range(world_size)]
        x_local = dispatch(_ints((2, S, 3), seed=n), plan, rank, dim=1).requires_grad_()
        (undispatch(x_local, plan, dist.group.WORLD, dim=1) * weights[rank]).sum().backward()
        assert torch.equal(x_local.grad, dispatch(sum(weights), plan, rank, dim=1)), n

        # dispatch backward: per-rank grads of a replicated input sum (all-reduce) to the true grad
        x = _ints((S, 3), seed=n).requires_grad_()
        w = _ints((S, 3), seed=200)
        (dispatch(x, plan, rank) * dispatch(w, plan, rank)).sum().backward()
        grad = x.grad.clone()
        dist.all_reduce(grad)
        assert torch.equal(grad, w), n

        # the composition: y = undispatch(dispatch(x)^2); loss_r = <W_r, y>; summed grad = 2 x sum_r W_r
        x.grad = None
        weights = [_ints((S, 3), seed=300 + r) for r in range(world_size)]
        y = undispatch(dispatch(x, plan, rank) ** 2, plan, None)
        assert torch.equal(y, x.detach() ** 2)
        (y * weights[rank]).sum().backward()
        grad = x.grad.clone()
        dist.all_reduce(grad)
        assert torch.equal(grad, 2 * x.detach() * sum(weights)), n
    return prints


@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
def test_round_trips_and_exact_gradients_over_gloo(world_size):
    prints = run_spawned(_check_all, world_size, timeout=180)
    assert all(p == prints[0] for p in prints)  # every rank built the same plans independently
