"""Runtime API: keys, dispatch/undispatch, position ids and distributed attention on the local shard."""

from .api import (
    DEFAULT_NUM_STAGES,
    build_key,
    calc_attn,
    clear_cache,
    dispatch,
    get_most_recent_key,
    get_position_ids,
    undispatch,
)
from .key import DistAttnKey

__all__ = [
    "DEFAULT_NUM_STAGES",
    "DistAttnKey",
    "build_key",
    "calc_attn",
    "clear_cache",
    "dispatch",
    "get_most_recent_key",
    "get_position_ids",
    "undispatch",
]
