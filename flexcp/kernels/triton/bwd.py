"""Triton backward kernels: row statistics, dK/dV per key block, dQ per query block.

All recompute ``P = exp(s - lse)`` from the *final* ``lse`` of the rows (the
distributed layer may merge several calls) and use ``delta = rowsum(dO * out)``,
computed first by a small row-statistics kernel (which also moves ``lse`` to the log2
domain, ``-inf`` -> ``+inf`` so rows without keys get probabilities of exactly 0;
both stored head-major ``[h, t]`` so per-tile loads are contiguous).
The dK/dV program owns ``BLOCK_N`` key rows of one KV head and walks, for each query
head of its GQA group, the query runs of the transposed schedule (GQA groups sum in
registers). The dQ program owns ``BLOCK_M`` query rows of one head and walks the
forward schedule. Every output element has exactly one writer and a fixed summation
order, so the backward is deterministic. (Adding dQ atomically from the dK/dV kernel
saves two matmuls but measured 10-25% slower on H200: the float32 atomics cost more.)
"""

from __future__ import annotations

import torch

from .common import block_prologue, dot_precision, gate_is_open, finite_or_zero, full_run, load_rows, logits2, masked_run, masked_tile, softmax_consts
from .lang import jit, tl, triton


@jit
def _rowstats_kernel(
    O, DO, LSE, LSE2, DELTA, Gate,
    stride_ot, stride_oh, stride_dot, stride_doh,
    T, HQ,
    HEAD_DIM: tl.constexpr, BLOCK: tl.constexpr, GATED: tl.constexpr,
):  # fmt: skip
    rows = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    h = tl.program_id(1)
    ok = rows < T
    if GATED:
        ok = ok & gate_is_open(Gate)
    offs_d = tl.arange(0, HEAD_DIM)
    o = tl.load(O + h * stride_oh + rows[:, None] * stride_ot + offs_d[None, :], mask=ok[:, None], other=0.0)
    do = tl.load(DO + h * stride_doh + rows[:, None] * stride_dot + offs_d[None, :], mask=ok[:, None], other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    lse = tl.load(LSE + rows * HQ + h, mask=ok, other=0.0)
    lse2 = tl.where(lse == float("-inf"), float("inf"), lse * 1.4426950408889634)
    tl.store(DELTA + h * T + rows, delta, mask=ok)
    tl.store(LSE2 + h * T + rows, lse2, mask=ok)


@jit
def _dkdv_step(k, v, q, do, lse2, delta, dk, dv, keep, c1, c2, SOFTCAP: tl.constexpr, MASKED: tl.constexpr, DOT_PREC: tl.constexpr):
    st = tl.dot(k, tl.trans(q), input_precision=DOT_PREC)  # [BLOCK_N, BLOCK_M]
    st, t = logits2(st, c1, c2, SOFTCAP)
    if MASKED:
        st = tl.where(keep, st, float("-inf"))
    pt = tl.math.exp2(st - lse2[None, :])
    dv = tl.dot(pt.to(do.dtype), do, dv, input_precision=DOT_PREC)
    dpt = tl.dot(v, tl.trans(do), input_precision=DOT_PREC)
    dst = pt * (dpt - delta[None, :])
    if MASKED:  # exactly 0 off the mask, also where dO.V or delta is not finite
        dst = tl.where(keep, dst, 0.0)
        q = finite_or_zero(q)  # a NaN query row adds only to the keys it attends (0 * NaN)
    if SOFTCAP:
        dst = dst * (1.0 - t * t)
    dk = tl.dot(dst.to(q.dtype), q, dk, input_precision=DOT_PREC)
    return dk, dv


@jit
def _dkdv_kernel(
    Q, K, V, DO, LSE2, DELTA, DK, DV,
    Blocks, Order, Full, Masked, Gate,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_dot, stride_doh,
    stride_dkt, stride_dkh, stride_dvt, stride_dvh,
    TQ, HKV, GROUP, c1, c2, sm_scale,
    HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr,
    SOFTCAP: tl.constexpr, DOT_PREC: tl.constexpr, GATED: tl.constexpr,
):  # fmt: skip
    hk, col0, col1, f0, f1, m0, m1 = block_prologue(Blocks, Order, tl.program_id(0), HKV, Gate, GATED)

    cols = col0 + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    col_ok = cols < col1
    k = tl.load(K + hk * stride_kh + cols[:, None] * stride_kt + offs_d[None, :], mask=col_ok[:, None], other=0.0)
    v = tl.load(V + hk * stride_vh + cols[:, None] * stride_vt + offs_d[None, :], mask=col_ok[:, None], other=0.0)
    dk = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)

    for g in range(GROUP):
        h = hk * GROUP + g
        q_ptrs = Q + h * stride_qh + offs_m[:, None] * stride_qt + offs_d[None, :]
        do_ptrs = DO + h * stride_doh + offs_m[:, None] * stride_dot + offs_d[None, :]
        for r in range(f0, f1):
            r0, rend = full_run(Full, r)
            for mm in range(r0, rend, BLOCK_M):
                q = load_rows(q_ptrs, mm, stride_qt, None, False)
                do = load_rows(do_ptrs, mm, stride_dot, None, False)
                lse2 = tl.load(LSE2 + h * TQ + mm + offs_m)
                delta = tl.load(DELTA + h * TQ + mm + offs_m)
                dk, dv = _dkdv_step(k, v, q, do, lse2, delta, dk, dv, None, c1, c2, SOFTCAP, False, DOT_PREC)
        for r in range(m0, m1):
            r0, rend, lo, hi = masked_run(Masked, r)
            for mm in range(r0, rend, BLOCK_M):
                row_ok, keep = masked_tile(cols, mm, offs_m, rend, lo, hi)  # transposed: lo <= q - k <= hi
                q = load_rows(q_ptrs, mm, stride_qt, row_ok, True)
                do = load_rows(do_ptrs, mm, stride_dot, row_ok, True)
                lse2 = tl.load(LSE2 + h * TQ + mm + offs_m, mask=row_ok, other=0.0)
                delta = tl.load(DELTA + h * TQ + mm + offs_m, mask=row_ok, other=0.0)
                dk, dv = _dkdv_step(k, v, q, do, lse2, delta, dk, dv, keep, c1, c2, SOFTCAP, True, DOT_PREC)

    tl.store(DK + hk * stride_dkh + cols[:, None] * stride_dkt + offs_d[None, :], (dk * sm_scale).to(DK.dtype.element_ty), mask=col_ok[:, None])
    tl.store(DV + hk * stride_dvh + cols[:, None] * stride_dvt + offs_d[None, :], dv.to(DV.dtype.element_ty), mask=col_ok[:, None])


@jit
def _dq_step(q, do, k, v, lse2, delta, dq, keep, c1, c2, SOFTCAP: tl.constexpr, MASKED: tl.constexpr, DOT_PREC: tl.constexpr):
    s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC)  # [BLOCK_M, BLOCK_N]
    s, t = logits2(s, c1, c2, SOFTCAP)
    if MASKED:
        s = tl.where(keep, s, float("-inf"))
    p = tl.math.exp2(s - lse2[:, None])
    dp = tl.dot(do, tl.trans(v), input_precision=DOT_PREC)
    ds = p * (dp - delta[:, None])
    if MASKED:  # exactly 0 off the mask, also where dO.V or delta is not finite
        ds = tl.where(keep, ds, 0.0)
        k = finite_or_zero(k)  # a NaN key adds only to the rows that attend it (0 * NaN)
    if SOFTCAP:
        ds = ds * (1.0 - t * t)
    return tl.dot(ds.to(k.dtype), k, dq, input_precision=DOT_PREC)


@jit
def _dq_kernel(
    Q, K, V, DO, LSE2, DELTA, DQ,
    Blocks, Order, Full, Masked, Gate,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_dot, stride_doh,
    stride_dqt, stride_dqh,
    TQ, HQ, GROUP, c1, c2, sm_scale,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    SOFTCAP: tl.constexpr, DOT_PREC: tl.constexpr, GATED: tl.constexpr,
):  # fmt: skip
    h, row0, row1, f0, f1, m0, m1 = block_prologue(Blocks, Order, tl.program_id(0), HQ, Gate, GATED)
    hk = h // GROUP

    rows = row0 + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = rows < row1
    q = tl.load(Q + h * stride_qh + rows[:, None] * stride_qt + offs_d[None, :], mask=row_ok[:, None], other=0.0)
    do = tl.load(DO + h * stride_doh + rows[:, None] * stride_dot + offs_d[None, :], mask=row_ok[:, None], other=0.0)
    lse2 = tl.load(LSE2 + h * TQ + rows, mask=row_ok, other=float("inf"))
    delta = tl.load(DELTA + h * TQ + rows, mask=row_ok, other=0.0)
    k_ptrs = K + hk * stride_kh + offs_n[:, None] * stride_kt + offs_d[None, :]
    v_ptrs = V + hk * stride_vh + offs_n[:, None] * stride_vt + offs_d[None, :]
    dq = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)

    for r in range(f0, f1):
        c0, cend = full_run(Full, r)
        for n0 in range(c0, cend, BLOCK_N):
            k = load_rows(k_ptrs, n0, stride_kt, None, False)
            v = load_rows(v_ptrs, n0, stride_vt, None, False)
            dq = _dq_step(q, do, k, v, lse2, delta, dq, None, c1, c2, SOFTCAP, False, DOT_PREC)
    for r in range(m0, m1):
        c0, cend, lo, hi = masked_run(Masked, r)
        for n0 in range(c0, cend, BLOCK_N):
            col_ok, keep = masked_tile(rows, n0, offs_n, cend, lo, hi)
            k = load_rows(k_ptrs, n0, stride_kt, col_ok, True)
            v = load_rows(v_ptrs, n0, stride_vt, col_ok, True)
            dq = _dq_step(q, do, k, v, lse2, delta, dq, keep, c1, c2, SOFTCAP, True, DOT_PREC)

    tl.store(DQ + h * stride_dqh + rows[:, None] * stride_dqt + offs_d[None, :], (dq * sm_scale).to(DQ.dtype.element_ty), mask=row_ok[:, None])


def backward_rowstats(do: torch.Tensor, out: torch.Tensor, lse: torch.Tensor, gate=None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(lse2, delta)`` float32 ``[h, t]``: log2-domain lse (+inf on rows without keys) and rowsum(dO * out).

    With ``gate`` (``backend.finiteness_gate``) they are written only when the gate is open.
    """
    t, h, d = do.shape
    lse2 = torch.empty(h, t, dtype=torch.float32, device=do.device)
    delta = torch.empty_like(lse2)
    block = 64
    _rowstats_kernel[(triton.cdiv(t, block), h)](
        out, do, lse.contiguous(), lse2, delta, lse2 if gate is None else gate,
        out.stride(0), out.stride(1), do.stride(0), do.stride(1),
        t, h, HEAD_DIM=d, BLOCK=block, GATED=gate is not None, num_warps=4,
    )  # fmt: skip
    return lse2, delta


def launch_dkdv(q, k, v, do, lse2, delta, dk, dv, sched, softmax_scale: float, softcap: float, cfg, gate=None) -> None:
    """dK/dV over a key-block schedule (``transposed_schedule``) into dk/dv ``[tk, hkv, d]`` (any float dtype)."""
    tq, hq, d = q.shape
    hkv = k.shape[1]
    c1, c2 = softmax_consts(softmax_scale, softcap)
    _dkdv_kernel[(sched.num_blocks * hkv,)](
        q, k, v, do, lse2, delta, dk, dv,
        sched.blocks, sched.order, sched.full, sched.masked, sched.blocks if gate is None else gate,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), do.stride(0), do.stride(1),
        dk.stride(0), dk.stride(1), dv.stride(0), dv.stride(1),
        tq, hkv, hq // hkv, c1, c2, softmax_scale,
        HEAD_DIM=d, BLOCK_N=sched.block, BLOCK_M=sched.tile,
        SOFTCAP=softcap > 0, DOT_PREC=dot_precision(q.dtype), GATED=gate is not None,
        num_warps=cfg.warps, num_stages=cfg.stages,
    )  # fmt: skip


def launch_dq(q, k, v, do, lse2, delta, dq, sched, softmax_scale: float, softcap: float, cfg, gate=None) -> None:
    """dQ over a query-block schedule (``forward_schedule``) into dq ``[tq, hq, d]`` (any float dtype)."""
    tq, hq, d = q.shape
    c1, c2 = softmax_consts(softmax_scale, softcap)
    _dq_kernel[(sched.num_blocks * hq,)](
        q, k, v, do, lse2, delta, dq,
        sched.blocks, sched.order, sched.full, sched.masked, sched.blocks if gate is None else gate,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), do.stride(0), do.stride(1),
        dq.stride(0), dq.stride(1),
        tq, hq, hq // k.shape[1], c1, c2, softmax_scale,
        HEAD_DIM=d, BLOCK_M=sched.block, BLOCK_N=sched.tile,
        SOFTCAP=softcap > 0, DOT_PREC=dot_precision(q.dtype), GATED=gate is not None,
        num_warps=cfg.warps, num_stages=cfg.stages,
    )  # fmt: skip
