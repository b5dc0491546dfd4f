"""Communication layer: GroupCast / GroupReduce of rows over a process group (no mask knowledge)."""

from .group_collective import CommHandle, group_cast, group_reduce
from .transfer import CastPlan, CommVolume, row_bytes, validate_plan

__all__ = ["CastPlan", "CommHandle", "CommVolume", "group_cast", "group_reduce", "row_bytes", "validate_plan"]
