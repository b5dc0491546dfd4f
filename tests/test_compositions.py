"""Property tests of every composition the router can build, CPU, float64, exact to 1e-10 against dense attention.

Masks come from ``strategies.composed_specs``: 1-60 slices of all four types, overlapping q
ranges, shared k ranges, bands beside their triangles, empty and one-token slices. Heads are
drawn with and without GQA. Routes: each whole backend, the split with a rest backend whose
price for each part is drawn (so every launch goes either way), the cost tables that send
bands to one side and the rest to the other, launches cuDNN refuses (run on the fallback
through ``launch_table``), the cuDNN plan's launches and merges (the emulator), and the
distributed stages at cp = 2, 3 over gloo with the router forced to split.
"""

from __future__ import annotations

import zlib

import pytest
import torch
import torch.distributed as dist
from hypothesis import given, settings
from hypothesis import strategies as st

from cudnn_emulator import EmulatedCudnn
from flexcp.kernels import AutoBackend, ReferenceBackend, get_backend, register_backend
from flexcp.kernels.backend import Offer
from flexcp.kernels.costs import Cost
from flexcp.kernels.cudnn.plan import to_entries
from flexcp.runtime import build_key, calc_attn, clear_cache, dispatch, undispatch
from multiproc import run_spawned
from reference_attention import dense_attention
from router_cases import BANDS_FAST, BANDS_SLOW, FAST, SLOW
from strategies import composed_specs

TOL = dict(rtol=1e-10, atol=1e-10)
HEADS = st.sampled_from([(1, 1), (2, 1), (4, 2), (3, 3)])


def _pick(key: str, salt: int) -> bool:
    """A reproducible coin per (key, salt)."""
    return zlib.crc32(f"{key}|{salt}".encode()) % 2 == 0


class Group(EmulatedCudnn):
    """The group backend: cuDNN over emulated graphs; refuses the signatures in ``refused`` (set per example)."""

    name = "prop_group"


class Rest(ReferenceBackend):
    """The rest backend; with ``salt`` set, its price for each part is a coin flip (free or prohibitive)."""

    name = "prop_rest"
    salt: int | None = None

    def offer(self, table, tq, tk, cost, **shape) -> Offer:
        o = super().offer(table, tq, tk, cost, **shape)
        if self.salt is None:
            return o
        return Offer(o.parts, (0.0 if _pick(table.digest, self.salt) else 1e9,), 0.0)


register_backend("prop_group", Group)
register_backend("prop_rest", Rest)
PER_PART = Cost({"full": 1.0, "causal": 1.0, "band": 1.0}, 1.0, 0.0)
NAMES = ("prop_group", "prop_rest")
ROUTERS = {  # name -> (costs, whole, expected backends or None when the coin decides)
    "whole_group": ({"prop_group": FAST, "prop_rest": SLOW}, NAMES, ["prop_group"]),
    "whole_rest": ({"prop_group": SLOW, "prop_rest": FAST}, NAMES, ["prop_rest"]),
    "bands_to_rest": ({"prop_group": BANDS_SLOW, "prop_rest": BANDS_FAST}, NAMES, None),
    "bands_to_group": ({"prop_group": BANDS_FAST, "prop_rest": BANDS_SLOW}, NAMES, None),
    "coin_split": ({"prop_group": PER_PART, "prop_rest": PER_PART}, ("prop_group",), None),
}
for _name, (_costs, _whole, _) in ROUTERS.items():
    register_backend(f"prop_{_name}", lambda c=_costs, w=_whole: AutoBackend(c, whole=w, split=NAMES, device_types=("cpu",)))


class Limited:
    """A stand-in for a kernel's element limit: refuses q or k of more than ``limit`` elements, records the largest run."""

    limit: int | None = None
    largest = 0

    def unsupported(self, q, k, softcap):
        if self.limit is not None and max(q.numel(), k.numel()) > self.limit:
            return f"more than {self.limit} elements"
        return super().unsupported(q, k, softcap)

    def forward(self, q, k, v, *args, **kwargs):
        self.largest = max(self.largest, q.numel(), k.numel())
        return super().forward(q, k, v, *args, **kwargs)

    def backward(self, do, q, k, *args, **kwargs):
        self.largest = max(self.largest, q.numel(), k.numel())
        return super().backward(do, q, k, *args, **kwargs)


class SmallGroup(Limited, Group):
    name = "prop_small_group"


class SmallRest(Limited, Rest):
    name = "prop_small_rest"


register_backend("prop_small_group", SmallGroup)
register_backend("prop_small_rest", SmallRest)
SMALL = ("prop_small_group", "prop_small_rest")
register_backend("prop_small_split", lambda: AutoBackend({n: PER_PART for n in SMALL}, whole=SMALL[:1], split=SMALL,
                                                         device_types=("cpu",)))


def _refuse(spec, salt: int) -> dict:
    """Refuse a coin-flipped subset of the mask's signatures."""
    return {sig: "refused by the test" for sig in set(to_entries(spec.table).sigs) if _pick(repr(sig), salt + 1)}


def _inputs(spec, hq: int, hkv: int, seed: int, d: int = 4):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(spec.total_seqlen, hq, d, generator=g, dtype=torch.float64)
    k, v = (torch.randn(spec.total_seqlen_k, hkv, d, generator=g, dtype=torch.float64) for _ in "kv")
    return q, k, v, torch.randn(q.shape, generator=g, dtype=torch.float64)


def _dense(spec, q, k, v, do, scale):
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    out, lse = dense_attention(*leaves, spec, scale)
    grads = torch.autograd.grad(out, leaves, do) if out.requires_grad else [torch.zeros_like(x) for x in leaves]
    return (out, lse, *grads)


def _assert_exact(got, want, what: str) -> None:
    for name, g, w in zip(("out", "lse", "dq", "dk", "dv"), got, want):
        torch.testing.assert_close(g, w, **TOL, msg=lambda m: f"{what} {name}: {m}")


def _run(backend, spec, q, k, v, do, scale):
    prep = backend.prepare(spec.table, spec.total_seqlen, spec.total_seqlen_k, q.device)
    out, lse = backend.forward(q, k, v, prep, scale, 0.0)
    return (out, lse, *backend.backward(do, q, k, v, out, lse, prep, scale, 0.0)), prep


@pytest.mark.parametrize("router", sorted(ROUTERS))
@settings(max_examples=40, deadline=None, derandomize=True)
@given(spec=composed_specs(), heads=HEADS, salt=st.integers(0, 2**16), refuse=st.booleans())
def test_every_route_is_exact(router, spec, heads, salt, refuse):
    """Whatever the route (whole, split by kind, split by coin) and refused launches, fwd+bwd equal dense float64."""
    auto = get_backend(f"prop_{router}")
    group, rest = get_backend("prop_group"), get_backend("prop_rest")
    group.refused = _refuse(spec, salt) if refuse else {}
    rest.salt = salt if router == "coin_split" else None
    q, k, v, do = _inputs(spec, *heads, seed=salt)
    got, prep = _run(auto, spec, q, k, v, do, 0.5)
    _assert_exact(got, _dense(spec, q, k, v, do, 0.5), f"route {router}")
    expected = ROUTERS[router][2]
    if expected is not None and len(spec.table.nonempty()):
        assert [p.backend.name for p in auto.route(prep, q, k, 0.0).parts] == expected


@settings(max_examples=40, deadline=None, derandomize=True)
@given(spec=composed_specs(), shape=st.sampled_from([(4, 2, 2), (6, 3, 3), (8, 4, 2), (8, 4, 4), (4, 4, 2), (8, 2, 2),
                                                     (2, 1, 1), (4, 2, 1)]), salt=st.integers(0, 2**16))
def test_calls_too_large_for_the_backends_run_in_groups_of_kv_heads(spec, shape, salt):
    """Backends that refuse more than ``limit`` elements (the GPU kernels' 2**31): the router runs one KV head per
    call when the whole call does not fit, each call routed (coin split) on its own; fwd+bwd equal dense float64."""
    auto = get_backend("prop_small_split")
    small = [get_backend(n) for n in SMALL]
    hq, hkv, groups = shape
    q, k, v, do = _inputs(spec, hq, hkv, seed=salt)
    limit = max(q.numel(), k.numel()) // groups
    for b in small:
        b.limit, b.largest = limit, 0
    small[1].salt = salt
    small[0].refused = {}
    got, prep = _run(auto, spec, q, k, v, do, 0.5)
    _assert_exact(got, _dense(spec, q, k, v, do, 0.5), f"{groups} groups of KV heads")
    assert auto.head_groups(prep, q, k, 0.0) == (1 if groups == 1 else hkv)
    assert 0 < max(b.largest for b in small) <= limit


@settings(max_examples=60, deadline=None, derandomize=True)
@given(spec=composed_specs(), heads=HEADS, salt=st.integers(0, 2**16))
def test_cudnn_launches_and_merges_are_exact(spec, heads, salt):
    """The cuDNN backend's own plan (launches, lse merges, private dK/dV rows), some launches refused."""
    backend = EmulatedCudnn()
    backend.refused = _refuse(spec, salt)
    q, k, v, do = _inputs(spec, *heads, seed=salt)
    got, _ = _run(backend, spec, q, k, v, do, 0.5)
    _assert_exact(got, _dense(spec, q, k, v, do, 0.5), "cudnn (emulated)")


# ------------------------------------------------------------------ distributed, router forced to split
def _distributed(rank: int, world_size: int, cases: list) -> list:
    """Every case on this rank: calc_attn with the coin-split router, undispatched out, lse and gradients."""
    rest = get_backend("prop_rest")
    results = []
    for spec, (hq, hkv), salt in cases:
        rest.salt = salt
        q, k, v, do = _inputs(spec, hq, hkv, seed=salt)
        key = build_key(spec, dist.group.WORLD, num_heads_q=hq, num_heads_kv=hkv, head_dim=4, chunk_size=4,
                        num_stages=1 + salt % 2)
        leaves = [dispatch(x, key).requires_grad_() for x in (q, k, v)]
        out, lse = calc_attn(*leaves, key, softmax_scale=0.5, backend="prop_coin_split")
        out.backward(dispatch(do, key))
        results.append([undispatch(x.detach(), key) for x in (out, lse, *(t.grad for t in leaves))])
    clear_cache()
    return results


@pytest.mark.parametrize("cp", [2, 3])
@settings(max_examples=3, deadline=None, derandomize=True)
@given(cases=st.lists(st.tuples(composed_specs(max_len=48, max_slices=40).filter(lambda s: s.total_seqlen == s.total_seqlen_k),
                                HEADS, st.integers(0, 2**16)), min_size=8, max_size=8))
def test_distributed_stages_split_by_the_router_are_exact(cp, cases):
    """Host and remote stages each routed by the coin-split router: gathered results equal dense float64."""
    cases = [c for c in cases if c[0].total_seqlen >= cp]
    for rank_results in run_spawned(_distributed, cp, cases, timeout=300):
        for (spec, (hq, hkv), salt), got in zip(cases, rank_results):
            q, k, v, do = _inputs(spec, hq, hkv, seed=salt)
            _assert_exact(got, _dense(spec, q, k, v, do, 0.5), f"cp={cp}")
