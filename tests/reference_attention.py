"""Test oracles: the mask cells straight from ``AttnMaskType``'s definition, and dense float64 attention.

Both are O(S^2) on purpose and meant for small tests only; other test files import them.
"""

from __future__ import annotations

import numpy as np
import torch

from flexcp.mask import AttnMaskSpec, AttnMaskType


def slice_cells(mask_type: AttnMaskType | str, sq: int, sk: int) -> np.ndarray:
    """Boolean ``[sq, sk]`` cells one slice keeps, row ``i`` and key ``j`` counted from its start."""
    i = np.arange(sq)[:, None]
    j = np.arange(sk)[None, :]
    causal = j <= i + sk - sq  # bottom-right aligned
    inv_causal = j >= i  # top-left aligned
    kind = AttnMaskType(mask_type)
    if kind == AttnMaskType.FULL:
        return np.ones((sq, sk), dtype=bool)
    if kind == AttnMaskType.CAUSAL:
        return causal
    if kind == AttnMaskType.INV_CAUSAL:
        return inv_causal
    return causal & inv_causal


def coverage(spec: AttnMaskSpec) -> np.ndarray:
    """How many slices cover each ``(q, k)`` cell (int ``[total_seqlen, total_seqlen_k]``), built slice by slice."""
    count = np.zeros((spec.total_seqlen, spec.total_seqlen_k), dtype=np.int64)
    for (qs, qe), (ks, ke), kind in zip(spec.q_ranges, spec.k_ranges, spec.mask_types):
        count[qs:qe, ks:ke] += slice_cells(kind, qe - qs, ke - ks)
    return count


def dense_mask(spec: AttnMaskSpec) -> np.ndarray:
    """Independent dense materialization of a valid spec (not using ``spec.to_dense``)."""
    return coverage(spec) > 0


def dense_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    spec: AttnMaskSpec,
    softmax_scale: float | None = None,
    softcap: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Float64 attention of THD tensors under ``spec.to_dense()``; returns ``(out [tq,hq,d], lse [tq,hq])``.

    Differentiable in ``q, k, v``. GQA: q head ``h`` reads kv head ``h // (hq // hkv)``.
    Rows with no keys give out 0 and lse -inf, and (because their probabilities are
    multiplied by the mask) exactly zero gradients.
    """
    hq, hkv = q.shape[1], k.shape[1]
    scale = q.shape[-1] ** -0.5 if softmax_scale is None else softmax_scale
    mask = spec.to_dense(device=q.device)  # [tq, tk]
    has_keys = mask.any(dim=1)  # [tq]
    kd = k.double().repeat_interleave(hq // hkv, dim=1)
    vd = v.double().repeat_interleave(hq // hkv, dim=1)
    s = torch.einsum("qhd,khd->hqk", q.double(), kd) * scale
    if softcap > 0:
        s = softcap * torch.tanh(s / softcap)
    s = s.masked_fill(~mask, float("-inf")).masked_fill(~has_keys[:, None], 0.0)  # empty rows stay finite
    lse = torch.logsumexp(s, dim=-1)  # [hq, tq]
    p = torch.exp(s - lse[..., None]) * mask
    out = torch.einsum("hqk,khd->qhd", p, vd)
    lse = lse.masked_fill(~has_keys, float("-inf")).transpose(0, 1)
    return out, lse
