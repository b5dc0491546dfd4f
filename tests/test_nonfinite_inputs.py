"""A NaN/inf in q, k or v reaches only the rows that attend it (reference backend, forward and backward).

Masked probabilities are exactly 0, but 0 * NaN is NaN: without care one bad value in a
tile poisons every row of the tile. Three documents share one tile here; a non-finite
entry in document 0 must leave documents 1 and 2 (out and every gradient) unchanged.
"""

import pytest
import torch

import flexcp
from flexcp.kernels import ReferenceBackend, register_backend
from flexcp.mask import AttnMaskSpec
from cudnn_emulator import EmulatedCudnn

register_backend("reference_tiles8", lambda: ReferenceBackend(block_q=8, block_k=8))  # unmasked tiles too
register_backend("cudnn_emulated", lambda: EmulatedCudnn(fallback=ReferenceBackend()))  # cuDNN's launches on CPU

SPEC = AttnMaskSpec.varlen([20, 30, 14])
DOC0 = slice(0, 20)
REST = slice(20, 64)


def _run(q, k, v, w, backend="reference"):
    q, k, v = (x.clone().requires_grad_() for x in (q, k, v))
    out, _ = flexcp.attention(q, k, v, SPEC, backend=backend)
    (torch.nan_to_num(out, nan=0.0) * w).sum().backward()
    return out.detach(), q.grad, k.grad, v.grad


def _inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(64, h, 8, generator=g, dtype=torch.float64) for h in (4, 2, 2, 4)]


@pytest.mark.parametrize("backend", ["reference", "reference_tiles8", "cudnn_emulated"])
@pytest.mark.parametrize("which", ["q", "k", "v"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_value_stays_in_its_document(which, bad, backend):
    q, k, v, w = _inputs()
    clean = _run(q, k, v, w, backend)
    tensors = {"q": q.clone(), "k": k.clone(), "v": v.clone()}
    tensors[which][5, 1, 3] = bad  # token 5: document 0
    got = _run(tensors["q"], tensors["k"], tensors["v"], w, backend)
    for name, a, b in zip(("out", "dq", "dk", "dv"), got, clean):
        assert torch.isfinite(a[REST]).all(), f"{which}={bad}: {name} of other documents is not finite"
        torch.testing.assert_close(a[REST], b[REST], rtol=1e-12, atol=1e-12, msg=lambda m: f"{which} {name}: {m}")
    if which == "v":  # the rows that attend the bad value see it
        assert torch.isnan(got[0][5:20, 2:4, 3]).all() and torch.isfinite(got[0][:5]).all()


def test_finite_inputs_take_the_plain_path():
    q, k, v, w = _inputs(1)
    out, dq, dk, dv = _run(q, k, v, w)
    assert torch.isfinite(out).all() and torch.isfinite(dq).all()


def _distributed(rank, world_size, bad):
    import torch.distributed as dist

    from flexcp.runtime import build_key, calc_attn, clear_cache, dispatch, undispatch

    q, k, v, w = _inputs()
    v[5, 1, 3] = bad
    key = build_key(SPEC, dist.group.WORLD, num_heads_q=4, num_heads_kv=2, head_dim=8, chunk_size=8)
    ql, kl, vl = (dispatch(x, key).requires_grad_() for x in (q, k, v))
    out, _ = calc_attn(ql, kl, vl, key)
    (torch.nan_to_num(out, nan=0.0) * dispatch(w, key)).sum().backward()
    result = [undispatch(x.detach(), key) for x in (out, ql.grad, kl.grad, vl.grad)]
    clear_cache()
    return result


def test_non_finite_value_stays_in_its_document_across_ranks():
    from multiproc import run_spawned

    q, k, v, w = _inputs()
    clean = _run(q, k, v, w)
    for a, b in zip(run_spawned(_distributed, 2, float("nan"), timeout=120)[0], clean):
        torch.testing.assert_close(a[REST], b[REST], rtol=1e-12, atol=1e-12)


def _gpu_backends():
    """The CUDA backends that run here (marks skip them without a GPU or the cuDNN frontend)."""
    from flexcp.kernels.cudnn.graphs import why_unavailable

    no_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
    no_cudnn = pytest.mark.skipif(why_unavailable() is not None, reason="needs nvidia-cudnn-frontend")
    return [
        pytest.param("triton", marks=[pytest.mark.gpu, no_gpu]),
        pytest.param("cudnn", marks=[pytest.mark.gpu, no_gpu, no_cudnn]),
    ]


@pytest.mark.parametrize("backend", _gpu_backends())
@pytest.mark.parametrize("which", ["q", "k", "v"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_value_stays_in_its_rows_on_gpu(which, bad, backend):
    """GPU backends in bf16: the other documents are unchanged (to bf16 rounding: a cuDNN call whose V
    holds a NaN/inf runs on Triton) and, for V, the earlier rows of its own causal document (which do
    not attend token 5) stay finite."""
    g = torch.Generator().manual_seed(0)
    q, k, v, w = (torch.randn(64, h, 64, generator=g).to("cuda", torch.bfloat16) for h in (4, 2, 2, 4))
    clean = _run(q, k, v, w, backend)
    tensors = {"q": q.clone(), "k": k.clone(), "v": v.clone()}
    tensors[which][5, 1, 3] = bad
    got = _run(tensors["q"], tensors["k"], tensors["v"], w, backend)
    for name, a, b in zip(("out", "dq", "dk", "dv"), got, clean):
        assert torch.isfinite(a[REST]).all(), f"{backend} {which}={bad}: {name} of other documents is not finite"
        torch.testing.assert_close(a[REST].float(), b[REST].float(), rtol=2e-2, atol=2e-2)
    if which == "v":
        assert torch.isfinite(got[0][:5]).all(), f"{backend}: rows before the bad key became non-finite"


@pytest.mark.parametrize("bad", [None, float("nan"), float("inf"), float("-inf")])
def test_finiteness_gate_opens_only_for_non_finite_values(bad):
    from flexcp.kernels.backend import finiteness_gate, gate_open

    v = torch.randn(64, 2, 8, dtype=torch.bfloat16)
    if bad is not None:
        v[40, 1, 5] = bad
    gate = finiteness_gate(v)
    assert gate.shape == (1,) and gate.dtype == torch.float32
    assert gate_open(gate) == (bad is not None)


def test_gated_writes_happen_only_behind_an_open_gate():
    """``forward_into`` / ``backward_into`` leave the buffers alone behind a closed gate, and write the
    plain results behind an open one (an overflowing sum of finite values is a false alarm: exact anyway)."""
    from flexcp.kernels.backend import finiteness_gate

    q, k, v, w = _inputs(2)
    ref = ReferenceBackend()
    prep = ref.prepare(SPEC.table, 64, 64, q.device)
    out, lse = ref.forward(q, k, v, prep, 0.3, 0.0)
    grads = ref.backward(w, q, k, v, out, lse, prep, 0.3, 0.0)
    buf = [torch.full_like(out, 7.0), torch.full_like(lse, 7.0)]
    gbuf = [torch.full_like(g, 7.0) for g in grads]
    ref.forward_into(q, k, v, prep, 0.3, 0.0, *buf, gate=finiteness_gate(v))
    ref.backward_into(w, q, k, v, out, lse, prep, 0.3, 0.0, gbuf, gate=finiteness_gate(v))
    assert all((b == 7.0).all() for b in buf + gbuf)
    huge = torch.full((1,), float("inf"))  # what finiteness_gate gives for an overflowing sum
    ref.forward_into(q, k, v, prep, 0.3, 0.0, *buf, gate=huge)
    ref.backward_into(w, q, k, v, out, lse, prep, 0.3, 0.0, gbuf, gate=huge)
    for got, want in zip(buf + gbuf, (out, lse, *grads)):
        assert torch.equal(got, want)
