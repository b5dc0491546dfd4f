"""``backend="auto"`` past 2**31 elements of q on the GPU: groups of KV heads, each under the kernels' 32-bit indexing.

1,179,648 tokens x 32 query heads x 64 (8 KV heads, bf16): q alone holds 2.4e9 elements, which the
Triton kernels refuse whole. ``auto`` must run it on GPU kernels (not the reference) and give
the attention of dense float32 on sampled rows, forward and backward (the loss weights only those
rows, so every gradient has a dense reference of a few documents' size). Marked ``gpu``.
"""

from __future__ import annotations

import pytest
import torch

from flexcp.kernels import ReferenceBackend, attention, get_backend, prepared
from flexcp.mask import varlen
from gpu_checks import DEVICE

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(DEVICE != "cuda", reason="needs a CUDA GPU")]

DOC, DOCS, HQ, HKV, D = 131072, 9, 32, 8, 64


def _rel(got: torch.Tensor, ref: torch.Tensor) -> float:
    return float((got.float() - ref).norm() / ref.norm().clamp_min(1e-30))


def test_auto_runs_calls_past_two_to_the_31_elements_in_groups_of_kv_heads_on_gpu_kernels() -> None:
    spec = varlen([DOC] * DOCS)
    t = DOC * DOCS
    gen = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(t, h, D, device="cuda", generator=gen, dtype=torch.bfloat16).requires_grad_()
               for h in (HQ, HKV, HKV))
    assert q.numel() >= 2**31  # the case guarded
    auto = get_backend("auto")
    prep = prepared(auto, spec, q.device)
    groups = auto.head_groups(prep, q, k, 0.0)
    assert groups > 1
    route = auto.route(prep, q[:, : HQ // groups], k[:, : HKV // groups], 0.0)
    assert not any(isinstance(p.backend, ReferenceBackend) for p in route.parts)

    rows = torch.tensor([0, 5, DOC - 1, DOC, 2 * DOC + DOC // 3, t - 1], device="cuda")
    weight = torch.randn(len(rows), HQ, D, device="cuda", generator=gen)
    torch.cuda.reset_peak_memory_stats()
    out, lse = attention(q, k, v, spec, backend="auto")
    (out[rows].float() * weight).sum().backward()

    scale = D**-0.5
    dk_ref = torch.zeros(t, HKV, D, device="cuda")
    dv_ref = torch.zeros_like(dk_ref)
    for i, r in enumerate(rows.tolist()):
        start = r - r % DOC
        qr = q[r].detach().float().requires_grad_()
        kr = k[start : r + 1].detach().float().repeat_interleave(HQ // HKV, 1).requires_grad_()
        vr = v[start : r + 1].detach().float().repeat_interleave(HQ // HKV, 1).requires_grad_()
        logits = torch.einsum("hd,khd->hk", qr, kr) * scale
        o = torch.einsum("hk,khd->hd", logits.softmax(-1), vr)
        assert _rel(out[r], o) < 2e-2 and _rel(lse[r], logits.logsumexp(-1)) < 1e-3
        (o * weight[i]).sum().backward()
        assert _rel(q.grad[r], qr.grad) < 3e-2
        dk_ref[start : r + 1] += kr.grad.unflatten(1, (HKV, HQ // HKV)).sum(2)
        dv_ref[start : r + 1] += vr.grad.unflatten(1, (HKV, HQ // HKV)).sum(2)
    assert _rel(k.grad, dk_ref) < 3e-2 and _rel(v.grad, dv_ref) < 3e-2
    print(f"groups={groups} route={[type(p.backend).__name__ for p in route.parts]} "
          f"peak={torch.cuda.max_memory_allocated() / 2**30:.1f} GiB")
