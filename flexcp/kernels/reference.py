"""Pure-PyTorch attention over slice masks, tile by tile (CPU and CUDA; the correctness oracle).

Forward keeps a running max / sum / accumulator per q tile (online log-sum-exp), so
memory grows with the tile, not with S^2. Backward recomputes each tile's
probabilities from the final lse (FlashAttention-style), which is also what lets the
distributed layer run it per stage with merged statistics.

Non-finite inputs stay where they belong: a NaN/inf in q, k or v reaches only the rows
that attend it. A masked cell's probability is exactly 0, and every product that would
multiply such a 0 by a non-finite value (P @ V in the forward; dS, dS @ K, dS^T @ Q in
the backward) uses a finite copy instead, while rows that do attend a non-finite value
become NaN.
"""

from __future__ import annotations

import torch

from ..mask.geometry import SliceTable
from .backend import AttnBackend, stat_dtype
from .tiles import TilePair, TileSchedule, build_tile_schedule


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    return stat_dtype(x.dtype)


def _tile_mask(pair: TilePair, device: torch.device) -> torch.Tensor | None:
    """Boolean ``[rows, cols]`` mask of a tile: the union of its slices' bands."""
    if pair.bands is None:
        return None
    b = torch.as_tensor(pair.bands, device=device)[:, :, None, None]
    i = torch.arange(pair.r0, pair.r1, device=device)[:, None]
    j = torch.arange(pair.c0, pair.c1, device=device)[None, :]
    d = j - i
    inside = (i >= b[:, 0]) & (i < b[:, 1]) & (j >= b[:, 2]) & (j < b[:, 3]) & (d >= b[:, 4]) & (d <= b[:, 5])
    return inside.any(dim=0)


def _finite(x: torch.Tensor) -> torch.Tensor:
    """``x`` with non-finite entries replaced by 0 (``x`` itself when all are finite)."""
    bad = ~torch.isfinite(x)
    return x.masked_fill(bad, 0.0) if bool(bad.any()) else x


class ReferenceBackend(AttnBackend):
    """Tiled attention in plain torch ops; exact semantics, modest speed."""

    name = "reference"

    def __init__(self, block_q: int = 512, block_k: int = 512) -> None:
        self.block_q = block_q
        self.block_k = block_k

    def prepare(self, table: SliceTable, tq: int, tk: int, device: torch.device) -> TileSchedule:
        return build_tile_schedule(table, tq, tk, self.block_q, self.block_k)

    def extra_memory_bytes(self, prep: TileSchedule, *, heads_q: int, heads_kv: int, head_dim: int, dtype: torch.dtype) -> int:
        """The default (``stat_dtype`` copies of q, k, v and their gradients) plus one tile's scores,
        probabilities and their gradients (four ``[heads_q, block_q, block_k]`` tensors)."""
        tiles = 4 * heads_q * self.block_q * self.block_k * stat_dtype(dtype).itemsize
        return super().extra_memory_bytes(prep, heads_q=heads_q, heads_kv=heads_kv, head_dim=head_dim, dtype=dtype) + tiles

    # ------------------------------------------------------------- helpers
    @staticmethod
    def _scores(qt: torch.Tensor, kt: torch.Tensor, scale: float, softcap: float):
        """Scores ``[hkv, g, rows, cols]`` and, with softcap, the tanh for the backward."""
        raw = torch.einsum("qhgd,khd->hgqk", qt, kt) * scale
        if softcap > 0:
            t = torch.tanh(raw / softcap)
            return t * softcap, t
        return raw, None

    @staticmethod
    def _grouped(x: torch.Tensor, hkv: int, dtype: torch.dtype) -> torch.Tensor:
        """``[t, hq, d] -> [t, hkv, g, d]`` in the compute dtype (GQA groups adjacent q heads)."""
        t, hq, d = x.shape
        return x.to(dtype).reshape(t, hkv, hq // hkv, d)

    # ------------------------------------------------------------- forward
    def forward(self, q, k, v, prep: TileSchedule, softmax_scale, softcap, out_dtype=None):
        tq, hq, d = q.shape
        hkv = k.shape[1]
        cdt = _compute_dtype(q)
        qg = self._grouped(q, hkv, cdt)
        kc, vc = k.to(cdt), v.to(cdt)
        v_bad = ~torch.isfinite(vc)
        v_bad = v_bad.to(cdt) if bool(v_bad.any()) else None  # P @ V then runs on a finite V, and
        if v_bad is not None:  # the rows attending a non-finite value are set to NaN at the end
            vc = vc.masked_fill(v_bad.bool(), 0.0)
        out = torch.zeros(tq, hq, v.shape[2], dtype=out_dtype or q.dtype, device=q.device)
        lse = torch.full((tq, hq), float("-inf"), dtype=stat_dtype(q.dtype), device=q.device)
        for row in prep.rows:
            r0, r1 = row[0].r0, row[0].r1
            m = torch.full((hkv, hq // hkv, r1 - r0, 1), float("-inf"), dtype=cdt, device=q.device)
            den = torch.zeros_like(m)
            acc = torch.zeros(hkv, hq // hkv, r1 - r0, v.shape[2], dtype=cdt, device=q.device)
            poison = None if v_bad is None else torch.zeros(hkv, 1, r1 - r0, v.shape[2], dtype=torch.bool,
                                                            device=q.device)
            for pair in row:
                mask = _tile_mask(pair, q.device)
                s, _ = self._scores(qg[r0:r1], kc[pair.c0 : pair.c1], softmax_scale, softcap)
                if mask is not None:
                    s = s.masked_fill(~mask, float("-inf"))
                m_new = torch.maximum(m, s.amax(dim=-1, keepdim=True))
                m_safe = torch.where(torch.isinf(m_new), torch.zeros_like(m_new), m_new)
                p = torch.exp(s - m_safe)
                alpha = torch.exp(m - m_safe)
                den = den * alpha + p.sum(dim=-1, keepdim=True)
                acc = acc * alpha + torch.einsum("hgqk,khd->hgqd", p, vc[pair.c0 : pair.c1])
                if poison is not None:
                    bad = v_bad[pair.c0 : pair.c1]
                    hits = bad.sum(0)[:, None] if mask is None else torch.einsum("qk,khd->hqd", mask.to(cdt), bad)
                    poison |= (hits > 0)[:, None]
                m = m_new
            empty = den == 0
            o = torch.where(empty, torch.zeros_like(acc), acc / torch.where(empty, torch.ones_like(den), den))
            if poison is not None:
                o = o.masked_fill(poison, float("nan"))
            l = torch.where(empty, torch.full_like(den, float("-inf")), m + torch.log(den))
            out[r0:r1] = o.permute(2, 0, 1, 3).reshape(r1 - r0, hq, -1).to(out.dtype)
            lse[r0:r1] = l.squeeze(-1).permute(2, 0, 1).reshape(r1 - r0, hq).to(lse.dtype)
        return out, lse

    # ------------------------------------------------------------ backward
    def backward(self, do, q, k, v, out, lse, prep: TileSchedule, softmax_scale, softcap, grad_dtype=None):
        tq, hq, d = q.shape
        hkv = k.shape[1]
        g = hq // hkv
        cdt = _compute_dtype(q)
        qg = self._grouped(q, hkv, cdt)
        dog = self._grouped(do, hkv, cdt)
        kc, vc = k.to(cdt), v.to(cdt)
        q_fin, k_fin = _finite(qg), _finite(kc)  # for dS @ K and dS^T @ Q, where masked dS is exactly 0
        delta = (do.to(cdt) * out.to(cdt)).sum(-1)  # [tq, hq]
        lse_c = lse.to(cdt)
        dq = torch.zeros(tq, hkv, g, d, dtype=cdt, device=q.device)
        dk = torch.zeros(k.shape, dtype=cdt, device=q.device)
        dv = torch.zeros(v.shape, dtype=cdt, device=q.device)
        for row in prep.rows:
            r0, r1 = row[0].r0, row[0].r1
            l = lse_c[r0:r1].reshape(r1 - r0, hkv, g).permute(1, 2, 0)[..., None]
            l = torch.where(torch.isinf(l), torch.zeros_like(l), l)
            dl = delta[r0:r1].reshape(r1 - r0, hkv, g).permute(1, 2, 0)[..., None]
            for pair in row:
                c0, c1 = pair.c0, pair.c1
                mask = _tile_mask(pair, q.device)
                s, t = self._scores(qg[r0:r1], kc[c0:c1], softmax_scale, softcap)
                p = torch.exp(s - l)
                if mask is not None:
                    p = p.masked_fill(~mask, 0.0)
                dv[c0:c1] += torch.einsum("hgqk,qhgd->khd", p, dog[r0:r1])
                dp = torch.einsum("qhgd,khd->hgqk", dog[r0:r1], vc[c0:c1])
                ds = p * (dp - dl)
                if t is not None:
                    ds = ds * (1 - t * t)
                ds = ds * softmax_scale
                if mask is not None:  # 0 * a non-finite dP (a V a row does not attend) must stay 0
                    ds = ds.masked_fill(~mask, 0.0)
                dq[r0:r1] += torch.einsum("hgqk,khd->qhgd", ds, k_fin[c0:c1])
                dk[c0:c1] += torch.einsum("hgqk,qhgd->khd", ds, q_fin[r0:r1])
        gdt = grad_dtype or stat_dtype(q.dtype)
        return dq.reshape(tq, hq, d).to(gdt), dk.to(gdt), dv.to(gdt)

