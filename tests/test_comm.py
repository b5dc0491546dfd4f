"""GroupCast / GroupReduce on gloo against a single-process simulation of the same random plans."""

import numpy as np
import pytest
import torch
import torch.distributed as dist

from flexcp.comm import CastPlan, CommVolume, group_cast, group_reduce, row_bytes, validate_plan
from multiproc import run_spawned

WORLD_SIZES = [2, 3, 4]
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float64": torch.float64}
ROW_SHAPES = [(2, 3), (4,)]  # K-like and V-like rows of different shapes, packed into one collective


def random_requests(seed: int, world_size: int) -> tuple[list[int], list[list[np.ndarray]]]:
    """Local row counts and a request table [dst][src]: empty entries, sends to self, repeated rows."""
    rng = np.random.default_rng(seed)
    sizes = [int(n) for n in rng.integers(0, 7, world_size)]
    sizes[0] = max(sizes[0], 1)
    requests = [[np.zeros(0, dtype=np.int64) for _ in range(world_size)] for _ in range(world_size)]
    for dst in range(world_size):
        for src in range(world_size):
            if sizes[src] and rng.random() > 0.3:
                requests[dst][src] = rng.integers(0, sizes[src], int(rng.integers(1, 6)))
    requests[0][0] = np.array([0, 0])  # a self-send with a repeated row, always
    return sizes, requests


def local_tensors(seed: int, rank: int, rows: int, dtype: torch.dtype) -> list[torch.Tensor]:
    """Integer-valued tensors (exact in bf16 and in sums) that every rank can regenerate for any rank."""
    gen = torch.Generator().manual_seed(seed * 1000 + rank)
    return [torch.randint(-8, 8, (rows, *shape), generator=gen).to(dtype) for shape in ROW_SHAPES]


def expected_cast(seed: int, rank: int, sizes, requests, dtype) -> list[torch.Tensor]:
    per_src = [local_tensors(seed, src, sizes[src], dtype) for src in range(len(sizes))]
    index = [torch.from_numpy(requests[rank][src]) for src in range(len(sizes))]
    return [torch.cat([per_src[src][i][index[src]] for src in range(len(sizes))]) for i in range(len(ROW_SHAPES))]


def expected_reduce(seed: int, rank: int, sizes, requests, dtype) -> list[torch.Tensor]:
    """out (seed + 1) plus every destination's partials (seed + 2) for rows it got from `rank`, in float64."""
    world_size = len(sizes)
    out = [t.double() for t in local_tensors(seed + 1, rank, sizes[rank], dtype)]
    for dst in range(world_size):
        recv_rows = sum(len(requests[dst][src]) for src in range(world_size))
        partials = local_tensors(seed + 2, dst, recv_rows, dtype)
        start = sum(len(requests[dst][src]) for src in range(rank))
        rows = torch.from_numpy(requests[dst][rank])
        for o, p in zip(out, partials):
            o.index_add_(0, rows, p[start : start + len(rows)].double())
    return out


def _cast_and_reduce(rank, world_size, seed, dtype_name, async_op):
    dtype = DTYPES[dtype_name]
    sizes, requests = random_requests(seed, world_size)
    plan = CastPlan.from_requests(rank, requests)
    validate_plan(plan, None)
    kv = local_tensors(seed, rank, sizes[rank], dtype)
    got = group_cast(kv, plan, None, async_op=async_op)
    got = got.wait() if async_op else got
    for g, e in zip(got, expected_cast(seed, rank, sizes, requests, dtype)):
        assert g.dtype == dtype and g.shape == e.shape and torch.equal(g, e), (g, e)

    partials = local_tensors(seed + 2, rank, plan.num_recv, dtype)
    out = local_tensors(seed + 1, rank, sizes[rank], dtype)
    result = group_reduce(partials, plan, None, out, async_op=async_op)
    result = result.wait() if async_op else result
    assert all(r is o for r, o in zip(result, out))
    for o, e in zip(out, expected_reduce(seed, rank, sizes, requests, dtype)):
        assert torch.equal(o, e.to(dtype)), (o, e)
    return plan.volume(row_bytes(kv))


@pytest.mark.parametrize("world_size", WORLD_SIZES)
@pytest.mark.parametrize("dtype_name,async_op", [("float32", False), ("bfloat16", False), ("bfloat16", True)])
def test_cast_and_reduce_match_simulation(world_size, dtype_name, async_op):
    for seed in (world_size, 10 + world_size):
        volumes = run_spawned(_cast_and_reduce, world_size, seed, dtype_name, async_op)
        sizes, requests = random_requests(seed, world_size)
        row = row_bytes(local_tensors(seed, 0, 0, DTYPES[dtype_name]))
        assert row == 10 * DTYPES[dtype_name].itemsize
        for rank, volume in enumerate(volumes):
            remote_in = sum(len(requests[rank][s]) for s in range(world_size) if s != rank)
            remote_out = sum(len(requests[d][rank]) for d in range(world_size) if d != rank)
            self_rows = len(requests[rank][rank])
            assert volume == CommVolume(remote_out, remote_in, remote_out * row, remote_in * row, self_rows)


def _adjoint(rank, world_size, seed):
    """<cast(x), y> == <x, reduce(y)> summed over ranks, in float64 with random values."""
    sizes, requests = random_requests(seed, world_size)
    plan = CastPlan.from_requests(rank, requests)
    gen = torch.Generator().manual_seed(seed + rank)
    x = [torch.randn(sizes[rank], *s, generator=gen, dtype=torch.float64) for s in ROW_SHAPES]
    y = [torch.randn(plan.num_recv, *s, generator=gen, dtype=torch.float64) for s in ROW_SHAPES]
    cast_x = group_cast(x, plan, None)
    reduced = group_reduce(y, plan, None, [torch.zeros_like(t) for t in x], reduce_dtype=torch.float64)
    sums = torch.tensor(
        [sum((a * b).sum() for a, b in zip(cast_x, y)), sum((a * b).sum() for a, b in zip(x, reduced))],
        dtype=torch.float64,
    )
    dist.all_reduce(sums)
    return sums.tolist()


@pytest.mark.parametrize("world_size", WORLD_SIZES)
def test_reduce_is_transpose_of_cast(world_size):
    lhs, rhs = run_spawned(_adjoint, world_size, 7)[0]
    assert lhs != 0.0 and abs(lhs - rhs) <= 1e-12 * max(1.0, abs(lhs))


def _overlapping_async_ops(rank, world_size, seed):
    """Three collectives in flight at once (two casts, one reduce), waited in reverse order."""
    sizes, requests = random_requests(seed, world_size)
    plan = CastPlan.from_requests(rank, requests)
    sizes2, requests2 = random_requests(seed + 100, world_size)
    plan2 = CastPlan.from_requests(rank, requests2)
    kv = local_tensors(seed, rank, sizes[rank], torch.float32)
    single = local_tensors(seed + 100, rank, sizes2[rank], torch.float32)[1]
    out = local_tensors(seed + 1, rank, sizes[rank], torch.float32)
    h1 = group_cast(kv, plan, None, async_op=True)
    h2 = group_cast([single], plan2, None, async_op=True)
    h3 = group_reduce(local_tensors(seed + 2, rank, plan.num_recv, torch.float32), plan, None, out, async_op=True)
    reduced, got2, got1 = h3.wait(), h2.wait(), h1.wait()
    assert h1.wait() is got1  # wait is idempotent
    assert torch.equal(got2[0], expected_cast(seed + 100, rank, sizes2, requests2, torch.float32)[1])
    assert all(torch.equal(g, e) for g, e in zip(got1, expected_cast(seed, rank, sizes, requests, torch.float32)))
    expected = expected_reduce(seed, rank, sizes, requests, torch.float32)
    assert all(torch.equal(o, e.float()) for o, e in zip(reduced, expected))
    return True


def test_async_ops_overlap():
    assert run_spawned(_overlapping_async_ops, 3, 5) == [True] * 3


def _bf16_partials_sum_in_float32(rank, world_size):
    """Every rank sends its row 0 to every rank; each returns a bf16 partial of 1 onto an owner value of 256."""
    requests = [[np.array([0]) for _ in range(world_size)] for _ in range(world_size)]
    plan = CastPlan.from_requests(rank, requests)
    out = torch.full((1, 1), 256.0, dtype=torch.bfloat16)
    group_reduce([torch.ones(world_size, 1, dtype=torch.bfloat16)], plan, None, [out])
    return out.item()


@pytest.mark.parametrize("world_size", WORLD_SIZES)
def test_bf16_partials_reduce_in_float32(world_size):
    # bf16 spacing at 256 is 2: adding 1.0 at a time in bf16 would round back to 256 every time
    expected = torch.tensor(256.0 + world_size).to(torch.bfloat16).item()
    assert expected > 256.0
    assert run_spawned(_bf16_partials_sum_in_float32, world_size) == [expected] * world_size


def _inconsistent_plan(rank, world_size):
    _, requests = random_requests(3, world_size)
    plan = CastPlan.from_requests(rank, requests)
    if rank == 1:
        counts = list(plan.recv_counts)
        counts[0] += 1
        plan = CastPlan(rank, plan.send_rows, counts)
    validate_plan(plan, None)


def _plan_for_wrong_group(rank, world_size):
    plan = CastPlan(rank, [[0]] * (world_size + 1), [1] * (world_size + 1))
    group_cast([torch.zeros(1, 2)], plan, None)


def test_mismatched_plans_raise_on_every_rank():
    with pytest.raises(ValueError, match="inconsistent CastPlans: rank 0 sends .* to rank 1"):
        run_spawned(_inconsistent_plan, 3)
    with pytest.raises(ValueError, match=r"plan is for rank (\d) of 3, but this is rank \1 of a group of 2"):
        run_spawned(_plan_for_wrong_group, 2)


def test_group_of_one_needs_no_process_group():
    assert not dist.is_initialized()
    x = torch.arange(8.0).reshape(4, 2)
    plan = CastPlan(0, [np.array([2, 0, 2])], [3])
    (got,) = group_cast([x], plan, None)
    assert torch.equal(got, x[[2, 0, 2]])
    out = torch.zeros(4, 2)
    group_reduce([torch.ones(3, 2)], plan, None, [out])
    assert out[:, 0].tolist() == [1.0, 0.0, 2.0, 0.0]


def test_volume_and_offsets():
    plan = CastPlan.from_requests(1, [[[], [0, 1]], [[3], [2, 2, 0]]])
    assert plan.send_counts == (2, 3) and plan.recv_counts == (1, 3)
    assert plan.recv_offsets.tolist() == [0, 1, 4] and plan.min_local_rows == 3
    assert plan.volume(8) == CommVolume(2, 1, 16, 8, 3)
    assert plan.volume(8).transposed() == CommVolume(1, 2, 8, 16, 3)


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: CastPlan(0, [[0]], [1, 2]), "one entry per rank"),
        (lambda: CastPlan(2, [[0], [1]], [1, 1]), "rank must be in"),
        (lambda: CastPlan(0, [[-1], [1]], [1, 1]), "negative row"),
        (lambda: CastPlan(0, [[0.5], [1]], [1, 1]), "integer array"),
        (lambda: CastPlan(0, [[0], [1]], [1, -1]), "non-negative"),
        (lambda: CastPlan.from_requests(0, [[[0]], [[0]]]), "2 x 2 table"),
    ],
)
def test_bad_plans(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_bad_tensors():
    plan = CastPlan(0, [np.array([3])], [1])
    x = torch.zeros(4, 2)
    with pytest.raises(ValueError, match="non-empty list"):
        group_cast(x, plan, None)
    with pytest.raises(ValueError, match="leading dim"):
        group_cast([x, torch.zeros(5, 2)], plan, None)
    with pytest.raises(ValueError, match="one dtype and device"):
        group_cast([x, x.double()], plan, None)
    with pytest.raises(ValueError, match="only 2 rows"):
        group_cast([x[:2]], plan, None)
    with pytest.raises(ValueError, match="receive buffer has 1"):
        group_reduce([torch.zeros(2, 2)], plan, None, [x])
    with pytest.raises(ValueError, match="does not match partials"):
        group_reduce([torch.zeros(1, 3)], plan, None, [x])
    with pytest.raises(ValueError, match="floating"):
        group_reduce([torch.zeros(1, 2)], plan, None, [x], reduce_dtype=torch.int64)
