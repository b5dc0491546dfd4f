"""Communication layer: GroupCast / GroupReduce of rows over a process group (no mask knowledge)."""

from .agreement import RankDisagreement, agree
from .group_collective import CommHandle, group_cast, group_reduce
from .transfer import CastPlan, CommVolume, row_bytes, validate_plan

__all__ = ["CastPlan", "RankDisagreement", "agree", "CommHandle", "CommVolume", "group_cast", "group_reduce", "row_bytes", "validate_plan"]
