"""TorchSdpaBackend: torch's cuDNN SDPA op for masks that are one full or causal rectangle, Triton for the rest.

PyTorch's cuDNN attention returns the log-sum-exp and its backward takes ``out`` and
``lse`` as inputs, so it honours the backend contract (the backward uses the rows'
*final* statistics, merged across calls by the distributed layer). It applies where the
whole mask is a single slice that is FULL, or CAUSAL with as many query as key rows
(then bottom-right and top-left alignment agree), with 16-bit inputs (GQA by
repeating k/v heads), head dim <= 128 (multiple of 8) and no softcap; anything else goes to the fallback
(Triton by default). Measured, not assumed: see docs/benchmarks.md. On a causal rectangle
cuDNN lets a NaN/inf in V reach rows that do not attend it, so the fallback then recomputes
the call behind a device-side gate (``backend.finiteness_gate``, no host sync).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ..mask.geometry import SliceTable
from ..mask.types import CAUSAL, FULL
from .backend import AttnBackend, Offer, finiteness_gate
from .costs import Cost


@dataclass(frozen=True)
class Rect:
    """The mask's one slice: rows ``[qs, qe)`` attend keys ``[ks, ke)``, causally or fully."""

    qs: int
    qe: int
    ks: int
    ke: int
    causal: bool


@dataclass
class SdpaPrep:
    rect: Rect | None
    fallback: Any


def single_rect(table: SliceTable) -> Rect | None:
    """The :class:`Rect` when ``table`` is one non-empty FULL slice or one square CAUSAL slice."""
    t = table.nonempty()
    if len(t) != 1:
        return None
    qs, qe, ks, ke, kind = (int(x[0]) for x in (t.qs, t.qe, t.ks, t.ke, t.types))
    if kind == FULL or (kind == CAUSAL and qe - qs == ke - ks):
        return Rect(qs, qe, ks, ke, kind == CAUSAL)
    return None


def _bhsd(x: torch.Tensor) -> torch.Tensor:
    """``[s, h, d]`` THD rows as the ``[1, h, s, d]`` view SDPA takes (no copy)."""
    return x.permute(1, 0, 2).unsqueeze(0)


class TorchSdpaBackend(AttnBackend):
    """torch's cuDNN SDPA for single full/causal rectangles; ``fallback`` runs everything else."""

    name = "torch_sdpa"

    def __init__(self, fallback: AttnBackend | None = None) -> None:
        if fallback is None:
            from .triton import TritonBackend

            fallback = TritonBackend()
        self.fallback = fallback

    def unsupported(self, q: torch.Tensor, k: torch.Tensor, softcap: float) -> str | None:
        return self.fallback.unsupported(q, k, softcap)

    def prepare(self, table: SliceTable, tq: int, tk: int, device: torch.device) -> SdpaPrep:
        return SdpaPrep(single_rect(table), self.fallback.prepare(table, tq, tk, device))

    @staticmethod
    def fast_path_ok(prep: SdpaPrep, q: torch.Tensor, k: torch.Tensor, softcap: float, out_dtype=None) -> bool:
        """Whether cuDNN runs this call (else the fallback does)."""
        return (
            prep.rect is not None
            and q.is_cuda
            and q.dtype in (torch.bfloat16, torch.float16)
            and out_dtype in (None, q.dtype)
            and q.shape[2] <= 128
            and q.shape[2] % 8 == 0
            and softcap == 0
        )

    def offer(self, table: SliceTable, tq: int, tk: int, cost: Cost, *, heads_q: int, heads_kv: int,
              head_dim: int) -> Offer:
        """The whole table when it is one full or square-causal rectangle (what this backend is for), else nothing."""
        if single_rect(table) is None:
            return Offer()
        return super().offer(table, tq, tk, cost, heads_q=heads_q, heads_kv=heads_kv, head_dim=head_dim)

    def extra_memory_bytes(self, prep: SdpaPrep, *, heads_q: int, heads_kv: int, head_dim: int, dtype: torch.dtype) -> int:
        """On the rectangle: k/v and their gradients repeated to ``heads_q`` heads (GQA), a float32 dQ-sized
        workspace (assumed, not measured) and the fallback's gated recompute; elsewhere the fallback's need."""
        shape = dict(heads_q=heads_q, heads_kv=heads_kv, head_dim=head_dim, dtype=dtype)
        fallback = self.fallback.extra_memory_bytes(prep.fallback, **shape)
        r = prep.rect
        if r is None:
            return fallback
        repeated = 4 * (r.ke - r.ks) * heads_q * head_dim * dtype.itemsize if heads_q != heads_kv else 0
        return repeated + (r.qe - r.qs) * heads_q * head_dim * 4 + fallback

    def forward(self, q, k, v, prep: SdpaPrep, softmax_scale, softcap, out_dtype=None):
        if not self.fast_path_ok(prep, q, k, softcap, out_dtype):
            return self.fallback.forward(q, k, v, prep.fallback, softmax_scale, softcap, out_dtype)
        out, lse = self._forward(q, k, v, prep, softmax_scale)
        if prep.rect.causal:
            self.fallback.forward_into(q, k, v, prep.fallback, softmax_scale, softcap, out, lse, gate=finiteness_gate(v))
        return out, lse

    def _forward(self, q, k, v, prep: SdpaPrep, softmax_scale):
        r = prep.rect
        groups = q.shape[1] // k.shape[1]
        res = torch.ops.aten._scaled_dot_product_cudnn_attention(
            _bhsd(q[r.qs : r.qe]), _bhsd(_heads(k[r.ks : r.ke], groups)), _bhsd(_heads(v[r.ks : r.ke], groups)),
            None, True, 0.0, r.causal, False, scale=float(softmax_scale),
        )  # fmt: skip
        o, lse_r = res[0][0].permute(1, 0, 2), res[1].reshape(q.shape[1], r.qe - r.qs).t()
        if r.qe - r.qs == q.shape[0]:
            return o.contiguous(), lse_r.contiguous()
        out = torch.zeros_like(q)
        lse = torch.full(q.shape[:2], float("-inf"), dtype=torch.float32, device=q.device)
        out[r.qs : r.qe] = o
        lse[r.qs : r.qe] = lse_r
        return out, lse

    def backward(self, do, q, k, v, out, lse, prep: SdpaPrep, softmax_scale, softcap, grad_dtype=None):
        if not self.fast_path_ok(prep, q, k, softcap):
            return self.fallback.backward(do, q, k, v, out, lse, prep.fallback, softmax_scale, softcap, grad_dtype)
        grads = self._backward(do, q, k, v, out, lse, prep, softmax_scale, grad_dtype or torch.float32)
        if prep.rect.causal:
            self.fallback.backward_into(do, q, k, v, out, lse, prep.fallback, softmax_scale, softcap, grads,
                                        gate=finiteness_gate(v))
        return grads

    def _backward(self, do, q, k, v, out, lse, prep: SdpaPrep, softmax_scale, gdt: torch.dtype):
        r = prep.rect
        sq, sk = r.qe - r.qs, r.ke - r.ks
        rows = slice(r.qs, r.qe)
        lse_r = lse[rows].t().contiguous().view(1, q.shape[1], sq, 1)
        # every row of a full or square-causal rectangle has keys, so lse is finite here
        unused = torch.empty((), dtype=torch.long, device=q.device)
        groups = q.shape[1] // k.shape[1]
        grads = torch.ops.aten._scaled_dot_product_cudnn_attention_backward(
            _bhsd(do[rows].to(q.dtype).contiguous()), _bhsd(q[rows]),
            _bhsd(_heads(k[r.ks : r.ke], groups)), _bhsd(_heads(v[r.ks : r.ke], groups)),
            _bhsd(out[rows].to(q.dtype).contiguous()), lse_r, unused, unused, None, None, None, sq, sk, 0.0, r.causal,
            scale=float(softmax_scale),
        )  # fmt: skip
        return tuple(_placed(g, start, x.shape, gdt) for g, start, x in zip(grads[:3], (r.qs, r.ks, r.ks), (q, k, v)))


def _heads(x: torch.Tensor, groups: int) -> torch.Tensor:
    """GQA for cuDNN: each k/v head repeated for the ``groups`` q heads that share it (q head h uses h // groups)."""
    return x if groups == 1 else x.repeat_interleave(groups, dim=1)


def _placed(g: torch.Tensor, start: int, shape: torch.Size, dtype: torch.dtype) -> torch.Tensor:
    """A ``[1, h, s, d]`` SDPA gradient as ``dtype`` THD rows ``[start, start + s)`` of a zero tensor of ``shape``.

    With GQA (``h`` a multiple of ``shape[1]``) the repeated heads' gradients are summed back
    (in float32). A gradient that already has the shape and dtype is returned without a copy.
    """
    g = g[0].permute(1, 0, 2)
    if g.shape[1] != shape[1]:
        g = g.float().reshape(g.shape[0], shape[1], g.shape[1] // shape[1], g.shape[2]).sum(2)
    if g.shape[0] == shape[0]:
        return g.to(dtype).contiguous()
    full = torch.zeros(shape, dtype=dtype, device=g.device)
    full[start : start + g.shape[0]] = g
    return full


__all__ = ["TorchSdpaBackend", "SdpaPrep", "Rect", "single_rect"]
