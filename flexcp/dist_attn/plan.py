"""Per-rank attention plan: which remote keys a rank needs and its slices in buffer coordinates.

Computed on every rank from the mask and the dispatch plan alone (deterministic, no
collectives). A rank's rows are its dispatched chunks; the keys they need are the
union of the key extents of the mask restricted to those rows. Keys it owns form the
host stage; the rest are fetched from their owners, exactly once each (zero
redundancy), in ``num_stages`` remote stages grouped by ring distance so that stage
``s`` on every rank receives from ranks ``rank - d`` and sends to ``rank + d`` for the
same distances ``d`` -- which is what makes every stage one consistent all-to-all.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..sharding.plan import DispatchPlan
from ..mask.cover import CoverageError, check_cover
from ..mask.geometry import SliceTable, clip_band


def _ramp(counts: np.ndarray) -> np.ndarray:
    return np.arange(counts.sum()) - np.repeat(np.cumsum(counts) - counts, counts)


@dataclass(frozen=True)
class Runs:
    """Disjoint key runs ``[start, end)`` in global rows, each placed at ``offset`` in some buffer."""

    start: np.ndarray
    end: np.ndarray
    offset: np.ndarray
    owner: np.ndarray

    def take(self, idx: np.ndarray) -> "Runs":
        return Runs(self.start[idx], self.end[idx], self.offset[idx], self.owner[idx])


@dataclass(frozen=True)
class StagePlan:
    """One remote stage of a rank: whom it receives from and its slices over the receive buffer."""

    distances: tuple[int, ...]
    recv_counts: tuple[int, ...]  # rows received from each source rank (buffer order: by source rank)
    send_rows: tuple[np.ndarray, ...]  # local rows this rank sends to each destination rank, in order
    table: SliceTable  # q: local shard rows, k: receive-buffer rows
    recv_len: int


@dataclass(frozen=True)
class RankAttnPlan:
    """Everything one rank needs to run distributed attention for one key."""

    rank: int
    cp_size: int
    local_len: int
    host_table: SliceTable  # q and k both in local shard rows
    stages: tuple[StagePlan, ...]

    @property
    def remote_rows(self) -> int:
        """Remote key rows received in the forward (and dK/dV rows sent back in the backward)."""
        return sum(s.recv_len for s in self.stages)



def _row_runs(plan: DispatchPlan, rank: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The rank's rows as maximal runs of globally consecutive chunks: (global start, end, local start)."""
    cs = plan.chunk_size
    chunks = plan.rank_chunks[rank]
    if len(chunks) == 0:
        z = np.zeros(0, dtype=np.int64)
        return z, z, z
    first = np.concatenate([[True], np.diff(chunks) != 1])
    starts = chunks[first]
    ends = chunks[np.concatenate([first[1:], [True]])] + 1
    return starts * cs, ends * cs, plan.local_offset_of_chunk[starts]


def _local_pieces(table: SliceTable, plan: DispatchPlan, rank: int) -> tuple[SliceTable, np.ndarray]:
    """The mask restricted to this rank's rows (global coords) and each piece's q shift to local rows.

    Slices are cut only where the rank's rows stop being consecutive, so a rank holding
    neighbouring chunks sees one piece there, not one per chunk (fewer, larger kernel work items).
    """
    live = np.nonzero((table.qe > table.qs) & (table.ke > table.ks))[0]
    t = table.take(live)
    r0, r1, local = _row_runs(plan, rank)
    first = np.searchsorted(r1, t.qs, side="right")
    last = np.searchsorted(r0, t.qe, side="left")
    n = np.maximum(last - first, 0)
    src = np.repeat(np.arange(len(t)), n)
    run = np.repeat(first, n) + _ramp(n)
    pieces, band = clip_band(
        np.maximum(t.qs[src], r0[run]), np.minimum(t.qe[src], r1[run]), t.ks[src], t.ke[src], t.lo[src], t.hi[src]
    )
    prun = run[band]
    return pieces, local[prun] - r0[prun]


def _needed_runs(pieces: SliceTable, plan: DispatchPlan) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Union of the pieces' key extents, cut at chunk boundaries: (start, end, owner) sorted by start."""
    if len(pieces) == 0:
        z = np.zeros(0, dtype=np.int64)
        return z, z, z
    order = np.argsort(pieces.ks, kind="stable")
    s, e = pieces.ks[order], pieces.ke[order]
    run_max = np.maximum.accumulate(e)
    new = np.concatenate([[True], s[1:] > run_max[:-1]])
    idx = np.nonzero(new)[0]
    ms = s[idx]
    me = np.maximum.reduceat(e, idx)
    cs = plan.chunk_size
    k0, k1 = ms // cs, (me - 1) // cs
    n = k1 - k0 + 1
    kc = np.repeat(k0, n) + _ramp(n)
    start = np.maximum(np.repeat(ms, n), kc * cs)
    end = np.minimum(np.repeat(me, n), (kc + 1) * cs)
    return start, end, plan.owner_of_chunk[kc]


def _to_local(rows_start: np.ndarray, rows_end: np.ndarray, plan: DispatchPlan) -> np.ndarray:
    """Local row indices (in the owner's shard) of the global rows in the given in-chunk runs."""
    n = rows_end - rows_start
    return np.repeat(_first_local(rows_start, plan), n) + _ramp(n)


def _merge_runs(runs: Runs) -> Runs:
    """Join neighbouring runs that are contiguous both globally and in their buffer."""
    if len(runs.start) < 2:
        return runs
    joins = (runs.start[1:] == runs.end[:-1]) & (runs.offset[1:] == runs.offset[:-1] + runs.end[:-1] - runs.start[:-1])
    keep = np.concatenate([[True], ~joins])
    ends = runs.end[np.concatenate([keep[1:], [True]])]
    return Runs(runs.start[keep], ends, runs.offset[keep], runs.owner[keep])


def _pieces_over_runs(pieces: SliceTable, q_shift: np.ndarray, runs: Runs) -> SliceTable:
    """Clip every piece to every key run it meets and move it to (local q, buffer k) coordinates."""
    if len(pieces) == 0 or len(runs.start) == 0:
        return SliceTable.concat([])
    runs = _merge_runs(runs)
    first = np.searchsorted(runs.end, pieces.ks, side="right")
    last = np.searchsorted(runs.start, pieces.ke, side="left")
    n = np.maximum(last - first, 0)
    p = np.repeat(np.arange(len(pieces)), n)
    r = np.repeat(first, n) + _ramp(n)
    out, band = clip_band(
        pieces.qs[p],
        pieces.qe[p],
        np.maximum(pieces.ks[p], runs.start[r]),
        np.minimum(pieces.ke[p], runs.end[r]),
        pieces.lo[p],
        pieces.hi[p],
    )
    return out.shifted(q_shift[p[band]], runs.offset[r[band]] - runs.start[r[band]])


def stage_distances(cp_size: int, num_stages: int) -> list[tuple[int, ...]]:
    """Split ring distances 1..cp-1 into ``num_stages`` contiguous groups (nearest first)."""
    d = np.arange(1, cp_size)
    k = max(1, min(num_stages, len(d)))
    return [tuple(int(x) for x in part) for part in np.array_split(d, k) if len(part)]


@dataclass(frozen=True)
class RankNeeds:
    """What one rank's rows need: its mask pieces (global coords), their q shift to local rows, and the key runs.

    ``runs`` is the union of the pieces' key extents cut at chunk boundaries, sorted by start,
    each with its owner; every needed key row appears in exactly one run (the zero-redundancy
    invariant: a run is fetched once, from its owner, in the one stage that covers that owner).
    """

    pieces: SliceTable
    q_shift: np.ndarray
    runs: Runs  # offset unused (0) until a stage places the runs in its buffer

    def from_owner(self, owner: int) -> Runs:
        """The runs owned by ``owner``, ascending by global start."""
        return self.runs.take(np.nonzero(self.runs.owner == owner)[0])


def _needs_by_rank(table: SliceTable, plan: DispatchPlan) -> list[RankNeeds]:
    """Every rank's needs (each rank plans all ranks, so it knows what to send without asking)."""
    out = []
    for r in range(plan.cp_size):
        pieces, shift = _local_pieces(table, plan, r)
        start, end, owner = _needed_runs(pieces, plan)
        out.append(RankNeeds(pieces, shift, Runs(start, end, np.zeros_like(start), owner)))
    return out


def build_rank_plans(table: SliceTable, plan: DispatchPlan, num_stages: int = 1) -> list[RankAttnPlan]:
    """Plans for every rank of the group (each rank needs the others' needs to know what to send)."""
    cp = plan.cp_size
    needs = _needs_by_rank(table, plan)
    plans = []
    for r in range(cp):
        own = needs[r].from_owner(r)
        host_runs = Runs(own.start, own.end, _first_local(own.start, plan), own.owner)
        host_table = _pieces_over_runs(needs[r].pieces, needs[r].q_shift, host_runs)
        stages = tuple(_stage(r, dist, needs, plan) for dist in stage_distances(cp, num_stages))
        plans.append(RankAttnPlan(r, cp, plan.local_len, host_table, stages))
    check_cover(table, _global_tables(plans, plan), "the distributed plan's host and remote stages")
    return plans


def _global_tables(plans: list[RankAttnPlan], plan: DispatchPlan) -> list[SliceTable]:
    """Every rank's host and stage tables moved back to global rows, through the rows the ranks hold and
    send (independently of how the tables were built), for the conservation check."""
    rows = [plan.global_indices(r) for r in range(plan.cp_size)]
    out = []
    for r, p in enumerate(plans):
        out.append(_to_global(p.host_table, rows[r], rows[r], f"rank {r}'s host stage"))
        for s, stage in enumerate(p.stages):
            # the receive buffer: what each source sends this rank in this stage, sources in rank order
            buffer = np.concatenate([rows[src][plans[src].stages[s].send_rows[r]] for src in range(plan.cp_size)])
            if len(buffer) != stage.recv_len:
                raise CoverageError(f"internal error: rank {r}'s stage {s} expects {stage.recv_len} key rows, "
                                    f"its sources send {len(buffer)}; this is a bug in flexcp")
            out.append(_to_global(stage.table, rows[r], buffer, f"rank {r}'s remote stage {s}"))
    return out


def _to_global(t: SliceTable, q_rows: np.ndarray, k_rows: np.ndarray, what: str) -> SliceTable:
    """``t`` in global rows, given the global row of each of its q rows and k rows; every slice must land
    on consecutive global rows (else it would be no slice of the mask)."""
    t = t.nonempty()
    return t.shifted(_shift(q_rows, t.qs, t.qe, what), _shift(k_rows, t.ks, t.ke, what))


def _shift(rows: np.ndarray, start: np.ndarray, end: np.ndarray, what: str) -> np.ndarray:
    """Per range ``[start, end)``: ``rows[i] - i``, which must be constant over the range."""
    shift = rows.astype(np.int64) - np.arange(len(rows), dtype=np.int64)
    run = np.concatenate([[0], np.cumsum(shift[1:] != shift[:-1])])
    bad = np.nonzero(run[start] != run[end - 1])[0]
    if len(bad):
        raise CoverageError(f"internal error: {what} has a slice over rows [{start[bad[0]]}, {end[bad[0]]}) that are "
                            f"not consecutive global rows; this is a bug in flexcp")
    return shift[start]


def _first_local(starts: np.ndarray, plan: DispatchPlan) -> np.ndarray:
    """Local row (in the owner's shard) of each global row."""
    cs = plan.chunk_size
    chunk = starts // cs
    return plan.local_offset_of_chunk[chunk] + (starts - chunk * cs)


def _recv_layout(mine: RankNeeds, sources: list[int], cp: int) -> tuple[Runs, tuple[int, ...]]:
    """The stage's receive buffer: runs from each source rank, sources in rank order, each source's runs
    in global order; returns the runs placed at their buffer offsets (ascending by global start) and
    the rows received from each rank."""
    recv_counts = [0] * cp
    placed = []
    offset = 0
    for src in sorted(sources):
        runs = mine.from_owner(src)
        lens = runs.end - runs.start
        placed.append(Runs(runs.start, runs.end, offset + np.cumsum(lens) - lens, runs.owner))
        recv_counts[src] = int(lens.sum())
        offset += recv_counts[src]
    if not placed:
        z = np.zeros(0, dtype=np.int64)
        return Runs(z, z, z, z), tuple(recv_counts)
    runs = Runs(*(np.concatenate([getattr(p, f) for p in placed]) for f in ("start", "end", "offset", "owner")))
    return runs.take(np.argsort(runs.start, kind="stable")), tuple(recv_counts)


def _send_rows(rank: int, dist: tuple[int, ...], needs: list[RankNeeds], plan: DispatchPlan) -> tuple[np.ndarray, ...]:
    """Local rows this rank sends in a stage: to each ``rank + d``, exactly the runs of ours it needs."""
    cp = plan.cp_size
    rows = [np.zeros(0, dtype=np.int64) for _ in range(cp)]
    for d in dist:
        dst = (rank + d) % cp
        theirs = needs[dst].from_owner(rank)
        rows[dst] = _to_local(theirs.start, theirs.end, plan)
    return tuple(rows)


def _stage(rank: int, dist: tuple[int, ...], needs: list[RankNeeds], plan: DispatchPlan) -> StagePlan:
    """Stage over ring distances ``dist``: receive from ``rank - d``, send to ``rank + d``."""
    cp = plan.cp_size
    mine = needs[rank]
    runs, recv_counts = _recv_layout(mine, [(rank - d) % cp for d in dist], cp)
    table = _pieces_over_runs(mine.pieces, mine.q_shift, runs)
    return StagePlan(tuple(dist), recv_counts, _send_rows(rank, dist, needs, plan), table, sum(recv_counts))
