"""Zero-redundant distributed attention: per-rank stage plans and the forward/backward that run them."""

from .function import DistAttnState, dist_backward, dist_forward
from ..kernels.compose import merge_partials
from .plan import RankAttnPlan, StagePlan, build_rank_plans

__all__ = ["DistAttnState", "dist_backward", "dist_forward", "RankAttnPlan", "StagePlan", "build_rank_plans", "merge_partials"]
