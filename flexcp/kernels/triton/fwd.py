"""Triton forward kernel: online softmax over the runs of a query block (schedule.py).

One program owns ``BLOCK_M`` query rows of one head. It walks the block's full runs
(no masking) and then its masked runs (iota compared with the run's column bounds and
diagonals), keeping one running max / sum / accumulator for all of them, so rows met
by several slices are merged in registers and ``out``/``lse`` are written once. Scores
live in the log2 domain (``exp2``); softcap applies ``cap * tanh(scale * qk / cap)``.
"""

from __future__ import annotations

from .common import block_prologue, dot_precision, finite_or_zero, full_run, load_rows, logits2, masked_run, masked_tile, softmax_consts
from .lang import jit, tl


@jit
def _fwd_step(q, k, v, acc, l_i, m_i, keep, c1, c2, SOFTCAP: tl.constexpr, MASKED: tl.constexpr, DOT_PREC: tl.constexpr):
    s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC)
    if SOFTCAP:
        s, _ = logits2(s, c1, c2, SOFTCAP)
        mult = 1.0
    else:  # keep raw scores: the scale folds into one FMA with the max below
        mult = c1
    if MASKED:
        s = tl.where(keep, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1) * mult)
    if MASKED:  # a row may still have no kept key: keep exp2 away from (-inf) - (-inf)
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
    else:
        m_use = m_new
    p = tl.math.exp2(s * mult - m_use[:, None])
    alpha = tl.math.exp2(m_i - m_use)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None]
    if MASKED:  # a masked-out key's NaN/inf must not reach rows that do not attend it (0 * NaN)
        bad = ~(tl.abs(v.to(tl.float32)) < float("inf"))
        if tl.sum(tl.sum(bad.to(tl.int32), 1), 0) > 0:
            v = finite_or_zero(v)
            hit = tl.dot(keep.to(v.dtype), bad.to(v.dtype), input_precision=DOT_PREC)
            acc = tl.where(hit > 0, float("nan"), acc)  # the rows and columns that do attend it
    acc = tl.dot(p.to(v.dtype), v, acc, input_precision=DOT_PREC)
    return acc, l_i, m_new


@jit
def _fwd_kernel(
    Q, K, V, O, LSE,
    Blocks, Order, Full, Masked, Gate,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_ot, stride_oh,
    HQ, GROUP, c1, c2,
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
    k_ptrs = K + hk * stride_kh + offs_n[:, None] * stride_kt + offs_d[None, :]
    v_ptrs = V + hk * stride_vh + offs_n[:, None] * stride_vt + offs_d[None, :]

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)

    for r in range(f0, f1):
        c0, cend = full_run(Full, r)
        for n0 in range(c0, cend, BLOCK_N):
            k = load_rows(k_ptrs, n0, stride_kt, None, False)
            v = load_rows(v_ptrs, n0, stride_vt, None, False)
            acc, l_i, m_i = _fwd_step(q, k, v, acc, l_i, m_i, None, c1, c2, SOFTCAP, False, DOT_PREC)
    for r in range(m0, m1):
        c0, cend, lo, hi = masked_run(Masked, r)
        for n0 in range(c0, cend, BLOCK_N):
            col_ok, keep = masked_tile(rows, n0, offs_n, cend, lo, hi)
            k = load_rows(k_ptrs, n0, stride_kt, col_ok, True)
            v = load_rows(v_ptrs, n0, stride_vt, col_ok, True)
            acc, l_i, m_i = _fwd_step(q, k, v, acc, l_i, m_i, keep, c1, c2, SOFTCAP, True, DOT_PREC)

    empty = l_i == 0.0
    out = acc / tl.where(empty, 1.0, l_i)[:, None]
    lse = tl.where(empty, float("-inf"), (m_i + tl.math.log2(tl.where(empty, 1.0, l_i))) * 0.6931471805599453)
    tl.store(O + h * stride_oh + rows[:, None] * stride_ot + offs_d[None, :], out.to(O.dtype.element_ty), mask=row_ok[:, None])
    tl.store(LSE + rows * HQ + h, lse, mask=row_ok)


def launch_forward(q, k, v, out, lse, sched, softmax_scale: float, softcap: float, cfg, gate=None) -> None:
    """Run the forward kernel; ``sched`` holds the device arrays of a query-block schedule.

    With ``gate`` (``backend.finiteness_gate``) the kernel writes only when the gate is open.
    """
    tq, hq, d = q.shape
    c1, c2 = softmax_consts(softmax_scale, softcap)
    grid = (sched.num_blocks * hq,)
    _fwd_kernel[grid](
        q, k, v, out, lse,
        sched.blocks, sched.order, sched.full, sched.masked, sched.blocks if gate is None else gate,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), out.stride(0), out.stride(1),
        hq, hq // k.shape[1], c1, c2,
        HEAD_DIM=d, BLOCK_M=sched.block, BLOCK_N=sched.tile,
        SOFTCAP=softcap > 0, DOT_PREC=dot_precision(q.dtype), GATED=gate is not None,
        num_warps=cfg.warps, num_stages=cfg.stages,
    )  # fmt: skip


__all__ = ["launch_forward"]
