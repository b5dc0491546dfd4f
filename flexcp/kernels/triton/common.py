"""``@triton.jit`` helpers shared by the three kernels: the block prologue and the run loops' tiles.

Every kernel owns one block of a schedule (schedule.py) and walks its full runs
(``Full``: ``(c0, c1)``, whole tiles, no masking) and masked runs (``Masked``:
``(c0, c1, lo, hi)``, an iota compared with the run's bounds and diagonals). The
forward and dQ kernels own query rows and walk key tiles; the dK/dV kernel owns key
rows and walks query tiles of the transposed schedule, with the diagonal read the other
way round
(the transposed table flips the bounds, so one diagonal test serves all three).
"""

from __future__ import annotations

from .lang import jit, tl

LOG2E = 1.4426950408889634


@jit
def block_prologue(Blocks, Order, pid, NH, Gate, GATED: tl.constexpr):
    """``(head, row0, row1, f0, f1, m0, m1)`` of program ``pid``: heaviest blocks first, ``NH`` heads per block.

    ``GATED``: the program runs only when the float at ``Gate`` is not finite (``x - x`` is
    then NaN); otherwise it owns no rows and no runs, so it loads and stores nothing.
    """
    blk = tl.load(Order + pid // NH)
    h = pid % NH
    row0 = tl.load(Blocks + blk * 6)
    row1 = tl.load(Blocks + blk * 6 + 1)
    f0 = tl.load(Blocks + blk * 6 + 2)
    f1 = tl.load(Blocks + blk * 6 + 3)
    m0 = tl.load(Blocks + blk * 6 + 4)
    m1 = tl.load(Blocks + blk * 6 + 5)
    if GATED:
        go = gate_is_open(Gate)
        row1 = tl.where(go, row1, row0)
        f1 = tl.where(go, f1, f0)
        m1 = tl.where(go, m1, m0)
    return h, row0, row1, f0, f1, m0, m1


@jit
def gate_is_open(Gate):
    """Whether the float at ``Gate`` is NaN or +-inf."""
    x = tl.load(Gate)
    return ~((x - x) == 0.0)


@jit
def full_run(Full, r):
    """Columns ``[c0, c1)`` of full run ``r``."""
    return tl.load(Full + r * 2), tl.load(Full + r * 2 + 1)


@jit
def masked_run(Masked, r):
    """Columns ``[c0, c1)`` and diagonal bounds ``lo, hi`` of masked run ``r``."""
    return tl.load(Masked + r * 4), tl.load(Masked + r * 4 + 1), tl.load(Masked + r * 4 + 2), tl.load(Masked + r * 4 + 3)


@jit
def masked_tile(owned, n0, offs, cend, lo, hi):
    """``(in_run, keep)`` of the tile at ``n0``: which walked indices lie in the run, and the kept cells.

    ``keep`` is ``[owned, walked]`` with ``lo <= walked - owned <= hi`` (for the transposed
    dK/dV schedule, owned = keys and walked = queries, whose bounds are already flipped).
    """
    walked = n0 + offs
    in_run = walked < cend
    diag = walked[None, :] - owned[:, None]
    keep = in_run[None, :] & (diag >= lo) & (diag <= hi)
    return in_run, keep


@jit
def load_rows(ptrs, n0, stride, ok, MASKED: tl.constexpr):
    """Rows ``n0 + offs`` of a tile (zeros outside ``ok`` when ``MASKED``)."""
    if MASKED:
        return tl.load(ptrs + n0 * stride, mask=ok[:, None], other=0.0)
    else:
        return tl.load(ptrs + n0 * stride)


@jit
def finite_or_zero(x):
    """``x`` with NaN and +-inf replaced by 0 (masked tiles: 0 * NaN must stay 0)."""
    return tl.where(tl.abs(x.to(tl.float32)) < float("inf"), x, tl.zeros_like(x))


@jit
def logits2(s, c1, c2, SOFTCAP: tl.constexpr):
    """Log2-domain logits of raw ``q.k`` and, with softcap, ``t = tanh(scale*qk/cap)``.

    No softcap: ``c1 = scale*log2(e)``. Softcap: ``c1 = scale/cap``, ``c2 = cap*log2(e)``.
    """
    if SOFTCAP:
        e = tl.math.exp2(s * (c1 * 2.8853900817779268))  # exp(2x)
        t = 1.0 - 2.0 / (e + 1.0)
        return t * c2, t
    else:
        return s * c1, s


def softmax_consts(softmax_scale: float, softcap: float) -> tuple[float, float]:
    """The ``(c1, c2)`` that :func:`logits2` expects."""
    if softcap > 0:
        return softmax_scale / softcap, softcap * LOG2E
    return softmax_scale * LOG2E, 0.0


def dot_precision(dtype) -> str:
    """Exact float32 products for float32 inputs (tests); tensor cores for 16-bit inputs."""
    import torch

    return "ieee" if dtype == torch.float32 else "tf32"
