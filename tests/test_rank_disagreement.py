"""Ranks that disagree get a clear error on every rank (gloo, cp = 2), never an abort or silently different results.

Every calc_attn / undispatch call exchanges an 8-byte fingerprint of its settings before its first
sized transfer (no FLEXCP_CHECK needed); build_key's own check runs always (and with
FLEXCP_CHECK=1 even with check=False). A rank that stalls makes the others time out with a
report naming it (train.stall), under the recipe's process-group timeout.
"""

import datetime
import os

import pytest
import torch
import torch.distributed as dist

from flexcp.mask import AttnMaskSpec
from flexcp.runtime import build_key, calc_attn, clear_cache, dispatch, undispatch
from multiproc import run_spawned

SPEC_A = AttnMaskSpec.causal(64)
SPEC_B = AttnMaskSpec.varlen([32, 32])


def _qkv(key, dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(64, 2, 8, generator=g, dtype=dtype)
    k = torch.randn(64, 2, 8, generator=g, dtype=dtype)
    return [dispatch(x, key).requires_grad_() for x in (q, k, k.clone())]


def _scenario(rank, world_size, case):
    if case == "check_false":
        os.environ["FLEXCP_CHECK"] = "1"
    group = dist.group.WORLD
    try:
        kw = dict(num_heads_q=2, num_heads_kv=2, head_dim=8, chunk_size=8)
        if case == "dtype":
            key = build_key(SPEC_A, group, **kw)
            calc_attn(*_qkv(key, torch.float64 if rank else torch.float32), key)
        elif case == "keys":
            keys = [build_key(s, group, **kw) for s in (SPEC_A, SPEC_B)]
            calc_attn(*_qkv(keys[rank]), keys[rank])
        elif case == "check_false":
            build_key(SPEC_A if rank == 0 else SPEC_B, group, check=False, **kw)
        elif case == "softcap":
            key = build_key(SPEC_A, group, **kw)
            calc_attn(*_qkv(key), key, softcap=float(rank))
        elif case == "scale":
            key = build_key(SPEC_A, group, **kw)
            calc_attn(*_qkv(key), key, softmax_scale=0.25 + rank)
        elif case == "grad":  # rank 1 evaluates (no gradients) while rank 0 trains: its backward would hang
            key = build_key(SPEC_A, group, **kw)
            calc_attn(*[x.detach().requires_grad_(rank == 0) for x in _qkv(key)], key)
        elif case == "masks_unchecked":  # build_key(check=False) with different masks: caught at the first call
            key = build_key(SPEC_A if rank == 0 else SPEC_B, group, check=False, **kw)
            calc_attn(*_qkv(key), key)
        elif case == "undispatch_dtype":
            key = build_key(SPEC_A, group, **kw)
            undispatch(dispatch(torch.randn(64, 3, dtype=torch.float64 if rank else torch.float32), key), key)
        elif case == "undispatch":
            key = build_key(SPEC_A, group, **kw)
            undispatch(dispatch(torch.randn(64, 2 + rank), key), key)
        elif case == "agree":
            key = build_key(SPEC_A, group, **kw)
            out, _ = calc_attn(*_qkv(key), key)
            return "ok" if torch.isfinite(out).all() else "nan"
    except ValueError as exc:
        return str(exc)
    finally:
        os.environ.pop("FLEXCP_CHECK", None)
        clear_cache()
    return None


DIFFERS = {"dtype": "dtype", "keys": "key", "check_false": "mask", "softcap": "softcap", "scale": "softmax_scale",
           "grad": "grad", "masks_unchecked": "key", "undispatch_dtype": "dtype"}


@pytest.mark.parametrize("case", list(DIFFERS))
def test_disagreeing_ranks_get_a_clear_error_on_every_rank(case):
    messages = run_spawned(_scenario, 2, case, timeout=120)
    for m in messages:
        assert m is not None and "disagree" in m, m
        assert f"disagree about {DIFFERS[case]}" in m and "rank 0" in m and "rank 1" in m, m
    if case in ("dtype", "undispatch_dtype"):
        assert all("torch.float64" in m and "torch.float32" in m for m in messages)


def test_agreeing_ranks_pass_the_debug_check():
    assert run_spawned(_scenario, 2, "agree") == ["ok", "ok"]


def _stall(rank, world_size):
    from flexcp.train.stall import StallTimeout, StallWatch

    group = dist.new_group(timeout=datetime.timedelta(seconds=3))
    watch = StallWatch(0.05)
    try:
        with watch.step(7 if rank == 0 else 6):
            if rank == 0:
                dist.barrier(group=group)  # rank 1 never arrives
    except StallTimeout as exc:
        return str(exc)
    return None


def test_stalled_rank_is_named():
    messages = run_spawned(_stall, 2, timeout=120)
    assert messages[1] is None
    assert "rank(s) [1] are behind" in messages[0] and "rank 1: step 6" in messages[0], messages[0]
    assert "parallel.timeout_minutes" in messages[0]


def test_recipe_sets_the_process_group_timeout(monkeypatch):
    from flexcp.train import parallel
    from flexcp.train.config import from_dict

    seen = {}
    monkeypatch.setattr(parallel.dist, "is_initialized", lambda: False)
    monkeypatch.setattr(parallel.dist, "init_process_group", lambda backend, **kw: seen.update(kw))
    monkeypatch.setattr(parallel.torch.cuda, "is_available", lambda: False)
    monkeypatch.setenv("RANK", "0")
    cfg = from_dict({})
    parallel.init_distributed(cfg.parallel.timeout_minutes)
    assert seen["timeout"] == datetime.timedelta(minutes=10)
    with pytest.raises(ValueError, match="timeout_minutes must be > 0"):
        parallel.init_distributed(0)


def test_a_world_of_one_leaves_the_environment_alone(monkeypatch):
    """A plain ``python`` launch rendezvouses in memory and writes no RANK/WORLD_SIZE to os.environ:
    a child process (a test's CLI run, a data worker) would otherwise inherit a half env:// setup."""
    from flexcp.train import parallel

    seen = {}
    monkeypatch.setattr(parallel.dist, "is_initialized", lambda: False)
    monkeypatch.setattr(parallel.dist, "init_process_group", lambda backend, **kw: seen.update(kw))
    monkeypatch.setattr(parallel.torch.cuda, "is_available", lambda: False)
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    parallel.init_distributed()
    assert (seen["rank"], seen["world_size"]) == (0, 1) and isinstance(seen["store"], parallel.dist.HashStore)
    assert not {"RANK", "WORLD_SIZE", "LOCAL_RANK"} & set(os.environ)



def test_undispatch_shape_mismatch_is_caught():
    for m in run_spawned(_scenario, 2, "undispatch"):
        assert m is not None and m.startswith("undispatch: the ranks of the group disagree about shape"), m
