"""The spawned-process harness: results come back in rank order, failures come back with tracebacks."""

import os
import time

import pytest
import torch
import torch.distributed as dist

from multiproc import RankFailedError, run_spawned


class CustomError(ValueError):
    """A test-module exception: the parent must rebuild this exact type."""


def _sum_of_ranks(rank, world_size, offset, *, scale):
    t = torch.tensor([float(rank)])
    dist.all_reduce(t)
    return {"rank": rank, "world_size": world_size, "sum": t.item(), "value": (rank + offset) * scale}


def _fail_on_last_rank(rank, world_size):
    if rank == world_size - 1:
        raise CustomError(f"boom from rank {rank}")
    dist.barrier()  # the other ranks wait in a collective that never completes


def _exit_abruptly(rank, world_size):
    if rank == 0:
        os._exit(3)
    dist.barrier()


def _sleep_on_rank_one(rank, world_size):
    if rank == 1:
        time.sleep(60)
    return rank


def _return_unpicklable(rank, world_size):
    return lambda: rank


def _pid(rank, world_size):
    return os.getpid()


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_results_in_rank_order(world_size):
    results = run_spawned(_sum_of_ranks, world_size, 10, scale=2)
    expected_sum = world_size * (world_size - 1) / 2
    assert results == [
        {"rank": r, "world_size": world_size, "sum": expected_sum, "value": (r + 10) * 2} for r in range(world_size)
    ]


def test_exception_reraised_with_type_and_traceback():
    pids = run_spawned(_pid, 3)
    with pytest.raises(CustomError) as info:
        run_spawned(_fail_on_last_rank, 3, timeout=50)  # shorter than PG_TIMEOUT_S: no wait on the hung ranks
    message = str(info.value)
    assert "rank 2" in message and "boom from rank 2" in message
    assert "_fail_on_last_rank" in message and "test_multiproc.py" in message  # the child's traceback
    # ranks 0 and 1 were stuck in a barrier: that pool was dropped, the next call gets fresh workers
    new_pids = run_spawned(_pid, 3)
    assert set(new_pids).isdisjoint(pids)


def test_failure_on_every_rank_keeps_the_pool():
    pids = run_spawned(_pid, 2)
    with pytest.raises(Exception, match=r"failed on rank \d: .*pickle") as info:
        run_spawned(_return_unpicklable, 2)
    assert "_worker_main" in str(info.value)
    assert run_spawned(_pid, 2) == pids


def test_dead_rank_and_timeout_are_errors():
    with pytest.raises(RankFailedError, match=r"rank 0 died \(exit code 3\)"):
        run_spawned(_exit_abruptly, 2, timeout=50)
    with pytest.raises(RankFailedError, match=r"timed out after 1s; ranks \[1\]"):
        run_spawned(_sleep_on_rank_one, 2, timeout=1)
    assert run_spawned(_sleep_on_rank_one, 1) == [0]


def test_rejects_bad_arguments():
    with pytest.raises(ValueError, match="world_size"):
        run_spawned(_sum_of_ranks, 0)
    with pytest.raises(ValueError, match="module-level"):
        run_spawned(lambda rank, world_size: None, 2)
