"""float64 in, float64-exact out: single device and distributed (gloo, cp = 1, 2, 3) against dense float64.

The statistics the backward and the cross-rank merge use (lse, partial out, dK/dV
partials on the wire) must stay float64, or gradients are only float32-accurate; and at
cp = 3 a rank whose remote stage has no work must still send float64 zeros.
"""

import pytest
import torch
import torch.distributed as dist

import flexcp
from flexcp.mask import AttnMaskSpec
from flexcp.runtime import build_key, calc_attn, clear_cache, dispatch, undispatch
from multiproc import run_spawned
from reference_attention import dense_attention
from mask_cases import random_spec

SEEDS = [11, 12, 13, 14]
RTOL = 1e-10


def _specs() -> dict[str, AttnMaskSpec]:
    specs = {f"random_{s}": random_spec(s) for s in SEEDS}
    specs["prefix_tree"] = AttnMaskSpec.prefix_tree([30, 12, 20, 1, 15], [[0, 1], [0, 2, 3], [0, 2, 4]])[0]
    specs["empty_rows"] = AttnMaskSpec([(5, 30), (50, 80)], [(0, 20), (40, 80)], ["full", "causal"], 90)
    return specs


def _inputs(spec, seed, hq=4, hkv=2, d=8):
    g = torch.Generator().manual_seed(seed)
    n = spec.total_seqlen
    return [torch.randn(n, h, d, generator=g, dtype=torch.float64) for h in (hq, hkv, hkv, hq)]


def _dense(spec, seed, softcap):
    q, k, v, w = _inputs(spec, seed)
    q, k, v = (x.requires_grad_() for x in (q, k, v))
    out, lse = dense_attention(q, k, v, spec, softcap=softcap)
    (out * w).sum().backward()
    return [out.detach(), lse.detach(), q.grad, k.grad, v.grad]


def _assert_exact(got, want, what):
    for name, a, b in zip(("out", "lse", "dq", "dk", "dv"), got, want):
        assert a.dtype == torch.float64, f"{what} {name} is {a.dtype}"
        finite = torch.isfinite(b)
        assert torch.equal(torch.isfinite(a), finite), f"{what} {name}: -inf rows differ"
        scale = b[finite].abs().max().clamp_min(1e-300)
        err = (a[finite] - b[finite]).abs().max() / scale
        assert err < RTOL, f"{what} {name}: relative error {err:.3g}"


def test_mask_types_all_covered():
    types = {t for s in _specs().values() for t in s.mask_types}
    assert len(types) == 4, types


@pytest.mark.parametrize("softcap", [0.0, 2.0])
def test_single_device_float64_is_exact(softcap):
    for i, (name, spec) in enumerate(_specs().items()):
        q, k, v, w = _inputs(spec, i)
        q, k, v = (x.requires_grad_() for x in (q, k, v))
        out, lse = flexcp.attention(q, k, v, spec, softcap=softcap, backend="reference")
        (out * w).sum().backward()
        _assert_exact([out.detach(), lse, q.grad, k.grad, v.grad], _dense(spec, i, softcap), name)


def _distributed(rank, world_size, softcap):
    group = dist.group.WORLD if world_size > 1 else None
    results = {}
    for i, (name, spec) in enumerate(_specs().items()):
        q, k, v, w = _inputs(spec, i)
        key = build_key(spec, group, num_heads_q=4, num_heads_kv=2, head_dim=8, chunk_size=8,
                        num_stages=1 + i % 3)
        ql, kl, vl = (dispatch(x, key).requires_grad_() for x in (q, k, v))
        out, lse = calc_attn(ql, kl, vl, key, softcap=softcap)
        (out * dispatch(w, key)).sum().backward()
        results[name] = [undispatch(x.detach(), key) for x in (out, lse, ql.grad, kl.grad, vl.grad)]
    clear_cache()
    return results


@pytest.mark.parametrize("cp", [1, 2, 3])
def test_distributed_float64_is_exact(cp):
    softcap = 2.0 if cp == 2 else 0.0
    results = _distributed(0, 1, softcap) if cp == 1 else run_spawned(_distributed, cp, softcap, timeout=300)[0]
    for i, (name, spec) in enumerate(_specs().items()):
        _assert_exact(results[name], _dense(spec, i, softcap), f"{name} cp={cp}")
