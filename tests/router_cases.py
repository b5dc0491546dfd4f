"""Cost tables and a mask shared by the router tests (test modules do not import each other)."""

from __future__ import annotations

from flexcp.kernels.costs import Cost
from flexcp.mask import AttnMaskSpec

MIXED = AttnMaskSpec(
    [(0, 30), (20, 60), (60, 84), (64, 100), (0, 18)],
    [(0, 40), (40, 66), (0, 52), (52, 80), (66, 82)],
    ["causal", "inv_causal", "bi_causal", "full", "full"],
    104,
    82,
)
FAST = Cost({"full": 1000.0, "causal": 1000.0, "band": 1000.0}, 0.0, 0.0)
SLOW = Cost({"full": 1.0, "causal": 1.0, "band": 1.0}, 0.0, 0.0)
BANDS_SLOW = Cost({"full": 1000.0, "causal": 1000.0, "band": 1.0}, 0.0, 0.0)
BANDS_FAST = Cost({"full": 1.0, "causal": 1.0, "band": 1000.0}, 0.0, 0.0)
