"""Zero-redundant distributed attention: per-rank stage plans and the autograd function that runs them."""

from .function import DistAttnFunction, DistAttnState
from ..kernels.compose import merge_partials
from .plan import RankAttnPlan, StagePlan, build_rank_plans

__all__ = ["DistAttnFunction", "DistAttnState", "RankAttnPlan", "StagePlan", "build_rank_plans", "merge_partials"]
