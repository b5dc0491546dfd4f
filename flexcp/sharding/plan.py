"""DispatchPlan: which chunks of a padded sequence each CP rank owns, built from a mask's real work."""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from functools import cached_property

import numpy as np

from ..mask import AttnMaskSpec, block_areas
from .solver import SOLVERS

logger = logging.getLogger("flexcp")

DEFAULT_CHUNK_SIZE = 512
"""The seed's default dispatch chunk size (tokens)."""


@dataclass(frozen=True, eq=False)
class DispatchPlan:
    """How one sequence of ``total_seqlen`` rows is sharded over ``cp_size`` ranks.

    The sequence is padded to ``padded_seqlen`` (a multiple of ``chunk_size * cp_size``)
    and cut into ``num_chunks`` chunks; chunk ``c`` is global rows
    ``[c * chunk_size, (c + 1) * chunk_size)``. ``rank_chunks[r]`` lists rank ``r``'s
    chunk ids in ascending order; its local shard is those chunks concatenated. Every
    rank owns ``num_chunks / cp_size`` chunks, so shards have equal length.
    ``chunk_workloads[c]`` is the exact number of unmasked (q, k) cells of chunk ``c``'s
    rows and ``imbalance`` the max rank workload over the mean (1.0 when all are zero).
    Arrays are read-only; equality and hashing go through :meth:`fingerprint`.
    """

    cp_size: int
    chunk_size: int
    total_seqlen: int
    padded_seqlen: int
    num_chunks: int
    rank_chunks: tuple[np.ndarray, ...]
    chunk_workloads: np.ndarray
    imbalance: float
    solver: str

    @property
    def local_len(self) -> int:
        """Tokens per rank (padding included); equal on every rank."""
        return self.padded_seqlen // self.cp_size

    @property
    def chunks_per_rank(self) -> int:
        return self.num_chunks // self.cp_size

    @cached_property
    def rank_workloads(self) -> np.ndarray:
        """Total workload (cells) of each rank."""
        return _readonly(self.chunk_workloads[self.rank_order.reshape(self.cp_size, -1)].sum(axis=1))

    @cached_property
    def rank_order(self) -> np.ndarray:
        """Chunk ids in all-gather order: rank 0's chunks, then rank 1's, ..."""
        return _readonly(np.concatenate(self.rank_chunks))

    @cached_property
    def owner_of_chunk(self) -> np.ndarray:
        """Rank owning each chunk."""
        owner = np.empty(self.num_chunks, dtype=np.int64)
        owner[self.rank_order] = np.repeat(np.arange(self.cp_size, dtype=np.int64), self.chunks_per_rank)
        return _readonly(owner)

    @cached_property
    def local_offset_of_chunk(self) -> np.ndarray:
        """Start row of each chunk inside its owner's local shard."""
        offset = np.empty(self.num_chunks, dtype=np.int64)
        offset[self.rank_order] = np.tile(np.arange(self.chunks_per_rank, dtype=np.int64) * self.chunk_size, self.cp_size)
        return _readonly(offset)

    @cached_property
    def gathered_chunk_of_chunk(self) -> np.ndarray:
        """Position of each global chunk in the all-gathered (rank-order) layout; inverse of ``rank_order``."""
        return _readonly(self.owner_of_chunk * self.chunks_per_rank + self.local_offset_of_chunk // self.chunk_size)

    def global_indices(self, rank: int) -> np.ndarray:
        """Global row index of each of ``rank``'s local tokens (ascending; padding rows are >= total_seqlen)."""
        chunks = self.rank_chunks[self._check_rank(rank)]
        rows = chunks[:, None] * self.chunk_size + np.arange(self.chunk_size, dtype=np.int64)[None, :]
        return rows.reshape(-1)

    def num_valid_local(self, rank: int) -> int:
        """How many of ``rank``'s local tokens are real rows (they come first: local order is ascending)."""
        chunks = self.rank_chunks[self._check_rank(rank)]
        return int(np.clip(self.total_seqlen - chunks * self.chunk_size, 0, self.chunk_size).sum())

    def fingerprint(self) -> tuple:
        """Deterministic, hashable identity of the plan (equal plans, equal prints)."""
        return self._fingerprint

    @cached_property
    def _fingerprint(self) -> tuple:
        digest = hashlib.blake2b(digest_size=16)
        for arr in (self.rank_order, self.chunk_workloads):
            digest.update(np.ascontiguousarray(arr, dtype=np.int64).tobytes())
        return (
            "flexcp.sharding/1",
            self.cp_size,
            self.chunk_size,
            self.total_seqlen,
            self.padded_seqlen,
            self.solver,
            digest.hexdigest(),
        )

    def __eq__(self, other: object) -> bool:
        return isinstance(other, DispatchPlan) and self.fingerprint() == other.fingerprint()

    def __hash__(self) -> int:
        return hash(self.fingerprint())

    def _check_rank(self, rank: int) -> int:
        if not 0 <= int(rank) < self.cp_size:
            raise ValueError(f"rank={rank} is outside the CP group; use 0 <= rank < cp_size={self.cp_size}")
        return int(rank)


def _readonly(arr: np.ndarray) -> np.ndarray:
    arr.setflags(write=False)
    return arr


def _positive_int(name: str, value: int) -> int:
    if isinstance(value, bool) or int(value) != value or int(value) < 1:
        raise ValueError(f"{name} must be a positive integer; got {value!r}")
    return int(value)


def resolve_chunk_size(total_seqlen: int, cp_size: int, chunk_size: int | None = None) -> int:
    """The chunk size a plan of ``total_seqlen`` tokens over ``cp_size`` ranks uses: the one rule.

    ``chunk_size`` is capped at one rank's share ``ceil(total / cp)`` (a larger chunk would only
    add padding). ``None`` asks for no padding at cp = 1 (the whole sequence is one chunk) and
    ``DEFAULT_CHUNK_SIZE`` at cp > 1: what a key built from a model's own mask uses
    (``flexcp.hf.build_flex_key``), while batch preparation passes its configured size.
    """
    share = -(-total_seqlen // cp_size)
    if chunk_size is None:
        return max(share, 1) if cp_size == 1 else min(DEFAULT_CHUNK_SIZE, share)
    if chunk_size > share:
        logger.info(
            "dispatch: chunk_size=%d is larger than a rank's share of the sequence (%d tokens / cp_size %d = %d); "
            "using chunk_size=%d",
            chunk_size,
            total_seqlen,
            cp_size,
            share,
            share,
        )
        return share
    return chunk_size


def build_plan(
    spec: AttnMaskSpec, cp_size: int, chunk_size: int = DEFAULT_CHUNK_SIZE, solver: str = "greedy"
) -> DispatchPlan:
    """Pad, chunk and assign ``spec``'s rows to ``cp_size`` ranks by exact chunk workload.

    Deterministic in its inputs, so every rank builds the same plan locally. Padding rows
    (``>= spec.total_seqlen``) attend to nothing: the spec is not changed. Solvers:
    ``"greedy"`` (LPT, the default), ``"zigzag"`` (head-tail) and ``"contiguous"``.
    """
    if not isinstance(spec, AttnMaskSpec):
        raise ValueError(f"spec must be an AttnMaskSpec; got {type(spec).__name__}")
    cp_size = _positive_int("cp_size", cp_size)
    chunk_size = _positive_int("chunk_size", chunk_size)
    if solver not in SOLVERS:
        raise ValueError(f"solver={solver!r} is unknown; use one of {sorted(SOLVERS)}")
    if spec.total_seqlen_k != spec.total_seqlen:
        raise ValueError(
            f"spec has total_seqlen={spec.total_seqlen} rows but total_seqlen_k={spec.total_seqlen_k} keys; "
            "dispatch shards self-attention, where both must be equal"
        )
    total = spec.total_seqlen
    if total < cp_size:
        raise ValueError(
            f"the sequence has {total} tokens, fewer than cp_size={cp_size} ranks; "
            "use a smaller CP group or a longer (packed) sequence"
        )
    spec.validate()
    chunk_size = resolve_chunk_size(total, cp_size, chunk_size)
    group = chunk_size * cp_size
    padded = -(-total // group) * group
    num_chunks = padded // chunk_size
    bounds = np.arange(num_chunks + 1, dtype=np.int64) * chunk_size
    workloads = _readonly(block_areas(spec.table, bounds))
    if cp_size == 1:  # nothing to balance; skips a per-chunk loop when chunk_size is tiny (e.g. 1)
        matrix = np.arange(num_chunks, dtype=np.int64)[None, :]
    else:
        matrix = np.sort(SOLVERS[solver](workloads, cp_size), axis=1)
    loads = workloads[matrix].sum(axis=1)
    mean = loads.sum() / cp_size
    return DispatchPlan(
        cp_size=cp_size,
        chunk_size=chunk_size,
        total_seqlen=total,
        padded_seqlen=padded,
        num_chunks=num_chunks,
        rank_chunks=tuple(_readonly(row.copy()) for row in matrix),
        chunk_workloads=workloads,
        imbalance=float(loads.max() / mean) if mean > 0 else 1.0,
        solver=solver,
    )
