"""Draw packed document lengths from a real corpus' length histogram (benchmarks and tests).

The histogram (``data/doc_length_distribution.csv``, from MagiAttention's benchmark
suite) has bins ``[lo, hi]`` with document counts. A document is drawn by picking a bin
by count and a length uniformly inside it; a pack caps each document at a fraction of
the pack length and adds documents until the pack is full (the last one is cut).
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np

DEFAULT_CSV = Path(__file__).with_name("data") / "doc_length_distribution.csv"


@dataclass(frozen=True)
class LengthBins:
    """Histogram bins: inclusive ``[lo, hi]`` lengths and the probability of each bin."""

    lo: np.ndarray
    hi: np.ndarray
    prob: np.ndarray

    @property
    def mean(self) -> float:
        return float((self.prob * (self.lo + self.hi) / 2).sum())


def load_bins(path: str | Path = DEFAULT_CSV) -> LengthBins:
    """Read a histogram CSV with columns ``range`` ("[lo, hi]") and ``number``."""
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        raise ValueError(f"path={str(path)!r} has no histogram rows; expected columns 'range' and 'number'")
    bounds = np.array([[int(x) for x in r["range"].strip().strip("[]").split(",")] for r in rows], dtype=np.int64)
    counts = np.array([float(r["number"]) for r in rows])
    lo = np.maximum(bounds[:, 0], 1)  # empty documents carry no tokens
    return LengthBins(lo=lo, hi=np.maximum(bounds[:, 1], lo), prob=counts / counts.sum())


def sample_doc_lengths(n: int, rng: np.random.Generator | int | None = None, bins: LengthBins | None = None) -> np.ndarray:
    """``n`` independent document lengths (int64, each >= 1)."""
    rng = np.random.default_rng(rng)
    bins = bins or load_bins()
    b = rng.choice(len(bins.prob), size=int(n), p=bins.prob)
    return rng.integers(bins.lo[b], bins.hi[b] + 1)


def sample_pack(
    pack_len: int,
    rng: np.random.Generator | int | None = None,
    max_doc_frac: float = 0.5,
    bins: LengthBins | None = None,
) -> np.ndarray:
    """Document lengths of one pack: each at most ``max_doc_frac * pack_len``, summing to ``pack_len``."""
    if pack_len < 1:
        raise ValueError(f"pack_len must be >= 1; got {pack_len}")
    if not 0 < max_doc_frac <= 1:
        raise ValueError(f"max_doc_frac must be in (0, 1]; got {max_doc_frac}")
    rng = np.random.default_rng(rng)
    bins = bins or load_bins()
    cap = max(1, int(max_doc_frac * pack_len))
    lengths = np.zeros(0, dtype=np.int64)
    while lengths.sum() < pack_len:
        draw = int(pack_len / min(bins.mean, cap) * 1.5) + 16
        lengths = np.concatenate([lengths, np.minimum(sample_doc_lengths(draw, rng, bins), cap)])
    ends = np.cumsum(lengths)
    n = int(np.searchsorted(ends, pack_len)) + 1  # first document reaching the pack end
    lengths = lengths[:n].copy()
    lengths[-1] -= ends[n - 1] - pack_len
    return lengths
