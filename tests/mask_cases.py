"""Masks and an error measure that several test modules share (a helper module, not a test module).

``HARD_CASES``: the named hard cases every backend is checked on (empty rows, one-token
documents, overlapping q ranges, shared k ranges, uneven lengths, every mask type with
sq != sk); ``random_spec``: random disjoint slices of all four types; ``rel_err``: the
relative error the tolerances are stated in.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from flexcp import AttnMaskSpec
from flexcp.mask import block_causal, prefix_tree, sliding_window, varlen


def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    """``||x - ref|| / max(||ref||, 0.25 * sqrt(n))`` in float64.

    Inputs are unit-variance, so outputs and gradients have elements of order 0.1 to 10.
    The floor only matters for tensors that are ~0 by cancellation (dq of a row with one
    key is ``p * (dp - delta)`` with ``p = 1``, ``dp == delta``), where the ratio would
    otherwise compare float32 rounding noise with float64 rounding noise.
    """
    x, ref = x.detach().double(), ref.detach().double()
    floor = 0.25 * math.sqrt(max(ref.numel(), 1))
    return float((x - ref).norm() / max(float(ref.norm()), floor))


def spec_of(slices, tq, tk=None):
    """A spec from ``((q0, q1), (k0, k1), type)`` triples."""
    return AttnMaskSpec([s[0] for s in slices], [s[1] for s in slices], [s[2] for s in slices], tq, tk)


HARD_CASES = {
    "empty_rows": spec_of([((3, 9), (0, 6), "full"), ((12, 20), (2, 5), "causal"), ((20, 21), (0, 1), "full")], 24),
    "no_slices": AttnMaskSpec([], [], [], 7, 5),
    "zero_area_slices": spec_of(
        [((0, 6), (0, 0), "full"), ((0, 6), (0, 3), "bi_causal"), ((6, 9), (3, 5), "inv_causal")], 9
    ),
    "one_token_docs": varlen([1, 1, 3, 1, 2, 1]),
    "one_token_q_and_k": spec_of(
        [((0, 1), (4, 5), "causal"), ((1, 2), (0, 1), "inv_causal"), ((2, 3), (2, 3), "bi_causal")], 3, 5
    ),
    "overlapping_q_ranges": spec_of(
        [
            ((0, 20), (0, 7), "full"),
            ((5, 20), (7, 19), "causal"),
            ((0, 12), (19, 30), "inv_causal"),
            ((10, 33), (30, 33), "bi_causal"),
            ((2, 3), (33, 40), "full"),
        ],
        33,
        40,
    ),
    "diagonal_complement": spec_of([((0, 37), (0, 37), "causal"), ((0, 37), (1, 37), "inv_causal")], 37),
    "uneven_lengths_q_gt_k": spec_of([((0, 37), (0, 19), "causal"), ((37, 53), (5, 19), "bi_causal")], 53, 19),
    "uneven_lengths_q_lt_k": spec_of([((0, 19), (0, 53), "causal"), ((0, 19), (53, 70), "inv_causal")], 19, 70),
    "sliding_window_crossing_tiles": sliding_window([70, 9, 1, 3], 20),
    "two_sided_window": sliding_window([45, 30], 7, causal=False),
    "prefix_tree": prefix_tree([17, 9, 23, 1, 11], [[0, 1], [0, 2, 3], [0, 2, 4]])[0],
    "block_causal": block_causal([13, 1, 20, 16]),
}
for _kind in ("full", "causal", "inv_causal", "bi_causal"):  # sq != sk in both directions, every type
    HARD_CASES[f"sq_ne_sk_{_kind}"] = spec_of(
        [
            ((0, 21), (0, 8), _kind),
            ((21, 27), (8, 40), _kind),
            ((27, 50), (40, 41), _kind),
            ((50, 51), (41, 60), _kind),
        ],
        51,
        60,
    )


def random_spec(seed: int) -> AttnMaskSpec:
    """Random disjoint slices of all four types: a grid of cells, each with a random band."""
    rng = np.random.default_rng(seed)
    n = int(rng.integers(60, 120))
    qcuts = np.unique(np.concatenate([[0, n], rng.integers(1, n, 4)]))
    kcuts = np.unique(np.concatenate([[0, n], rng.integers(1, n, 4)]))
    q, k, t = [], [], []
    for a, b in zip(qcuts[:-1], qcuts[1:]):
        for c, d in zip(kcuts[:-1], kcuts[1:]):
            if rng.random() < 0.45:
                kind = ["full", "causal", "inv_causal", "bi_causal"][int(rng.integers(4))]
                if kind == "bi_causal" and d - c < b - a:
                    kind = "causal"
                q.append((int(a), int(b)))
                k.append((int(c), int(d)))
                t.append(kind)
    return AttnMaskSpec(q, k, t, n)
