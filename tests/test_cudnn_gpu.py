"""The cuDNN backend and the cost router on the GPU against dense float64 truth.

Marked ``gpu``: skipped without CUDA or without nvidia-cudnn-frontend. Every check runs
the backend contract (forward, then backward from the forward's own out/lse) and
asserts what ``test_triton_gpu.check`` asserts (no NaN, -inf lse and zero out/dQ exactly
on rows without keys, relative errors within bf16/fp16 tolerance), plus exact zeros of
dK/dV on keys no row attends.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings

from flexcp.kernels import AutoBackend, CudnnBackend, get_backend
from flexcp.kernels.costs import COSTS, Cost
from flexcp.kernels.cudnn.graphs import why_unavailable
from flexcp.mask import AttnMaskSpec, block_causal, prefix_tree, sliding_window, varlen
from gpu_checks import MIXED, check, make_inputs, run_backend, truth
from mask_cases import HARD_CASES, rel_err
from strategies import valid_specs

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
    pytest.mark.skipif(why_unavailable() is not None, reason="needs nvidia-cudnn-frontend"),
]
CUDNN = CudnnBackend()
DTYPES = [torch.bfloat16, torch.float16]


def check_all(spec: AttnMaskSpec, hq: int, hkv: int, d: int, dtype: torch.dtype, backend=CUDNN, seed: int = 0,
              grad_dtype="input"):
    """:func:`check` (gradients in the inputs' dtype unless ``grad_dtype=None``: float32 partials),
    plus dK/dV exactly 0 on keys no row attends."""
    out = check(spec, hq, hkv, d=d, dtype=dtype, backend=backend, seed=seed, grad_dtype=grad_dtype)
    unused = ~spec.to_dense(device=out[3].device).any(dim=0)
    assert (out[3][unused] == 0).all() and (out[4][unused] == 0).all()
    return out


@pytest.mark.parametrize("grads", [None, "input"], ids=["f32_grads", "input_grads"])
@pytest.mark.parametrize("dtype", DTYPES, ids=["bf16", "fp16"])
@pytest.mark.parametrize("name", sorted(HARD_CASES))
def test_hard_cases(name, dtype, grads):
    check_all(HARD_CASES[name], 8, 2, 128, dtype, grad_dtype=grads)


SHAPES = {
    "mixed_every_type": MIXED,
    "varlen_uneven": varlen([1, 700, 33, 1, 1290, 64]),
    "causal_rows_lt_keys": AttnMaskSpec([(0, 300)], [(0, 1000)], ["causal"], 300, 1000),
    "causal_rows_gt_keys": AttnMaskSpec([(0, 900)], [(0, 250)], ["causal"], 900, 250),
    "shared_k_ranges": AttnMaskSpec([(0, 200), (200, 390), (390, 600)], [(0, 500)] * 3, ["full", "causal", "full"], 600, 500),
    "overlapping_q_chunks": AttnMaskSpec(
        [(0, 512), (0, 512), (256, 768)], [(0, 300), (300, 1100), (1100, 1500)], ["full", "causal", "bi_causal"], 768, 1500
    ),
    "sliding_window_fused": sliding_window([2000, 300, 1500], 256),
    "two_sided_window": sliding_window([900, 400], 100, causal=False),
    "prefix_tree": prefix_tree([700, 200, 300, 1, 250], [[0, 1], [0, 2, 3], [0, 2, 4]])[0],
    "block_causal": block_causal([300, 1, 500, 260]),
    "inv_causal_only": AttnMaskSpec([(0, 400), (400, 700)], [(0, 600), (600, 900)], ["inv_causal"] * 2, 700, 900),
}


@pytest.mark.parametrize("heads", [(8, 8), (8, 2)], ids=["mha", "gqa"])
@pytest.mark.parametrize("dtype", DTYPES, ids=["bf16", "fp16"])
@pytest.mark.parametrize("name", sorted(SHAPES))
def test_shapes(name, dtype, heads):
    check_all(SHAPES[name], *heads, 128, dtype)


@pytest.mark.parametrize("d", [64, 128])
def test_head_dims(d):
    check_all(MIXED, 4, 2, d, torch.bfloat16)


@settings(max_examples=25, deadline=None)
@given(valid_specs(max_len=160, max_slices=8))
def test_random_masks(spec):
    check_all(spec, 4, 2, 64, torch.bfloat16)


@pytest.mark.parametrize("name", ["mixed_every_type", "prefix_tree", "sliding_window_fused"])
def test_router_matches_truth(name):
    check_all(SHAPES[name], 8, 2, 128, torch.bfloat16, backend=get_backend("auto"))


def test_router_split_uses_two_backends_in_one_call():
    """A cost table that makes Triton cheap for bands and cuDNN cheap elsewhere splits the mask, exactly."""
    costs = dict(COSTS)
    costs["cudnn"] = Cost({"full": 1000.0, "causal": 1000.0, "band": 1.0}, 0.0, 0.0)
    costs["triton"] = Cost({"full": 1.0, "causal": 1.0, "band": 1000.0}, 0.0, 0.0)
    auto = AutoBackend(costs)
    spec = SHAPES["mixed_every_type"]
    check_all(spec, 8, 2, 128, torch.bfloat16, backend=auto)
    q, k, _, _ = make_inputs(spec, 8, 2, 128, torch.bfloat16)
    prep = auto.prepare(spec.table, spec.total_seqlen, spec.total_seqlen_k, q.device)
    assert [p["backend"] for p in auto.route(prep, q, k, 0.0).describe()] == ["cudnn", "triton"]


def test_refused_signature_falls_back_per_launch():
    """A launch whose graph cuDNN refuses runs on the fallback; the other launches stay on cuDNN."""
    backend = CudnnBackend()
    backend.refused[(1, 70)] = "test: pretend cuDNN refused this band"
    spec = AttnMaskSpec([(0, 100), (100, 200)], [(0, 170), (170, 300)], ["bi_causal", "causal"], 200, 300)
    check_all(spec, 4, 4, 64, torch.bfloat16, backend=backend)
    assert (1, 70) in backend.refused


def test_final_stats_partial_backward():
    """Keys split over two calls, merged by lse, backward per call from the merged out/lse (the CP contract)."""
    whole = AttnMaskSpec([(0, 384), (384, 700)], [(0, 512), (0, 600)], ["full", "causal"], 700, 600)
    halves = [
        AttnMaskSpec([(0, 384), (384, 700)], [(0, 200), (0, 200)], ["full", "full"], 700, 600),
        AttnMaskSpec([(0, 384), (384, 700)], [(200, 512), (200, 600)], ["full", "causal"], 700, 600),
    ]
    q, k, v, do = make_inputs(whole, 8, 2, 128, torch.bfloat16)
    preps = [CUDNN.prepare(h.table, 700, 600, q.device) for h in halves]
    parts = [CUDNN.forward(q, k, v, p, 0.1, 0.0, out_dtype=torch.float32) for p in preps]
    lse = torch.logaddexp(parts[0][1], parts[1][1])
    out = sum(torch.exp(l - lse)[..., None] * o for o, l in parts)
    grads = [CUDNN.backward(do, q, k, v, out, lse, p, 0.1, 0.0) for p in preps]
    ref = truth(whole, q, k, v, do, 0.1, 0.0)
    assert rel_err(out, ref[0]) <= 1e-2 and rel_err(lse, ref[1]) <= 1e-3
    for g, r in zip(zip(*grads), ref[2:]):
        assert rel_err(g[0] + g[1], r) <= 1e-2


def test_graphs_are_reused_within_a_bucket():
    """Two packs with different documents but the same bucket build no new graph."""
    backend = CudnnBackend()
    a, b = varlen([700, 300, 24]), varlen([650, 300, 74])  # both: 4 entries, max length 1024
    for spec in (a, b):
        q, k, v, do = make_inputs(spec, 4, 4, 64, torch.bfloat16)
        run_backend(backend, spec, q, k, v, do, 0.125, 0.0)
        if spec is a:
            misses = backend.graphs.stats.misses
    assert backend.graphs.stats.misses == misses == 2 and backend.graphs.stats.hits >= 2
