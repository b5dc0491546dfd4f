"""Mask language: AttnMaskType, AttnMaskSpec and the geometry behind them (no kernels, no distribution)."""

from .constructors import *  # noqa: F403  (every registered mask family)
from .constructors import FAMILIES
from .geometry import SliceTable, block_areas, clip_band, clip_slices, row_key_counts, slice_areas
from .spec import AttnMaskSpec
from .types import AttnMaskType

__all__ = sorted(
    ["AttnMaskSpec", "AttnMaskType", "SliceTable", "block_areas", "clip_band", "clip_slices", "row_key_counts", "slice_areas"]
    + list(FAMILIES)
)
