"""Checking a GPU backend through the contract against dense float64 truth (a helper module).

``check(spec, ...)`` runs forward, then backward from the forward's own out/lse, with freed
cache memory poisoned by NaN so unwritten outputs show, and asserts: no NaN anywhere, lse
-inf exactly on rows without keys, out/dq exactly 0 there, relative errors within the
dtype's tolerance. ``DEVICE`` is "cuda", or "cpu" under ``TRITON_INTERPRET=1``, else None.
"""

from __future__ import annotations

import os

import pytest
import torch

from flexcp.kernels.triton import TritonBackend
from flexcp.mask import AttnMaskSpec
from mask_cases import rel_err
from reference_attention import dense_attention


def _device() -> str | None:
    if torch.cuda.is_available():
        return "cuda"
    if os.environ.get("TRITON_INTERPRET") == "1":
        import importlib.util

        return "cpu" if importlib.util.find_spec("triton") else None
    return None


DEVICE = _device()
TOL = {torch.float32: 2e-5, torch.float16: 5e-3, torch.bfloat16: 1e-2}
TRITON = TritonBackend()


def skip_unrunnable(dtype: torch.dtype) -> None:
    if DEVICE == "cpu" and dtype == torch.bfloat16:
        pytest.skip("Triton's interpreter has no bfloat16 dot")


def make_inputs(spec: AttnMaskSpec, hq: int, hkv: int, d: int, dtype: torch.dtype, seed: int = 0):
    gen = torch.Generator(device=DEVICE).manual_seed(seed)
    shapes = [(spec.total_seqlen, hq, d), (spec.total_seqlen_k, hkv, d), (spec.total_seqlen_k, hkv, d), (spec.total_seqlen, hq, d)]
    return [torch.randn(s, generator=gen, device=DEVICE).to(dtype) for s in shapes]


def poison_allocator() -> None:
    """Leave NaN in freed cached memory so outputs the kernels fail to write show up."""
    if DEVICE == "cuda":
        torch.full((64 << 20,), float("nan"), device=DEVICE)  # freed at once, left in the cache


def run_backend(backend, spec, q, k, v, do, scale, softcap, grad_dtype=None):
    prep = backend.prepare(spec.table, spec.total_seqlen, spec.total_seqlen_k, torch.device(DEVICE))
    poison_allocator()
    out, lse = backend.forward(q, k, v, prep, scale, softcap)
    poison_allocator()
    return (out, lse, *backend.backward(do, q, k, v, out, lse, prep, scale, softcap, grad_dtype))


def truth(spec, q, k, v, do, scale, softcap):
    leaves = [x.detach().double().requires_grad_() for x in (q, k, v)]
    out, lse = dense_attention(*leaves, spec, scale, softcap)
    return (out, lse, *torch.autograd.grad(out, leaves, do.double()))


def check(spec, hq=2, hkv=1, d=64, dtype=torch.float32, softcap=0.0, backend=TRITON, seed=0, scale=None, grad_dtype=None):
    """Backend vs dense float64 truth on one mask; returns the backend's results.

    ``grad_dtype``: None asks for float32 partials, ``"input"`` for gradients in ``dtype``
    (what ``flexcp.attention`` asks for).
    """
    skip_unrunnable(dtype)
    q, k, v, do = make_inputs(spec, hq, hkv, d, dtype, seed)
    scale = d**-0.5 if scale is None else scale
    gdt = dtype if grad_dtype == "input" else grad_dtype
    got = run_backend(backend, spec, q, k, v, do, scale, softcap, gdt)
    ref = truth(spec, q, k, v, do, scale, softcap)
    out, lse, dq, dk, dv = got
    assert out.dtype == dtype and lse.dtype == torch.float32 and lse.shape == (spec.total_seqlen, hq)
    assert all(x.dtype == (gdt or torch.float32) for x in (dq, dk, dv))
    for name, x in zip(("out", "dq", "dk", "dv"), (out, dq, dk, dv)):
        assert torch.isfinite(x).all(), f"{name} has NaN/inf"
    empty = torch.isinf(ref[1])
    assert torch.equal(torch.isneginf(lse), empty) and not torch.isnan(lse).any()
    assert (out[empty] == 0).all() and (dq[empty] == 0).all()
    tol = TOL[dtype]
    for name, x, r in zip(("out", "lse", "dq", "dk", "dv"), (out, lse[~empty], dq, dk, dv), (ref[0], ref[1][~empty], *ref[2:])):
        err = rel_err(x, r)
        assert err <= tol, f"{name}: relative error {err:.2e} > {tol:.0e}"
    return got


MIXED = AttnMaskSpec(  # every type, sq != sk, overlapping q ranges, rows without keys, tiles crossing slices
    [(0, 150), (100, 300), (300, 420), (320, 500), (0, 90)],
    [(0, 200), (200, 330), (0, 260), (260, 400), (330, 410)],
    ["causal", "inv_causal", "bi_causal", "full", "full"],
    520,
    410,
)
