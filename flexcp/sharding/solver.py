"""Chunk-to-rank assignment solvers: equal chunk counts per rank, balanced workload.

A solver maps per-chunk workloads (int64, length ``cp_size * m``) to a ``[cp_size, m]``
matrix of chunk ids, row ``r`` holding rank ``r``'s chunks in ascending order. Solvers
are pure functions of their inputs with ties broken by index, so every rank of a CP
group computes the same assignment with no collective.
"""

from __future__ import annotations

import heapq
from typing import Callable

import numpy as np

Solver = Callable[[np.ndarray, int], np.ndarray]


def contiguous(workloads: np.ndarray, cp_size: int) -> np.ndarray:
    """Rank ``r`` gets the ``r``-th contiguous block of chunks (plain sequence sharding)."""
    return np.arange(len(workloads), dtype=np.int64).reshape(cp_size, -1)


def zigzag(workloads: np.ndarray, cp_size: int) -> np.ndarray:
    """Head-tail sharding: rank ``r`` gets head block ``r`` and tail block ``cp_size - 1 - r``.

    With ``m`` chunks per rank the first ``cp_size * ceil(m / 2)`` chunks form the heads and
    the rest the tails (in reverse rank order), so odd ``m`` works too. This is the
    ring-attention "zigzag" layout that balances one causal sequence.
    """
    m = len(workloads) // cp_size
    head, tail = (m + 1) // 2, m // 2
    ranks = np.arange(cp_size, dtype=np.int64)[:, None]
    heads = ranks * head + np.arange(head, dtype=np.int64)[None, :]
    tails = cp_size * head + (cp_size - 1 - ranks) * tail + np.arange(tail, dtype=np.int64)[None, :]
    return np.concatenate([heads, tails], axis=1)


def lpt(workloads: np.ndarray, cp_size: int) -> np.ndarray:
    """Longest-processing-time greedy with equal chunk counts.

    Chunks in descending workload order (ties: lower chunk id first) each go to the
    least-loaded rank that still has a free slot (ties: lower rank first). One heap
    operation per chunk, never per token.
    """
    m = len(workloads) // cp_size
    order = np.argsort(-workloads, kind="stable")
    owner = np.empty(len(workloads), dtype=np.int64)
    heap = [(0, r) for r in range(cp_size)]
    slots = [m] * cp_size
    for c, w in zip(order.tolist(), workloads[order].tolist()):
        load, r = heapq.heappop(heap)
        owner[c] = r
        slots[r] -= 1
        if slots[r]:
            heapq.heappush(heap, (load + w, r))
    return np.argsort(owner, kind="stable").reshape(cp_size, m)


def greedy(workloads: np.ndarray, cp_size: int) -> np.ndarray:
    """LPT, then single-chunk swaps that lower the most-loaded rank (the default solver).

    LPT's last chunks are forced into whichever ranks still have free slots; a few swaps
    between the most-loaded rank and a partner repair that (measured in the solver report).
    """
    return refine_swaps(lpt(workloads, cp_size), workloads)


def refine_swaps(matrix: np.ndarray, workloads: np.ndarray, tol: float = 1e-4, max_iters: int | None = None) -> np.ndarray:
    """Improve an assignment by swapping one chunk of the most-loaded rank with one of another rank.

    Each step takes the most-loaded rank ``A`` (lowest index on ties) and, over every
    partner ``B`` and chunk ``a`` of ``A``, the chunk ``b`` of ``B`` whose workload is
    nearest ``w_a - (L_A - L_B) / 2`` (a sorted search, so a step costs
    O(num_chunks log m)); it applies the swap with the lowest resulting pair maximum if
    that is below ``L_A``. Stops when no swap helps, the max load is within ``tol`` of the
    mean, or after ``max_iters`` steps (default ``2 * cp_size + 32``). Counts per rank
    never change. Deterministic: ties go to the first candidate.
    """
    matrix = matrix.copy()
    cp, m = matrix.shape
    w = workloads
    loads = w[matrix].sum(axis=1)
    target = loads.sum() / cp * (1 + tol)
    stride = 4 * (int(w.max(initial=0)) + 1)  # keeps rows apart in one flat sorted array
    row_offset = np.arange(cp, dtype=np.int64) * stride
    row_start = np.arange(cp, dtype=np.int64) * m
    for _ in range(2 * cp + 32 if max_iters is None else max_iters):
        a_rank = int(np.argmax(loads))
        if loads[a_rank] <= target:
            break
        wr = w[matrix]
        order = np.argsort(wr, axis=1, kind="stable")
        flat_w = np.take_along_axis(wr, order, axis=1).reshape(-1)
        keys = 2 * flat_w + np.repeat(row_offset, m)
        gap = loads[a_rank] - loads
        want = 2 * wr[a_rank][:, None] - gap[None, :] + row_offset[None, :]  # [m, cp], in key units
        pos = np.searchsorted(keys, want)
        cand = np.stack([np.clip(p, row_start, row_start + m - 1) for p in (pos - 1, pos)])  # [2, m, cp]
        d = wr[a_rank][None, :, None] - flat_w[cand]
        pair_max = np.maximum(loads[a_rank] - d, loads[None, None, :] + d)
        ok = (d > 0) & (pair_max < loads[a_rank])
        ok[:, :, a_rank] = False
        if not ok.any():
            break
        s, a, b_rank = np.unravel_index(int(np.argmin(np.where(ok, pair_max, np.iinfo(np.int64).max))), ok.shape)
        b = order[b_rank, cand[s, a, b_rank] - row_start[b_rank]]
        matrix[a_rank, a], matrix[b_rank, b] = matrix[b_rank, b], matrix[a_rank, a]
        loads[a_rank] -= d[s, a, b_rank]
        loads[b_rank] += d[s, a, b_rank]
    return matrix


SOLVERS: dict[str, Solver] = {"greedy": greedy, "lpt": lpt, "zigzag": zigzag, "contiguous": contiguous}
"""Registered solvers by name (``build_plan(..., solver=name)``)."""
