"""Distributed attention on gloo (spawned CPU processes) equals single-process attention.

Each rank builds the same global q/k/v, dispatches its shard with the key, runs
calc_attn and a backward; outputs, lse and gradients, undispatched, must equal
flexcp.attention on the global tensors. The zero-redundancy invariant is checked
against the dense mask: rows received == distinct remote keys the rank's rows need.
"""

import pytest
import torch
import torch.distributed as dist

import flexcp
from flexcp.mask import AttnMaskSpec
from flexcp.runtime import build_key, calc_attn, clear_cache, dispatch, get_position_ids, undispatch
from flexcp.runtime.key import lookup
from mask_cases import random_spec
from multiproc import run_spawned


def _specs():
    return {
        "causal": AttnMaskSpec.causal(97),
        "varlen_1tok": AttnMaskSpec.varlen([1, 30, 1, 1, 17, 40, 1, 9]),
        "prefix_tree": AttnMaskSpec.prefix_tree([30, 12, 20, 1, 15], [[0, 1], [0, 2, 3], [0, 2, 4]])[0],
        "sliding": AttnMaskSpec.sliding_window([70, 33], 11),
        "two_sided": AttnMaskSpec.sliding_window([90], 7, causal=False),
        "empty_rows": AttnMaskSpec([(5, 30), (50, 80)], [(0, 20), (40, 80)], ["full", "causal"], 90),
        "random_a": random_spec(1),
        "random_b": random_spec(2),
    }


def _global_inputs(spec, hq, hkv, d, seed):
    g = torch.Generator().manual_seed(seed)
    n = spec.total_seqlen
    q = torch.randn(n, hq, d, generator=g)
    k = torch.randn(n, hkv, d, generator=g)
    v = torch.randn(n, hkv, d, generator=g)
    w = torch.randn(n, hq, d, generator=g)
    return q, k, v, w


def _run_case(spec, group, hq, hkv, d, softcap, num_stages, seed):
    """One rank's distributed result, undispatched, plus the zero-redundancy counts."""
    q, k, v, w = _global_inputs(spec, hq, hkv, d, seed)
    key = build_key(spec, group, num_heads_q=hq, num_heads_kv=hkv, head_dim=d, chunk_size=8, num_stages=num_stages)
    ql, kl, vl = (dispatch(x, key).requires_grad_() for x in (q, k, v))
    out, lse = calc_attn(ql, kl, vl, key, softcap=softcap)
    (out * dispatch(w, key)).sum().backward()
    gathered = [undispatch(x.detach(), key) for x in (out, lse, ql.grad, kl.grad, vl.grad)]
    plan = lookup(key).state.plan
    rows = get_position_ids(key)
    real = rows[rows < spec.total_seqlen]
    needed = spec.to_dense()[real].any(dim=0).nonzero().flatten().tolist()
    remote_needed = len(set(needed) - set(rows.tolist()))
    volume = [(sum(cp.volume().rows_received for cp in lookup(key).state.cast_plans))]
    return gathered, plan.remote_rows, remote_needed, volume[0], float(torch.isnan(out).any())


def _check_all(rank, world_size):
    group = dist.group.WORLD
    report = []
    for i, (name, spec) in enumerate(_specs().items()):
        hq, hkv = (4, 2) if i % 2 else (2, 2)
        softcap = 3.0 if name == "random_b" else 0.0
        num_stages = 1 + i % 3
        gathered, remote_rows, remote_needed, received, has_nan = _run_case(spec, group, hq, hkv, 8, softcap, num_stages, i)
        report.append((name, hq, hkv, softcap, gathered, remote_rows, remote_needed, received, has_nan))
    clear_cache()
    return report


def _single_process(spec, hq, hkv, softcap, seed):
    q, k, v, w = _global_inputs(spec, hq, hkv, 8, seed)
    q, k, v = (x.requires_grad_() for x in (q, k, v))
    out, lse = flexcp.attention(q, k, v, spec, softcap=softcap)
    (out * w).sum().backward()
    return [out.detach(), lse, q.grad, k.grad, v.grad]


@pytest.mark.parametrize("cp", [2, 3, 4])
def test_calc_attn_matches_single_process(cp):
    results = run_spawned(_check_all, cp, timeout=300)
    specs = _specs()
    for rank_report in results:
        for i, (name, hq, hkv, softcap, gathered, remote_rows, remote_needed, received, has_nan) in enumerate(rank_report):
            expected = _single_process(specs[name], hq, hkv, softcap, i)
            for what, got, want in zip(("out", "lse", "dq", "dk", "dv"), gathered, expected):
                torch.testing.assert_close(got, want, rtol=2e-5, atol=2e-5, msg=lambda m: f"{name} cp={cp} {what}: {m}")
            assert not has_nan
            assert remote_rows == remote_needed, f"{name} cp={cp}: received {remote_rows}, needed {remote_needed}"
            assert received == remote_needed  # what the wire carries (dK/dV go back over the same rows)


def test_cp1_is_identity_plus_padding():
    spec = AttnMaskSpec.varlen([5, 9, 3])
    key = build_key(spec, None, num_heads_q=2, num_heads_kv=1, head_dim=8, chunk_size=4)
    x = torch.arange(17.0)
    local = dispatch(x, key, pad_value=-1)
    assert local.shape[0] == 20 and (local[:17] == x).all() and (local[17:] == -1).all()
    assert get_position_ids(key).tolist() == list(range(20))
    assert torch.equal(undispatch(local, key), x)
    q, k, v, _ = _global_inputs(spec, 2, 1, 8, 0)
    out, lse = calc_attn(*(dispatch(t, key) for t in (q, k, v)), key)
    ref, ref_lse = flexcp.attention(q, k, v, spec)
    torch.testing.assert_close(out[:17], ref)
    assert (out[17:] == 0).all() and torch.isinf(lse[17:]).all()


def test_calc_attn_rejects_wrong_shapes():
    spec = AttnMaskSpec.causal(16)
    key = build_key(spec, None, num_heads_q=4, num_heads_kv=2, head_dim=8, chunk_size=4)
    q = torch.randn(16, 4, 8)
    kv = torch.randn(16, 1, 8)
    with pytest.raises(ValueError, match="expects local q"):
        calc_attn(q, kv, kv, key)
    with pytest.raises(ValueError, match="multiple of num_heads_kv"):
        build_key(spec, None, num_heads_q=3, num_heads_kv=2, head_dim=8)
    with pytest.raises(ValueError, match="total_seqlen_k"):
        build_key(AttnMaskSpec([(0, 4)], [(0, 6)], ["full"], 4, 6), None, num_heads_q=2, num_heads_kv=2, head_dim=8)


def _disagree(rank, world_size):
    spec = AttnMaskSpec.causal(64) if rank == 0 else AttnMaskSpec.varlen([32, 32])
    try:
        build_key(spec, dist.group.WORLD, num_heads_q=2, num_heads_kv=2, head_dim=8, chunk_size=8)
    except ValueError as e:
        return str(e)
    return None


def test_ranks_that_disagree_get_a_clear_error():
    messages = run_spawned(_disagree, 2)
    assert all(m is not None and "disagree" in m for m in messages)


def _too_short(rank, world_size):
    try:
        build_key(AttnMaskSpec.causal(2), dist.group.WORLD, num_heads_q=2, num_heads_kv=2, head_dim=8)
    except ValueError as e:
        return str(e)
    return None


def test_sequence_shorter_than_group_is_an_error():
    messages = run_spawned(_too_short, 3)
    assert all(m is not None for m in messages)


def test_key_cache_is_bounded_and_keeps_the_latest(monkeypatch):
    from flexcp.runtime import key as key_module

    monkeypatch.setattr(key_module, "MAX_KEYS", 3)
    clear_cache()
    keys = [build_key(AttnMaskSpec.varlen([n, 20 - n]), None, num_heads_q=2, num_heads_kv=2, head_dim=8)
            for n in range(1, 7)]
    assert len(key_module._ENTRIES) == 3
    lookup(keys[-1])
    with pytest.raises(ValueError, match="build_key again"):
        lookup(keys[0])
    clear_cache()


def test_keys_are_released_at_exit():
    """The exit hook (registered at import) forgets every key: their plans hold process groups."""
    from flexcp.runtime import api

    key = build_key(AttnMaskSpec.causal(16), None, num_heads_q=2, num_heads_kv=2, head_dim=8, chunk_size=4)
    assert lookup(key) is not None
    api._release_at_exit()
    with pytest.raises(ValueError, match="not built on this process"):
        lookup(key)


def _bf16_case(rank, world_size):
    spec = _specs()["prefix_tree"]
    q, k, v, w = (x.bfloat16() for x in _global_inputs(spec, 4, 2, 8, 7))
    key = build_key(spec, dist.group.WORLD, num_heads_q=4, num_heads_kv=2, head_dim=8, chunk_size=8, num_stages=2)
    ql, kl, vl = (dispatch(x, key).requires_grad_() for x in (q, k, v))
    out, _ = calc_attn(ql, kl, vl, key)
    (out.float() * dispatch(w, key).float()).sum().backward()
    result = [undispatch(x, key) for x in (out.detach(), ql.grad, kl.grad, vl.grad)]
    stages = len(lookup(key).state.plan.stages)
    clear_cache()
    return result, stages


@pytest.mark.parametrize("cp", [2, 3])
def test_bf16_remote_stage_partials_sum_to_the_single_process_result(cp):
    """Remote stages hand back 16-bit partials (what cuDNN writes; they travel at that width) that are
    summed into float32 accumulators: bf16 gradients at cp > 1 match one process within bf16 rounding."""
    spec = _specs()["prefix_tree"]
    q, k, v, w = (x.bfloat16() for x in _global_inputs(spec, 4, 2, 8, 7))
    leaves = [x.double().requires_grad_() for x in (q, k, v)]
    out, _ = flexcp.attention(*leaves, spec)
    (out * w.double()).sum().backward()
    truth = [out.detach(), *(x.grad for x in leaves)]
    for rank_result, stages in run_spawned(_bf16_case, cp, timeout=300):
        assert stages >= 1, "the case must have a remote stage"
        for what, got, want in zip(("out", "dq", "dk", "dv"), rank_result, truth):
            assert got.dtype == torch.bfloat16, f"{what} is {got.dtype}"
            err = float((got.double() - want).norm() / want.norm())
            assert err < 1e-2, f"cp={cp} {what}: relative error {err:.2e}"
