"""A CPU stand-in for cuDNN's ragged SDPA graphs: what the cuDNN backend's launches would compute.

``EmulatedGraphs`` replaces the backend's graph cache: ``run`` reads the same named
bindings a real graph execution gets (THD tensors, int64 element offsets, int32
lengths) and, entry by entry, computes attention under the launch's TOP_LEFT band in
float64, *overwriting* the output rows the offsets point at, as cuDNN does. So the
backend's offset arithmetic, spans, private dK/dV rows, merges and accumulation are
tested on CPU, exactly, without cuDNN. A backward graph built by tokens (``key.shape.total_q``)
also checks that no offset addresses a row past its totals (cuDNN's accumulators end there).
``versions`` (what the workspace policy reads) is an H200 with cuDNN 9.19 unless a test sets it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from flexcp.kernels import ReferenceBackend
from flexcp.kernels.cudnn import CudnnBackend
from flexcp.kernels.cudnn.graphs import CacheStats, GraphKey
from flexcp.kernels.cudnn.plan import UNBOUNDED
from flexcp.kernels.cudnn.workspace import Versions

H200_9_19 = Versions(91900, (1, 32), 9)


@dataclass
class EmulatedGraphs:
    stats: CacheStats

    def __init__(self) -> None:
        self.stats = CacheStats()
        self.keys: set = set()
        self.runs = 0
        self.current = H200_9_19

    def versions(self, device: int) -> Versions:
        return self.current

    def get(self, key: GraphKey):
        if key in self.keys:
            self.stats.hits += 1
        else:
            self.keys.add(key)
            self.stats.misses += 1
        return key

    def run(self, key: GraphKey, b: dict) -> None:
        self.get(key)
        self.runs += 1
        hq, hkv, d = key.shape.hq, key.shape.hkv, key.shape.head_dim
        g = hq // hkv
        for e in range(key.shape.batch):
            n, m = int(b["seq_q"][e]), int(b["seq_k"][e])
            assert n <= key.shape.max_q and m <= key.shape.max_k, "entry longer than its graph's bucket"
            if n == 0:
                continue
            row = lambda name, width: int(b[f"off_{name}"][e]) // width  # noqa: E731
            q = b["q"][row("q", hq * d) :][:n].double()
            k = b["k"][row("k", hkv * d) :][:m].double().repeat_interleave(g, 1)
            v = b["v"][row("v", hkv * d) :][:m].double().repeat_interleave(g, 1)
            assert q.shape[0] == n and k.shape[0] == m, "an offset points past the end of its tensor"
            i, j = torch.arange(n)[:, None], torch.arange(m)[None, :]
            left, right = key.sig
            keep = torch.ones(n, m, dtype=torch.bool)
            if left is not None:
                keep &= j > i - left
            if right is not None:
                keep &= j <= i + (key.shape.max_k if right == UNBOUNDED else right)
            s = torch.einsum("qhd,khd->hqk", q, k) * key.scale
            s = s.masked_fill(~keep, float("-inf"))
            if not key.backward:
                lse = torch.logsumexp(s, -1)
                p = torch.exp(s - lse[..., None])
                o0, s0 = row("o", hq * d), row("stats", hq)
                b["o"][o0 : o0 + n] = torch.einsum("hqk,khd->qhd", p, v).to(b["o"].dtype)
                b["stats"][s0 : s0 + n] = lse.t().to(b["stats"].dtype)
                continue
            s0 = row("stats", hq)
            if key.shape.total_q:
                # cuDNN 9.19's token-sized backward gave a wrong dQ unless the query side's offsets are the
                # running sums of the entries' lengths from 0 (measured on an H200); emulate that contract
                first = int(b["seq_q"][:e].sum())
                assert all(row(t, w) == first for t, w in (("q", hq * d), ("o", hq * d), ("do", hq * d), ("dq", hq * d),
                                                           ("stats", hq))), "token-sized backward: query offsets not packed from 0"
                assert s0 + n <= key.shape.total_q and row("dq", hq * d) + n <= key.shape.total_q, "a row past max_total_seq_len_q"
                assert max(row("dk", hkv * d), row("dv", hkv * d)) + m <= key.shape.total_k, "a row past max_total_seq_len_kv"
            lse = b["stats"][s0 : s0 + n].double().t()
            o = b["o"][row("o", hq * d) :][:n].double()
            do = b["do"][row("do", hq * d) :][:n].double()
            p = torch.exp(s - lse[..., None])
            dp = torch.einsum("qhd,khd->hqk", do, v)
            ds = p * (dp - (do * o).sum(-1).t()[..., None]) * key.scale
            dq0, dk0, dv0 = row("dq", hq * d), row("dk", hkv * d), row("dv", hkv * d)
            b["dq"][dq0 : dq0 + n] = torch.einsum("hqk,khd->qhd", ds, k).to(b["dq"].dtype)
            dk = torch.einsum("hqk,qhd->khd", ds, q).reshape(m, hkv, g, d).sum(2)
            dv = torch.einsum("hqk,qhd->khd", p, do).reshape(m, hkv, g, d).sum(2)
            b["dk"][dk0 : dk0 + m] = dk.to(b["dk"].dtype)
            b["dv"][dv0 : dv0 + m] = dv.to(b["dv"].dtype)


class EmulatedCudnn(CudnnBackend):
    """The cuDNN backend's orchestration over :class:`EmulatedGraphs` (any device, any float dtype).

    The fallback (refused launches, the gated non-finite recompute) defaults to the reference.
    """

    def __init__(self, fallback=None) -> None:
        super().__init__(fallback=fallback or ReferenceBackend(), graphs=EmulatedGraphs())

    def unsupported(self, q, k, softcap):
        return "the emulator has no softcap" if softcap > 0 else None
