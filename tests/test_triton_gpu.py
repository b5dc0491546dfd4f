"""Triton and SDPA backends on the GPU against dense float64 truth and the reference backend.

Marked ``gpu``: skipped without CUDA. (For kernel debugging on a CPU, run with
``TRITON_INTERPRET=1`` and Triton installed: the kernels then run in Triton's
interpreter on CPU tensors; its bfloat16 dot is unsupported, so bf16 cases skip.)
Each check runs the backend contract directly (forward, then backward from the
forward's own out/lse) and asserts: no NaN anywhere, lse -inf exactly on rows without
keys, out/dq exactly 0 there, relative errors within the dtype's tolerance.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from flexcp.kernels import ReferenceBackend, attention, available_backends, register_backend
from flexcp.kernels.torch_sdpa import TorchSdpaBackend as SdpaBackend
from flexcp.kernels.triton import TritonBackend
from flexcp.mask import AttnMaskSpec, prefix_tree, sliding_window, varlen
from gpu_checks import DEVICE, MIXED, TRITON, check, make_inputs, run_backend, skip_unrunnable, truth
from mask_cases import HARD_CASES, rel_err
from strategies import valid_specs

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(DEVICE is None, reason="needs a CUDA GPU")]
SDPA = SdpaBackend(TRITON)
if "triton" not in available_backends():
    register_backend("triton", TritonBackend)


# ------------------------------------------------------------------ named hard cases
@pytest.mark.parametrize("name", sorted(HARD_CASES))
def test_hard_cases_float32_gqa(name):
    """Exact-precision path, GQA 4:2, and agreement with the reference backend in float32."""
    spec = HARD_CASES[name]
    got = check(spec, 4, 2, d=64)
    q, k, v, do = make_inputs(spec, 4, 2, 64, torch.float32)
    ref = run_backend(ReferenceBackend(), spec, q, k, v, do, 64**-0.5, 0.0)
    for x, r in zip(got, ref):
        fin = torch.isfinite(r)
        assert torch.equal(fin, torch.isfinite(x))
        assert rel_err(x[fin], r[fin]) <= 2e-5


@pytest.mark.parametrize("grads", [None, "input"], ids=["f32_grads", "input_grads"])
@pytest.mark.parametrize("name", sorted(HARD_CASES))
def test_hard_cases_bfloat16_gqa(name, grads):
    check(HARD_CASES[name], 8, 2, d=128, dtype=torch.bfloat16, grad_dtype=grads)


@pytest.mark.parametrize(
    "dtype,d,softcap",
    [
        (torch.bfloat16, 128, 0.0),
        (torch.bfloat16, 128, 30.0),
        (torch.bfloat16, 64, 0.0),
        (torch.bfloat16, 256, 0.0),
        (torch.float16, 64, 0.0),
        (torch.float16, 128, 20.0),
        (torch.float32, 128, 0.0),
        (torch.float32, 64, 2.0),
    ],
)
@pytest.mark.parametrize("mask", ["mixed", "prefix_tree"])
def test_dtypes_head_dims_softcap(dtype, d, softcap, mask):
    spec = MIXED if mask == "mixed" else prefix_tree([200, 90, 130, 60], [[0, 1], [0, 2], [0, 2, 3]])[0]
    check(spec, 4, 2, d=d, dtype=dtype, softcap=softcap)


@pytest.mark.parametrize("heads", [(8, 1), (6, 3), (4, 4)])
def test_gqa_groups(heads):
    check(MIXED, *heads, d=64, dtype=torch.float16)


def test_softmax_scale_is_used():
    check(MIXED, 2, 2, d=64, scale=0.3)


def test_long_masks_bfloat16():
    """Thousands of rows: many blocks, long full runs, heavy-first grid order."""
    from flexcp.bench.docdist import sample_pack

    check(varlen(sample_pack(4096, rng=0, max_doc_frac=1.0).tolist()), 4, 2, d=128, dtype=torch.bfloat16)
    check(prefix_tree([1024, 700, 900], [[0, 1], [0, 2]])[0], 8, 2, d=128, dtype=torch.bfloat16)
    check(sliding_window([3000, 1096], 700), 4, 4, d=128, dtype=torch.bfloat16)
    check(AttnMaskSpec.causal(4096), 2, 1, d=128, dtype=torch.bfloat16)


# ------------------------------------------------------------------ random masks
@settings(max_examples=40, deadline=None)
@given(
    spec=valid_specs(max_len=300, max_slices=10),
    dtype=st.sampled_from([torch.float32, torch.bfloat16]),
    softcap=st.sampled_from([0.0, 5.0]),
    seed=st.integers(0, 2**16),
)
def test_random_masks(spec, dtype, softcap, seed):
    check(spec, 4, 2, d=64, dtype=dtype, softcap=softcap, seed=seed)


# ------------------------------------------------------------------ contract details
def test_empty_rows_and_unused_keys_are_exact_zeros():
    spec = AttnMaskSpec([(10, 60), (100, 130)], [(0, 40), (50, 70)], ["causal", "full"], 200, 90)
    out, lse, dq, dk, dv = check(spec, 2, 1, d=64, dtype=torch.float16)
    keys = spec.to_dense(DEVICE).any(0)
    rows = spec.to_dense(DEVICE).any(1)
    assert (out[~rows] == 0).all() and torch.isneginf(lse[~rows]).all() and (dq[~rows] == 0).all()
    assert (dk[~keys] == 0).all() and (dv[~keys] == 0).all()
    assert not rows[10:20].all()  # causal with sq > sk: its first rows see no key


def test_backward_is_deterministic():
    skip_unrunnable(torch.bfloat16)
    spec = varlen([700, 1500, 300, 1596])
    q, k, v, do = make_inputs(spec, 8, 2, 128, torch.bfloat16)
    first = run_backend(TRITON, spec, q, k, v, do, 0.1, 0.0)
    second = run_backend(TRITON, spec, q, k, v, do, 0.1, 0.0)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


@pytest.mark.parametrize("backend", ["triton", "sdpa"])
def test_backward_uses_final_merged_stats(backend):
    """Keys split over two calls (each one FULL rectangle), merged in float32, backward per call from the merged out/lse."""
    dtype = torch.bfloat16 if DEVICE == "cuda" else torch.float16
    impl = SDPA if backend == "sdpa" else TRITON
    whole = AttnMaskSpec([(0, 384)], [(0, 512)], ["full"], 384, 512)
    halves = [AttnMaskSpec([(0, 384)], [k], ["full"], 384, 512) for k in ((0, 200), (200, 512))]
    q, k, v, do = make_inputs(whole, 4, 4, 128, dtype)
    dev = torch.device(DEVICE)
    preps = [impl.prepare(h.table, 384, 512, dev) for h in halves]
    if backend == "sdpa":
        if DEVICE != "cuda":
            pytest.skip("cuDNN needs CUDA")
        assert all(SdpaBackend.fast_path_ok(p, q, k, 0.0) for p in preps)
    parts = [impl.forward(q, k, v, p, 0.1, 0.0, out_dtype=None if backend == "sdpa" else torch.float32) for p in preps]
    lse = torch.logaddexp(parts[0][1], parts[1][1])
    out = sum(torch.exp(l - lse)[..., None] * o.float() for o, l in parts)
    grads = [impl.backward(do, q, k, v, out, lse, p, 0.1, 0.0) for p in preps]
    ref = truth(whole, q, k, v, do, 0.1, 0.0)
    assert rel_err(out, ref[0]) <= 1e-2 and rel_err(lse, ref[1]) <= 1e-2
    for g, r in zip(zip(*grads), ref[2:]):
        assert rel_err(g[0] + g[1], r) <= 1e-2


# ------------------------------------------------------------------ SDPA fast path
@pytest.mark.parametrize(
    "spec",
    [
        AttnMaskSpec([(0, 640)], [(0, 640)], ["full"], 640),
        AttnMaskSpec.causal(777),
        AttnMaskSpec([(100, 300)], [(50, 250)], ["causal"], 400, 300),  # rows outside the rectangle: empty
        AttnMaskSpec([(0, 200)], [(0, 500)], ["full"], 200, 500),
    ],
    ids=["full", "causal", "causal_partial_rows", "full_sq_ne_sk"],
)
@pytest.mark.parametrize("heads", [(4, 4), (8, 2)], ids=["mha", "gqa"])
def test_sdpa_fast_path(spec, heads):
    if DEVICE != "cuda":
        pytest.skip("cuDNN needs CUDA")
    prep = SDPA.prepare(spec.table, spec.total_seqlen, spec.total_seqlen_k, torch.device(DEVICE))
    q, k, _, _ = make_inputs(spec, *heads, 128, torch.bfloat16)
    assert SdpaBackend.fast_path_ok(prep, q, k, 0.0)
    for grads in (None, "input"):
        check(spec, *heads, d=128, dtype=torch.bfloat16, backend=SDPA, grad_dtype=grads)


def test_sdpa_falls_back_for_other_masks():
    prep = SDPA.prepare(MIXED.table, 520, 410, torch.device(DEVICE))
    assert prep.rect is None
    check(MIXED, 4, 2, d=64, dtype=torch.float16, backend=SDPA)


# ------------------------------------------------------------------ through flexcp.attention
def test_attention_api_autograd():
    skip_unrunnable(torch.bfloat16)
    spec = prefix_tree([300, 100, 150], [[0, 1], [0, 2]])[0]
    q, k, v, do = make_inputs(spec, 4, 2, 128, torch.bfloat16)
    leaves = [x.requires_grad_() for x in (q, k, v)]
    out, lse = attention(*leaves, spec, backend="triton")
    grads = torch.autograd.grad(out, leaves, do)
    ref = truth(spec, q, k, v, do, 128**-0.5, 0.0)
    assert rel_err(out, ref[0]) <= 1e-2
    for g, r in zip(grads, ref[2:]):
        assert g.dtype == torch.bfloat16 and rel_err(g, r) <= 1e-2
    assert np.isfinite(lse.cpu().numpy()).all()
