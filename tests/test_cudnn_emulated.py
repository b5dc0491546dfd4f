"""The cuDNN backend's orchestration on CPU over emulated graphs (cudnn_emulator.py), exactly vs dense float64."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings

from cudnn_emulator import EmulatedCudnn
from flexcp.kernels import ReferenceBackend
from flexcp.mask import AttnMaskSpec, block_causal, prefix_tree, sliding_window, varlen
from reference_attention import dense_attention
from mask_cases import HARD_CASES
from strategies import valid_specs

CASES = dict(HARD_CASES)
CASES.update(
    shared_k=AttnMaskSpec([(0, 20), (20, 39), (39, 60)], [(0, 50)] * 3, ["full", "causal", "full"], 60, 50),
    overlapping_q=AttnMaskSpec([(0, 51), (0, 51), (25, 77)], [(0, 30), (30, 110), (110, 150)], ["full", "causal", "bi_causal"], 77, 150),
    window=sliding_window([200, 30, 150], 25),
    prefix=prefix_tree([70, 20, 30, 1, 25], [[0, 1], [0, 2, 3], [0, 2, 4]])[0],
    blocks=block_causal([30, 1, 50, 26]),
    docs=varlen([1, 70, 33, 1, 129, 64]),
)


def run(backend, spec: AttnMaskSpec, hq: int = 4, hkv: int = 2, d: int = 8, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(spec.total_seqlen, hq, d, generator=gen, dtype=torch.float64)
    k, v = (torch.randn(spec.total_seqlen_k, hkv, d, generator=gen, dtype=torch.float64) for _ in "kv")
    do = torch.randn_like(q)
    prep = backend.prepare(spec.table, spec.total_seqlen, spec.total_seqlen_k, q.device)
    out, lse = backend.forward(q, k, v, prep, 0.3, 0.0)
    grads = backend.backward(do, q, k, v, out, lse, prep, 0.3, 0.0)
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    ref, ref_lse = dense_attention(*leaves, spec, 0.3)
    ref_grads = torch.autograd.grad(ref, leaves, do) if ref.requires_grad else [torch.zeros_like(x) for x in leaves]
    return (out, lse, *grads), (ref, ref_lse, *ref_grads)


def assert_exact(got, ref) -> None:
    """float64 in, float64-exact out (lse and gradient sums stay float64)."""
    out, lse, *grads = got
    assert lse.dtype == torch.float64 and all(g.dtype == torch.float64 for g in grads)
    torch.testing.assert_close(out, ref[0], rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(lse, ref[1], rtol=1e-10, atol=1e-10)
    empty = torch.isinf(ref[1])
    assert (out[empty] == 0).all() and torch.isneginf(lse[empty]).all()
    for g, r in zip(grads, ref[2:]):
        torch.testing.assert_close(g, r, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("name", sorted(CASES))
def test_named_cases(name):
    assert_exact(*run(EmulatedCudnn(), CASES[name]))


@settings(max_examples=40, deadline=None)
@given(valid_specs(max_len=70, max_slices=9))
def test_random_masks(spec):
    assert_exact(*run(EmulatedCudnn(), spec))


def test_refused_launch_runs_on_the_fallback():
    backend = EmulatedCudnn(fallback=ReferenceBackend())
    backend.refused[(1, 70)] = "pretend cuDNN refused this band"
    spec = AttnMaskSpec([(0, 100), (100, 200)], [(0, 170), (170, 300)], ["bi_causal", "causal"], 200, 300)
    assert_exact(*run(backend, spec))
    assert backend.graphs.runs == 4  # the causal square and its FULL part, forward and backward


OFF_DIAGONAL_SQUARES = AttnMaskSpec([(0, 8), (7, 9), (9, 10)], [(5, 7), (8, 10), (8, 9)], ["causal", "full", "bi_causal"], 10)
"""The first case of ../shared/repro/router_split_cells.py: a BI_CAUSAL square off the diagonal."""


def test_refused_window_signature_keeps_off_diagonal_squares():
    """A BI_CAUSAL square (``sq == sk``) has the one-token window's signature ``(1, 0)``; refused, it runs on the
    fallback through ``launch_table``, which must keep its cells though it is not on the diagonal (it lost them)."""
    backend = EmulatedCudnn(fallback=ReferenceBackend())
    backend.refused[(1, 0)] = "pretend cuDNN refused this band"
    assert_exact(*run(backend, OFF_DIAGONAL_SQUARES))


def test_one_launch_writes_in_place():
    backend = EmulatedCudnn()
    assert_exact(*run(backend, varlen([5, 60, 1, 30])))
    assert backend.graphs.runs == 2


@pytest.mark.parametrize("name", ["docs", "prefix", "shared_k", "overlapping_q", "window", "blocks"])
def test_sixteen_bit_gradients_match_the_float32_sums(name):
    """``grad_dtype=bf16`` (written in place where nothing overlaps, else summed in float32 and
    converted once) equals the float32 partials rounded to bf16, and both match dense float64."""
    spec = CASES[name]
    backend = EmulatedCudnn()
    gen = torch.Generator().manual_seed(3)
    q = torch.randn(spec.total_seqlen, 4, 8, generator=gen).bfloat16()
    k, v = (torch.randn(spec.total_seqlen_k, 2, 8, generator=gen).bfloat16() for _ in "kv")
    do = torch.randn(q.shape, generator=gen).bfloat16()
    prep = backend.prepare(spec.table, spec.total_seqlen, spec.total_seqlen_k, q.device)
    out, lse = backend.forward(q, k, v, prep, 0.3, 0.0)
    g32 = backend.backward(do, q, k, v, out, lse, prep, 0.3, 0.0)
    g16 = backend.backward(do, q, k, v, out, lse, prep, 0.3, 0.0, torch.bfloat16)
    assert all(g.dtype == torch.float32 for g in g32) and all(g.dtype == torch.bfloat16 for g in g16)
    for a, b in zip(g16, g32):
        assert torch.equal(a, b.bfloat16())
    leaves = [x.double().requires_grad_() for x in (q, k, v)]
    ref, _ = dense_attention(*leaves, spec, 0.3)
    for g, r in zip(g32, torch.autograd.grad(ref, leaves, do.double())):
        torch.testing.assert_close(g.double(), r, rtol=2e-2, atol=2e-2)
