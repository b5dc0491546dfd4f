"""Sharding: split one sequence over a CP group by the mask's real work (docs/ARCHITECTURE.md).

``build_plan`` chunks and balances; ``dispatch`` / ``undispatch`` move tensors between the
global and the sharded layout; ``position_ids`` gives the global index of local tokens.
"""

from .ops import IGNORE_INDEX, dispatch, position_ids, undispatch
from .plan import DEFAULT_CHUNK_SIZE, DispatchPlan, build_plan, resolve_chunk_size
from .solver import SOLVERS

__all__ = ["DEFAULT_CHUNK_SIZE", "IGNORE_INDEX", "DispatchPlan", "SOLVERS", "build_plan", "dispatch", "position_ids", "resolve_chunk_size", "undispatch"]
