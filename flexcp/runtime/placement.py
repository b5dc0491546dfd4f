"""Choosing the dispatch plan: balanced work versus communication, by a simple time model.

Work-balancing solvers (greedy) scatter chunks, which is ideal for causal and packed
masks but makes every rank fetch almost every remote key of a local mask such as a
sliding window, where contiguous sharding is already balanced, and cuts causal masks
into many more kernel slices than head-tail (zigzag) sharding. ``solver="auto"`` plans
all three and keeps the one whose slowest rank is fastest, modelling a rank's time as
``max(compute + per-slice overhead, communication)`` (the transfers overlap compute).
"""

from __future__ import annotations

from ..sharding import DispatchPlan, build_plan
from ..dist_attn.plan import RankAttnPlan, build_rank_plans
from ..mask import AttnMaskSpec

AUTO_CANDIDATES = ("greedy", "zigzag", "contiguous")

# One remote key row costs about this many attention cells of compute per (q heads / kv heads):
# K+V cast twice (fwd + bwd) in bf16 and dK+dV reduced in fp32 ~ 16 bytes * hkv * d at ~100 GB/s,
# against 14 flops * hq * d per cell at ~400 TFLOP/s (H100-class, measured orders of magnitude).
ROW_COST_IN_CELLS = 4500.0
# Every slice a kernel sees costs partly filled boundary tiles and scheduling: about one 128x128 tile.
SLICE_COST_IN_CELLS = 16384.0


def modeled_time(plan: DispatchPlan, rank_plans: list[RankAttnPlan], num_heads_q: int, num_heads_kv: int) -> float:
    """Slowest rank's modeled time, in units of one attention cell."""
    row_cost = ROW_COST_IN_CELLS * num_heads_kv / num_heads_q
    return max(
        max(float(w) + _num_slices(p) * SLICE_COST_IN_CELLS, p.remote_rows * row_cost)
        for w, p in zip(plan.rank_workloads, rank_plans)
    )


def _num_slices(plan: RankAttnPlan) -> int:
    return len(plan.host_table) + sum(len(s.table) for s in plan.stages)


def choose_plan(
    spec: AttnMaskSpec, cp_size: int, chunk_size: int, solver: str, num_stages: int, num_heads_q: int, num_heads_kv: int
) -> tuple[DispatchPlan, list[RankAttnPlan]]:
    """The dispatch plan and every rank's attention plan for ``solver`` ('auto' picks by modeled time)."""
    candidates = AUTO_CANDIDATES if solver == "auto" and cp_size > 1 else (("greedy",) if solver == "auto" else (solver,))
    best = None
    for name in candidates:
        plan = build_plan(spec, cp_size, chunk_size, solver=name)
        rank_plans = build_rank_plans(spec.table, plan, num_stages)
        t = modeled_time(plan, rank_plans, num_heads_q, num_heads_kv)
        if best is None or t < best[0]:
            best = (t, plan, rank_plans)
    return best[1], best[2]
