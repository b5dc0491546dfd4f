"""CudnnBackend: slice masks on cuDNN's ragged SDPA (nvidia-cudnn-frontend), forward and backward.

``prepare`` turns the slice table into launches (plan.py); each launch is one graph
execution over a batch of entries located by ragged offsets. The forward writes out/lse
in place when one launch covers every written row, else merges launches by lse in
float32; the backward takes the *final* out and lse (merged across launches, or across
CP stages by the distributed layer), so every launch's dQ/dK/dV are exact partials, and
sums them (private dK/dV rows of launches with shared keys are index-added).
With ``grad_dtype`` equal to the inputs' dtype, launches with pairwise disjoint query rows
write dQ straight into the caller's gradient (and disjoint key rows dK/dV), no float32
buffers or conversions; what overlaps is summed in float32 and converted once.
A launch whose graph cuDNN refuses runs on ``fallback`` (Triton by default) instead, so
one mask may use both backends in one call. cuDNN's launches let a NaN/inf in V reach
rows that do not attend it, so after every call that ran on cuDNN the fallback
recomputes the whole call behind a device-side gate (``backend.finiteness_gate``): a few
microseconds when V is finite, the exact confined result when it is not, no host sync.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from ...mask.cover import CoverageError, cells, check_cover
from ...mask.geometry import BIG, SliceTable, clip_band
from ..backend import AttnBackend, Offer, finiteness_gate, stat_dtype
from ..costs import FLOPS_PER_CELL, Cost
from ..compose import GradSum, merge_into
from .graphs import GraphCache, GraphKey, why_unavailable
from .plan import UNBOUNDED, Launch, covered_rows, launch_bucket, launch_rows_overlap, plan_launches, row_depth, to_entries
from . import workspace
from .workspace import KNOWN_BAD, Shape, accumulator_elements, backward_workspace, padded_reason, token_bucket, too_large

SUPPORTED_DTYPES = (torch.bfloat16, torch.float16)
MAX_HEAD_DIM = 128


@dataclass
class LaunchTensors:
    """Device-side lengths and offsets of one launch for one (hq, hkv, d) layout."""

    seq_q: torch.Tensor
    seq_k: torch.Tensor
    off: dict  # name -> int64 [batch + 1] element offsets
    key_index: torch.Tensor | None  # private dK/dV row -> key row


@dataclass
class CudnnPrep:
    tq: int
    tk: int
    device: torch.device
    launches: list
    shared_rows: list  # per launch: rows also written by another launch
    full_q: bool  # the launches together write every query row
    table: SliceTable  # the whole mask, for the fallback's gated recompute
    disjoint_keys: bool  # no key row is in two entries (dK/dV can be written in place)
    full_k: bool  # the launches together touch every key row
    _tensors: dict = field(default_factory=dict, repr=False)
    _fallback: dict = field(default_factory=dict, repr=False)

    def tensors(self, i: int, hq: int, hkv: int, d: int) -> LaunchTensors:
        key = (i, hq, hkv, d)
        if key not in self._tensors:
            self._tensors[key] = _launch_tensors(self.launches[i], hq, hkv, d, self.device)
        return self._tensors[key]


def _launch_tensors(la: Launch, hq: int, hkv: int, d: int, device: torch.device) -> LaunchTensors:
    batch, _, _ = launch_bucket(la)
    n = len(la)
    r0, _ = la.row_span
    c0, _ = la.key_span

    def padded(x: np.ndarray) -> np.ndarray:
        # unused entries (length 0) repeat the last offset, so offsets stay non-decreasing where they were
        return np.concatenate([x, np.full(batch + 1 - n, x[-1] if n else 0, dtype=np.int64)])

    qd, kd = hq * d, hkv * d
    dk_rows = la.private if la.private is not None else la.ks - c0
    offs = {
        "off_q": la.qs * qd, "off_k": la.ks * kd, "off_stats": la.qs * hq,
        "off_q_span": (la.qs - r0) * qd, "off_stats_span": (la.qs - r0) * hq, "off_dk": dk_rows * kd,
    }  # fmt: skip
    names = list(offs)
    table = np.stack([padded(offs[k].astype(np.int64)) for k in names])
    dev = torch.from_numpy(table).to(device)
    lens = np.zeros((2, batch), dtype=np.int32)
    lens[0, :n], lens[1, :n] = la.sq, la.sk
    lens_dev = torch.from_numpy(lens).to(device)
    key_index = None
    if la.private is not None:
        idx = np.concatenate([np.arange(s, s + c) for s, c in zip(la.ks.tolist(), la.sk.tolist())])
        key_index = torch.from_numpy(idx.astype(np.int64)).to(device)
    return LaunchTensors(lens_dev[0], lens_dev[1], {k: dev[i] for i, k in enumerate(names)}, key_index)


def backward_extents(la: Launch) -> tuple[int, int]:
    """Rows a token-sized backward's ragged offsets address: ``(query rows, key rows)``.

    Query-side tensors (q, o, dO, stats, dQ) are bound from the launch's first row on, so
    query offsets reach its row span's length; dK/dV offsets reach its last key row, or its
    private rows. The graph's ``max_total_seq_len_*`` must be at least these (cuDNN sizes its
    accumulators by them).
    """
    r0, r1 = la.row_span
    return r1 - r0, max(la.key_span[1], la.private_rows)


def packed_rows(la: Launch) -> bool:
    """Whether the launch's entries tile its row span with no gap (their query offsets, counted
    from the span's first row, are the running sums of their lengths).

    cuDNN 9.19's token-sized backward (``max_total_seq_len_q``) gave a wrong dQ, with right dK/dV,
    whenever query offsets were not those running sums from 0 (measured on one H200 over the
    GPU differential check: random masks, prefix trees, CP host stages). So a token-sized
    backward binds the query side from the span's first row, and a launch with gaps between
    its entries runs padded instead (within the index limit; else on the fallback).
    """
    r0, r1 = la.row_span
    return int(la.sq.sum()) == r1 - r0


def launch_table(la: Launch) -> SliceTable:
    """The launch's cells as typed slices (for running it on another backend).

    cuDNN's band is TOP_LEFT, counted from each entry's own start: ``i' - L < j' <= i' + R``
    with ``i' = i - qs`` and ``j' = j - ks``. In the mask's coordinates that is the band
    ``ks - qs - L + 1 <= j - i <= ks - qs + R``, which :func:`clip_band` cuts into typed
    slices. (Translating by signature alone is wrong: a BI_CAUSAL square ``sq == sk`` has
    the signature ``(1, 0)`` of a one-token window, but unlike a window's squares it need
    not sit on the diagonal ``qs == ks``.)
    """
    left, right = la.sig
    shift = la.ks - la.qs
    lo = np.full_like(la.qs, -BIG) if left is None else shift - left + 1
    hi = np.full_like(la.qs, BIG) if right is None or right == UNBOUNDED else shift + right
    t, _ = clip_band(la.qs, la.qs + la.sq, la.ks, la.ks + la.sk, lo, hi)
    return t


def check_launches(table: SliceTable, launches: list[Launch]) -> None:
    """The plan's conservation check (once per mask, in ``prepare``): every launch's cells as cuDNN's band
    counts them equal those of its :func:`launch_table` (what the per-launch fallback and the router's split
    run), and those hold exactly ``table``'s cells, each once (what the gated recompute runs)."""
    tables = [launch_table(la) for la in launches]
    for i, (la, t) in enumerate(zip(launches, tables)):
        if cells(t) != la.area():
            raise CoverageError(f"internal error: cuDNN launch {i} (band {la.sig}) holds {la.area()} cells but its "
                                f"slices {cells(t)}; this is a bug in flexcp")
    check_cover(table, tables, "the cuDNN plan's launches")


class CudnnBackend(AttnBackend):
    """Slice-mask attention on cuDNN's ragged SDPA; launches cuDNN refuses run on ``fallback``."""

    name = "cudnn"

    def __init__(self, fallback: AttnBackend | None = None, graphs: GraphCache | None = None) -> None:
        self._fallback = fallback
        self.graphs = graphs or GraphCache()
        self.refused: dict = {}  # signature -> cuDNN's error, for signatures it would not build
        self._versions: dict = {}  # device index -> workspace.Versions
        self._warned: set = set()  # one-time warnings already given

    @property
    def fallback(self) -> AttnBackend:
        if self._fallback is None:
            from ..triton import TritonBackend

            self._fallback = TritonBackend()
        return self._fallback

    def unsupported(self, q: torch.Tensor, k: torch.Tensor, softcap: float) -> str | None:
        why = why_unavailable()
        if why:
            return why
        if not q.is_cuda:
            return "the cudnn backend needs CUDA tensors"
        if q.dtype not in SUPPORTED_DTYPES:
            return f"the cudnn backend supports {SUPPORTED_DTYPES}, got {q.dtype}: cast q/k/v or use backend='triton'"
        d = q.shape[-1]
        if d % 8 or d > MAX_HEAD_DIM:
            return f"the cudnn backend needs head_dim a multiple of 8 and <= {MAX_HEAD_DIM}, got {d}"
        if softcap > 0:
            return "the cudnn backend has no softcap; use backend='triton' (or 'auto', which routes it there)"
        # the fallback recomputes a call whose V is not finite and runs refused launches: it must take these too
        return self.fallback.unsupported(q, k, softcap)

    def prepare(self, table: SliceTable, tq: int, tk: int, device: torch.device) -> CudnnPrep:
        launches = plan_launches(to_entries(table), tk)
        check_launches(table, launches)
        tq, tk = int(tq), int(tk)
        key_depth = row_depth(launches, tk, keys=True)
        return CudnnPrep(
            tq, tk, torch.device(device), launches, launch_rows_overlap(launches, tq), covered_rows(launches, tq) == tq,
            table.nonempty(), bool((key_depth <= 1).all()), bool((key_depth > 0).all()),
        )

    def offer(self, table: SliceTable, tq: int, tk: int, cost: Cost, *, heads_q: int, heads_kv: int,
              head_dim: int) -> Offer:
        """One part per launch of the plan, each paying ``cost.launch_us``; a launch whose rows another
        launch also writes pays ``cost.shared_row_ns`` per row and head of its span (buffers and merge)."""
        launches = plan_launches(to_entries(table), tk)
        seconds = []
        for la, shared in zip(launches, launch_rows_overlap(launches, tq)):
            kind = {(None, None): "full", (None, 0): "causal"}.get(la.sig, "band")
            work = cost.seconds({kind: la.area() * FLOPS_PER_CELL * head_dim * heads_q}, len(la), heads_q,
                                gqa=heads_q != heads_kv)
            span = la.row_span[1] - la.row_span[0]
            seconds.append(work + shared * span * heads_q * cost.shared_row_ns * 1e-9)
        return Offer(tuple(launch_table(la) for la in launches), tuple(seconds))

    def extra_memory_bytes(self, prep: CudnnPrep, *, heads_q: int, heads_kv: int, head_dim: int, dtype: torch.dtype) -> int:
        """Predicted extra peak bytes of one forward+backward call (16-bit gradients, as ``flexcp.attention``
        asks): the larger of the two passes, whose temporaries are freed in between.

        Forward: one launch writes out/lse in place (nothing extra); several are merged in a
        ``stat_dtype`` out accumulator, with one launch's span buffers alive beside it.
        Backward: ``stat_dtype`` sums of dQ (launches share query rows) and of dK/dV (entries
        share keys), plus, for the largest launch, its 16-bit span buffers and cuDNN's workspace
        (``workspace.backward_workspace``: sized by tokens or padded, per the version policy and
        :func:`packed_rows`; fitted to the H200 measurements, see there). A launch on the fallback (refused, or over
        the index limit) holds the fallback's full-size partials and its own need instead.
        Not counted: cuDNN's forward workspace and the engine's few MiB, the copies of out / dout
        a caller passing them in another dtype causes, and the gated recompute (it runs only
        when V holds a NaN/inf).
        """
        if not prep.launches or prep.tq == 0:
            return 0
        hq, hkv, d, dev = heads_q, heads_kv, head_dim, prep.device.index or 0
        e, f = dtype.itemsize, stat_dtype(dtype).itemsize
        partials = f * d * (prep.tq * hq + 2 * prep.tk * hkv)  # a full-size stat-dtype dq, dk, dv (or out, lse)
        shapes = [self.backward_shape(la, hq, hkv, d, dev) for la in prep.launches]
        on = [la.sig not in self.refused and not too_large(s) for la, s in zip(prep.launches, shapes)]

        def on_fallback(i: int) -> int:
            return partials + self.fallback.extra_memory_bytes(self._fallback_prep(prep, i), heads_q=hq, heads_kv=hkv,
                                                               head_dim=d, dtype=dtype)

        fwd = 0
        if len(prep.launches) > 1 or not on[0]:
            spans = [(la.row_span[1] - la.row_span[0]) * hq * (d * e + f) for la in prep.launches]
            fwd = prep.tq * hq * d * f + max(spans[i] if on[i] else on_fallback(i) for i in range(len(spans)))
        direct = all(on)
        direct_q, direct_k = direct and not any(prep.shared_rows), direct and prep.disjoint_keys
        sums = (0 if direct_q else prep.tq * hq * d * f) + (0 if direct_k else 2 * prep.tk * hkv * d * f)
        per_launch = []
        for i, (la, shape) in enumerate(zip(prep.launches, shapes)):
            if not on[i]:
                per_launch.append(on_fallback(i))
                continue
            r0, r1 = la.row_span
            krows = la.private_rows if la.private is not None else la.key_span[1] - la.key_span[0]
            buffers = (0 if direct_q else (r1 - r0) * hq * d * e) + (0 if direct_k else 2 * krows * hkv * d * e)
            per_launch.append(buffers + backward_workspace(shape, e))
        return int(max(fwd, sums + max(per_launch)))

    # ------------------------------------------------------------------ helpers
    def padded_reason(self, device: int, head_dim: int) -> str | None:
        """Why backward graphs on ``device`` are sized by the padded shape (None: by tokens); see workspace.py."""
        if device not in self._versions:
            self._versions[device] = self.graphs.versions(device)
        v = self._versions[device]
        why = padded_reason(v, head_dim)
        if why and any(a <= v.backend < b for a, b in KNOWN_BAD):
            self._warn_once(why, f"{why}. The cudnn backend sizes its backward workspace by the padded shape there "
                                 "(more memory); launches too large for that run on the fallback.")
        return why

    def backward_shape(self, la: Launch, hq: int, hkv: int, d: int, device: int) -> Shape:
        """The backward graph's shape for this launch: by tokens (bucketed totals) where the policy allows."""
        batch, mq, mk = launch_bucket(la)
        if self.padded_reason(device, d) is not None:
            return Shape(batch, mq, mk, hq, hkv, d)
        if not packed_rows(la):
            return Shape(batch, mq, mk, hq, hkv, d)
        rows, keys = backward_extents(la)
        return Shape(batch, mq, mk, hq, hkv, d, token_bucket(rows), token_bucket(keys))

    def _key(self, la: Launch, q: torch.Tensor, k: torch.Tensor, scale: float, backward: bool) -> GraphKey:
        dev = q.device.index or 0
        hq, hkv, d = q.shape[1], k.shape[1], q.shape[2]
        shape = self.backward_shape(la, hq, hkv, d, dev) if backward else Shape(*launch_bucket(la), hq, hkv, d)
        return GraphKey(backward, la.sig, shape, q.dtype, float(scale), dev)

    def _warn_once(self, topic: str, message: str) -> None:
        if topic not in self._warned:
            self._warned.add(topic)
            warnings.warn(message, RuntimeWarning, stacklevel=3)

    def _runs_on_cudnn(self, la: Launch, q, k, scale: float, backward: bool) -> bool:
        """Build (or find) the launch's graph; a refused signature is remembered and goes to the fallback,
        and so does a backward launch whose accumulator would be too large to index safely."""
        if la.sig in self.refused:
            return False
        key = self._key(la, q, k, scale, backward)
        if backward and too_large(key.shape):
            why = self.padded_reason(key.device, key.shape.head_dim)
            self._warn_once(
                f"too large: {why}",
                f"cudnn backward: launches whose float32 accumulator would exceed {workspace.INDEX_LIMIT} elements "
                f"(this one: {accumulator_elements(key.shape)}) run on the {self.fallback.name} fallback (cuDNN "
                "gave a wrong dQ past that size, measured); "
                + (f"its workspace is padded because {why}" if why else "even sized by tokens"),
            )
            return False
        try:
            self.graphs.get(key)
            return True
        except Exception as e:  # noqa: BLE001 - cuDNN raises its own error types for unsupported graphs
            self.refused[la.sig] = f"{type(e).__name__}: {e}"
            return False

    def _fallback_prep(self, prep: CudnnPrep, i: int | None) -> Any:
        """The fallback's schedule of launch ``i`` (None: of the whole mask)."""
        if i not in prep._fallback:
            table = prep.table if i is None else launch_table(prep.launches[i])
            prep._fallback[i] = self.fallback.prepare(table, prep.tq, prep.tk, prep.device)
        return prep._fallback[i]

    # ------------------------------------------------------------------ forward
    def forward(self, q, k, v, prep: CudnnPrep, softmax_scale, softcap, out_dtype=None):
        self._check(q, k, v, softcap)
        tq, hq, d = q.shape
        want = out_dtype or q.dtype
        if not prep.launches or tq == 0:
            return torch.zeros(tq, hq, d, dtype=want, device=q.device), _neg_inf(tq, hq, q)
        on_cudnn = [self._runs_on_cudnn(la, q, k, softmax_scale, False) for la in prep.launches]
        if len(prep.launches) == 1 and on_cudnn[0]:
            alloc = torch.empty if prep.full_q else torch.zeros
            out = alloc(tq, hq, d, dtype=q.dtype, device=q.device)
            lse = torch.empty(tq, hq, dtype=stat_dtype(q.dtype), device=q.device) if prep.full_q else _neg_inf(tq, hq, q)
            self._forward_launch(prep, 0, q, k, v, out, lse, softmax_scale, span=False)
            out = out.to(want)
        else:
            out, lse = self._forward_merged(q, k, v, prep, on_cudnn, softmax_scale, softcap, want)
        if any(on_cudnn):
            self.fallback.forward_into(q, k, v, self._fallback_prep(prep, None), softmax_scale, softcap, out, lse,
                                       gate=finiteness_gate(v))
        return out, lse

    def _forward_merged(self, q, k, v, prep: CudnnPrep, on_cudnn: list, scale: float, softcap: float, want):
        """Launches (cuDNN or fallback) merged by lse in float32."""
        tq, hq, d = q.shape
        acc = stat_dtype(q.dtype)
        out = torch.zeros(tq, hq, d, dtype=acc, device=q.device)
        lse = _neg_inf(tq, hq, q)
        for i, la in enumerate(prep.launches):
            if on_cudnn[i]:
                r0, r1 = la.row_span
                covered = int(la.sq.sum()) == r1 - r0  # then every row of the span is written
                o_t = (torch.empty if covered else torch.zeros)(r1 - r0, hq, d, dtype=q.dtype, device=q.device)
                l_t = torch.empty(r1 - r0, hq, dtype=acc, device=q.device) if covered else _neg_inf(r1 - r0, hq, q)
                self._forward_launch(prep, i, q, k, v, o_t, l_t, scale, span=True)
                merge_into(out[r0:r1], lse[r0:r1], o_t, l_t)
            else:
                o_f, l_f = self.fallback.forward(q, k, v, self._fallback_prep(prep, i), scale, softcap, acc)
                merge_into(out, lse, o_f, l_f)
        return out.to(want), lse

    def _forward_launch(self, prep, i, q, k, v, out, lse, scale, span: bool) -> None:
        la = prep.launches[i]
        t = prep.tensors(i, q.shape[1], k.shape[1], q.shape[2])
        o_off, s_off = ("off_q_span", "off_stats_span") if span else ("off_q", "off_stats")
        self.graphs.run(
            self._key(la, q, k, scale, False),
            {
                "q": q, "k": k, "v": v, "o": out, "stats": lse, "seq_q": t.seq_q, "seq_k": t.seq_k,
                "off_q": t.off["off_q"], "off_k": t.off["off_k"], "off_v": t.off["off_k"],
                "off_o": t.off[o_off], "off_stats": t.off[s_off],
            },
        )  # fmt: skip

    # ----------------------------------------------------------------- backward
    def backward(self, do, q, k, v, out, lse, prep: CudnnPrep, softmax_scale, softcap, grad_dtype=None):
        self._check(q, k, v, softcap)
        want = grad_dtype or stat_dtype(q.dtype)
        if not prep.launches or q.shape[0] == 0:
            return tuple(torch.zeros(x.shape, dtype=want, device=x.device) for x in (q, k, v))
        on_cudnn = [self._runs_on_cudnn(la, q, k, softmax_scale, True) for la in prep.launches]
        # 16-bit gradients wanted and every launch on cuDNN: write straight into them where nothing overlaps
        direct = want == q.dtype and all(on_cudnn)
        sink = _GradSink(q, k, v, prep, direct_q=direct and not any(prep.shared_rows), direct_k=direct and prep.disjoint_keys)
        o16 = out.to(q.dtype).contiguous()
        do16 = do.to(q.dtype).contiguous()
        lse = lse.to(stat_dtype(q.dtype)).contiguous()
        for i, la in enumerate(prep.launches):
            if on_cudnn[i]:
                self._backward_launch(prep, i, q, k, v, o16, do16, lse, softmax_scale, sink)
            else:
                parts = self.fallback.backward(do, q, k, v, out, lse, self._fallback_prep(prep, i), softmax_scale, softcap)
                for acc, part in zip(sink.sums, parts):
                    acc.add(part)
        grads = sink.result(want)
        if any(on_cudnn):
            self.fallback.backward_into(do, q, k, v, out, lse, self._fallback_prep(prep, None), softmax_scale, softcap,
                                        grads, gate=finiteness_gate(v))
        return grads

    def _backward_launch(self, prep, i, q, k, v, o16, do16, lse, scale, sink: "_GradSink") -> None:
        la = prep.launches[i]
        hq, hkv, d = q.shape[1], k.shape[1], q.shape[2]
        t = prep.tensors(i, hq, hkv, d)
        key = self._key(la, q, k, scale, True)
        by_tokens = bool(key.shape.total_q)
        dq_t, off_dq = sink.dq_target(la, t, by_tokens)
        (dk_t, dv_t), off_dk = sink.dkv_target(la, t)
        off_q, off_stats = t.off["off_q"], t.off["off_stats"]
        if by_tokens:  # the query side bound from the span's first row (see packed_rows)
            r0 = la.row_span[0]
            q, o16, do16, lse = q[r0:], o16[r0:], do16[r0:], lse[r0:]
            off_q, off_stats = t.off["off_q_span"], t.off["off_stats_span"]
        self.graphs.run(
            key,
            {
                "q": q, "k": k, "v": v, "o": o16, "do": do16, "stats": lse, "dq": dq_t, "dk": dk_t, "dv": dv_t,
                "seq_q": t.seq_q, "seq_k": t.seq_k, "off_q": off_q, "off_k": t.off["off_k"],
                "off_v": t.off["off_k"], "off_o": off_q, "off_do": off_q,
                "off_stats": off_stats, "off_dq": off_dq, "off_dk": off_dk, "off_dv": off_dk,
            },
        )  # fmt: skip
        sink.collect(la, t, dq_t, dk_t, dv_t)

    def _check(self, q, k, v, softcap) -> None:
        why = self.unsupported(q, k, softcap)
        if why:
            raise ValueError(why)
        for name, x in (("q", q), ("k", k), ("v", v)):
            if not x.is_contiguous():
                raise ValueError(f"{name} must be contiguous THD for the cudnn backend (call .contiguous())")


class _GradSink:
    """Where one backward's launches write dQ/dK/dV: in place into the final 16-bit gradients
    (``direct_q`` / ``direct_k``: nothing overlaps), else into per-launch buffers summed in float32.

    cuDNN writes 16-bit gradients: its float32 gradient outputs built and ran on cuDNN 9.19 but
    gave wrong results (measured), so they are not used.
    """

    def __init__(self, q, k, v, prep: CudnnPrep, direct_q: bool, direct_k: bool) -> None:
        self.q, self.k = q, k
        self.sums = [GradSum(x.shape, x.device, q.dtype) for x in (q, k, v)]
        self.dq = _buffer(q.shape[0], prep.full_q, q.shape[1], q.shape[2], q.dtype, q.device) if direct_q else None
        self.dkv = [_buffer(k.shape[0], prep.full_k, k.shape[1], k.shape[2], q.dtype, q.device) for _ in "kv"] if direct_k else None

    def dq_target(self, la: Launch, t: LaunchTensors, from_span: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """dQ's binding: the final gradient (a view from the span's first row when ``from_span``) or a span buffer."""
        r0, r1 = la.row_span
        if self.dq is not None:
            return (self.dq[r0:], t.off["off_q_span"]) if from_span else (self.dq, t.off["off_q"])
        # every row of a span some entry covers is written; the others must read as zero
        return _buffer(r1 - r0, int(la.sq.sum()) == r1 - r0, self.q.shape[1], self.q.shape[2], self.q.dtype, self.q.device), t.off["off_q_span"]

    def dkv_target(self, la: Launch, t: LaunchTensors) -> tuple[list, torch.Tensor]:
        if self.dkv is not None:
            return self.dkv, t.off["off_k"]
        c0, c1 = la.key_span
        private = la.private is not None
        krows = la.private_rows if private else c1 - c0
        covered = private or int(la.sk.sum()) == krows
        return [_buffer(krows, covered, self.k.shape[1], self.k.shape[2], self.q.dtype, self.q.device) for _ in "kv"], t.off["off_dk"]

    def collect(self, la: Launch, t: LaunchTensors, dq_t, dk_t, dv_t) -> None:
        """Add a launch's buffers to the float32 sums (nothing to do for what was written in place)."""
        dq, dk, dv = self.sums
        if self.dq is None:
            dq.add_rows(la.row_span[0], dq_t)
        if self.dkv is not None:
            return
        if t.key_index is None:
            dk.add_rows(la.key_span[0], dk_t)
            dv.add_rows(la.key_span[0], dv_t)
        else:
            dk.add_index(t.key_index, dk_t)
            dv.add_index(t.key_index, dv_t)

    def result(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        dq = self.dq if self.dq is not None else self.sums[0].result().to(dtype)
        dk, dv = self.dkv if self.dkv is not None else (s.result().to(dtype) for s in self.sums[1:])
        return dq, dk, dv


def _buffer(rows: int, covered: bool, heads: int, d: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A gradient buffer cuDNN writes: uninitialized when every row is written, else zeros."""
    return (torch.empty if covered else torch.zeros)(rows, heads, d, dtype=dtype, device=device)


def _neg_inf(t: int, h: int, like: torch.Tensor) -> torch.Tensor:
    """An lse buffer of ``t`` rows, ``h`` heads: -inf, in ``stat_dtype`` of ``like`` (float32 for cuDNN's 16-bit inputs)."""
    return torch.full((t, h), float("-inf"), dtype=stat_dtype(like.dtype), device=like.device)
