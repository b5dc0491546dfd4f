"""Mask language: AttnMaskType, AttnMaskSpec and the geometry behind them (no kernels, no distribution)."""

from .constructors import (
    block_causal,
    causal,
    from_cu_seqlens,
    from_position_ids,
    prefix_tree,
    sliding_window,
    varlen,
)
from .geometry import SliceTable, block_areas, clip_band, clip_slices, row_key_counts, slice_areas
from .spec import AttnMaskSpec
from .types import AttnMaskType

__all__ = [
    "AttnMaskSpec",
    "AttnMaskType",
    "SliceTable",
    "block_areas",
    "block_causal",
    "causal",
    "clip_band",
    "clip_slices",
    "from_cu_seqlens",
    "from_position_ids",
    "prefix_tree",
    "row_key_counts",
    "slice_areas",
    "sliding_window",
    "varlen",
]
