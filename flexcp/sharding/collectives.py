"""The two flat collectives flexcp uses, under the name the installed torch prefers.

torch 2.13 renamed ``all_gather_into_tensor`` / ``reduce_scatter_tensor`` to
``all_gather_single`` / ``reduce_scatter_single`` (same arguments) and warns on every
call of the old names; torch 2.11 and 2.12 have only the old ones.
"""

from __future__ import annotations

import torch.distributed as dist

all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
"""``(output, input, group=None, async_op=False)``: ``output`` holds every rank's ``input``, in rank order."""

reduce_scatter_single = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
"""``(output, input, op=SUM, group=None, async_op=False)``: this rank's slice of the ranks' reduced ``input``."""

__all__ = ["all_gather_single", "reduce_scatter_single"]
